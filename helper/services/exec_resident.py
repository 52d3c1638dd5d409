"""Resident supervisors: supervisors that stay at one identity and run command after command.

A one-shot supervisor costs a fork of a Python process per command, plus the copy-on-write faults
and the teardown of that copy: several times the cost of a short command itself.  A *resident*
supervisor is forked once by the forker (:mod:`~chroot_helper.services.exec_forker`), prepares
itself (steps 1 to 4 of :mod:`~chroot_helper.services.exec_spawn`: descriptors, subreaper, the
command's uid/gid/groups, ``no_new_privs``, rlimits) and then serves jobs one at a time over its
``SOCK_SEQPACKET`` channel to the daemon: ``posix_spawn`` (a ``vfork``, no page tables copied),
wait, kill and reap the whole tree, report.  Nothing of one command survives into the next: its
tree is dead and reaped before the exit status is reported.

Used for commands that need no namespace of their own (``network = true``,
``pid_namespace = false``); those that do get a one-shot supervisor, which unshares while still
root.  When the helper runs as root (with ``CAP_SYS_ADMIN`` and ``CAP_SETPCAP``, as the systemd
unit we ship grants), the forker forks each resident as PID 1 of a PID namespace of its own: its
commands can signal nothing outside it (nor kill it: the kernel drops SIGKILL sent to a
namespace's init from inside), and if it dies, the kernel kills everything left in it.
Residents are keyed by identity (uid, gid, groups, rlimits), so commands with the same identity
share them.

Channel messages, daemon -> resident: a job, JSON ``{"argv", "env", "cwd", ...}`` with exactly
three descriptors (stdin, stdout, stderr) beside it, and the client's connection as a fourth when
the resident talks to the client itself; while a command runs, control bytes (see
:mod:`~chroot_helper.services.exec_spawn`).  Resident -> daemon: the status messages of
:mod:`~chroot_helper.services.exec_spawn`, where the exit message ends with :data:`RETIRING`
when the resident exits after this command: after :data:`MAX_JOBS` commands, or once its own CPU
time reaches half its RLIMIT_CPU (the limit applies to the resident too), and the error message
for a client's connection ends with a NUL and the command's name.  EOF on the channel
kills a running tree and ends the resident; an idle resident also ends when the forker has gone.

A resident that talks to a client over the Unix socket keeps the connection after the command
(EXIT with ``keep``) and runs the client's next requests itself (:class:`_Keeper`), logging their
exits (:class:`_ExitLog`), reporting to the daemon only how the connection ends
(:data:`CLOSED_KEPT`, :data:`HANDED_BACK`, :data:`BUSY`) and keeping its state byte (shared
memory the daemon reads if it dies) non-zero while a command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import resource
import select
import signal
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from ..errors import CommandError, RemoteProtocolError
from ..fdpass import ancillary_space, recv_into, scm_rights
from ..protocol import (
    CLOSED,
    HEADER,
    MAX_JSON_PAYLOAD,
    NEED_DATA,
    Connection,
    Error,
    Role,
    Signal,
    Started,
    State,
    encode_event,
    exit_frame,
    request_payload,
)
from .exec_calls import CommandTable, runs_in_resident
from .exec_spawn import (
    FORWARDED_SIGNALS,
    RELEASE,
    STATUS_ERROR,
    SpawnSpec,
    Supervisor,
    _check,
    _close_std,
    _enter,
    _kill_tree,
    _libc,
    _prepare,
    _report_exit,
    _start,
    _start_error,
    _supervise,
    _wait,
)

if TYPE_CHECKING:
    from .exec_forker import Forker

#: The exec service's logger: a resident logs the commands of the connections it keeps.
log = logging.getLogger("chroot_helper.services.exec")

__all__ = [
    "ResidentPool",
    "resident_main",
    "MAX_JOBS",
    "MAX_IDLE",
    "RETIRING",
    "TIMED_OUT",
    "CLOSED_KEPT",
    "HANDED_BACK",
    "BUSY",
    "MAX_REPORT",
]

#: Commands one resident runs before it retires (a fresh fork replaces it).
MAX_JOBS: Final = 10_000
#: Idle residents the daemon keeps per identity; one more is told to exit.
MAX_IDLE: Final = 32
#: In the tail of an exit message: the resident exits after this command.
RETIRING: Final = b"R"
#: In the tail of an exit message: the resident killed the command at its timeout.
TIMED_OUT: Final = b"T"
#: A kept connection has ended (closed by either side, idle too long, or released).
CLOSED_KEPT: Final = b"C"
#: A kept connection's next request, for the daemon: the bytes read, its descriptors beside.
HANDED_BACK: Final = b"B"
#: The answer to :data:`~chroot_helper.services.exec_spawn.RELEASE` while a command runs: the
#: connection ends with it.
BUSY: Final = b"A"
_RELEASE_BYTE: Final = bytes((RELEASE,))
#: One read of a kept connection: room for the largest request frame.
_MAX_REQUEST_READ: Final = HEADER.size + MAX_JSON_PAYLOAD
#: The largest message a resident sends the daemon (a handed-back request and what followed it).
MAX_REPORT: Final = 1 + 2 * _MAX_REQUEST_READ
_STD_FDS: Final = 3
_PR_SET_DUMPABLE: Final = 4
_MAX_JOB: Final = 256 * 1024
_FD_SPACE: Final = ancillary_space(_STD_FDS + 1)
# Plain ints: socket's flag enums would run Python code for each | and &.
_RECV_FLAGS: Final = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_STARTED_FRAME: Final = encode_event(Started())
_decode_json = json.JSONDecoder().decode
#: A kept connection's plans remembered (:meth:`_Keeper._runnable`), and the largest payload kept.
_MAX_PLANS: Final = 64
_MAX_PLANNED_PAYLOAD: Final = 4096
#: Seconds before the count of repeated exit lines is logged (see :class:`_ExitLog`).
_REPEATS_LOGGED_AFTER: Final = 1.0


class _Job(NamedTuple):
    """One command for a resident: what :func:`~chroot_helper.services.exec_spawn._start` needs
    (the resident already has the command's identity)."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    #: stdin, stdout, stderr
    streams: tuple[int, int, int]


def encode_job(
    spec: SpawnSpec,
    *,
    name: str = "",
    timeout: float | None = None,
    started: bool = True,
    keep: bool = False,
    peer: str = "",
) -> bytes:
    """The job message for *spec* (its descriptors travel beside it); *timeout*, *started* (send
    a STARTED frame) and *keep* (keep the connection for the client's next request) apply when
    the client's connection travels with it."""
    return json.dumps(
        {
            "argv": list(spec.argv),
            "env": spec.env,
            "cwd": spec.cwd,
            "name": name,
            "timeout": timeout,
            "started": started,
            "keep": keep,
            "peer": peer,
        }
    ).encode()


class ResidentPool:
    """The daemon's idle residents by identity, and the forker that makes new ones.

    :param forker: asked for a resident when none is idle; after taking the last idle one the pool
        asks for a spare in the background, so a steady load never waits for a fork.
    """

    def __init__(self, forker: Forker) -> None:
        self._forker = forker
        self._idle: dict[bytes, list[_Resident]] = {}
        self._busy: dict[int, _Resident] = {}
        #: Busy residents whose forker has gone: not reused.
        self._forkers_gone: set[_Resident] = set()
        self._refilling: set[bytes] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self,
        spec: SpawnSpec,
        identity: bytes,
        *,
        client: int | None = None,
        name: str = "",
        timeout: float | None = None,
        started: bool = True,
        keep: bool = False,
        peer: str = "",
    ) -> Supervisor:
        """Send *spec* to a resident at *identity*; return at once (the status reports the start).

        With *client* (the client's connection), the resident takes over the rest of the exchange:
        it sends STARTED and EXIT, forwards SIGNAL frames, kills the tree when the client hangs up
        or *timeout* passes, and reports to the daemon only ``E`` or ``X`` (before the EXIT frame);
        with *keep* it keeps the connection for the client's next requests (see :class:`_Keeper`).

        :raises ConnectionError: the forker is gone.
        :raises OSError: no resident could take the job.
        """
        job = encode_job(spec, name=name, timeout=timeout, started=started, keep=keep, peer=peer)
        passed = [spec.stdin, spec.stdout, spec.stderr]
        fds = scm_rights(passed if client is None else [*passed, client])
        idle = self._idle.setdefault(identity, [])
        while True:
            fresh = not idle
            resident = idle.pop() if idle else await self._forker.resident(identity)
            channel, state = resident
            state[0] = 1  # running from now on, as far as the daemon knows
            try:
                channel.sendmsg([job], fds)
            except OSError as exc:  # an idle resident that has exited (its forker died)
                _close(resident)
                if fresh:
                    raise OSError(exc.errno, f"a new supervisor refused its job: {exc}") from None
                continue
            break
        if not idle:
            self._refill(identity)
        fd = channel.fileno()
        self._busy[fd] = resident
        return Supervisor(
            pid=None,
            status_fd=fd,
            control_fd=fd,
            resident=identity,
            handed_off=client is not None,
            state=state,
        )

    def replace_forker(self, forker: Forker) -> None:
        """Ask *forker* for residents from now on (the last one has gone); those of the last one
        exit once idle: the idle ones are let go now, the busy ones when released."""
        self._forker = forker
        for idle in self._idle.values():
            for resident in idle:
                _close(resident)
        self._idle.clear()
        self._forkers_gone.update(self._busy.values())

    def prewarm(self, identity: bytes) -> None:
        """Have a resident at *identity* ready before the first request needs one."""
        if not self._idle.get(identity):
            self._refill(identity)

    def release(self, sup: Supervisor, *, reusable: bool) -> None:
        """Take back *sup*'s resident: idle again when *reusable* (its command has exited and it
        stays), else close its channel (which kills a tree still running; the resident exits)."""
        resident = self._busy.pop(sup.status_fd, None)
        if resident is None:
            return
        reusable = reusable and resident not in self._forkers_gone
        self._forkers_gone.discard(resident)
        idle = self._idle.setdefault(sup.resident or b"", [])
        if reusable and len(idle) < MAX_IDLE:
            idle.append(resident)
        else:
            _close(resident)

    def _refill(self, identity: bytes) -> None:
        if identity in self._refilling:
            return
        self._refilling.add(identity)
        task = asyncio.ensure_future(self._spare(identity))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spare(self, identity: bytes) -> None:
        try:
            resident = await self._forker.resident(identity)
        except OSError:
            return  # the next request finds out, and says so
        finally:
            self._refilling.discard(identity)
        idle = self._idle.setdefault(identity, [])
        if len(idle) < MAX_IDLE:
            idle.append(resident)
        else:
            _close(resident)

    async def close(self) -> None:
        """Close every idle resident's channel (they exit); running ones are released later."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for idle in self._idle.values():
            for resident in idle:
                _close(resident)
        self._idle.clear()


_Resident = tuple[socket.socket, mmap.mmap]
"""The daemon's end of a resident's channel, and its state byte."""


def _close(resident: _Resident) -> None:
    channel, state = resident
    channel.close()
    state.close()


def resident_main(  # pragma: no cover - runs in a resident
    channel: int,
    alive: int,
    identity: bytes,
    state: mmap.mmap,
    table: CommandTable,
    idle_timeout: float,
) -> None:
    """Run in a resident supervisor: prepare once, then serve jobs until told to stop.

    *state* is the byte the daemon reads when this resident dies: non-zero while a command of a
    client's connection runs (then the daemon tells the client it was killed).
    """
    wake_r = _prepare({channel, alive})
    ident = json.loads(identity)
    base = SpawnSpec(
        argv=("",),
        env={},
        cwd="/",
        uid=ident["uid"],
        gid=ident["gid"],
        groups=ident["groups"],
        rlimits=[(int(res), int(limit)) for res, limit in ident["rlimits"]],
        stdin=-1,
        stdout=-1,
        stderr=-1,
    )
    failure: OSError | None = None
    try:
        _enter(base)
        # It serves one client after another: no command of the same uid may ptrace it or read
        # its memory or descriptors (dropping from root already did this; be explicit).
        _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    except OSError as exc:
        failure = exc  # reported to the first job, then this resident exits
    cpu = dict(base.rlimits).get(resource.RLIMIT_CPU)
    sock = socket.socket(fileno=channel)
    poller = select.poll()
    for fd in (channel, alive, wake_r):
        poller.register(fd, select.POLLIN)
    buffer = bytearray(_MAX_JOB)
    keeper = _Keeper(channel, alive, wake_r, table, identity, idle_timeout)
    jobs = 0
    while True:
        ready = dict(poller.poll())
        if wake_r in ready:
            os.read(wake_r, 64)  # a signal while idle: there is no tree to kill
        if channel in ready:
            try:
                data, fds, flags = recv_into(sock, buffer, _FD_SPACE, _RECV_FLAGS)
            except BlockingIOError:
                continue
            if not data:
                return  # the daemon closed the channel
            if len(fds) not in (_STD_FDS, _STD_FDS + 1) or flags & (
                socket.MSG_TRUNC | socket.MSG_CTRUNC
            ):
                for fd in fds:  # a control byte that came after the command ended, or junk
                    os.close(fd)
                continue
            client: _Client | None = None
            try:
                job = json.loads(data)
                command = _Job(tuple(job["argv"]), job["env"], job["cwd"], (fds[0], fds[1], fds[2]))
                if len(fds) > _STD_FDS:
                    client = _Client(fds[3], channel, peer=str(job.get("peer", "")))
                    client.start(
                        job["timeout"],
                        started=job["started"] is not False,
                        keep=job.get("keep") is True,
                        name=str(job["name"]),
                    )
            except (ValueError, KeyError, TypeError, OSError):
                if client is not None:
                    client.sock.detach()  # its descriptor is closed below, with the others
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                with contextlib.suppress(OSError):
                    os.write(channel, STATUS_ERROR + b"malformed job")
                continue
            if failure is not None:
                _refuse(channel, command, failure, client)
                return
            while True:  # the job, then the kept connection's next requests
                # The request's arrival woke this resident, which may have preempted its sender:
                # let the sender reach its recv() first.  While it is still runnable on this CPU,
                # the command starts on another one, and waking an idle CPU (an idle vCPU above
                # all) costs more than the whole exchange.  A no-op when nothing else waits.
                os.sched_yield()
                try:
                    child = _start(command.argv, command.env, command.cwd, command.streams)
                except OSError as exc:
                    keeper.exits.flush()
                    _refuse(channel, command, exc, client, keeper.null_fds)
                    break
                jobs += 1
                times = os.times()
                retire = jobs >= MAX_JOBS or (
                    cpu is not None and times.user + times.system >= cpu / 2
                )
                tail = RETIRING if retire else b""
                if client is None:
                    _supervise(command.streams, child, channel, channel, wake_r, tail)
                    break
                if retire:
                    client.keep = False
                streams = command.streams
                if not _converse(streams, child, channel, wake_r, client, tail, keeper):
                    break
                state[0] = 0
                next_command = keeper.wait(client)
                if next_command is None:
                    break
                if isinstance(next_command, _Quit):
                    return
                state[0] = 1
                command = next_command
            if retire:
                return
        elif alive in ready:
            return  # the forker is gone: idle residents go with it


def _refuse(
    channel: int,
    command: _Job,
    exc: OSError,
    client: _Client | None,
    shared: Collection[int] = (),
) -> None:  # pragma: no cover - runs in a resident
    """The command could not start: tell the daemon, which answers the client (after a NUL, the
    command's name: on a kept connection it need not be the one the daemon handed over)."""
    _close_std(command.streams, shared)
    report = _start_error(command.argv[0], exc)
    if client is not None:
        client.close()
        report += b"\0" + client.name.encode()
    with contextlib.suppress(OSError):
        os.write(channel, report)


def _converse(
    streams: Sequence[int],
    child: int,
    channel: int,
    wake_r: int,
    client: _Client,
    tail: bytes,
    keeper: _Keeper,
) -> bool:  # pragma: no cover - runs in a resident
    """Step 6 with the client's connection: STARTED, wait, kill the tree, report, EXIT.  Return
    whether the connection is kept for the client's next request.

    On a connection it keeps, the resident reports nothing to the daemon and logs the exit itself.
    The command's *streams* are closed, except the *keeper*'s (the resident's own).
    """
    _close_std(streams, keeper.null_fds)
    if client.started:
        client.write(_STARTED_FRAME)
    returncode = _wait(child, channel, wake_r, client)
    _kill_tree(child)
    timed_out = client.timed_out
    if client.keep and client.fd >= 0:
        client.write(exit_frame(returncode, timed_out, False, True))
        if timed_out:
            keeper.exits.flush()
            log.warning("%s: %s timed out", client.peer, client.name)
        keeper.exits.exited(client.peer, client.name, returncode)
        return True
    keeper.exits.flush()
    # The daemon hears first, so it has counted the request as over by the time the client can
    # send another; it never hears when it has gone, and then the client gets no EXIT either
    # (the helper stopped).
    if _report_exit(channel, returncode, tail + (TIMED_OUT if timed_out else b"")):
        client.write(exit_frame(returncode, timed_out, False, False))
    client.close()
    return False


class _Client:
    """The client's connection, handed over by the daemon (see :meth:`ResidentPool.start`).

    Its SIGNAL frames are forwarded; a hang-up or anything else but an ERROR kills the tree, as
    in the daemon.  Implements :class:`~chroot_helper.services.exec_spawn.Watch`.
    """

    def __init__(self, fd: int, channel: int, *, peer: str = "") -> None:
        # The daemon made the socket non-blocking (the flag belongs to the shared open file).
        # Family, type and protocol given: no system calls to look them up.
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
        self._fd = self.fd = fd
        self._channel = channel
        self.peer = peer
        self.start(None)

    def start(
        self, timeout: object, *, started: bool = True, keep: bool = False, name: str = ""
    ) -> None:
        """Begin a request: its *timeout* (seconds or None), whether to send STARTED, whether to
        keep the connection afterwards, and the command's name for the log."""
        if timeout is not None and not isinstance(timeout, int | float):
            raise TypeError("timeout must be a number or null")
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timed_out = False
        self.started = started
        #: Keep the connection for the client's next request once this one is over.
        self.keep = keep
        self.name = name
        #: What the client sends while the command runs (rarely anything): made when it does.
        self.conn: Connection | None = None

    def readable(self) -> list[int]:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        conn = self.conn
        if conn is None:
            conn = self.conn = Connection(Role.SERVER)
            conn.our_state = conn.their_state = State.RUNNING  # its REQUEST has been read
        signals: list[int] = []
        try:
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                if event is CLOSED:
                    raise RemoteProtocolError("the client hung up")
                if isinstance(event, Signal) and event.signal in FORWARDED_SIGNALS:
                    signals.append(event.signal)
                elif not isinstance(event, Error):
                    raise RemoteProtocolError(f"{type(event).__name__} frame is not allowed here")
        except RemoteProtocolError:
            self.fd = -1
            return [signal.SIGKILL]
        return signals

    def expired(self) -> None:
        self.timed_out = True

    def release(self) -> None:
        """The daemon wants the connection back once this command is over."""
        self.keep = False
        with contextlib.suppress(OSError):
            os.write(self._channel, BUSY)

    def write(self, frame: bytes) -> None:
        """Send *frame*, a STARTED or EXIT frame (the client may have gone)."""
        try:
            os.write(self._fd, frame)  # a few bytes: one write, or the client is gone
        except OSError:
            pass  # a client that has gone learns nothing more

    def close(self) -> None:
        self.sock.close()


class _ExitLog:
    """The log lines of a kept connection's exits.  A run of identical lines is logged as its
    first line and then a count, as syslog does ("last message repeated N times"): the count
    comes with the next different line, when the connection ends, or once the client has been
    idle (or the run has lasted) :data:`_REPEATS_LOGGED_AFTER` seconds."""

    def __init__(self) -> None:
        self.line: tuple[str, str, int] | None = None
        #: Lines like :attr:`line` not logged yet.
        self.repeats = 0
        self.since = 0.0

    def exited(self, peer: str, name: str, returncode: int) -> None:
        line = (peer, name, returncode)
        if line == self.line and time.monotonic() - self.since < _REPEATS_LOGGED_AFTER:
            self.repeats += 1
            return
        self.flush()
        log.info("%s: %s exited %d", peer, name, returncode)
        self.line = line
        self.since = time.monotonic()

    def flush(self) -> None:
        """Log the count of the repeats not logged yet."""
        if self.line is not None and self.repeats:
            peer, name, returncode = self.line
            times = "time" if self.repeats == 1 else "times"
            log.info("%s: %s exited %d (%d more %s)", peer, name, returncode, self.repeats, times)
        self.line = None
        self.repeats = 0


class _Plan(NamedTuple):
    """A request a resident may run itself, checked (see :meth:`_Keeper._plan`)."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    #: The descriptors that must come with the request.
    fds: int
    stdin_fd: bool
    stdout_fd: bool
    #: "fd", "null" or "stdout"
    stderr_mode: str
    timeout: float
    started: bool


class _Quit:
    pass


#: :meth:`_Keeper.wait`: the resident must exit (the daemon or the forker has gone).
_QUIT: Final = _Quit()


class _Keeper:
    """Waits on a kept connection for the client's next request (a resident has one at most).

    A request this resident can run (an exec of a command with its identity, no stream piped
    through the daemon, nothing sent after the request yet) it runs at once; anything else goes
    back to the daemon (:data:`HANDED_BACK`) with the bytes and descriptors read so far.  The
    connection is closed, unread, when the client is idle for *idle_timeout* seconds or the daemon
    asks for it (:data:`~chroot_helper.services.exec_spawn.RELEASE`).
    """

    def __init__(
        self,
        channel: int,
        alive: int,
        wake_r: int,
        table: CommandTable,
        identity: bytes,
        idle_timeout: float,
    ) -> None:
        self.channel = channel
        self.alive = alive
        self.wake_r = wake_r
        self.table = table
        #: The commands this resident may run itself: its identity, no namespace of their own.
        self.local = frozenset(
            name
            for name, command in table.commands.items()
            if runs_in_resident(command) and table.identities[name] == identity
        )
        self.idle_timeout = idle_timeout
        #: The resident's /dev/null, for reading and for writing: the streams of mode "null".
        self.null_fds = (
            os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC),
            os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC),
        )
        self.buffer = bytearray(_MAX_REQUEST_READ)
        #: The plans of the requests seen lately, by payload: a client repeats its requests.
        self.plans: dict[bytes, _Plan] = {}
        self.exits = _ExitLog()
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.poller = select.poll()
        for fd in (channel, alive, wake_r):
            self.poller.register(fd, select.POLLIN)

    def wait(self, client: _Client) -> _Job | _Quit | None:
        """The next command to run for *client* (which is set up for it), None once the
        connection has ended (it is closed or back with the daemon), or :data:`_QUIT`."""
        self.poller.register(client.fd, select.POLLIN)
        try:
            return self._next(client)
        finally:
            self.poller.unregister(client.fd)

    def _next(self, client: _Client) -> _Job | _Quit | None:
        deadline = time.monotonic() + self.idle_timeout
        raw = b""
        fds: list[int] = []
        while True:
            remaining = deadline - time.monotonic()
            flush_first = self.exits.repeats > 0 and remaining > _REPEATS_LOGGED_AFTER
            wait = _REPEATS_LOGGED_AFTER if flush_first else remaining
            ready = dict(self.poller.poll(wait * 1000)) if remaining > 0 else {}
            if not ready:
                if flush_first:
                    self.exits.flush()  # the client is idle: time to log the repeats
                    continue
                self._end(client, fds)  # idle too long (or stuck inside a frame)
                return None
            if self.wake_r in ready:
                os.read(self.wake_r, 64)
            if self.alive in ready:
                self._end(client, fds, report=False)
                return _QUIT
            if self.channel in ready:
                message = os.read(self.channel, 64)
                if not message:
                    self._end(client, fds, report=False)
                    return _QUIT
                if _RELEASE_BYTE in message:
                    self._end(client, fds)
                    return None
            if client.fd not in ready:
                continue
            try:
                data, more, flags = recv_into(
                    client.sock,
                    self.buffer,
                    _FD_SPACE,
                    _RECV_FLAGS,
                )
            except BlockingIOError:
                continue
            except OSError:
                data, more, flags = b"", [], 0
            fds += more
            raw += data
            if not data and not raw:
                self._end(client, fds)  # the client closed it between requests
                return None
            if not data or flags & _MSG_CTRUNC or len(fds) > _STD_FDS:
                self._hand_back(client, raw, fds)  # the daemon answers and logs it
                return None
            payload = request_payload(raw)
            if payload is NEED_DATA:
                continue
            job = None if payload is None else self._runnable(payload, client, fds)
            if job is None:
                self._hand_back(client, raw, fds)
            return job

    def _runnable(self, payload: bytes, client: _Client, fds: list[int]) -> _Job | None:
        """The command for a REQUEST's *payload* if this resident may run it as the daemon would;
        *client* is then set up for it.  Anything else, valid or not, is the daemon's to answer."""
        if client.conn is not None and client.conn.buffered:
            return None  # part of a frame sent while the last command ran
        plan = self.plans.get(payload)
        if plan is None:
            plan = self._plan(payload)
            if plan is None:
                return None
            if len(payload) <= _MAX_PLANNED_PAYLOAD:
                if len(self.plans) >= _MAX_PLANS:
                    del self.plans[next(iter(self.plans))]
                self.plans[payload] = plan
        if plan.fds != len(fds):
            return None
        fd = iter(fds)
        null_r, null_w = self.null_fds
        stdin = next(fd) if plan.stdin_fd else null_r
        stdout = next(fd) if plan.stdout_fd else null_w
        mode = plan.stderr_mode
        stderr = next(fd) if mode == "fd" else stdout if mode == "stdout" else null_w
        if self.debug:
            log.debug("%s: exec %s", client.peer, plan.name)
        client.start(plan.timeout, started=plan.started, keep=True, name=plan.name)
        return _Job(plan.argv, plan.env, plan.cwd, (stdin, stdout, stderr))

    def _plan(self, payload: bytes) -> _Plan | None:
        """What a REQUEST's *payload* asks for if this resident may run it; it depends on nothing
        but the payload (the descriptors that came with it are counted against ``fds``)."""
        try:
            request = _decode_json(payload.decode())
        except (ValueError, RecursionError):
            return None
        if type(request) is not dict or request.get("op") != "exec":
            return None
        if request.get("token") is not None:
            return None  # for the daemon to check (and refuse: this is the Unix socket)
        params = request.get("params")
        passed = request.get("fds")
        if type(params) is not dict or type(passed) is not int:
            return None
        try:
            call = self.table.parse(params, passed)
        except CommandError:
            return None
        command = call.command
        if command.name not in self.local or call.piped:
            return None
        modes = call.modes
        return _Plan(
            name=command.name,
            argv=call.argv,
            env=command.env,
            cwd=command.cwd,
            fds=passed,
            stdin_fd=modes["stdin"] == "fd",
            stdout_fd=modes["stdout"] == "fd",
            stderr_mode=modes["stderr"],
            timeout=call.timeout,
            started=call.started,
        )

    def _hand_back(self, client: _Client, raw: bytes, fds: list[int]) -> None:
        self.exits.flush()
        try:
            _send_message(self.channel, HANDED_BACK + raw, fds)
        except OSError:  # the daemon cannot take it: end the connection instead
            self._end(client, fds)
            return
        self._end(client, fds, report=False)

    def _end(self, client: _Client, fds: list[int], *, report: bool = True) -> None:
        self.exits.flush()
        for fd in fds:
            os.close(fd)
        client.close()
        if report:
            with contextlib.suppress(OSError):
                os.write(self.channel, CLOSED_KEPT)


def _send_message(channel: int, data: bytes, fds: list[int]) -> None:  # pragma: no cover
    sock = socket.socket(fileno=channel)
    try:
        sock.sendmsg([data], scm_rights(fds))
    finally:
        sock.detach()

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
root.  Residents are keyed by identity (uid, gid, groups, rlimits), so commands with the same
identity share them.

Channel messages, daemon -> resident: a job, JSON ``{"argv", "env", "cwd"}`` with exactly three
descriptors (stdin, stdout, stderr) beside it; while a command runs, control bytes (see
:mod:`~chroot_helper.services.exec_spawn`).  Resident -> daemon: the status messages of
:mod:`~chroot_helper.services.exec_spawn`, where the exit message ends with :data:`RETIRING`
when the resident exits after this command: after :data:`MAX_JOBS` commands, or once its own CPU
time reaches half its RLIMIT_CPU (the limit applies to the resident too).  EOF on the channel
kills a running tree and ends the resident; an idle resident also ends when the forker has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ..errors import RemoteProtocolError
from ..fdpass import ancillary_space, recv_into, scm_rights
from ..protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Error,
    Event,
    Exit,
    Role,
    Signal,
    Started,
    State,
    encode_event,
)
from .exec_spawn import (
    FORWARDED_SIGNALS,
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

__all__ = [
    "ResidentPool",
    "identity_of",
    "resident_main",
    "MAX_JOBS",
    "MAX_IDLE",
    "RETIRING",
    "TIMED_OUT",
]

#: Commands one resident runs before it retires (a fresh fork replaces it).
MAX_JOBS: Final = 10_000
#: Idle residents the daemon keeps per identity; one more is told to exit.
MAX_IDLE: Final = 32
#: In the tail of an exit message: the resident exits after this command.
RETIRING: Final = b"R"
#: In the tail of an exit message: the resident killed the command at its timeout.
TIMED_OUT: Final = b"T"
_STD_FDS: Final = 3
_PR_SET_DUMPABLE: Final = 4
_MAX_JOB: Final = 256 * 1024
_FD_SPACE: Final = ancillary_space(_STD_FDS + 1)


def identity_of(
    *, uid: int, gid: int, groups: Sequence[int], rlimits: Sequence[tuple[int, int]]
) -> bytes:
    """The key of the residents that can run a command: who it runs as, under which limits."""
    return json.dumps(
        {
            "uid": uid,
            "gid": gid,
            "groups": list(groups),
            "rlimits": [list(pair) for pair in rlimits],
        },
        sort_keys=True,
    ).encode()


def encode_job(
    spec: SpawnSpec, *, name: str = "", timeout: float | None = None, started: bool = True
) -> bytes:
    """The job message for *spec* (its descriptors travel beside it); *timeout* and *started*
    (send a STARTED frame) apply when the client's connection travels with it."""
    return json.dumps(
        {
            "argv": list(spec.argv),
            "env": spec.env,
            "cwd": spec.cwd,
            "name": name,
            "timeout": timeout,
            "started": started,
        }
    ).encode()


class ResidentPool:
    """The daemon's idle residents by identity, and the forker that makes new ones.

    :param forker: asked for a resident when none is idle; after taking the last idle one the pool
        asks for a spare in the background, so a steady load never waits for a fork.
    """

    def __init__(self, forker: Forker) -> None:
        self._forker = forker
        self._idle: dict[bytes, list[socket.socket]] = {}
        self._busy: dict[int, socket.socket] = {}
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
    ) -> Supervisor:
        """Send *spec* to a resident at *identity*; return at once (the status reports the start).

        With *client* (the client's connection), the resident takes over the rest of the exchange:
        it sends STARTED and EXIT, forwards SIGNAL frames, kills the tree when the client hangs up
        or *timeout* passes, and reports to the daemon only ``E`` or ``X`` (before the EXIT frame).

        :raises ConnectionError: the forker is gone.
        :raises OSError: no resident could take the job.
        """
        job = encode_job(spec, name=name, timeout=timeout, started=started)
        passed = [spec.stdin, spec.stdout, spec.stderr]
        fds = scm_rights(passed if client is None else [*passed, client])
        idle = self._idle.setdefault(identity, [])
        while True:
            fresh = not idle
            channel = idle.pop() if idle else await self._forker.resident(identity)
            try:
                channel.sendmsg([job], fds)
            except OSError as exc:  # an idle resident that has exited (its forker died)
                channel.close()
                if fresh:
                    raise OSError(exc.errno, f"a new supervisor refused its job: {exc}") from None
                continue
            break
        if not idle:
            self._refill(identity)
        fd = channel.fileno()
        self._busy[fd] = channel
        return Supervisor(
            pid=None, status_fd=fd, control_fd=fd, resident=identity, handed_off=client is not None
        )

    def prewarm(self, identity: bytes) -> None:
        """Have a resident at *identity* ready before the first request needs one."""
        if not self._idle.get(identity):
            self._refill(identity)

    def release(self, sup: Supervisor, *, reusable: bool) -> None:
        """Take back *sup*'s resident: idle again when *reusable* (its command has exited and it
        stays), else close its channel (which kills a tree still running; the resident exits)."""
        channel = self._busy.pop(sup.status_fd, None)
        if channel is None:
            return
        idle = self._idle.setdefault(sup.resident or b"", [])
        if reusable and len(idle) < MAX_IDLE:
            idle.append(channel)
        else:
            channel.close()

    def _refill(self, identity: bytes) -> None:
        if identity in self._refilling:
            return
        self._refilling.add(identity)
        task = asyncio.ensure_future(self._spare(identity))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spare(self, identity: bytes) -> None:
        try:
            channel = await self._forker.resident(identity)
        except OSError:
            return  # the next request finds out, and says so
        finally:
            self._refilling.discard(identity)
        idle = self._idle.setdefault(identity, [])
        if len(idle) < MAX_IDLE:
            idle.append(channel)
        else:
            channel.close()

    async def close(self) -> None:
        """Close every idle resident's channel (they exit); running ones are released later."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for idle in self._idle.values():
            for channel in idle:
                channel.close()
        self._idle.clear()


def resident_main(channel: int, alive: int, identity: bytes) -> None:  # pragma: no cover
    """Run in a resident supervisor: prepare once, then serve jobs until told to stop."""
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
    jobs = 0
    while True:
        ready = dict(poller.poll())
        if wake_r in ready:
            os.read(wake_r, 64)  # a signal while idle: there is no tree to kill
        if channel in ready:
            try:
                data, fds, flags = recv_into(
                    sock, buffer, _FD_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                )
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
            try:
                job = json.loads(data)
                spec = SpawnSpec(
                    argv=job["argv"],
                    env=job["env"],
                    cwd=job["cwd"],
                    uid=base.uid,
                    gid=base.gid,
                    groups=base.groups,
                    rlimits=base.rlimits,
                    stdin=fds[0],
                    stdout=fds[1],
                    stderr=fds[2],
                )
                client = (
                    None
                    if len(fds) == _STD_FDS
                    else _Client(fds[3], job["timeout"], started=job["started"] is not False)
                )
            except (ValueError, KeyError, TypeError, OSError):
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                with contextlib.suppress(OSError):
                    os.write(channel, STATUS_ERROR + b"malformed job")
                continue
            if failure is not None:
                _refuse(channel, spec, failure, client)
                return
            try:
                child = _start(spec)
            except OSError as exc:
                _refuse(channel, spec, exc, client)
                continue
            jobs += 1
            times = os.times()
            retire = jobs >= MAX_JOBS or (cpu is not None and times.user + times.system >= cpu / 2)
            tail = RETIRING if retire else b""
            if client is None:
                _supervise(spec, child, channel, channel, wake_r, tail)
            else:
                _converse(spec, child, channel, wake_r, client, tail)
            if retire:
                return
        elif alive in ready:
            return  # the forker is gone: idle residents go with it


def _refuse(
    channel: int, spec: SpawnSpec, exc: OSError, client: _Client | None
) -> None:  # pragma: no cover - runs in a resident
    """The command could not start: tell the daemon, which answers the client."""
    _close_std(spec)
    if client is not None:
        client.close()
    with contextlib.suppress(OSError):
        os.write(channel, _start_error(spec, exc))


def _converse(
    spec: SpawnSpec, child: int, channel: int, wake_r: int, client: _Client, tail: bytes
) -> None:  # pragma: no cover - runs in a resident
    """Step 6 with the client's connection: STARTED, wait, kill the tree, report, EXIT."""
    _close_std(spec)
    if client.started:
        client.send(Started())
    returncode = _wait(child, channel, wake_r, client)
    _kill_tree(child)
    # The daemon hears first, so it has counted the request as over by the time the client
    # can send another; it never hears when it has gone, and then the client gets no EXIT
    # either (the helper stopped).
    if _report_exit(channel, returncode, tail + (TIMED_OUT if client.timed_out else b"")):
        client.send(Exit(returncode=returncode, timed_out=client.timed_out))
    client.close()


class _Client:
    """The client's connection, handed over by the daemon (see :meth:`ResidentPool.start`).

    Its SIGNAL frames are forwarded; a hang-up or anything else but an ERROR kills the tree, as
    in the daemon.  Implements :class:`~chroot_helper.services.exec_spawn.Watch`.
    """

    def __init__(self, fd: int, timeout: object, *, started: bool = True) -> None:
        if timeout is not None and not isinstance(timeout, int | float):
            raise TypeError("timeout must be a number or null")
        # The daemon made the socket non-blocking (the flag belongs to the shared open file);
        # plain reads and writes on the descriptor need no socket object.
        self._fd = self.fd = fd
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timed_out = False
        self.started = started
        self.conn: Connection | None = None  # made when the client first sends something

    def readable(self) -> list[int]:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        signals: list[int] = []
        if self.conn is None:
            self.conn = Connection(Role.SERVER)
            self.conn.our_state = self.conn.their_state = State.RUNNING  # the daemon read REQUEST
        try:
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not NEED_DATA:
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

    def send(self, event: Event) -> None:
        with contextlib.suppress(OSError):  # a client that has gone learns nothing more
            os.write(self._fd, encode_event(event))  # a few bytes: one write, or the client is gone

    def close(self) -> None:
        os.close(self._fd)

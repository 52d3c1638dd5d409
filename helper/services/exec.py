"""The exec service: run allowlisted commands for jailed apps.

Only commands configured as ``[exec.NAME]`` run, with the configured argv prefix plus the caller's
arguments (checked against ``args``), never through a shell, with a clean environment, as the
configured user, under a supervisor that kills and reaps the whole process tree (see
:mod:`chroot_helper.services.exec_spawn`).

Request parameters (op ``exec``)::

    {"command": "echo" | "/bin/echo",      # a table name, argv[0], or argv[0]'s basename
     "args": ["hello"],                   # appended to argv
     "stdin":  "pipe" | "fd" | "null",    # pipe: DATA frames; fd: passed with SCM_RIGHTS
     "stdout": "pipe" | "fd" | "null",
     "stderr": "pipe" | "fd" | "null" | "stdout",
     "timeout": 5.0 | null,               # may only shorten the configured timeout
     "started": true}                     # false: no STARTED frame (the caller just waits)

Passed fds come in the order stdin, stdout, stderr (only those whose mode is ``"fd"``).  The reply
is a STARTED frame once the command runs (unless ``started`` is false), DATA frames for piped
output as it is produced, then one EXIT frame.  ``max_output`` counts only
piped output: a caller that passes its own fds keeps what the command writes (``max_file_size``
still caps regular files).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Final

from ..config import CommandConfig
from ..errors import CommandError, RemoteProtocolError, error_code
from ..fdpass import ancillary_space, fds_from_ancdata
from ..privileges import CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN
from ..protocol import MAX_DATA_PAYLOAD, MAX_FDS, Data, Error, Exit, Request, Signal, Started
from ..server import Channel, Service, wait_fd
from .exec_calls import Call, CommandTable, runs_in_resident
from .exec_forker import Forker
from .exec_resident import (
    BUSY,
    CLOSED_KEPT,
    HANDED_BACK,
    MAX_REPORT,
    RETIRING,
    TIMED_OUT,
    ResidentPool,
)
from .exec_spawn import (
    FORWARDED_SIGNALS,
    KILL_TREE,
    RELEASE,
    STATUS_ERROR,
    STATUS_EXIT,
    SpawnSpec,
    Supervisor,
    spawn,
)

__all__ = ["ExecService", "FORWARDED_SIGNALS"]

log = logging.getLogger(__name__)

_CHUNK: Final = MAX_DATA_PAYLOAD - 1
_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20
_CODE = struct.Struct("!i")
#: Seconds the daemon waits for residents to give back idle kept connections.
_RELEASE_WAIT: Final = 1.0
_REPORT_FDS: Final = ancillary_space(MAX_FDS)


class ExecService(Service):
    """Runs ``[exec.NAME]`` commands.

    :param commands: the validated command tables by name.
    """

    name = "exec"

    def __init__(
        self, commands: Mapping[str, CommandConfig], *, idle_timeout: float = 10.0
    ) -> None:
        self.table = CommandTable(commands)
        self.idle_timeout = idle_timeout
        self.commands = self.table.commands
        self._running: set[Supervisor] = set()
        caps = {CAP_SETUID, CAP_SETGID}
        if any(not cmd.network or cmd.pid_namespace for cmd in commands.values()):
            caps.add(CAP_SYS_ADMIN)
        self.capabilities = frozenset(caps)
        self._forker: Forker | None = None
        self._pool: ResidentPool | None = None
        self._forker_pids: list[int] = []
        self._reaping: set[asyncio.Future[None]] = set()
        #: /dev/null for reading and for writing, shared by every command with a "null" stream.
        self.null_fds: tuple[int, int] = (-1, -1)
        #: Commands whose resident talks to the client, by the descriptor their outcome comes on.
        self.handoffs: dict[int, _Handoff] = {}

    async def start(self) -> None:
        """Start the forker that forks supervisors off the loop (see
        :mod:`~chroot_helper.services.exec_forker`)."""
        if self.commands:
            self.null_fds = (os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY))
            self._forker = self._start_forker()
            self._pool = ResidentPool(self._forker)
            for name, cmd in self.commands.items():
                if runs_in_resident(cmd):
                    self._pool.prewarm(self.table.identities[name])

    async def spawn(
        self,
        spec: SpawnSpec,
        *,
        name: str,
        client: int | None = None,
        timeout: float = 0,
        started: bool = True,
        keep: bool = False,
        peer: str = "",
    ) -> Supervisor:
        """Start *spec* under a supervisor: a resident one, or a one-shot one from the forker's
        pool (for commands with namespaces of their own), else by forking here.

        A resident also takes over the *client* connection when given one (see
        :meth:`ResidentPool.start`; the result says whether it did).
        """
        for _ in range(2):  # a second time with another forker if this one has gone
            forker, pool = self._forker, self._pool
            if forker is None or pool is None:
                break
            try:
                if spec.network and not spec.pid_namespace:
                    return await pool.start(
                        spec,
                        self.table.identities[name],
                        client=client,
                        name=name,
                        timeout=timeout,
                        started=started,
                        keep=keep,
                        peer=peer,
                    )
                return forker.spawn(spec)
            except BlockingIOError:
                log.info("the forker's queue is full; forking a supervisor in the daemon")
            except ConnectionError as exc:
                log.warning("the forker is gone (%s); starting another forker", exc)
                self._restart_forker()
                continue
            except OSError as exc:
                log.warning("no supervisor from the forker (%s); forking one in the daemon", exc)
            break
        return spawn(spec)

    def _start_forker(self) -> Forker:
        one_shot = any(not runs_in_resident(cmd) for cmd in self.commands.values())
        forker = Forker.start(
            self.capabilities, self.table, pool=one_shot, idle_timeout=self.idle_timeout
        )
        self._forker_pids.append(forker.pid)
        return forker

    def _restart_forker(self) -> None:
        """Start another forker in place of one that has gone (it is the subreaper that kills
        what a killed supervisor leaves behind); without one, supervisors are forked here."""
        if self._forker is None or self._pool is None:
            return
        gone = self._forker
        gone.close()
        self._forker = None
        self._forker_pids.remove(gone.pid)
        reaping = asyncio.ensure_future(_reap(gone.pid))
        self._reaping.add(reaping)
        reaping.add_done_callback(self._reaping.discard)
        try:
            forker = self._start_forker()
        except OSError as exc:
            log.warning("cannot start another forker (%s); forking supervisors in the daemon", exc)
            return
        self._forker = forker
        self._pool.replace_forker(forker)

    def release(self, sup: Supervisor, *, reusable: bool) -> None:
        """Done with *sup*: a resident goes back to the pool when *reusable*; anything else is
        closed (which kills a tree still running)."""
        if sup.resident is not None and self._pool is not None:
            self._pool.release(sup, reusable=reusable and self._forker is not None)
            return
        _close(sup.status_fd)
        _close(sup.control_fd)

    def settle(self) -> None:
        """End the requests whose resident has already reported the outcome."""
        for handoff in list(self.handoffs.values()):
            handoff.settle()

    async def release_idle(self) -> None:
        """Take back the kept connections that wait for a request, so that their slots go to
        others: each resident closes its idle one, or ends it with the command it runs now."""
        answers = [handoff.release() for handoff in list(self.handoffs.values()) if handoff.idle]

        if answers:
            await asyncio.wait(answers, timeout=_RELEASE_WAIT)

    async def stop(self) -> None:
        """Kill every tree still running (normally none: connections end first), stop the forker."""
        for handoff in self.handoffs.values():
            handoff.abandon()
        self.handoffs.clear()
        for sup in list(self._running):
            self.release(sup, reusable=False)
        self._running.clear()
        if self._pool is not None:
            await self._pool.close()
        if self._forker is not None:
            self._forker.close()
            self._forker = None
        _close_all([fd for fd in self.null_fds if fd >= 0])
        self.null_fds = (-1, -1)
        for pid in self._forker_pids:
            await _reap(pid)
        self._forker_pids.clear()

    async def handle_exec(self, request: Request, channel: Channel) -> None:
        """Run one command for *channel*'s peer and stream its output and exit status."""
        passed = channel.take_fds()
        try:
            call = self.table.parse(request.params, request.fds)
        except BaseException:
            _close_all(passed)
            raise
        await _Run(call, channel, passed, self).run()


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        _close(fd)


class _Run:
    """One command's life on the daemon side."""

    def __init__(
        self, call: Call, channel: Channel, passed: list[int], service: ExecService
    ) -> None:
        self.call = call
        self.channel = channel
        self.passed = passed
        self.service = service
        self.running = service._running
        self.output = 0
        self.timed_out = False
        self.output_limited = False
        self.sup: Supervisor | None = None

    def _pipes(self) -> tuple[list[int], int | None, dict[int, int]]:
        """Return (child fds [in, out, err], our stdin write end, {our read end: stream}).

        On failure, closes what it opened (the passed fds stay with the caller).
        """
        modes = self.call.modes
        passed = iter(self.passed)
        child: list[int] = []
        stdin_w: int | None = None
        readers: dict[int, int] = {}
        opened: list[int] = []
        try:
            for index, stream in enumerate(("stdin", "stdout", "stderr")):
                mode = modes[stream]
                if mode == "fd":
                    child.append(next(passed))
                elif mode == "null":
                    child.append(self.service.null_fds[0 if index == 0 else 1])
                elif mode == "stdout":
                    child.append(child[1])
                else:
                    r, w = os.pipe()
                    opened += (r, w)
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(r, _F_SETPIPE_SZ, _PIPE_SIZE)
                    if index == 0:
                        child.append(r)
                        stdin_w = w
                        os.set_blocking(w, False)
                    else:
                        child.append(w)
                        readers[r] = index
                        os.set_blocking(r, False)
        except BaseException:
            _close_all(opened)
            raise
        return child, stdin_w, readers

    def _track(self) -> None:
        assert self.sup is not None
        self.running.add(self.sup)
        log.debug("%s: exec %s", self.channel.peer, self.call.command.name)
        self.channel.keep()
        self.service.handoffs[self.sup.status_fd] = _Handoff(self)

    async def run(self) -> None:
        cmd = self.call.command
        child_fds: list[int] = []
        stdin_w: int | None = None
        readers: dict[int, int] = {}
        try:
            child_fds, stdin_w, readers = self._pipes()
            spec = self.service.table.spec(self.call, child_fds)
            handoff = None if self.call.piped else self.channel.handoff_fd()
            self.sup = await self.service.spawn(
                spec,
                client=handoff,
                name=cmd.name,
                timeout=self.call.timeout,
                started=self.call.started,
                keep=self.channel.peer.transport == "unix",
                peer=str(self.channel.peer),
            )
        except BaseException:
            _close_all([*readers, *([stdin_w] if stdin_w is not None else [])])
            raise
        finally:
            _close_all(sorted((set(child_fds) - set(self.service.null_fds)) | set(self.passed)))
        sup = self.sup
        if sup.handed_off:
            self._track()
            return
        self.running.add(sup)
        log.debug("%s: exec %s", self.channel.peer, cmd.name)
        status = _StatusReader(sup.status_fd, messages=sup.resident is not None)
        tasks: list[asyncio.Task[None]] = []
        try:
            started = await status.read_start()
            if started is not None:
                _close_all([*readers, *([stdin_w] if stdin_w is not None else [])])
                readers, stdin_w = {}, None
                raise CommandError(f"[exec.{cmd.name}] could not start: {started}")
            if self.call.started:
                await self.channel.send(Started())
            pumps = [
                asyncio.ensure_future(self._pump(fd, stream)) for fd, stream in readers.items()
            ]
            tasks.extend(pumps)
            readers = {}
            client = asyncio.ensure_future(self._client_events(stdin_w))
            stdin_w = None
            tasks.append(client)
            try:
                async with asyncio.timeout(self.call.timeout):
                    returncode = await status.read_exit()
            except TimeoutError:
                self.timed_out = True
                log.warning(
                    "%s: %s timed out after %s s", self.channel.peer, cmd.name, self.call.timeout
                )
                self.kill()
                returncode = await status.read_exit()
            # The tree is dead and reaped, so the pipes reach EOF: forward the rest, then EXIT.
            # A client that stops reading gets as long again as the command had, no more: it
            # must not hold its concurrency slot forever.
            grace = max(self.call.timeout, 1.0)
            try:
                if pumps:
                    async with asyncio.timeout(grace):
                        await asyncio.gather(*pumps)
            except TimeoutError:
                log.warning(
                    "%s: read no output for %s s after %s ended", self.channel.peer, grace, cmd.name
                )
                raise ConnectionError(
                    f"the client read no output for {grace} s after {cmd.name} ended; dropped"
                ) from None
            client.cancel()
            # Over before the client hears it: its next request must not find this one counted.
            self.channel.release()
            await self.channel.send(
                Exit(
                    returncode=returncode,
                    timed_out=self.timed_out,
                    output_limited=self.output_limited,
                )
            )
            log.info("%s: %s exited %d", self.channel.peer, cmd.name, returncode)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            _close_all([*readers, *([stdin_w] if stdin_w is not None else [])])
            if sup in self.running:  # not yet released by ExecService.stop
                self.running.discard(sup)
                self.service.release(sup, reusable=status.reusable)  # kills a running tree
            if sup.pid is not None:
                await _reap(sup.pid)

    def kill(self) -> None:
        """Ask the supervisor to SIGKILL the whole tree now."""
        self.signal(KILL_TREE)

    def signal(self, signum: int) -> None:
        assert self.sup is not None
        with contextlib.suppress(OSError):
            os.write(self.sup.control_fd, bytes((signum,)))

    async def _pump(self, fd: int, stream: int) -> None:
        """Forward one output pipe to the client until EOF, enforcing max_output."""
        limit = self.call.command.max_output
        try:
            while True:
                try:
                    data = os.read(fd, _CHUNK)
                except BlockingIOError:
                    await wait_fd(fd)
                    continue
                if not data:
                    break
                if self.output_limited:
                    continue  # drain until the killed tree's pipe closes
                room = limit - self.output
                if len(data) > room:
                    data = data[:room]
                    self.output_limited = True
                    log.warning(
                        "%s: %s passed max_output = %d bytes; killing it",
                        self.channel.peer,
                        self.call.command.name,
                        limit,
                    )
                    self.kill()
                self.output += len(data)
                if data:
                    await self.channel.send(Data(stream=stream, data=data))
            await self.channel.send(Data(stream=stream, data=b""))
        finally:
            _close(fd)

    async def _client_events(self, stdin_w: int | None) -> None:
        """Feed stdin, forward signals; kill the tree if the client goes away."""
        try:
            while True:
                event = await self.channel.receive()
                if event is None:
                    log.info(
                        "%s: client closed; killing %s", self.channel.peer, self.call.command.name
                    )
                    self.kill()
                    return
                if isinstance(event, Signal):
                    if event.signal not in FORWARDED_SIGNALS:
                        raise RemoteProtocolError(f"signal {event.signal} may not be forwarded")
                    self.signal(event.signal)
                elif isinstance(event, Data):
                    if stdin_w is None:
                        if self.call.modes["stdin"] != "pipe":
                            raise RemoteProtocolError("stdin data sent but stdin is not 'pipe'")
                        continue  # the command closed its stdin; drop the rest
                    if not event.data:
                        _close(stdin_w)
                        stdin_w = None
                        continue
                    if not await _write_all(stdin_w, event.data):
                        _close(stdin_w)
                        stdin_w = None
        except (RemoteProtocolError, ConnectionError) as exc:
            log.warning("%s: %s; killing %s", self.channel.peer, exc, self.call.command.name)
            self.kill()
        finally:
            if stdin_w is not None:
                _close(stdin_w)


async def _write_all(fd: int, data: bytes) -> bool:
    """Write *data* to a non-blocking pipe; False once the reader has gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await wait_fd(fd, write=True)
        except BrokenPipeError:
            return False
    return True


class _StatusReader:
    """Reads the supervisor's status: a pipe, or a resident's channel (one message per read).

    :param messages: the status comes in messages (a resident): an error message is complete
        as read, and the channel stays open after it.
    """

    def __init__(self, fd: int, *, messages: bool = False) -> None:
        self.fd = fd
        self.messages = messages
        if not messages:
            os.set_blocking(fd, False)
        self.buffer = b""
        self.eof = False
        self._waiter: asyncio.Future[None] | None = None
        #: The exit status arrived from a resident that can serve another command.
        self.reusable = False

    def _read_some(self) -> bool:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        self.buffer += data
        self.eof = not data
        return True

    async def _fill(self, need: int) -> None:
        loop = asyncio.get_running_loop()
        while len(self.buffer) < need and not self.eof:
            if self._read_some():
                continue
            self._waiter = loop.create_future()
            loop.add_reader(self.fd, _wake, self._waiter)
            try:
                await self._waiter
            finally:
                loop.remove_reader(self.fd)
                self._waiter = None

    async def read_start(self) -> str | None:
        """None once the command started, else the reason it could not."""
        await self._fill(1)
        tag, self.buffer = self.buffer[:1], self.buffer[1:]
        if tag == b"S":
            return None
        if not (self.messages and tag == STATUS_ERROR):
            await self._fill(1 << 16)
        return self.buffer.decode(errors="replace") or "the supervisor died"

    async def read_exit(self) -> int:
        await self._fill(1 + _CODE.size)
        if self.buffer[:1] != STATUS_EXIT or len(self.buffer) < 1 + _CODE.size:
            return -signal.SIGKILL  # the supervisor itself was killed
        self.reusable = self.messages and RETIRING not in self.buffer[1 + _CODE.size :]
        return int(_CODE.unpack_from(self.buffer, 1)[0])


class _Handoff:
    """A command whose resident talks to the client itself (see
    :meth:`~chroot_helper.services.exec_resident.ResidentPool.start`), and the connection's later
    requests while the resident keeps it.

    The daemon keeps the request counted and its own copy of the connection open for as long as
    the resident has it, and reads the resident's reports in a loop callback (no task):

    * ``X`` the exit status, sent just before the client's EXIT, when the resident does not keep
      the connection: the request ends;
    * ``E`` the command could not start (then NUL and its name): the daemon answers the client;
    * ``C`` the kept connection ended; ``B`` it is back, with the next request's bytes and
      descriptors, for the daemon to serve (a command of another identity, or piped streams);
    * ``A`` a command runs: the connection ends with it (the answer to a release);
    * the end of the channel: the resident died; if its state byte says a command ran, the
      client gets EXIT -9.

    While the resident keeps the connection it runs the client's next requests and logs them
    without a word to the daemon.
    """

    def __init__(self, run: _Run) -> None:
        assert run.sup is not None
        self.run = run
        self.sup = run.sup
        self.name = run.call.command.name
        self._answer: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._sock = socket.socket(fileno=self.sup.status_fd)
        self._loop.add_reader(self.sup.status_fd, self.settle)

    def settle(self) -> None:
        """Handle every report the resident has sent."""
        while self.sup.status_fd in self.run.service.handoffs:
            try:
                report, ancdata, _, _ = self._sock.recvmsg(
                    MAX_REPORT, _REPORT_FDS, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError:
                report, ancdata = b"", []
            if self._answer is not None and not self._answer.done():
                self._answer.set_result(None)
            self._handle(report, fds_from_ancdata(ancdata))

    @property
    def idle(self) -> bool:
        """The resident keeps the connection and runs no command for it now."""
        state = self.sup.state
        return state is not None and not state[0]

    def release(self) -> asyncio.Future[None]:
        """Ask the resident for the idle connection; the result is set at its answer."""
        self._answer = self._loop.create_future()
        try:
            os.write(self.sup.status_fd, bytes((RELEASE,)))
        except OSError:
            self._answer.set_result(None)
        return self._answer

    def _handle(self, report: bytes, fds: list[int]) -> None:
        channel = self.run.channel
        kind = report[:1]
        if kind == BUSY:
            pass
        elif kind == HANDED_BACK:
            self._end(reusable=True, keep_connection=True)
            channel.serve_again(report[1:], fds)
            fds = []
        elif kind == CLOSED_KEPT:
            self._end(reusable=True)
        elif kind == STATUS_ERROR:
            detail, _, name = report[1:].decode(errors="replace").partition("\0")
            error = CommandError(f"[exec.{name or self.name}] could not start: {detail}")
            log.warning("%s: %s", channel.peer, error)
            channel.send_now(Error(code=error_code(error), message=str(error)))
            self._end(reusable=False)
        else:
            exited = kind == STATUS_EXIT and len(report) >= 1 + _CODE.size
            returncode = _CODE.unpack_from(report, 1)[0] if exited else -signal.SIGKILL
            tail = report[1 + _CODE.size :]
            if TIMED_OUT in tail:
                log.warning("%s: %s timed out", channel.peer, self.name)
            if exited or not self.idle:
                log.info("%s: %s exited %d", channel.peer, self.name, returncode)
            if not exited and not self.idle:
                # The resident died before its report, so before any EXIT frame.
                channel.send_now(Exit(returncode=returncode))
            self._end(reusable=exited and RETIRING not in tail)
        _close_all(fds)

    def _end(self, *, reusable: bool, keep_connection: bool = False) -> None:
        self._loop.remove_reader(self.sup.status_fd)
        self._sock.detach()
        run = self.run
        run.service.handoffs.pop(self.sup.status_fd, None)
        if self.sup in run.running:  # not yet released by ExecService.stop
            run.running.discard(self.sup)
            run.service.release(self.sup, reusable=reusable)
        if not keep_connection:
            run.channel.close()

    def abandon(self) -> None:
        """The daemon stops: close the client's connection without an answer."""
        self._loop.remove_reader(self.sup.status_fd)
        self._sock.detach()
        self.run.channel.close()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _reap(pid: int) -> None:
    """Reap the supervisor as soon as it exits, without blocking the loop (a pidfd turns
    readable when the process ends)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1
    try:
        if pidfd >= 0:
            await wait_fd(pidfd)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    finally:
        if pidfd >= 0:
            os.close(pidfd)

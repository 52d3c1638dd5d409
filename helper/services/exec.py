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
import resource
import signal
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..config import CommandConfig
from ..errors import CommandError, RemoteProtocolError, error_code
from ..privileges import CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN
from ..protocol import MAX_DATA_PAYLOAD, Data, Error, Exit, Request, Signal, Started
from ..server import Channel, Service, wait_fd
from .exec_forker import Forker
from .exec_resident import RETIRING, TIMED_OUT, ResidentPool, identity_of
from .exec_spawn import (
    FORWARDED_SIGNALS,
    KILL_TREE,
    STATUS_ERROR,
    STATUS_EXIT,
    SpawnSpec,
    Supervisor,
    spawn,
)

__all__ = ["ExecService", "FORWARDED_SIGNALS"]

log = logging.getLogger(__name__)

_MODES: Final = {
    "stdin": ("pipe", "fd", "null"),
    "stdout": ("pipe", "fd", "null"),
    "stderr": ("pipe", "fd", "null", "stdout"),
}
_CHUNK: Final = MAX_DATA_PAYLOAD - 1
_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20
_CODE = struct.Struct("!i")


@dataclass(frozen=True, kw_only=True)
class _Call:
    command: CommandConfig
    args: tuple[str, ...]
    modes: Mapping[str, str]
    timeout: float
    started: bool = True


def _str_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CommandError(f"exec parameter {key!r} must be a list of strings")
    return tuple(value)


class ExecService(Service):
    """Runs ``[exec.NAME]`` commands.

    :param commands: the validated command tables by name.
    """

    name = "exec"

    def __init__(self, commands: Mapping[str, CommandConfig]) -> None:
        self.commands = dict(commands)
        self._by_path: dict[str, list[str]] = {}
        for cmd in commands.values():
            for key in {cmd.argv[0], os.path.basename(cmd.argv[0])}:
                self._by_path.setdefault(key, []).append(cmd.name)
        self._running: set[Supervisor] = set()
        caps = {CAP_SETUID, CAP_SETGID}
        if any(not cmd.network or cmd.pid_namespace for cmd in commands.values()):
            caps.add(CAP_SYS_ADMIN)
        self.capabilities = frozenset(caps)
        self._forker: Forker | None = None
        self._pool: ResidentPool | None = None
        self._forker_pids: list[int] = []
        #: /dev/null for reading and for writing, shared by every command with a "null" stream.
        self.null_fds: tuple[int, int] = (-1, -1)
        #: Commands whose resident talks to the client, by the descriptor their outcome comes on.
        self.handoffs: dict[int, _Handoff] = {}
        self._rlimits = {name: _rlimits(cmd) for name, cmd in self.commands.items()}
        self._identities = {
            name: identity_of(
                uid=cmd.uid, gid=cmd.gid, groups=cmd.groups, rlimits=self._rlimits[name]
            )
            for name, cmd in self.commands.items()
        }

    async def start(self) -> None:
        """Start the forker that forks supervisors off the loop (see
        :mod:`~chroot_helper.services.exec_forker`)."""
        if self.commands:
            self.null_fds = (os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY))
            one_shot = any(not _resident(cmd) for cmd in self.commands.values())
            self._forker = Forker.start(self.capabilities, pool=one_shot)
            self._forker_pids.append(self._forker.pid)
            self._pool = ResidentPool(self._forker)
            for name, cmd in self.commands.items():
                if _resident(cmd):
                    self._pool.prewarm(self._identities[name])

    async def spawn(
        self,
        spec: SpawnSpec,
        *,
        name: str,
        client: int | None = None,
        timeout: float = 0,
        started: bool = True,
    ) -> Supervisor:
        """Start *spec* under a supervisor: a resident one, or a one-shot one from the forker's
        pool (for commands with namespaces of their own), else by forking here.

        A resident also takes over the *client* connection when given one (see
        :meth:`ResidentPool.start`; the result says whether it did).
        """
        if self._forker is not None and self._pool is not None:
            try:
                if spec.network and not spec.pid_namespace:
                    return await self._pool.start(
                        spec,
                        self._identities[name],
                        client=client,
                        name=name,
                        timeout=timeout,
                        started=started,
                    )
                return self._forker.spawn(spec)
            except BlockingIOError:
                log.info("the forker's queue is full; forking a supervisor in the daemon")
            except ConnectionError as exc:
                log.warning("the forker is gone (%s); forking supervisors in the daemon", exc)
                self._forker.close()
                self._forker = None
            except OSError as exc:
                log.warning("no supervisor from the forker (%s); forking one in the daemon", exc)
        return spawn(spec)

    def rlimits(self, cmd: CommandConfig) -> list[tuple[int, int]]:
        """The ``(resource, limit)`` pairs *cmd* runs under."""
        return self._rlimits[cmd.name]

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

    def resolve(self, name: str) -> CommandConfig:
        """Find the command a caller means by *name*: table name, argv[0], or its basename."""
        if name in self.commands:
            return self.commands[name]
        matches = self._by_path.get(name, [])
        if len(matches) == 1:
            return self.commands[matches[0]]
        if matches:
            raise CommandError(
                f"{name!r} is configured as several commands ({', '.join(sorted(matches))}); "
                "call one of them by name"
            )
        configured = ", ".join(sorted(self.commands)) or "none"
        raise CommandError(
            f"command {name!r} is not allowed: no [exec.{os.path.basename(name) or name}] table "
            f"in the helper's config (configured: {configured})"
        )

    def _parse(self, request: Request) -> _Call:
        params = request.params
        unknown = set(params) - {
            "command",
            "args",
            "stdin",
            "stdout",
            "stderr",
            "timeout",
            "started",
        }
        if unknown:
            raise CommandError(f"unknown exec parameter {sorted(unknown)[0]!r}")
        name = params.get("command")
        if not isinstance(name, str) or not name:
            raise CommandError("exec parameter 'command' must be a non-empty string")
        command = self.resolve(name)
        args = _str_list(params.get("args", []), "args")
        self._check_args(command, args)
        modes = {}
        for stream, allowed in _MODES.items():
            mode = params.get(stream, "null")
            if mode not in allowed:
                raise CommandError(
                    f"exec parameter {stream!r} = {mode!r}; expected one of {allowed}"
                )
            modes[stream] = str(mode)
        wanted = sum(mode == "fd" for mode in modes.values())
        if wanted != request.fds:
            raise CommandError(f"{wanted} streams use mode 'fd' but {request.fds} fds were passed")
        timeout = command.timeout
        asked = params.get("timeout")
        if asked is not None:
            if isinstance(asked, bool) or not isinstance(asked, int | float) or not asked > 0:
                raise CommandError(f"exec parameter 'timeout' = {asked!r}; expected seconds > 0")
            timeout = min(timeout, float(asked))
        started = params.get("started", True)
        if not isinstance(started, bool):
            raise CommandError(f"exec parameter 'started' = {started!r}; expected true or false")
        return _Call(command=command, args=args, modes=modes, timeout=timeout, started=started)

    @staticmethod
    def _check_args(command: CommandConfig, args: Sequence[str]) -> None:
        table = f"[exec.{command.name}]"
        if command.args == "none" and args:
            raise CommandError(f'{table} takes no arguments (args = "none"); got {len(args)}')
        if len(args) > command.max_args:
            raise CommandError(f"{table} allows at most max_args = {command.max_args} arguments")
        for index, arg in enumerate(args, 1):
            if "\0" in arg:
                raise CommandError(f"{table} argument {index} contains a NUL byte")
            try:
                os.fsencode(arg)
            except UnicodeEncodeError:
                raise CommandError(f"{table} argument {index} is not valid text") from None
            if isinstance(command.args, tuple) and not any(p.fullmatch(arg) for p in command.args):
                raise CommandError(
                    f"{table} argument {index} {arg!r} matches none of the allowed patterns "
                    f"{[p.pattern for p in command.args]}"
                )

    async def handle_exec(self, request: Request, channel: Channel) -> None:
        """Run one command for *channel*'s peer and stream its output and exit status."""
        passed = channel.take_fds()
        try:
            call = self._parse(request)
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


def _resident(cmd: CommandConfig) -> bool:
    """Whether resident supervisors run *cmd* (see :mod:`~chroot_helper.services.exec_resident`)."""
    return cmd.network and not cmd.pid_namespace


def _rlimits(cmd: CommandConfig) -> list[tuple[int, int]]:
    limits = [(resource.RLIMIT_NOFILE, cmd.max_open_files), (resource.RLIMIT_CORE, 0)]
    for res, value in (
        (resource.RLIMIT_CPU, cmd.cpu),
        (resource.RLIMIT_AS, cmd.max_memory),
        (resource.RLIMIT_NPROC, cmd.max_processes),
        (resource.RLIMIT_FSIZE, cmd.max_file_size),
    ):
        if value is not None:
            limits.append((res, value))
    return limits


class _Run:
    """One command's life on the daemon side."""

    def __init__(
        self, call: _Call, channel: Channel, passed: list[int], service: ExecService
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
            spec = SpawnSpec(
                argv=(*cmd.argv, *self.call.args),
                env=dict(cmd.env),
                cwd=cmd.cwd,
                uid=cmd.uid,
                gid=cmd.gid,
                groups=cmd.groups,
                rlimits=self.service.rlimits(cmd),
                stdin=child_fds[0],
                stdout=child_fds[1],
                stderr=child_fds[2],
                network=cmd.network,
                pid_namespace=cmd.pid_namespace,
            )
            handoff = None if "pipe" in self.call.modes.values() else self.channel.handoff_fd()
            self.sup = await self.service.spawn(
                spec,
                client=handoff,
                name=cmd.name,
                timeout=self.call.timeout,
                started=self.call.started,
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
    :meth:`~chroot_helper.services.exec_resident.ResidentPool.start`).

    The daemon keeps the request counted and its end of the connection open, and reads the one
    message the resident reports when a loop callback finds it (no task): ``X`` (the exit status,
    sent just before the client's EXIT), ``E`` (the command could not start: the daemon answers
    the client) or the end of the channel (the resident died: the client gets EXIT -9).
    """

    def __init__(self, run: _Run) -> None:
        assert run.sup is not None
        self.run = run
        self.sup = run.sup
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sup.status_fd, self.settle)

    def settle(self) -> None:
        """End the request if the resident has reported."""
        try:
            report = os.read(self.sup.status_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            report = b""
        self._loop.remove_reader(self.sup.status_fd)
        run, channel, name = self.run, self.run.channel, self.run.call.command.name
        reusable = False
        if report[:1] == STATUS_ERROR:
            error = CommandError(
                f"[exec.{name}] could not start: {report[1:].decode(errors='replace')}"
            )
            log.warning("%s: %s", channel.peer, error)
            channel.send_now(Error(code=error_code(error), message=str(error)))
        else:
            exited = report[:1] == STATUS_EXIT and len(report) >= 1 + _CODE.size
            returncode = _CODE.unpack_from(report, 1)[0] if exited else -signal.SIGKILL
            tail = report[1 + _CODE.size :]
            if TIMED_OUT in tail:
                log.warning("%s: %s timed out after %s s", channel.peer, name, run.call.timeout)
            if not exited:  # the resident died before its report, so before any EXIT frame
                channel.send_now(Exit(returncode=returncode))
            log.info("%s: %s exited %d", channel.peer, name, returncode)
            reusable = exited and RETIRING not in tail
        run.service.handoffs.pop(self.sup.status_fd, None)
        if self.sup in run.running:  # not yet released by ExecService.stop
            run.running.discard(self.sup)
            run.service.release(self.sup, reusable=reusable)
        channel.close()

    def abandon(self) -> None:
        """The daemon stops: close the client's connection without an answer."""
        self._loop.remove_reader(self.sup.status_fd)
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

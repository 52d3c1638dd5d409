"""The forker: a small copy of the daemon that forks supervisors, off the daemon's event loop.

Forking a copy of the daemon costs about as much as a whole short command (page tables of a Python
process), so the daemon never does it on a request's path while the forker runs.  The forker:

* keeps :data:`POOL_SIZE` one-shot supervisors forked and prepared (steps 1 and 2 of
  :mod:`~chroot_helper.services.exec_spawn`), for commands that need their own namespaces; the
  daemon sends such a job (JSON spec plus the five descriptors stdin, stdout, stderr, status write
  end, control read end), the forker hands it to an idle supervisor and forks a replacement;
* forks a *resident* supervisor (:mod:`~chroot_helper.services.exec_resident`) when the daemon asks
  for one with ``b"R" + identity`` and answers ``b"R"`` with the daemon's end of the resident's
  channel and a memfd holding its state byte beside it (``SCM_RIGHTS``), or ``b"E" + reason``.

Messages travel over one ``SOCK_SEQPACKET`` pair.  Supervisors are the forker's children: it reaps
them, and a resident exits once idle when the forker has gone.  The forker is also a child
subreaper: a command that kills its own supervisor (same uid) leaves its tree to the forker, which
SIGKILLs every child it did not fork itself until none is left (as the stray's uid: no
``CAP_KILL`` needed).  A resident forked into a PID namespace of its own (as root) cannot be
killed by its commands, and takes them with it when it dies.
If the forker dies, the exec service starts another when it next needs one (forked from the
daemon, which has dropped the capabilities PID namespaces take: its residents share the helper's),
and forks one-shot supervisors itself (:func:`~chroot_helper.services.exec_spawn.spawn`) only if
that fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import json
import logging
import mmap
import os
import select
import signal
import socket
from collections.abc import Sequence
from typing import Final

from ..fdpass import ancillary_space, fds_from_ancdata, scm_rights
from ..privileges import CAP_SETPCAP, CAP_SYS_ADMIN, drop_capabilities, lacking
from .exec_calls import CommandTable
from .exec_resident import resident_main
from .exec_spawn import (
    _CLONE_NEWPID,
    _PR_SET_CHILD_SUBREAPER,
    STATUS_ERROR,
    SpawnSpec,
    Supervisor,
    _check,
    _close_all_but,
    _libc,
    _pipes,
    _prepare,
    _report_failure,
    _run,
)

__all__ = ["Forker", "POOL_SIZE"]

log = logging.getLogger(__name__)

#: Descriptors that travel with a job to a pooled supervisor, in this order.
_JOB_FDS: Final = 5  # stdin, stdout, stderr, status write end, control read end
_MAX_JOB: Final = 256 * 1024
_JOB_FD_SPACE: Final = ancillary_space(_JOB_FDS)
_REPLY_FD_SPACE: Final = ancillary_space(2)
#: One-shot supervisors the forker keeps forked ahead of time (when a command needs them).
POOL_SIZE: Final = 4
_RESIDENT: Final = b"R"
#: What residents need to serve kept connections: the commands, and the idle timeout.
_Keeping = tuple[CommandTable, float]
#: What the forker keeps, beyond the daemon's capabilities, to fork residents into PID namespaces
#: of their own (and have them drop the two again, from their bounding set too).
_NAMESPACE_CAPABILITIES: Final = frozenset({CAP_SYS_ADMIN, CAP_SETPCAP})
#: How to fork a resident: what it keeps, the capabilities it drops to (None: it has them
#: already), our PID namespace (-1: fork it into ours).
_HowToFork = tuple[_Keeping, frozenset[int] | None, int]


def _encode_job(spec: SpawnSpec) -> bytes:
    return json.dumps(
        {
            "argv": list(spec.argv),
            "env": spec.env,
            "cwd": spec.cwd,
            "uid": spec.uid,
            "gid": spec.gid,
            "groups": list(spec.groups),
            "rlimits": [list(pair) for pair in spec.rlimits],
            "network": spec.network,
            "pid_namespace": spec.pid_namespace,
        }
    ).encode()


def _decode_job(data: bytes, fds: list[int]) -> SpawnSpec:  # pragma: no cover - in a supervisor
    job = json.loads(data)
    return SpawnSpec(
        argv=job["argv"],
        env=job["env"],
        cwd=job["cwd"],
        uid=job["uid"],
        gid=job["gid"],
        groups=job["groups"],
        rlimits=[(int(res), int(limit)) for res, limit in job["rlimits"]],
        stdin=fds[0],
        stdout=fds[1],
        stderr=fds[2],
        network=job["network"],
        pid_namespace=job["pid_namespace"],
    )


def _send(fd: int, data: bytes, fds: Sequence[int], flags: int = 0) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.sendmsg([data], scm_rights(list(fds)), flags)
    finally:
        sock.detach()


def _recv(fd: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One message and its descriptors; a job must carry exactly :data:`_JOB_FDS`."""
    sock = socket.socket(fileno=fd)
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(
            _MAX_JOB, _JOB_FD_SPACE, flags | socket.MSG_CMSG_CLOEXEC
        )
    finally:
        sock.detach()
    fds = fds_from_ancdata(ancdata)
    wanted = 0 if data[:1] == _RESIDENT else _JOB_FDS
    if data and (msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != wanted):
        for extra in fds:
            os.close(extra)
        raise OSError(0, "malformed message to the forker")
    return data, fds


class Forker:
    """The daemon's handle on the forker process.

    Started by the exec service before the daemon accepts connections; the forker drops to the
    same capabilities as the daemon, except that as root it also keeps ``CAP_SYS_ADMIN`` and
    ``CAP_SETPCAP``: to fork each resident into a PID namespace of its own, and to let the
    supervisors it forks drop back to the daemon's capabilities, bounding set included.

    :param pid: the forker's pid (the daemon reaps it).
    :param fd: the daemon's end of their ``SOCK_SEQPACKET`` socket pair (non-blocking).
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._waiting: collections.deque[asyncio.Future[tuple[int, int]]] = collections.deque()
        self._reading = False

    @classmethod
    def start(
        cls,
        capabilities: frozenset[int],
        table: CommandTable,
        *,
        pool: bool = True,
        idle_timeout: float = 10.0,
    ) -> Forker:
        """Fork the forker; it keeps only *capabilities*, and one-shot supervisors if *pool*.

        Its residents check a kept connection's requests against *table* and close the
        connection after *idle_timeout* seconds without one.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        our_fd, their_fd = ours.detach(), theirs.detach()
        try:
            pid = os.fork()
        except BaseException:
            os.close(our_fd)
            os.close(their_fd)
            raise
        if pid == 0:  # pragma: no cover - runs in the forker
            try:
                _forker_main(
                    their_fd, capabilities, POOL_SIZE if pool else 0, (table, idle_timeout)
                )
            finally:
                os._exit(0)
        os.close(their_fd)
        os.set_blocking(our_fd, False)
        return cls(pid, our_fd)

    def spawn(self, spec: SpawnSpec) -> Supervisor:
        """Hand *spec* to a pooled one-shot supervisor; return at once.

        :raises BlockingIOError: the forker's queue is full (fork here instead).
        :raises OSError: the forker is gone.
        """
        status_r, status_w, control_r, control_w = _pipes()
        try:
            self._sock.sendmsg(
                [_encode_job(spec)],
                scm_rights([spec.stdin, spec.stdout, spec.stderr, status_w, control_r]),
            )
        except BaseException:
            for fd in (status_r, control_w):
                os.close(fd)
            raise
        finally:
            os.close(status_w)
            os.close(control_r)
        return Supervisor(pid=None, status_fd=status_r, control_fd=control_w)

    async def resident(self, identity: bytes) -> tuple[socket.socket, mmap.mmap]:
        """Ask for a resident supervisor at *identity*; return the daemon's end of its channel
        and its state byte (see :attr:`~chroot_helper.services.exec_spawn.Supervisor.state`).

        :raises ConnectionError: the forker is gone.
        :raises OSError: it could not fork one.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, int]] = loop.create_future()
        self._sock.send(_RESIDENT + identity)
        self._waiting.append(fut)
        if not self._reading:
            loop.add_reader(self._sock.fileno(), self._on_reply)
            self._reading = True
        fd, state_fd = await fut
        try:
            state = mmap.mmap(state_fd, 1)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.close(state_fd)
        channel = socket.socket(fileno=fd)
        channel.setblocking(False)
        return channel, state

    def _on_reply(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self._sock.recvmsg(
                    4096, _REPLY_FD_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            fds = fds_from_ancdata(ancdata)
            if not data:
                self._fail(ConnectionResetError(0, "the forker closed its socket"))
                return
            fut = self._waiting.popleft() if self._waiting else None
            if fut is None or fut.done() or data[:1] != _RESIDENT or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                if fut is not None and not fut.done():
                    reason = data[1:].decode(errors="replace") or "malformed reply"
                    fut.set_exception(OSError(0, f"the forker could not fork: {reason}"))
                continue
            fut.set_result((fds[0], fds[1]))

    def _fail(self, exc: OSError) -> None:
        self._stop_reading()
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _stop_reading(self) -> None:
        if self._reading:
            with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._reading = False

    def close(self) -> None:
        """Tell the forker to exit (its idle supervisors exit with it); reap :attr:`pid` later."""
        if self.fd >= 0:
            self._fail(ConnectionResetError(0, "the forker was closed"))
            self._sock.close()
            self.fd = -1


def _forker_main(  # pragma: no cover - runs in the forker
    fd: int, capabilities: frozenset[int], pool_size: int, keeping: _Keeping
) -> None:
    gc.disable()  # never let a collected copy of a daemon object close a reused fd number
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _close_all_but({fd, 0, 1, 2})
    # Reap supervisors as soon as they exit: zombies still count against the commands' user's
    # RLIMIT_NPROC (max_processes).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    pid_ns = _our_pid_namespace()
    # With the two extra capabilities, what the forker forks drops back to the daemon's.
    narrow_to: frozenset[int] | None = None
    if pid_ns >= 0:
        drop_capabilities(capabilities | _NAMESPACE_CAPABILITIES)
        narrow_to = capabilities
    else:
        drop_capabilities(capabilities)
    idle: list[int] = []  # our ends of the pooled supervisors' socket pairs
    alive: dict[int, int] = {}  # resident pid -> our end of its pipe (EOF: the forker is gone)
    forked: set[int] = set()  # every supervisor we forked and have not reaped yet
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while True:
            # Jobs come first: refill the pool one fork at a time, only when none is waiting.
            timeout = 0 if len(idle) < pool_size else None
            ready = {ready_fd for ready_fd, _ in poller.poll(timeout)}
            if not ready:
                idle.append(_fork_idle(forked, narrow_to))
                continue
            if wake_r in ready:
                os.read(wake_r, 4096)
            _reap(alive, forked)
            if fd not in ready:
                continue
            while True:  # every message queued
                try:
                    data, fds = _recv(fd, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # malformed: nothing to hand over
                if not data:
                    return  # the daemon closed its end
                if data[:1] == _RESIDENT:
                    _answer_resident(fd, data[1:], alive, forked, (keeping, narrow_to, pid_ns))
                    continue
                try:
                    _hand_over(idle, data, fds, forked, narrow_to)
                finally:
                    for passed in fds:
                        os.close(passed)
    finally:
        for end in idle:
            os.close(end)


def _our_pid_namespace() -> int:  # pragma: no cover - runs in the forker
    """Our PID namespace (a descriptor to return to) if residents can be forked into namespaces
    of their own: as root with ``CAP_SYS_ADMIN`` and ``CAP_SETPCAP``, and unshare() allowed (the
    systemd unit we ship allows that); else -1."""
    if os.geteuid() != 0 or lacking(_NAMESPACE_CAPABILITIES):
        log.info("no PID namespaces for residents: the helper lacks CAP_SYS_ADMIN or CAP_SETPCAP")
        return -1
    fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    if _libc.unshare(_CLONE_NEWPID) != 0:
        reason = os.strerror(ctypes.get_errno())
        os.close(fd)
        log.info("no PID namespaces for residents: unshare(CLONE_NEWPID): %s", reason)
        return -1
    _check(_libc.setns(fd, _CLONE_NEWPID), "setns(our PID namespace)")
    return fd


def _reap(alive: dict[int, int], forked: set[int]) -> None:  # pragma: no cover - in the forker
    """Reap every exited child; kill strays when a supervisor failed or a stray exited."""
    strays = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in forked:
            forked.discard(pid)
            strays = strays or status != 0  # killed, or failed: its tree may be left
        else:
            strays = True  # a stray we killed: its own children are ours now
        end = alive.pop(pid, None)
        if end is not None:
            os.close(end)
    if strays:
        _kill_strays(forked)


def _kill_strays(forked: set[int]) -> None:  # pragma: no cover - runs in the forker
    """SIGKILL our children that we did not fork: what a killed supervisor left to us."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as listing:
            children = [int(pid) for pid in listing.read().split()]
    except OSError:
        return
    for pid in children:
        if pid not in forked:
            _kill_as_owner(pid)


def _kill_as_owner(pid: int) -> None:  # pragma: no cover - runs in the forker
    """SIGKILL *pid* with our effective uid set to its real uid (root keeps no ``CAP_KILL``)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError):
        return  # gone already
    switch = os.geteuid() == 0 and uid != 0
    if switch:
        os.seteuid(uid)  # the effective capabilities come back with euid 0 below
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        if switch:
            os.seteuid(0)


def _answer_resident(  # pragma: no cover - runs in the forker
    fd: int, identity: bytes, alive: dict[int, int], forked: set[int], how: _HowToFork
) -> None:
    try:
        pid, channel, alive_w, state_fd = _fork_resident(identity, *how)
    except OSError as exc:
        with contextlib.suppress(OSError):
            _send(fd, STATUS_ERROR + str(exc).encode()[:2000], [])
        return
    forked.add(pid)
    alive[pid] = alive_w
    try:
        _send(fd, _RESIDENT, [channel, state_fd])
    except OSError:
        pass  # the daemon is gone; the resident sees its channel close and exits
    finally:
        os.close(channel)
        os.close(state_fd)


def _fork_resident(  # pragma: no cover - runs in the forker
    identity: bytes, keeping: _Keeping, narrow_to: frozenset[int] | None, pid_ns: int
) -> tuple[int, int, int, int]:
    """Fork a resident supervisor, as the init of a new PID namespace when *pid_ns* (ours) is
    given; return its pid, the daemon's channel end, our alive pipe end and the memfd of its state
    byte."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    our_fd, their_fd = ours.detach(), theirs.detach()
    alive_r, alive_w = os.pipe()
    state_fd = os.memfd_create("chroot-helper-resident-state", os.MFD_CLOEXEC)
    try:
        os.ftruncate(state_fd, 1)
        state = mmap.mmap(state_fd, 1)
        pid = _fork_into_pid_namespace(pid_ns)
    except BaseException:
        for end in (our_fd, their_fd, alive_r, alive_w, state_fd):
            os.close(end)
        raise
    if pid == 0:
        code = 70
        try:
            if narrow_to is not None:
                drop_capabilities(narrow_to, quiet=True)
            resident_main(their_fd, alive_r, identity, state, *keeping)
            code = 0
        finally:
            os._exit(code)
    state.close()
    os.close(their_fd)
    os.close(alive_r)
    return pid, our_fd, alive_w, state_fd


def _fork_into_pid_namespace(pid_ns: int) -> int:  # pragma: no cover - runs in the forker
    """``os.fork()``; the child is the init of a new PID namespace unless *pid_ns* (ours, which
    this process returns to for its next children) is -1."""
    if pid_ns < 0:
        return os.fork()
    _check(_libc.unshare(_CLONE_NEWPID), "unshare(PID namespace)")
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            _check(_libc.setns(pid_ns, _CLONE_NEWPID), "setns(our PID namespace)")
    return pid


def _hand_over(  # pragma: no cover - runs in the forker
    idle: list[int],
    job: bytes,
    fds: list[int],
    forked: set[int],
    narrow_to: frozenset[int] | None,
) -> None:
    while True:
        end = idle.pop(0) if idle else _fork_idle(forked, narrow_to)
        try:
            _send(end, job, fds)
            return
        except OSError:
            if not idle:  # even a fresh supervisor failed: report it instead of hanging
                with contextlib.suppress(OSError):
                    os.write(fds[3], STATUS_ERROR + b"no supervisor could take the command")
                return
        finally:
            os.close(end)


def _fork_idle(
    forked: set[int], narrow_to: frozenset[int] | None
) -> int:  # pragma: no cover - runs in the forker
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    our_fd, their_fd = ours.detach(), theirs.detach()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            if narrow_to is not None:
                drop_capabilities(narrow_to, quiet=True)
            _pooled_main(their_fd)
            code = 0
        finally:
            os._exit(code)
    forked.add(pid)
    os.close(their_fd)
    return our_fd


def _pooled_main(fd: int) -> None:  # pragma: no cover - runs in a pooled supervisor
    wake_r = _prepare({fd})  # before the job: this is the work the pool saves a request
    job, fds = _recv(fd)
    os.close(fd)
    if not job:
        return  # the forker went away
    status_w, control_r = fds[3], fds[4]
    try:
        spec = _decode_job(job, fds)
        _run(spec, status_w, control_r, wake_r)
    except BaseException as exc:
        _report_failure(status_w, exc)

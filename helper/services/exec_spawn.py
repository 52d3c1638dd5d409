"""Start one command under a supervisor process that kills and reaps its whole tree.

Used only by :mod:`chroot_helper.services.exec`; jailed code never imports this.  The daemon forks a
*supervisor* per command; the supervisor, in a fixed order:

1. takes over the daemon's signal handlers and closes every descriptor it does not need (so it
   never holds another connection's pipes open),
2. becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``): descendants that detach with ``setsid``
or
   a double fork are re-parented to it, not to init,
3. optionally unshares a network namespace (``network = false``) and a PID namespace
   (``pid_namespace = true``), while still root,
4. drops to the command's uid/gid with no supplementary groups (unless configured), sets
   ``no_new_privs`` (setuid binaries do not elevate) and the rlimits, changes to ``cwd``,
5. ``posix_spawn``\\ s the command in a new session (its own process group) with a clean
   environment and only fds 0, 1 and 2,
6. waits; on the daemon's request forwards a signal to the command's process group; when the
   command exits, or the daemon asks for it, or the daemon goes away (its control pipe reads EOF),
   it SIGKILLs the process group and every remaining child, reaps them all, and only then reports
   the exit status.

Steps 1 and 2 need no job, so a :class:`Forker` process keeps :data:`POOL_SIZE` supervisors
forked and prepared ahead of time; the daemon sends a job (JSON spec plus the five descriptors:
stdin, stdout, stderr, status, control) over a ``SOCK_SEQPACKET`` pair to the forker, which hands
it to an idle supervisor and forks a replacement.  The daemon's event loop then never forks, and
a request does not wait for a fork.  :func:`spawn` forks a supervisor directly; the exec service
falls back to it when the forker's queue is full or the forker is gone.

Status pipe (supervisor -> daemon): ``b"S"`` started, or ``b"E" + message`` could not start, then
``b"X" + int32`` the ``subprocess``-style return code.  Control pipe (daemon -> supervisor): one
byte per request, a signal number to forward, or ``0`` to kill the tree now.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import os
import resource
import select
import signal
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..fdpass import ancillary_space, fds_from_ancdata, scm_rights
from ..privileges import drop_capabilities

__all__ = ["SpawnSpec", "Supervisor", "Forker", "spawn", "POOL_SIZE", "STATUS_EXIT", "KILL_TREE"]

STATUS_STARTED: Final = b"S"
STATUS_ERROR: Final = b"E"
STATUS_EXIT: Final = b"X"
KILL_TREE: Final = 0
_CODE = struct.Struct("!i")

_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_SET_NO_NEW_PRIVS: Final = 38
_CLONE_NEWNET: Final = 0x40000000
_CLONE_NEWPID: Final = 0x20000000
# Margin of address space the supervisor keeps for itself above its current size.
_AS_MARGIN: Final = 32 << 20

_libc = ctypes.CDLL(None, use_errno=True)
#: Every signal the command gets at its default disposition (all but KILL and STOP).
_RESET_SIGNALS: Final = tuple(
    sig for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)
)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@dataclass(frozen=True, kw_only=True)
class SpawnSpec:
    """Everything the supervisor needs, prepared by the daemon before the fork.

    :param argv: the full argv; ``argv[0]`` is an absolute path.
    :param env: the complete environment.
    :param cwd: working directory.
    :param uid: user to run as; ``gid`` and ``groups`` likewise.
    :param rlimits: ``(resource, limit)`` pairs; soft and hard are both set to the limit, except
        RLIMIT_CPU whose hard limit is one second higher (SIGXCPU first, then SIGKILL).
    :param stdin: descriptor for the command's fd 0; ``stdout`` and ``stderr`` likewise (they may be
        the same descriptor).
    :param network: False unshares a network namespace.
    :param pid_namespace: True unshares a PID namespace; the command becomes its PID 1.
    """

    argv: Sequence[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: Sequence[int]
    rlimits: Sequence[tuple[int, int]]
    stdin: int
    stdout: int
    stderr: int
    network: bool = True
    pid_namespace: bool = False


@dataclass(frozen=True, kw_only=True)
class Supervisor:
    """The daemon's handle on a supervisor.

    :param pid: the supervisor's pid when the daemon forked it itself (and so must reap it);
        None when the :class:`Forker` did (the forker reaps it).
    :param status_fd: read end of the status pipe.
    :param control_fd: write end of the control pipe; closing it kills the tree.
    """

    pid: int | None
    status_fd: int
    control_fd: int


def _pipes() -> tuple[int, int, int, int]:
    status_r, status_w = os.pipe()
    try:
        control_r, control_w = os.pipe()
    except BaseException:
        os.close(status_r)
        os.close(status_w)
        raise
    return status_r, status_w, control_r, control_w


def spawn(spec: SpawnSpec) -> Supervisor:
    """Fork a supervisor for *spec* from this process; return at once (the status pipe reports
    the start).  Slower than :meth:`Forker.spawn`, which it backs up."""
    status_r, status_w, control_r, control_w = _pipes()
    try:
        pid = os.fork()
    except BaseException:
        for fd in (status_r, status_w, control_r, control_w):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - runs in the forked supervisor
        gc.disable()  # never let a collected copy of a daemon object close a reused fd number
        code = 70
        try:
            wake_r = _prepare({spec.stdin, spec.stdout, spec.stderr, status_w, control_r})
            _run(spec, status_w, control_r, wake_r)
            code = 0
        except BaseException as exc:
            _report_failure(status_w, exc)
        os._exit(code)
    os.close(status_w)
    os.close(control_r)
    return Supervisor(pid=pid, status_fd=status_r, control_fd=control_w)


def _report_failure(status_w: int, exc: BaseException) -> None:  # pragma: no cover
    try:
        os.write(status_w, STATUS_ERROR + f"supervisor failed: {exc!r}".encode()[:2000])
    except OSError:
        pass


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _vm_size() -> int:
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _prepare(keep: set[int]) -> int:  # pragma: no cover - runs in the forked supervisor
    """Steps 1 and 2, which need no job: signals, descriptors, subreaper.  Return the read end of
    the signal wakeup pipe."""
    # The daemon's loop handles TERM/INT/HUP through its wakeup fd: replace all three (below),
    # and keep SIGPIPE ignored, so that a write to a vanished daemon cannot kill the supervisor
    # before it has cleaned up.  The command gets default dispositions from posix_spawn.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _close_all_but(keep | {0, 1, 2})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: None)
    _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    return wake_r


def _run(spec: SpawnSpec, status_w: int, control_r: int, wake_r: int) -> None:  # pragma: no cover
    """Steps 3 to 6: namespaces, privileges, limits, spawn, wait, kill the tree, report."""
    std = {spec.stdin, spec.stdout, spec.stderr}
    flags = (0 if spec.network else _CLONE_NEWNET) | (_CLONE_NEWPID if spec.pid_namespace else 0)
    try:
        if flags:
            _check(_libc.unshare(flags), "unshare(network/PID namespace)")
        if os.geteuid() == 0:
            os.setgroups(list(spec.groups))
            os.setresgid(spec.gid, spec.gid, spec.gid)
            os.setresuid(spec.uid, spec.uid, spec.uid)
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        for res, limit in spec.rlimits:
            if res == resource.RLIMIT_AS and limit < _vm_size() + _AS_MARGIN:
                raise OSError(
                    0, f"max_memory = {limit} bytes is too low to start anything; raise max_memory"
                )
            hard = limit + 1 if res == resource.RLIMIT_CPU else limit
            resource.setrlimit(res, (limit, hard))
        os.chdir(spec.cwd)
        actions = [
            (os.POSIX_SPAWN_DUP2, spec.stdin, 0),
            (os.POSIX_SPAWN_DUP2, spec.stdout, 1),
            (os.POSIX_SPAWN_DUP2, spec.stderr, 2),
        ]
        child = os.posix_spawn(
            spec.argv[0],
            list(spec.argv),
            spec.env,
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=_RESET_SIGNALS,
        )
    except OSError as exc:
        detail = exc.strerror or str(exc)
        if exc.errno == errno.EAGAIN:
            detail += " (the user already runs max_processes processes; raise max_processes)"
        os.write(status_w, STATUS_ERROR + f"{spec.argv[0]}: {detail}".encode()[:2000])
        return
    for fd in std:
        if fd > 2:
            os.close(fd)
    try:
        os.write(status_w, STATUS_STARTED)
    except OSError:
        _kill_tree(child)
        return
    returncode = _wait(child, control_r, wake_r)
    _kill_tree(child)
    try:
        os.write(status_w, STATUS_EXIT + _CODE.pack(returncode))
    except OSError:
        pass


def _wait(child: int, control_r: int, wake_r: int) -> int:  # pragma: no cover
    """Serve control requests until *child* exits; return its subprocess-style return code."""
    poller = select.poll()
    poller.register(control_r, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    control_open = True
    while True:
        while True:  # reap whatever has exited; remember the command's status
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid == 0:
                break
            if pid == child:
                return os.waitstatus_to_exitcode(status)
        for fd, _ in poller.poll():
            if fd == wake_r:
                data = os.read(wake_r, 64)
                if any(b in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) for b in data):
                    _signal_group(child, signal.SIGKILL)
            elif control_open:
                data = os.read(control_r, 64)
                if not data:  # the daemon went away or gave up on this command
                    control_open = False
                    poller.unregister(control_r)
                    _signal_group(child, signal.SIGKILL)
                for byte in data:
                    _signal_group(child, signal.SIGKILL if byte == KILL_TREE else byte)


def _signal_group(pgid: int, sig: int) -> None:  # pragma: no cover
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if sig == signal.SIGKILL:
        try:
            os.kill(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _children() -> list[int]:  # pragma: no cover
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _kill_tree(child: int) -> None:  # pragma: no cover
    """SIGKILL the command's process group and every descendant left; reap them all."""
    _signal_group(child, signal.SIGKILL)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # nothing left: the common case, without reading /proc
        if pid:
            continue
        for pid in _children():
            _signal_group(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


#: Descriptors that travel with a job to a pooled supervisor, in this order.
_JOB_FDS: Final = 5  # stdin, stdout, stderr, status write end, control read end
_MAX_JOB: Final = 256 * 1024
_JOB_FD_SPACE: Final = ancillary_space(_JOB_FDS)
#: Supervisors the forker keeps forked ahead of time.
POOL_SIZE: Final = 4


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


def _send_job(fd: int, job: bytes, fds: Sequence[int], flags: int = 0) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.sendmsg([job], scm_rights(list(fds)), flags)
    finally:
        sock.detach()


def _recv_job(fd: int, flags: int = 0) -> tuple[bytes, list[int]]:
    sock = socket.socket(fileno=fd)
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(
            _MAX_JOB, _JOB_FD_SPACE, flags | socket.MSG_CMSG_CLOEXEC
        )
    finally:
        sock.detach()
    fds = fds_from_ancdata(ancdata)
    if data and (msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != _JOB_FDS):
        for extra in fds:
            os.close(extra)
        raise OSError(0, "malformed job message")
    return data, fds


class Forker:
    """A process that keeps :data:`POOL_SIZE` supervisors forked ahead of time.

    Forking a copy of the daemon costs about as much as the whole command (page tables of a
    Python process); the forker does it off the daemon's event loop and before a request needs
    it.  Started by the exec service before the daemon accepts connections; it drops to the
    same capabilities as the daemon.  If it dies, the exec service forks supervisors itself.

    :param pid: the forker's pid (the daemon reaps it).
    :param fd: the daemon's end of their ``SOCK_SEQPACKET`` socket pair.
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd

    @classmethod
    def start(cls, capabilities: frozenset[int]) -> Forker:
        """Fork the forker; it keeps only *capabilities*."""
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
                _forker_main(their_fd, capabilities)
            finally:
                os._exit(0)
        os.close(their_fd)
        os.set_blocking(our_fd, False)
        return cls(pid, our_fd)

    def spawn(self, spec: SpawnSpec) -> Supervisor:
        """Hand *spec* to a pooled supervisor; return at once.

        :raises BlockingIOError: the forker's queue is full (fork here instead).
        :raises OSError: the forker is gone.
        """
        status_r, status_w, control_r, control_w = _pipes()
        try:
            _send_job(
                self.fd,
                _encode_job(spec),
                [spec.stdin, spec.stdout, spec.stderr, status_w, control_r],
            )
        except BaseException:
            for fd in (status_r, control_w):
                os.close(fd)
            raise
        finally:
            os.close(status_w)
            os.close(control_r)
        return Supervisor(pid=None, status_fd=status_r, control_fd=control_w)

    def close(self) -> None:
        """Tell the forker to exit (its idle supervisors exit with it); reap :attr:`pid` later."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _forker_main(fd: int, capabilities: frozenset[int]) -> None:  # pragma: no cover
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
    drop_capabilities(capabilities)
    idle: list[int] = []  # our ends of the pooled supervisors' socket pairs
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while True:
            # Jobs come first: refill the pool one fork at a time, only when none is waiting.
            ready = {ready_fd for ready_fd, _ in poller.poll(0 if len(idle) < POOL_SIZE else None)}
            if not ready:
                idle.append(_fork_idle())
                continue
            if wake_r in ready:
                os.read(wake_r, 4096)
            while True:  # reap finished supervisors
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
            if fd not in ready:
                continue
            while True:  # every job queued
                try:
                    job, fds = _recv_job(fd, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # malformed: nothing to hand over
                if not job:
                    return  # the daemon closed its end
                try:
                    _hand_over(idle, job, fds)
                finally:
                    for passed in fds:
                        os.close(passed)
    finally:
        for end in idle:
            os.close(end)


def _hand_over(idle: list[int], job: bytes, fds: list[int]) -> None:  # pragma: no cover
    while True:
        end = idle.pop(0) if idle else _fork_idle()
        try:
            _send_job(end, job, fds)
            return
        except OSError:
            if not idle:  # even a fresh supervisor failed: report it instead of hanging
                with contextlib.suppress(OSError):
                    os.write(fds[3], STATUS_ERROR + b"no supervisor could take the command")
                return
        finally:
            os.close(end)


def _fork_idle() -> int:  # pragma: no cover - runs in the forker
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    our_fd, their_fd = ours.detach(), theirs.detach()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            _pooled_main(their_fd)
            code = 0
        finally:
            os._exit(code)
    os.close(their_fd)
    return our_fd


def _pooled_main(fd: int) -> None:  # pragma: no cover - runs in a pooled supervisor
    wake_r = _prepare({fd})  # before the job: this is the work the pool saves a request
    job, fds = _recv_job(fd)
    os.close(fd)
    if not job:
        return  # the forker went away
    status_w, control_r = fds[3], fds[4]
    try:
        spec = _decode_job(job, fds)
        _run(spec, status_w, control_r, wake_r)
    except BaseException as exc:
        _report_failure(status_w, exc)

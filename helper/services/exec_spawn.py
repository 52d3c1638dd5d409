"""Start one command under a supervisor process that kills and reaps its whole tree.

Used only by the exec service; jailed code never imports this.  A *supervisor*, in a fixed order:

1. takes over the daemon's signal handlers and closes every descriptor it does not need (so it
   never holds another connection's pipes open),
2. becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``): descendants that detach with ``setsid``
   or a double fork are re-parented to it, not to init,
3. optionally unshares a network namespace (``network = false``) and a PID namespace
   (``pid_namespace = true``), while still root,
4. drops to the command's uid/gid with no supplementary groups (unless configured), sets
   ``no_new_privs`` (setuid binaries do not elevate) and the rlimits,
5. changes to ``cwd`` and ``posix_spawn``\\ s the command in a new session (its own process
   group) with a clean environment and only fds 0, 1 and 2,
6. waits; on the daemon's request forwards a signal to the command's process group; when the
   command exits, or the daemon asks for it, or the daemon goes away (its control channel reads
   EOF), it SIGKILLs the process group and every remaining child, reaps them all, and only then
   reports the exit status.

This module holds those steps and :func:`spawn`, which forks a one-shot supervisor (steps 1 to 6,
then exit) from the calling process.  :mod:`~chroot_helper.services.exec_forker` forks
supervisors ahead of time, off the daemon's loop, and
:mod:`~chroot_helper.services.exec_resident` keeps supervisors that stay at a command's identity
after step 4 and repeat steps 5 and 6 for one command after another.

Status (supervisor -> daemon): ``b"S"`` started, or ``b"E" + message`` could not start, then
``b"X" + int32`` the ``subprocess``-style return code.  Control (daemon -> supervisor): one byte
per request, a signal number to forward, ``0`` to kill the tree now, or :data:`RELEASE` (the
daemon wants the client's connection back from a resident once the command is over).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import mmap
import os
import resource
import select
import signal
import struct
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "SpawnSpec",
    "Supervisor",
    "spawn",
    "STATUS_STARTED",
    "STATUS_ERROR",
    "STATUS_EXIT",
    "KILL_TREE",
    "RELEASE",
    "FORWARDED_SIGNALS",
    "Watch",
]

STATUS_STARTED: Final = b"S"
STATUS_ERROR: Final = b"E"
STATUS_EXIT: Final = b"X"
KILL_TREE: Final = 0
RELEASE: Final = 255
#: Signals a client may forward to its command's process group.
FORWARDED_SIGNALS: Final = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGKILL,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
    }
)
_CODE = struct.Struct("!i")
#: Signals that stop a supervisor: its tree is killed first.
_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

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

    @property
    def streams(self) -> tuple[int, int, int]:
        """The command's stdin, stdout and stderr."""
        return self.stdin, self.stdout, self.stderr


@dataclass(frozen=True, kw_only=True)
class Supervisor:
    """The daemon's handle on a supervisor.

    :param pid: the supervisor's pid when the daemon forked it itself (and so must reap it);
        None when the forker did (the forker reaps it).
    :param status_fd: where the daemon reads the status (a pipe, or a resident's channel).
    :param control_fd: where it writes control bytes; closing it kills the tree.
    :param resident: the identity key of a resident supervisor (its channel is both fds and it
        serves further commands once this one has exited); None for a one-shot supervisor.
    :param handed_off: the resident took over the client's connection and reports only the
        outcome to the daemon.
    :param state: a resident's shared byte, non-zero while it runs a command (written by the
        resident, read by the daemon; see :mod:`~chroot_helper.services.exec_resident`).
    """

    pid: int | None
    status_fd: int
    control_fd: int
    resident: bytes | None = None
    handed_off: bool = False
    state: mmap.mmap | None = None


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
    the start).  Slower than the forker's supervisors, which it backs up."""
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


def _enter(spec: SpawnSpec) -> None:  # pragma: no cover - runs in a supervisor
    """Steps 3 and 4: namespaces, then the command's identity, no_new_privs and rlimits."""
    flags = (0 if spec.network else _CLONE_NEWNET) | (_CLONE_NEWPID if spec.pid_namespace else 0)
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


def _start(
    argv: tuple[str, ...], env: Mapping[str, str], cwd: str, streams: Sequence[int]
) -> int:  # pragma: no cover - runs in a supervisor
    """Step 5: ``posix_spawn`` *argv* in a new session, *streams* as its fds 0, 1 and 2; return
    its pid."""
    os.chdir(cwd)
    stdin, stdout, stderr = streams
    actions = [
        (os.POSIX_SPAWN_DUP2, stdin, 0),
        (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    return os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=actions,
        setsid=True,
        setsigmask=(),
        setsigdef=_RESET_SIGNALS,
    )


def _start_error(path: str, exc: OSError) -> bytes:  # pragma: no cover - in a supervisor
    """The status message for a command at *path* that could not start."""
    detail = exc.strerror or str(exc)
    if exc.errno == errno.EAGAIN:
        detail += " (the user already runs max_processes processes; raise max_processes)"
    return STATUS_ERROR + f"{path}: {detail}".encode()[:2000]


def _close_std(
    streams: Sequence[int], shared: Collection[int] = ()
) -> None:  # pragma: no cover - runs in a supervisor
    """Close the command's *streams* once it has them, but not the *shared* ones."""
    for fd in set(streams):
        if fd > 2 and fd not in shared:
            os.close(fd)


def _supervise(
    streams: Sequence[int],
    child: int,
    status_w: int,
    control_r: int,
    wake_r: int,
    tail: bytes = b"",
) -> None:  # pragma: no cover - runs in a supervisor
    """Step 6: report the start, wait, kill and reap the tree, report the exit (plus *tail*)."""
    _close_std(streams)
    try:
        os.write(status_w, STATUS_STARTED)
    except OSError:
        _kill_tree(child)
        return
    returncode = _wait(child, control_r, wake_r)
    _kill_tree(child)
    _report_exit(status_w, returncode, tail)


def _report_exit(status_w: int, returncode: int, tail: bytes = b"") -> bool:  # pragma: no cover
    """Write the exit status; False when the daemon has gone."""
    try:
        os.write(status_w, STATUS_EXIT + _CODE.pack(returncode) + tail)
    except OSError:
        return False
    return True


def _run(spec: SpawnSpec, status_w: int, control_r: int, wake_r: int) -> None:  # pragma: no cover
    """Steps 3 to 6 for one command, in a supervisor that exits afterwards."""
    try:
        _enter(spec)
        child = _start(tuple(spec.argv), spec.env, spec.cwd, spec.streams)
    except OSError as exc:
        os.write(status_w, _start_error(spec.argv[0], exc))
        return
    _supervise(spec.streams, child, status_w, control_r, wake_r)


class Watch(Protocol):
    """Something else a supervisor watches while its command runs (the client's connection)."""

    #: The descriptor to poll for input, or -1 once there is nothing more to read.
    fd: int
    #: ``time.monotonic()`` value at which :meth:`expired` is called, or None.
    deadline: float | None

    def readable(self) -> list[int]:
        """Handle input on :attr:`fd`; return signals for the command's process group."""
        ...

    def expired(self) -> None:
        """:attr:`deadline` has passed (the tree is killed next)."""
        ...

    def release(self) -> None:
        """The daemon sent :data:`RELEASE`, or has gone: the command's connection ends with it."""
        ...


def _wait(
    child: int, control_r: int, wake_r: int, watch: Watch | None = None
) -> int:  # pragma: no cover
    """Serve control requests until *child* exits; return its subprocess-style return code."""
    poller = select.poll()
    poller.register(control_r, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    if watch is not None:
        poller.register(watch.fd, select.POLLIN)
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
        timeout = None
        if watch is not None and watch.deadline is not None:
            timeout = max(0.0, watch.deadline - time.monotonic()) * 1000
        ready = poller.poll(timeout)
        if not ready and watch is not None and watch.deadline is not None:
            if time.monotonic() >= watch.deadline:
                watch.deadline = None
                watch.expired()
                _signal_group(child, signal.SIGKILL)
        for fd, _ in ready:
            if watch is not None and fd == watch.fd:
                for sig in watch.readable():
                    _signal_group(child, sig)
                if watch.fd < 0:
                    poller.unregister(fd)
            elif fd == wake_r:
                data = os.read(wake_r, 64)
                if _STOP_SIGNALS.intersection(data):
                    _signal_group(child, signal.SIGKILL)
            elif control_open:
                data = os.read(control_r, 64)
                if not data:  # the daemon went away or gave up on this command
                    control_open = False
                    poller.unregister(control_r)
                    _signal_group(child, signal.SIGKILL)
                    if watch is not None:
                        watch.release()
                for byte in data:
                    if byte == RELEASE:
                        if watch is not None:
                            watch.release()
                    else:
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
    """SIGKILL the command's process group and every descendant left; reap them all.

    With no child left there is nothing to do: a descendant still alive would be a child of this
    subreaper or of one of its children.  In a PID namespace of its own (a resident is its init),
    everything else in the namespace is the command's, and one ``kill(-1)`` reaches all of it.
    Otherwise the group alone first (the command itself has usually been reaped), then what is
    still alive outside it, found among the children.
    """
    group_killed = False
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # nothing left: the common case, without a kill or reading /proc
        if pid:
            continue
        if os.getpid() == 1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)  # all but init itself
        elif not group_killed:
            group_killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child, signal.SIGKILL)
            continue
        else:
            for pid in _children():
                _signal_group(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue

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
import dataclasses
import json
import os
import resource
import select
import socket
from typing import TYPE_CHECKING, Final

from ..fdpass import ancillary_space, fds_from_ancdata, scm_rights
from .exec_spawn import (
    STATUS_ERROR,
    SpawnSpec,
    Supervisor,
    _close_std,
    _enter,
    _prepare,
    _start,
    _start_error,
    _supervise,
)

if TYPE_CHECKING:
    from .exec_forker import Forker

__all__ = ["ResidentPool", "identity_of", "resident_main", "MAX_JOBS", "MAX_IDLE", "RETIRING"]

#: Commands one resident runs before it retires (a fresh fork replaces it).
MAX_JOBS: Final = 10_000
#: Idle residents the daemon keeps per identity; one more is told to exit.
MAX_IDLE: Final = 32
#: Last byte of an exit message from a resident that exits after it.
RETIRING: Final = b"R"
_STD_FDS: Final = 3
_MAX_JOB: Final = 256 * 1024
_FD_SPACE: Final = ancillary_space(_STD_FDS)


def identity_of(spec: SpawnSpec) -> bytes:
    """The key of the residents that can run *spec*: who it runs as, under which limits."""
    return json.dumps(
        {
            "uid": spec.uid,
            "gid": spec.gid,
            "groups": list(spec.groups),
            "rlimits": [list(pair) for pair in spec.rlimits],
        },
        sort_keys=True,
    ).encode()


def encode_job(spec: SpawnSpec) -> bytes:
    """The job message for *spec* (its descriptors travel beside it)."""
    return json.dumps({"argv": list(spec.argv), "env": spec.env, "cwd": spec.cwd}).encode()


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

    async def start(self, spec: SpawnSpec, identity: bytes) -> Supervisor:
        """Send *spec* to a resident at *identity*; return at once (the status reports the start).

        :raises ConnectionError: the forker is gone.
        :raises OSError: no resident could take the job.
        """
        job = encode_job(spec)
        fds = scm_rights([spec.stdin, spec.stdout, spec.stderr])
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
        return Supervisor(pid=None, status_fd=fd, control_fd=fd, resident=identity)

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
    except OSError as exc:
        failure = exc  # reported to the first job, then this resident exits
    cpu = dict(base.rlimits).get(resource.RLIMIT_CPU)
    sock = socket.socket(fileno=channel)
    poller = select.poll()
    for fd in (channel, alive, wake_r):
        poller.register(fd, select.POLLIN)
    jobs = 0
    while True:
        ready = dict(poller.poll())
        if wake_r in ready:
            os.read(wake_r, 64)  # a signal while idle: there is no tree to kill
        if channel in ready:
            try:
                data, ancdata, flags, _ = sock.recvmsg(
                    _MAX_JOB, _FD_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            fds = fds_from_ancdata(ancdata)
            if not data:
                return  # the daemon closed the channel
            if len(fds) != _STD_FDS or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:  # a control byte that came after the command ended, or junk
                    os.close(fd)
                continue
            try:
                job = json.loads(data)
                spec = dataclasses.replace(
                    base,
                    argv=job["argv"],
                    env=job["env"],
                    cwd=job["cwd"],
                    stdin=fds[0],
                    stdout=fds[1],
                    stderr=fds[2],
                )
            except (ValueError, KeyError, TypeError):
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.write(channel, STATUS_ERROR + b"malformed job")
                continue
            if failure is not None:
                _close_std(spec)
                with contextlib.suppress(OSError):
                    os.write(channel, _start_error(spec, failure))
                return
            try:
                child = _start(spec)
            except OSError as exc:
                _close_std(spec)
                with contextlib.suppress(OSError):
                    os.write(channel, _start_error(spec, exc))
                continue
            jobs += 1
            times = os.times()
            retire = jobs >= MAX_JOBS or (cpu is not None and times.user + times.system >= cpu / 2)
            _supervise(spec, child, channel, channel, wake_r, RETIRING if retire else b"")
            if retire:
                return
        elif alive in ready:
            return  # the forker is gone: idle residents go with it

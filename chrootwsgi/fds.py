"""Audit the open file descriptors before entry.

A directory descriptor opened before ``chroot`` still points at the host: ``fchdir(fd)`` followed
by ``chdir("..")`` walks out of any jail, even with every capability dropped. Namespace
descriptors (``/proc/PID/ns/*``) are handles to the host's namespaces. Both are closed here, and
each closing is logged with the path it pointed at, so the owner can be found.
"""

from __future__ import annotations

import logging
import os
import re
import stat

log = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"(mnt|net|pid|user|uts|ipc|cgroup|time)(_for_children)?:\[\d+\]")


def close_escape_fds() -> list[str]:
    """Close every directory and namespace descriptor; return what each one pointed at."""
    closed: list[str] = []
    for fd, target in _escape_fds():
        os.close(fd)
        log.warning(
            "pid %d: closed fd %d (%s) before entering the jail: it would lead back "
            "to the host; open it after entry, or expose the path instead",
            os.getpid(),
            fd,
            target,
        )
        closed.append(target)
    return closed


def _escape_fds() -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            mode = os.fstat(fd).st_mode
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor os.listdir used, already closed again
        if stat.S_ISDIR(mode) or _NAMESPACE.fullmatch(target):
            found.append((fd, target))
    return found

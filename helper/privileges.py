"""Drop the root capabilities chroot-helper does not need once its sockets are bound.

The daemon starts as root when it must (bind a socket inside a root-owned jail, run commands as
other users, unshare namespaces).  After :meth:`~chroot_helper.server.HelperServer.start` it keeps
only what the configured services declare, through :attr:`Service.capabilities
<chroot_helper.server.Service.capabilities>`: the exec service needs ``CAP_SETUID`` and
``CAP_SETGID`` to run commands as their users, and ``CAP_SYS_ADMIN`` only when a command sets
``network = false`` or ``pid_namespace = true``.  Everything else (``CAP_DAC_OVERRIDE``,
``CAP_NET_ADMIN``, ``CAP_SYS_PTRACE``, ...) leaves the effective, permitted, inheritable *and*
bounding sets, so neither the daemon nor anything it starts can get it back, even a command
configured with ``user = "root"``.

Does nothing when the daemon is not root.

:func:`raise_open_files_limit` lifts the soft ``RLIMIT_NOFILE`` (often 1024) to the hard limit,
so a burst of idle clients meets the connection limits, not ``EMFILE``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
from collections.abc import Iterable
from typing import Final

from .errors import ConfigError

__all__ = [
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SYS_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "drop_capabilities",
    "lacking",
    "raise_open_files_limit",
]

log = logging.getLogger(__name__)

CAP_SETGID: Final = 6
CAP_SETUID: Final = 7
CAP_SETPCAP: Final = 8
CAP_NET_BIND_SERVICE: Final = 10
CAP_SYS_ADMIN: Final = 21
#: The capabilities the helper may keep, and what for.
_USES: Final = {
    CAP_SETGID: "CAP_SETGID (to run commands as their users)",
    CAP_SETUID: "CAP_SETUID (to run commands as their users)",
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE (to bind a port below 1024)",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN (for commands with network = false or pid_namespace = true)",
}
_PR_CAPBSET_READ: Final = 23
_PR_CAPBSET_DROP: Final = 24
_CAPABILITY_VERSION_3: Final = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as fh:
            return int(fh.read())
    except OSError:
        return 40


def lacking(capabilities: Iterable[int]) -> list[int]:
    """Those of *capabilities* this process cannot have: they are out of its bounding set."""
    return sorted(cap for cap in capabilities if _libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) != 1)


def drop_capabilities(keep: Iterable[int], *, quiet: bool = False) -> None:
    """Keep only the capabilities in *keep*, in every set including the bounding set (dropping
    from it takes ``CAP_SETPCAP``); log what is kept unless *quiet*.

    :raises ConfigError: the process lacks a capability in *keep*.
    :raises OSError: the kernel refused (the daemon then must not go on as full root).
    """
    if os.geteuid() != 0:
        return
    wanted = frozenset(keep)
    missing = lacking(wanted)
    if missing:
        names = ", ".join(_USES.get(cap, f"capability {cap}") for cap in missing)
        raise ConfigError(
            f"the helper needs {names} but was started without it: add it to the capability "
            "bounding set it runs with (the systemd unit's CapabilityBoundingSet=), or change "
            "the configuration that needs it"
        )
    for cap in range(_last_cap() + 1):
        if cap in wanted or _libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) == 0:
            continue  # kept, or gone already (dropping it would take CAP_SETPCAP all the same)
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")
    mask = sum(1 << cap for cap in wanted)
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for index in range(2):
        word = (mask >> (32 * index)) & 0xFFFFFFFF
        data[index].effective = data[index].permitted = word
        data[index].inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    if not quiet:
        log.info("kept capabilities %s; dropped the rest", sorted(wanted) or "none")


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the limit now in force.

    Commands started by the exec service get their own ``max_open_files``, not this one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
            return soft
        soft = hard
    return soft

"""What the services' standalone runners (``python -m chroot_helper.services.NAME``) share.

Reading their one table from a TOML file, and tying forked worker processes to their parent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import tomllib

from ..errors import ConfigError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def read_table(path: str, name: str) -> dict[str, object]:
    """The ``[name]`` table of the TOML file at *path*; ConfigError saying what is wrong."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config {path!r}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path!r}: not valid TOML ({exc})") from None
    table = document.get(name)
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path!r}: has no [{name}] table; add one (see {name}.listen)")
    return table


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGTERM this worker when the parent dies (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

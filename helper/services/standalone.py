"""What the services' standalone runners (``python -m chroot_helper.services.NAME``) share.

Their start-up (command line, logging, their one table from a TOML file, the open-files limit),
and tying forked worker processes to their parent.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from ..config import read_toml
from ..errors import ConfigError
from ..privileges import raise_open_files_limit

Config = TypeVar("Config")

EXIT_CONFIG = 78
"""Exit code for a bad configuration (``EX_CONFIG``)."""

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def read_table(path: str, name: str) -> dict[str, object]:
    """The ``[name]`` table of the TOML file at *path*; ConfigError saying what is wrong."""
    table = read_toml(path).get(name)
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path!r}: has no [{name}] table; add one (see {name}.listen)")
    return table


def start_runner(
    name: str,
    description: str,
    argv: Sequence[str] | None,
    parse: Callable[[Mapping[str, object]], Config],
) -> Config:
    """Parse ``--config FILE`` and ``--log-level``, set up logging to stderr, read and validate
    the ``[name]`` table with *parse* and lift the open-files limit to the hard limit.

    :raises SystemExit: 2 for a bad command line, :data:`EXIT_CONFIG` (after printing the error)
        for a bad configuration.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m chroot_helper.services.{name}", description=description
    )
    parser.add_argument("--config", required=True, help=f"TOML file with a [{name}] table")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = parse(read_table(args.config, name))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    log.info("open files limit: %d", raise_open_files_limit())
    return config


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGTERM this worker when the parent dies (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

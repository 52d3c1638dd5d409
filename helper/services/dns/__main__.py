"""Run the DNS stub alone: ``python -m chroot_helper.services.dns --config FILE``.

Reads the ``[dns]`` table of the TOML file, starts the service, logs
``dns stub ready on HOST port PORT`` to stderr, and runs until SIGTERM or SIGINT.  SIGUSR1 logs
a stats line; one more is logged at exit.  SIGHUP flushes the cache and re-reads the hosts
file.  With ``workers > 1`` the process forks that many
workers in all, sharing the address through ``SO_REUSEPORT``; SIGTERM to the parent stops them.

Exit codes: 0 stopped by a signal, 2 bad command line, 71 cannot bind, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Sequence

from ...errors import ConfigError, ListenError
from .config import DnsConfig, parse_config
from .server import start
from .stats import format_stats

log = logging.getLogger("chroot_helper.services.dns")

EXIT_OK = 0
EXIT_LISTEN = 71
EXIT_CONFIG = 78

PR_SET_PDEATHSIG = 1


def load_config(path: str) -> DnsConfig:
    """The validated ``[dns]`` table of the TOML file at ``path``."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config {path!r}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path!r}: not valid TOML ({exc})") from None
    table = document.get("dns")
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path!r}: has no [dns] table; add one (see dns.listen)")
    return parse_config(table)


async def serve(config: DnsConfig) -> int:
    """Run one worker until SIGTERM/SIGINT; return the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        service = await start(config)
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_LISTEN
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: log.info("dns stats: %s", format_stats(service.stats()))
    )
    loop.add_signal_handler(signal.SIGHUP, service.flush)
    try:
        await stop.wait()
    finally:
        log.info("dns stats: %s", format_stats(service.stats()))
        await service.close()
        log.info("dns stub stopped")
    return EXIT_OK


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGTERM this worker when the parent dies (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run_workers(config: DnsConfig) -> int:
    children = []
    parent = os.getpid()
    for _ in range(config.workers - 1):
        pid = os.fork()
        if pid == 0:
            code = EXIT_LISTEN
            try:
                _die_with_parent(parent)
                code = asyncio.run(serve(config))
            finally:
                os._exit(code)
        children.append(pid)
    code = asyncio.run(serve(config))
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        _pid, status = os.waitpid(pid, 0)
        code = code or os.waitstatus_to_exitcode(status)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m chroot_helper.services.dns", description="Run the DNS stub alone."
    )
    parser.add_argument("--config", required=True, help="TOML file with a [dns] table")
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
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return _run_workers(config)


if __name__ == "__main__":
    sys.exit(main())

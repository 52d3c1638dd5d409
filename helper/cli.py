"""The ``chroot-helper`` command line.

::

    chroot-helper serve --config /etc/chroot-helper.toml   # run the daemon (foreground)
    chroot-helper check --config /etc/chroot-helper.toml   # validate the config and exit
    chroot-helper exec NAME [ARGS...]                      # run a configured command via the helper

``exec`` passes its own stdin/stdout/stderr to the command and exits with the command's status
(``128 + N`` when killed by signal N, :data:`EXIT_TIMEOUT` on timeout, :data:`EXIT_HELPER` when the
helper refused or could not be reached).  This is the only module that configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Final

from .errors import HelperError

__all__ = ["main", "EXIT_OK", "EXIT_CONFIG", "EXIT_HELPER", "EXIT_TIMEOUT", "EXIT_OUTPUT"]

EXIT_OK: Final = 0
#: ``serve``/``check``: the configuration is invalid.
EXIT_CONFIG: Final = 78
#: ``exec``: the helper refused the request or could not be reached.
EXIT_HELPER: Final = 125
#: ``exec``: the command passed its timeout (as timeout(1)).
EXIT_TIMEOUT: Final = 124
#: ``exec``: the command passed max_output.
EXIT_OUTPUT: Final = 123

log = logging.getLogger("chroot_helper")


def _ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed, so no socket or pipe lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _serve(config_path: str, log_level: str) -> int:
    from .config import load_config
    from .privileges import raise_open_files_limit
    from .server import load_services, serve

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The daemon logs a line per request. Its format uses none of the caller's file and line,
    # thread, process or multiprocessing names: skip collecting them (a stack walk, a getpid
    # system call and two lookups per record).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if log_level.upper() != "DEBUG":
        # aiosmtpd logs every SMTP command, addresses included, at INFO: keep it for DEBUG.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    _ensure_std_fds()
    log.info("open files limit: %d", raise_open_files_limit())
    try:
        config = load_config(config_path)
        services = load_services(config)
    except HelperError as exc:
        print(f"chroot-helper: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, services, stop)

    try:
        asyncio.run(run())
    except HelperError as exc:
        print(f"chroot-helper: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _check(config_path: str) -> int:
    from .config import load_config
    from .server import load_services

    try:
        config = load_config(config_path)
        load_services(config)
    except HelperError as exc:
        print(f"chroot-helper: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{config_path}: OK ({len(config.commands)} commands, socket {config.socket})")
    return EXIT_OK


def _exec(argv: Sequence[str], timeout: float | None) -> int:
    from . import client

    try:
        done = client.run(list(argv), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        print(f"chroot-helper: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except client.OutputLimitExceeded as exc:
        print(f"chroot-helper: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except HelperError as exc:
        print(f"chroot-helper: {exc}", file=sys.stderr)
        return EXIT_HELPER
    return done.returncode if done.returncode >= 0 else 128 - done.returncode


def _dns_stats(config_path: str | None) -> int:
    from . import client
    from .services.dns import DnsStats, format_stats

    if config_path is not None:
        from .config import load_config

        try:
            os.environ["CHROOT_HELPER_SOCKET"] = load_config(config_path).socket
        except HelperError as exc:
            print(f"chroot-helper: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        result = client.call("dns_stats")
    except HelperError as exc:
        print(f"chroot-helper: {exc}", file=sys.stderr)
        return EXIT_HELPER
    print(format_stats(DnsStats.from_json(result)))
    return EXIT_OK


_MAIL_COMMANDS = ("sendmail", "mailq", "flush")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chroot-helper`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _MAIL_COMMANDS:
        # sendmail(1) flags (-t, -oi, -f ADDR, ...) do not fit argparse; each parses its own.
        from .services import mail

        run: dict[str, Callable[[list[str]], int]] = {
            "sendmail": mail.sendmail_main,
            "mailq": mail.mailq_main,
            "flush": mail.flush_main,
        }
        return run[args[0]](args[1:])
    parser = argparse.ArgumentParser(prog="chroot-helper", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the daemon in the foreground")
    p_serve.add_argument("--config", required=True, help="TOML configuration file")
    p_serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    p_check = sub.add_parser("check", help="validate the configuration and exit")
    p_check.add_argument("--config", required=True, help="TOML configuration file")
    p_exec = sub.add_parser("exec", help="run a configured command through the helper")
    p_exec.add_argument(
        "--timeout", type=float, default=None, help="seconds (capped by the config)"
    )
    p_exec.add_argument("name", help="configured command name or path")
    p_exec.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the command")
    for name, text in (
        ("sendmail", "submit a message like sendmail(1) (-t, -i, -f ADDR, -F NAME, ...)"),
        ("mailq", "list the mail queue (--config FILE or --spool DIR)"),
        ("flush", "retry every queued message now (--config FILE or --spool DIR)"),
    ):
        sub.add_parser(name, help=text, add_help=False)
    p_stats = sub.add_parser("dns-stats", help="print the DNS stub's counters")
    p_stats.add_argument(
        "--config", help="the helper's TOML file (for its socket); else $CHROOT_HELPER_SOCKET"
    )
    ns = parser.parse_args(argv)
    if ns.command == "serve":
        return _serve(ns.config, ns.log_level)
    if ns.command == "check":
        return _check(ns.config)
    if ns.command == "dns-stats":
        return _dns_stats(ns.config)
    return _exec([ns.name, *ns.args], ns.timeout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

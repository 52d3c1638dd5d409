"""Run the mail service alone: ``python -m chroot_helper.services.mail --config FILE``.

Reads the ``[mail]`` table of the TOML file, starts the service, logs
``mail service ready on ADDRESSES`` to stderr, and runs until SIGTERM or SIGINT.  SIGUSR1
logs a stats line; SIGHUP retries every deferred message now (like ``flush``).

The front ends run the same way: ``python -m chroot_helper.services.mail sendmail|mailq|flush
ARGS`` (what ``chroot-helper sendmail|mailq|flush`` call).

Exit codes: 0 stopped by a signal, 2 bad command line, 71 cannot bind, 73 spool unusable,
78 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tomllib
from collections.abc import Sequence

from ...errors import ConfigError, MailListenError, SpoolError
from .config import MailConfig, parse_config
from .mailq import flush_main, mailq_main
from .sendmail_cli import main as sendmail_main
from .stats import format_stats

log = logging.getLogger("chroot_helper.services.mail")

EXIT_OK = 0
EXIT_LISTEN = 71
EXIT_SPOOL = 73
EXIT_CONFIG = 78


def load_config(path: str) -> MailConfig:
    """The validated ``[mail]`` table of the TOML file at ``path``."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config {path!r}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path!r}: not valid TOML ({exc})") from None
    table = document.get("mail")
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path!r}: has no [mail] table; add one (see mail.listen)")
    return parse_config(table)


async def serve(config: MailConfig) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    from .server import start

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        service = await start(config)
    except MailListenError as exc:
        log.error("%s", exc)
        return EXIT_LISTEN
    except SpoolError as exc:
        log.error("%s", exc)
        return EXIT_SPOOL
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: log.info("mail stats: %s", format_stats(service.stats()))
    )
    loop.add_signal_handler(signal.SIGHUP, service.flush)
    try:
        await stop.wait()
    finally:
        await service.close()
        log.info("mail service stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "sendmail":
        return sendmail_main(args_list[1:])
    if args_list and args_list[0] == "mailq":
        return mailq_main(args_list[1:])
    if args_list and args_list[0] == "flush":
        return flush_main(args_list[1:])
    parser = argparse.ArgumentParser(
        prog="python -m chroot_helper.services.mail",
        description="Run the mail service alone (or: sendmail|mailq|flush ARGS).",
    )
    parser.add_argument("--config", required=True, help="TOML file with a [mail] table")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd logs every command at INFO on "mail.log", addresses included; keep it for DEBUG.
    if args.log_level != "DEBUG":
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())

"""Mail service of chroot-helper: SMTP submission on loopback and in the jail, a durable spool,
delivery through a smarthost or the host's sendmail binary.

An empty jail has no sendmail binary and no MTA; apps submit here instead, with smtplib, with
:func:`client_sendmail`, or with ``chroot-helper sendmail`` (sendmail(1) flags).  A message is
acknowledged with ``250`` only once it is fsynced in the spool, and is never dropped after that.

The helper core plugs it in with::

    config = parse_config(toml["mail"])         # ConfigError names the key, value and fix
    service = await start(config)               # binds mail.listen, starts the queue runner
    print(format_stats(service.stats()))
    await service.close()

    sendmail_main(argv)  mailq_main(argv)  flush_main(argv)   # chroot-helper sendmail|mailq|flush

Standalone, for tests and debugging: ``python -m chroot_helper.services.mail --config FILE``,
and ``python -m chroot_helper.services.mail sendmail|mailq|flush ...``.

:func:`client_sendmail` and the front ends use only the standard library; the server side
(:func:`start`, :class:`MailService`, needing aiosmtpd) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .client import client_sendmail
from .config import MailConfig, parse_config
from .mailq import flush_main, mailq_main
from .sendmail_cli import build_submission
from .sendmail_cli import main as sendmail_main
from .sendmail_cli import parse_args as parse_sendmail_args
from .stats import MailStats, format_stats

if TYPE_CHECKING:
    from .server import MailService, start
    from .service import create_service

__all__ = [
    "MailConfig",
    "MailService",
    "MailStats",
    "build_submission",
    "client_sendmail",
    "create_service",
    "flush_main",
    "format_stats",
    "mailq_main",
    "parse_config",
    "parse_sendmail_args",
    "sendmail_main",
    "start",
]


def __getattr__(name: str) -> object:
    if name in ("start", "MailService"):
        from . import server

        return getattr(server, name)
    if name == "create_service":  # the daemon side, not for jailed apps
        from . import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The mail service as a chroot-helper service: started and stopped with ``chroot-helper serve``.

A ``[mail]`` table in the helper's configuration makes the server load this module. The SMTP
listeners bind when the daemon starts, before it drops its capabilities, so
``listen = ["127.0.0.1:25"]`` works for a helper started as root; the queue runner delivers with
the helper's own privileges, never inside the jail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...config import HelperConfig
from ..hosted import HostedService, refuse_workers
from .config import MailConfig, parse_config

if TYPE_CHECKING:
    from .server import MailService


async def _start(config: MailConfig) -> MailService:
    from .server import start  # aiosmtpd: imported by the daemon only

    return await start(config)


def create_service(
    config: HelperConfig, table: Mapping[str, object]
) -> HostedService[MailConfig, MailService]:
    """The server's entry point for a ``[mail]`` table; raises ConfigError on a bad table."""
    mail = parse_config(table)
    refuse_workers("mail", mail.workers)
    return HostedService("mail", mail, _start)

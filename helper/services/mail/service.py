"""The mail service as a chroot-helper service: started and stopped with ``chroot-helper serve``.

A ``[mail]`` table in the helper's configuration makes the server load this module. The SMTP
listeners bind in :meth:`MailHelperService.start`, before the daemon drops its capabilities, so
``listen = ["127.0.0.1:25"]`` works for a helper started as root; the queue runner delivers with
the helper's own privileges, never inside the jail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...config import HelperConfig
from ...errors import ConfigError
from ...server import Service
from .config import MailConfig, parse_config

if TYPE_CHECKING:
    from .server import MailService


class MailHelperService(Service):
    """Runs SMTP submission and the queue runner inside the helper's event loop.

    :param config: the validated ``[mail]`` table.
    """

    name = "mail"

    def __init__(self, config: MailConfig) -> None:
        self.config = config
        self._running: MailService | None = None

    async def start(self) -> None:
        from .server import start

        self._running = await start(self.config)

    async def stop(self) -> None:
        if self._running is not None:
            await self._running.close()
            self._running = None


def create_service(config: HelperConfig, table: Mapping[str, object]) -> MailHelperService:
    """The server's entry point for a ``[mail]`` table; raises ConfigError on a bad table."""
    mail = parse_config(table)
    if mail.workers > 1:
        raise ConfigError(
            f"mail.workers = {mail.workers}: inside chroot-helper serve the mail service runs in "
            "the daemon's own loop; remove mail.workers, or run it alone with "
            "'python -m chroot_helper.services.mail --config FILE' for several workers"
        )
    return MailHelperService(mail)

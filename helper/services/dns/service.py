"""The DNS stub as a chroot-helper service: started and stopped with ``chroot-helper serve``.

A ``[dns]`` table in the helper's configuration makes the server load this module; the stub's
UDP and TCP listeners bind in :meth:`DnsHelperService.start`, before the daemon drops its
capabilities, so ``listen = "127.0.0.1:53"`` works for a helper started as root.
``chroot-helper dns-stats`` asks the running daemon with the ``dns_stats`` operation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ...config import HelperConfig
from ...errors import ConfigError
from ...protocol import Request, Response
from ...server import Channel, Service
from .config import DnsConfig, parse_config
from .server import DnsService, start


class DnsHelperService(Service):
    """Runs the stub resolver inside the helper's event loop.

    :param config: the validated ``[dns]`` table.
    """

    name = "dns"

    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        self._running: DnsService | None = None

    async def start(self) -> None:
        self._running = await start(self.config)

    async def stop(self) -> None:
        if self._running is not None:
            await self._running.close()
            self._running = None

    async def handle_dns_stats(self, request: Request, channel: Channel) -> None:
        """Answer the stub's counters (``chroot-helper dns-stats``)."""
        assert self._running is not None, "requests are served only after start()"
        await channel.send(Response(result=dataclasses.asdict(self._running.stats())))


def create_service(config: HelperConfig, table: Mapping[str, object]) -> DnsHelperService:
    """The server's entry point for a ``[dns]`` table; raises ConfigError on a bad table."""
    dns = parse_config(table)
    if dns.workers > 1:
        raise ConfigError(
            f"dns.workers = {dns.workers}: inside chroot-helper serve the stub runs in the "
            "daemon's own loop; remove dns.workers, or run the stub alone with "
            "'python -m chroot_helper.services.dns --config FILE' for several workers"
        )
    return DnsHelperService(dns)

"""The DNS stub as a chroot-helper service: started and stopped with ``chroot-helper serve``.

A ``[dns]`` table in the helper's configuration makes the server load this module; the stub's
UDP and TCP listeners bind when the daemon starts, before it drops its capabilities, so
``listen = "127.0.0.1:53"`` works for a helper started as root.
``chroot-helper dns-stats`` asks the running daemon with the ``dns_stats`` operation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ...config import HelperConfig
from ...protocol import Request, Response
from ...server import Channel
from ..hosted import HostedService, refuse_workers
from .config import DnsConfig, parse_config
from .server import DnsService, start


class DnsHelperService(HostedService[DnsConfig, DnsService]):
    """Runs the stub resolver inside the helper's event loop."""

    def __init__(self, config: DnsConfig) -> None:
        super().__init__("dns", config, start)

    async def handle_dns_stats(self, request: Request, channel: Channel) -> None:
        """Answer the stub's counters (``chroot-helper dns-stats``)."""
        assert self.running is not None, "requests are served only after start()"
        await channel.send(Response(result=dataclasses.asdict(self.running.stats())))


def create_service(config: HelperConfig, table: Mapping[str, object]) -> DnsHelperService:
    """The server's entry point for a ``[dns]`` table; raises ConfigError on a bad table."""
    dns = parse_config(table)
    refuse_workers("dns", dns.workers)
    return DnsHelperService(dns)

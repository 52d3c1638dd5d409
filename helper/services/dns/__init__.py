"""DNS service of chroot-helper: a caching stub resolver on loopback for jailed apps.

An empty jail has no resolv.conf, so glibc asks 127.0.0.1:53; this service answers there (or at
any loopback address the jail's resolv.conf names), forwards to the host's upstream resolvers,
caches positive and negative answers, and answers hosts-file names itself.

``chroot-helper serve`` starts it when its configuration has a ``[dns]`` table
(:func:`create_service`). Used directly::

    config = parse_config(toml["dns"])          # ConfigError names the key, value and fix
    service = await start(config)               # binds UDP+TCP in the running loop
    print(format_stats(service.stats()))        # chroot-helper dns-stats
    await service.close()

Standalone, for tests and debugging: ``python -m chroot_helper.services.dns --config FILE``.
"""

from __future__ import annotations

from .config import DnsConfig, Endpoint, parse_config
from .resolvconf import JAIL_NSSWITCH_CONF, jail_resolv_conf
from .server import DnsService, start
from .service import DnsHelperService, create_service
from .stats import DnsStats, format_stats

__all__ = [
    "JAIL_NSSWITCH_CONF",
    "jail_resolv_conf",
    "DnsConfig",
    "DnsHelperService",
    "DnsService",
    "DnsStats",
    "Endpoint",
    "create_service",
    "format_stats",
    "parse_config",
    "start",
]

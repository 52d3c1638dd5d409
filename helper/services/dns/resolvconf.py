"""The resolv.conf and nsswitch.conf a jail's private mount view needs to reach the stub.

glibc's stub resolver always asks port 53 and reads ``/etc/resolv.conf`` and
``/etc/nsswitch.conf``; an empty jail has neither, so glibc falls back to 127.0.0.1:53 and
``hosts: dns [!UNAVAIL=return] files``.  When the stub listens elsewhere (another loopback
address because the host's resolver holds 127.0.0.1:53), the jail side bind-mounts these texts
into its private mount view; the jail directory on disk stays empty.  Pure text, no I/O.

Example::

    >>> print(jail_resolv_conf(parse_config({"listen": "127.0.0.53:53",
    ...                                      "upstreams": ["10.0.0.1"]})), end="")
    # chroot-helper DNS stub; generated, do not edit
    nameserver 127.0.0.53
    options timeout:2 attempts:2 edns0
"""

from __future__ import annotations

from ...errors import ConfigError
from .config import DNS_PORT, DnsConfig

__all__ = ["JAIL_NSSWITCH_CONF", "jail_resolv_conf"]

JAIL_NSSWITCH_CONF = "# chroot-helper; generated, do not edit\nhosts: dns\n"
"""Names go to the stub only; it answers the host's hosts-file names itself."""


def jail_resolv_conf(config: DnsConfig, *, timeout: int = 2, attempts: int = 2) -> str:
    """resolv.conf text naming the stub's listen address.

    :param timeout: glibc's per-try timeout, seconds (``options timeout:``).
    :param attempts: glibc's tries per name (``options attempts:``).
    :raises ConfigError: ``dns.listen`` is not on port 53, which glibc cannot be told to use.
    """
    if config.listen.port != DNS_PORT:
        raise ConfigError(
            f"dns.listen = {str(config.listen)!r}: glibc in the jail always asks port 53; "
            "use port 53 on a spare loopback address, e.g. '127.0.0.53:53'"
        )
    return (
        "# chroot-helper DNS stub; generated, do not edit\n"
        f"nameserver {config.listen.host}\n"
        f"options timeout:{timeout} attempts:{attempts} edns0\n"
    )

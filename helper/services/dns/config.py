"""The ``[dns]`` table of the helper's TOML configuration, validated into a :class:`DnsConfig`.

Validation happens once, at start; a bad value raises :class:`~chroot_helper.errors.ConfigError`
naming the key, the value and what to change.  Nothing here opens sockets.

Example::

    >>> cfg = parse_config({"listen": "127.0.0.53:5353", "upstreams": ["127.0.0.2:5300"]})
    >>> cfg.listen
    Endpoint(host='127.0.0.53', port=5353)

Every key and its default::

    [dns]
    listen = "127.0.0.1:53"          # UDP and TCP; a loopback address only
    upstreams = []                   # "host[:port]"; empty: the nameservers of resolv_conf
    resolv_conf = "/etc/resolv.conf" # read at start when upstreams is empty
    hosts_file = "/etc/hosts"        # names answered locally; "" disables
    allow = []                       # if non-empty, only these names resolve ("*.x" = below x)
    deny = []                        # never resolved (wins over allow); answered REFUSED
    cache_size = 10000               # cached answers (positive and negative)
    min_ttl = 0                      # clamp of cached TTLs, seconds
    max_ttl = 86400
    max_negative_ttl = 3600          # cap of the RFC 2308 negative TTL
    upstream_timeout = 1.5           # one attempt at one upstream, seconds
    timeout = 4.0                    # whole query: SERVFAIL after this, seconds
    edns_udp_size = 1232             # EDNS0 payload size offered to clients and upstreams
    log_queries = false              # one INFO line per answered query
    stats_interval = 0               # seconds between stats log lines; 0 disables
    tcp_idle_timeout = 10.0          # seconds a TCP client may stay silent
    max_tcp_clients = 128
    workers = 1                      # processes sharing listen via SO_REUSEPORT (standalone run)
    pin_workers = true               # workers > 1: one CPU each, answering the queries sent from it
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...errors import ConfigError

__all__ = ["DEFAULT_LISTEN", "DnsConfig", "Endpoint", "parse_config", "parse_resolv_conf"]

DEFAULT_LISTEN = "127.0.0.1:53"
DNS_PORT = 53


@dataclasses.dataclass(frozen=True, kw_only=True)
class Endpoint:
    """An IP address and port.

    :param host: a literal IPv4 or IPv6 address (no brackets, no names).
    :param port: 1-65535.
    """

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        """True for an IPv6 address."""
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DnsConfig:
    """Validated settings of the DNS stub; see the module docstring for keys and defaults.

    :param listen: where UDP and TCP are served.  Loopback only: the stub answers anyone who can
        reach it, so it must never be exposed off the host.
    :param upstreams: tried in order with failover; never empty.
    :param hosts_file: a hosts(5) file answered locally, or ``None``.
    :param allow: name patterns that may resolve; empty allows everything not denied.
    :param deny: name patterns answered REFUSED; wins over ``allow``.
    :param timeout: bound of a whole forwarded query; past it the client gets SERVFAIL.
    :param workers: processes sharing ``listen`` through ``SO_REUSEPORT``, each with its own
        cache; only the standalone runner forks them.  With 1, a second server on the same
        address fails to start instead of silently sharing it.
    :param pin_workers: with several workers, pin each of the first ones to one CPU and steer
        the queries sent from that CPU to it (``SO_INCOMING_CPU``, Linux 6.2+): a lookup is
        answered without waking another CPU.  One busy client thread then gets one worker's
        capacity; set false to spread its queries over every worker instead.
    """

    listen: Endpoint = dataclasses.field(
        default_factory=lambda: Endpoint(host="127.0.0.1", port=DNS_PORT)
    )
    upstreams: tuple[Endpoint, ...]
    hosts_file: Path | None = Path("/etc/hosts")
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    cache_size: int = 10000
    min_ttl: int = 0
    max_ttl: int = 86400
    max_negative_ttl: int = 3600
    upstream_timeout: float = 1.5
    timeout: float = 4.0
    edns_udp_size: int = 1232
    log_queries: bool = False
    stats_interval: float = 0.0
    tcp_idle_timeout: float = 10.0
    max_tcp_clients: int = 128
    workers: int = 1
    pin_workers: bool = True


def _key(name: str) -> str:
    return f"dns.{name}"


def parse_endpoint(text: str, *, key: str, default_port: int = DNS_PORT) -> Endpoint:
    """Parse ``"1.2.3.4"``, ``"1.2.3.4:53"``, ``"::1"`` or ``"[::1]:53"``.

    :raises ConfigError: naming ``key`` when ``text`` is not an address with an optional port.
    """
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not text[end + 1 :].startswith(":")):
            raise ConfigError(f"{key} = {text!r}: write an IPv6 address as '[::1]:53'")
        host, port_text = text[1:end], text[end + 2 :]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{key} = {text!r}: {host!r} is not an IP address; "
            "write a literal address such as '127.0.0.1:53' or '[::1]:53' (no host names)"
        ) from None
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{key} = {text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return Endpoint(host=address.compressed, port=port)


def parse_resolv_conf(text: str) -> list[str]:
    """Return the ``nameserver`` addresses of a resolv.conf(5) text, in order.

    Scoped IPv6 addresses (``fe80::1%eth0``) and lines that are not addresses are skipped.
    """
    servers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and "%" not in fields[1]:
            try:
                servers.append(ipaddress.ip_address(fields[1]).compressed)
            except ValueError:
                continue
    return servers


def _get(
    table: Mapping[str, object], name: str, kind: type | tuple[type, ...], hint: str
) -> object:
    value = table[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{_key(name)} = {value!r}: expected {hint}")
    if not isinstance(value, kind):
        raise ConfigError(f"{_key(name)} = {value!r}: expected {hint}")
    return value


def _int(table: Mapping[str, object], name: str, low: int, high: int) -> int | None:
    if name not in table:
        return None
    value = _get(table, name, int, f"an integer from {low} to {high}")
    assert isinstance(value, int)
    if not low <= value <= high:
        raise ConfigError(f"{_key(name)} = {value!r}: expected an integer from {low} to {high}")
    return value


def _float(table: Mapping[str, object], name: str, low: float, high: float) -> float | None:
    if name not in table:
        return None
    value = _get(table, name, (int, float), f"a number of seconds from {low} to {high}")
    assert isinstance(value, int | float)
    if not low <= value <= high:
        raise ConfigError(
            f"{_key(name)} = {value!r}: expected a number of seconds from {low} to {high}"
        )
    return float(value)


def _strings(table: Mapping[str, object], name: str) -> list[str] | None:
    if name not in table:
        return None
    value = table[name]
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ConfigError(f'{_key(name)} = {value!r}: expected a list of strings, e.g. ["x"]')
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{_key(name)} = {value!r}: every entry must be a string")
        out.append(item)
    return out


def _pattern(name: str, text: str) -> str:
    pattern = text.strip().rstrip(".").lower()
    body = pattern[2:] if pattern.startswith("*.") else pattern
    labels = body.split(".")
    if not body or any(not label or len(label) > 63 or "*" in label for label in labels):
        raise ConfigError(
            f"{_key(name)} entry {text!r}: expected a domain name such as 'example.org' "
            "or '*.example.org' (names below it)"
        )
    return pattern


_KNOWN = frozenset(
    {
        "listen",
        "upstreams",
        "resolv_conf",
        "hosts_file",
        "allow",
        "deny",
        "cache_size",
        "min_ttl",
        "max_ttl",
        "max_negative_ttl",
        "upstream_timeout",
        "timeout",
        "edns_udp_size",
        "log_queries",
        "stats_interval",
        "tcp_idle_timeout",
        "max_tcp_clients",
        "workers",
        "pin_workers",
    }
)


def parse_config(table: Mapping[str, object]) -> DnsConfig:
    """Validate the ``[dns]`` table of the helper's TOML into a :class:`DnsConfig`.

    When ``upstreams`` is absent or empty the nameservers of ``resolv_conf`` (default
    ``/etc/resolv.conf``) are read now, once.

    :raises ConfigError: naming the key (``dns.listen``, ...), the bad value and the fix.
    """
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise ConfigError(
            f"dns.{unknown[0]}: unknown key; the [dns] table takes {', '.join(sorted(_KNOWN))}"
        )
    kwargs: dict[str, object] = {}

    listen_text = table.get("listen", DEFAULT_LISTEN)
    if not isinstance(listen_text, str):
        raise ConfigError(f"dns.listen = {listen_text!r}: expected a string like '127.0.0.1:53'")
    listen = parse_endpoint(listen_text, key="dns.listen")
    if not ipaddress.ip_address(listen.host).is_loopback:
        raise ConfigError(
            f"dns.listen = {listen_text!r}: the stub serves anyone who reaches it; "
            "use a loopback address (127.0.0.0/8 or ::1)"
        )
    kwargs["listen"] = listen

    upstream_texts = _strings(table, "upstreams") or []
    if not upstream_texts:
        resolv = table.get("resolv_conf", "/etc/resolv.conf")
        if not isinstance(resolv, str):
            raise ConfigError(f"dns.resolv_conf = {resolv!r}: expected a file path")
        try:
            upstream_texts = parse_resolv_conf(Path(resolv).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"dns.resolv_conf = {resolv!r}: cannot read it ({exc.strerror}); "
                "set dns.upstreams explicitly"
            ) from None
        if not upstream_texts:
            raise ConfigError(
                f"dns.resolv_conf = {resolv!r}: has no nameserver lines; set dns.upstreams"
            )
        upstream_key = f"dns.upstreams (from {resolv})"
    else:
        upstream_key = "dns.upstreams"
    upstreams = tuple(parse_endpoint(text, key=upstream_key) for text in upstream_texts)
    if listen in upstreams:
        raise ConfigError(
            f"{upstream_key} contains {listen}, which is dns.listen: the stub would forward to "
            "itself; point dns.upstreams at a real resolver or move dns.listen"
        )
    kwargs["upstreams"] = upstreams

    if "hosts_file" in table:
        hosts = _get(table, "hosts_file", str, 'a file path, or "" to disable')
        assert isinstance(hosts, str)
        if hosts and not Path(hosts).is_file():
            raise ConfigError(
                f"dns.hosts_file = {hosts!r}: no such file; fix the path, or set "
                'dns.hosts_file = "" to answer only localhost locally'
            )
        kwargs["hosts_file"] = Path(hosts) if hosts else None

    for name in ("allow", "deny"):
        patterns = _strings(table, name)
        if patterns is not None:
            kwargs[name] = tuple(_pattern(name, text) for text in patterns)

    ints = {
        "cache_size": (0, 10_000_000),
        "min_ttl": (0, 86400),
        "max_ttl": (0, 604800),
        "max_negative_ttl": (0, 86400),
        "edns_udp_size": (512, 4096),
        "max_tcp_clients": (1, 65536),
        "workers": (1, 64),
    }
    for name, (low, high) in ints.items():
        number = _int(table, name, low, high)
        if number is not None:
            kwargs[name] = number
    floats = {
        "upstream_timeout": (0.05, 60.0),
        "timeout": (0.05, 120.0),
        "stats_interval": (0.0, 86400.0),
        "tcp_idle_timeout": (0.1, 3600.0),
    }
    for name, (flow, fhigh) in floats.items():
        seconds = _float(table, name, flow, fhigh)
        if seconds is not None:
            kwargs[name] = seconds
    for flag in ("log_queries", "pin_workers"):
        if flag in table:
            kwargs[flag] = _get(table, flag, bool, "true or false")

    config = DnsConfig(**kwargs)  # type: ignore[arg-type]
    if config.min_ttl > config.max_ttl:
        raise ConfigError(
            f"dns.min_ttl = {config.min_ttl} is above dns.max_ttl = {config.max_ttl}; "
            "lower dns.min_ttl or raise dns.max_ttl"
        )
    if config.upstream_timeout > config.timeout:
        raise ConfigError(
            f"dns.upstream_timeout = {config.upstream_timeout} is above dns.timeout = "
            f"{config.timeout}: no upstream would get a full attempt; lower it"
        )
    return config

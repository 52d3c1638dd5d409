"""Counters of the DNS service, their frozen snapshot, and the line operators read.

``chroot-helper dns-stats`` and the periodic log line both print :func:`format_stats`::

    queries=120 udp=118 tcp=2 cache_hits=97 cache_misses=21 hit_ratio=0.81 ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = ["Counters", "DnsStats", "format_stats"]


@dataclasses.dataclass(slots=True)
class Counters:
    """Mutable counters, owned by one service instance and updated on the loop thread."""

    queries: int = 0
    udp_queries: int = 0
    tcp_queries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    hosts_answers: int = 0
    refused: int = 0
    servfail: int = 0
    formerr: int = 0
    dropped: int = 0
    truncated: int = 0
    upstream_queries: int = 0
    upstream_errors: int = 0
    upstream_timeouts: int = 0
    upstream_mismatches: int = 0
    upstream_tcp_retries: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DnsStats:
    """A snapshot of the service's counters.

    :param queries: queries answered or dropped, UDP and TCP.
    :param cache_hits: queries answered from the cache (fast path and slow path).
    :param cache_misses: queries forwarded (or joined to an identical forward in flight).
    :param hosts_answers: queries answered from the hosts file.
    :param refused: queries refused by the allow/deny lists or for an unsupported type/class.
    :param servfail: SERVFAIL answers (every upstream failed or timed out).
    :param formerr: FORMERR answers to malformed queries.
    :param dropped: packets not answered at all (garbage, responses, overload).
    :param truncated: UDP answers sent with TC set (client should retry over TCP).
    :param upstream_queries: attempts sent to upstreams.
    :param upstream_errors: failed attempts (timeouts, refused connections, error rcodes).
    :param upstream_timeouts: attempts that got no answer in time.
    :param upstream_mismatches: upstream datagrams ignored as not answering our question.
    :param upstream_tcp_retries: truncated upstream answers retried over TCP.
    :param cache_entries: answers in the cache now.
    :param uptime: seconds since the service started.
    """

    queries: int
    udp_queries: int
    tcp_queries: int
    cache_hits: int
    cache_misses: int
    hosts_answers: int
    refused: int
    servfail: int
    formerr: int
    dropped: int
    truncated: int
    upstream_queries: int
    upstream_errors: int
    upstream_timeouts: int
    upstream_mismatches: int
    upstream_tcp_retries: int
    cache_entries: int
    uptime: float

    @classmethod
    def snapshot(cls, counters: Counters, *, cache_entries: int, uptime: float) -> DnsStats:
        """Freeze ``counters``."""
        return cls(**dataclasses.asdict(counters), cache_entries=cache_entries, uptime=uptime)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> DnsStats:
        """Rebuild stats the daemon sent (``chroot-helper dns-stats``); missing counters are 0."""
        values: dict[str, float] = {}
        for item in dataclasses.fields(cls):
            value = data.get(item.name, 0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"dns stats: {item.name} = {value!r} is not a number")
            values[item.name] = value
        return cls(**values)  # type: ignore[arg-type]  # ints where the fields say int

    @property
    def hit_ratio(self) -> float:
        """Cache hits over cache-eligible queries (hits + misses); 0.0 before any."""
        eligible = self.cache_hits + self.cache_misses
        return self.cache_hits / eligible if eligible else 0.0


def format_stats(stats: DnsStats) -> str:
    """One ``key=value`` line, stable order, for logs and ``chroot-helper dns-stats``."""
    fields = [
        ("queries", stats.queries),
        ("udp", stats.udp_queries),
        ("tcp", stats.tcp_queries),
        ("cache_hits", stats.cache_hits),
        ("cache_misses", stats.cache_misses),
        ("hit_ratio", f"{stats.hit_ratio:.2f}"),
        ("cache_entries", stats.cache_entries),
        ("hosts", stats.hosts_answers),
        ("refused", stats.refused),
        ("servfail", stats.servfail),
        ("formerr", stats.formerr),
        ("dropped", stats.dropped),
        ("truncated", stats.truncated),
        ("upstream_queries", stats.upstream_queries),
        ("upstream_errors", stats.upstream_errors),
        ("upstream_timeouts", stats.upstream_timeouts),
        ("upstream_mismatches", stats.upstream_mismatches),
        ("upstream_tcp_retries", stats.upstream_tcp_retries),
        ("uptime", f"{stats.uptime:.0f}s"),
    ]
    return " ".join(f"{name}={value}" for name, value in fields)

"""Hosts-file parsing and the allow/deny name policy."""

from __future__ import annotations

from chroot_helper.services.dns.hosts import parse_hosts
from chroot_helper.services.dns.policy import NamePolicy
from chroot_helper.services.dns.stats import Counters, DnsStats, format_stats


def test_hosts_forward_reverse_and_localhost():
    table = parse_hosts(
        "10.0.0.5   db.internal db  # primary\n"
        "10.0.0.6   db.internal\n"
        "fe80::1%lo  linklocal\n"
        "not-an-ip  broken\n"
        "10.0.0.7\n"
    )
    assert table.addresses("DB.internal.") == ("10.0.0.5", "10.0.0.6")
    assert table.addresses("db") == ("10.0.0.5",)
    assert table.addresses("linklocal") == ("fe80::1",)
    assert table.addresses("broken") is None
    assert table.addresses("localhost") == ("127.0.0.1", "::1")
    assert table.pointer("5.0.0.10.in-addr.arpa.") == "db.internal"
    assert table.pointer("1.0.0.127.in-addr.arpa") == "localhost"


def test_policy_exact_and_wildcard():
    policy = NamePolicy(
        allow=("api.example.org", "*.cdn.example.org"), deny=("bad.cdn.example.org",)
    )
    assert policy.permits("API.example.org.")
    assert policy.permits("img.cdn.example.org")
    assert not policy.permits("cdn.example.org")
    assert not policy.permits("bad.cdn.example.org")
    assert not policy.permits("evil.test")
    assert policy.permits("localhost")


def test_policy_empty_allow_permits_all_but_denied():
    policy = NamePolicy(allow=(), deny=("*.tracker.test",))
    assert policy.permits("anything.example")
    assert not policy.permits("x.tracker.test")


def test_stats_line():
    counters = Counters(queries=10, cache_hits=6, cache_misses=2, upstream_errors=1)
    line = format_stats(DnsStats.snapshot(counters, cache_entries=3, uptime=12.4))
    assert line.startswith("queries=10 udp=0 tcp=0 cache_hits=6 cache_misses=2 hit_ratio=0.75")
    assert "upstream_errors=1" in line and "cache_entries=3" in line and "uptime=12s" in line

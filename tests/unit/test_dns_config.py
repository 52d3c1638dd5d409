"""parse_config: defaults, resolv.conf fallback, and errors that name the key, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from chroot_helper.config import load_config
from chroot_helper.errors import ConfigError
from chroot_helper.server import load_services
from chroot_helper.services.dns import (
    JAIL_NSSWITCH_CONF,
    DnsConfig,
    Endpoint,
    jail_resolv_conf,
    parse_config,
)
from chroot_helper.services.dns.config import parse_resolv_conf


def test_defaults_with_explicit_upstreams():
    config = parse_config({"upstreams": ["127.0.0.2:5300", "::1", "[::1]:5301"]})
    assert isinstance(config, DnsConfig)
    assert config.listen == Endpoint(host="127.0.0.1", port=53)
    assert config.upstreams == (
        Endpoint(host="127.0.0.2", port=5300),
        Endpoint(host="::1", port=53),
        Endpoint(host="::1", port=5301),
    )
    assert config.hosts_file == Path("/etc/hosts")
    assert config.allow == () and config.deny == ()
    assert config.timeout == 4.0 and config.upstream_timeout == 1.5
    assert config.workers == 1


def test_upstreams_default_to_resolv_conf(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# c\nsearch example\nnameserver 127.0.0.9\nnameserver fe80::1%eth0\n"
        "nameserver ::1\noptions ndots:2\n"
    )
    config = parse_config({"resolv_conf": str(resolv), "listen": "127.0.0.53:53"})
    assert [str(u) for u in config.upstreams] == ["127.0.0.9:53", "[::1]:53"]


def test_resolv_conf_without_nameservers(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example\n")
    with pytest.raises(ConfigError, match=r"dns.resolv_conf = .* has no nameserver.*dns.upstreams"):
        parse_config({"resolv_conf": str(resolv)})


def test_resolv_conf_unreadable(tmp_path):
    with pytest.raises(ConfigError, match=r"dns.resolv_conf = .*cannot read.*dns.upstreams"):
        parse_config({"resolv_conf": str(tmp_path / "missing")})


def test_parse_resolv_conf_order():
    assert parse_resolv_conf("nameserver 10.0.0.1\nnameserver bogus\nnameserver 10.0.0.2") == [
        "10.0.0.1",
        "10.0.0.2",
    ]


@pytest.mark.parametrize(
    ("table", "pattern"),
    [
        ({"listen": "10.0.0.1:53"}, r"dns.listen = '10.0.0.1:53'.*loopback"),
        ({"listen": "localhost:53"}, r"dns.listen = 'localhost:53'.*not an IP address"),
        ({"listen": "127.0.0.1:99999"}, r"dns.listen = '127.0.0.1:99999'.*1 to 65535"),
        ({"listen": "[::1:53"}, r"dns.listen = '\[::1:53'.*\[::1\]:53"),
        ({"listen": 53}, r"dns.listen = 53: expected a string"),
        ({"upstreams": "127.0.0.2"}, r"dns.upstreams = '127.0.0.2': expected a list"),
        ({"upstreams": ["ns.example"]}, r"dns.upstreams = 'ns.example'.*not an IP address"),
        ({"upstreams": ["127.0.0.1"]}, r"dns.upstreams contains 127.0.0.1:53, which is dns.listen"),
        ({"timeout": 0}, r"dns.timeout = 0: expected a number of seconds"),
        ({"timeout": "5"}, r"dns.timeout = '5'"),
        ({"cache_size": True}, r"dns.cache_size = True"),
        ({"cache_size": -1}, r"dns.cache_size = -1"),
        ({"log_queries": "yes"}, r"dns.log_queries = 'yes': expected true or false"),
        ({"allow": ["bad..name"]}, r"dns.allow entry 'bad..name'"),
        ({"deny": ["a.*.b"]}, r"dns.deny entry 'a.\*.b'"),
        ({"min_ttl": 100, "max_ttl": 10}, r"dns.min_ttl = 100 is above dns.max_ttl = 10"),
        ({"upstream_timeout": 5, "timeout": 1}, r"dns.upstream_timeout = 5.0 is above"),
        ({"listn": "127.0.0.1:53"}, r"dns.listn: unknown key"),
        ({"workers": 0}, r"dns.workers = 0"),
        ({"pin_workers": 1}, r"dns.pin_workers = 1: expected true or false"),
        ({"hosts_file": "/nonexistent/hosts"}, r"dns.hosts_file = '/nonexistent/hosts': no such"),
    ],
)
def test_errors_name_key_and_value(table, pattern):
    table = {"upstreams": ["127.0.0.2:5300"], **table}
    with pytest.raises(ConfigError, match=pattern):
        parse_config(table)


def test_hosts_file_can_be_disabled_and_patterns_normalised():
    config = parse_config(
        {"upstreams": ["127.0.0.2"], "hosts_file": "", "allow": ["Example.ORG.", "*.cdn.test"]}
    )
    assert config.hosts_file is None
    assert config.allow == ("example.org", "*.cdn.test")


def test_jail_resolv_conf_names_the_stub():
    config = parse_config({"listen": "127.0.0.53:53", "upstreams": ["127.0.0.2:5300"]})
    text = jail_resolv_conf(config)
    assert "nameserver 127.0.0.53\n" in text
    assert "options timeout:2 attempts:2 edns0\n" in text
    assert "hosts: dns" in JAIL_NSSWITCH_CONF


def test_jail_resolv_conf_needs_port_53():
    config = parse_config({"listen": "127.0.0.53:5353", "upstreams": ["127.0.0.2:5300"]})
    with pytest.raises(ConfigError, match=r"dns.listen = '127.0.0.53:5353'.*port 53"):
        jail_resolv_conf(config)


def test_helper_serve_refuses_several_dns_workers(tmp_path):
    path = tmp_path / "helper.toml"
    path.write_text(
        f'[helper]\nsocket = "{tmp_path}/h.sock"\nallow_uids = [0]\n'
        '[dns]\nlisten = "127.0.0.1:5399"\nupstreams = ["127.0.0.2:53"]\nworkers = 2\n'
    )
    with pytest.raises(ConfigError, match="dns.workers = 2: inside chroot-helper serve"):
        load_services(load_config(str(path)))

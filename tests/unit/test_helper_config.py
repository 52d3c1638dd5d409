"""Config loading: the documented shape works, and every mistake names its key and fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from chroot_helper.config import load_config, parse_config, parse_size
from chroot_helper.errors import ConfigError, PeerRefusedError, error_from_code

ISSUE_EXAMPLE = """
[helper]
socket = "/srv/jail/run/chroot-helper.sock"
allow_uids = [33]

[exec.echo]
argv = ["/bin/echo"]
args = "any"
user = "nobody"
timeout = 10
max_output = "10M"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "helper.toml"
    path.write_text(text)
    return str(path)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_EXAMPLE))
    assert config.socket == "/srv/jail/run/chroot-helper.sock"
    assert config.allow_uids == frozenset({33})
    echo = config.commands["echo"]
    assert echo.argv == ("/bin/echo",)
    assert echo.args == "any"
    assert (echo.user, echo.uid, echo.gid, echo.groups) == ("nobody", 65534, 65534, ())
    assert echo.timeout == 10.0
    assert echo.max_output == 10 << 20
    assert echo.env == {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    assert config.service_tables == {}


def test_jail_gives_the_default_socket_path() -> None:
    config = parse_config({"helper": {"jail": "/srv/jail", "allow_uids": ["www-data"]}})
    assert config.socket == "/srv/jail/run/chroot-helper.sock"
    assert config.allow_uids == frozenset({33})


def test_dns_and_mail_tables_are_kept_raw() -> None:
    raw = {
        "helper": {"socket": "/run/x.sock", "allow_uids": [33]},
        "dns": {"upstream": "127.0.0.1:5353", "anything": [1, 2]},
        "mail": {"relay": "127.0.0.1:2525"},
    }
    config = parse_config(raw)
    assert config.service_tables == {"dns": raw["dns"], "mail": raw["mail"]}


def test_args_patterns_are_compiled() -> None:
    config = parse_config(
        {
            "helper": {"socket": "/run/x.sock", "allow_uids": [33]},
            "exec": {"convert": {"argv": ["/bin/echo"], "args": ["-resize", "[0-9]+x[0-9]+"]}},
        }
    )
    patterns = config.commands["convert"].args
    assert isinstance(patterns, tuple)
    assert [p.pattern for p in patterns] == ["-resize", "[0-9]+x[0-9]+"]


@pytest.mark.parametrize("value", ["10M", "10 MiB", "10MB", 10485760])
def test_sizes(value: object) -> None:
    assert parse_size(value, "[exec.x] max_output") == 10 << 20


BASE = {"socket": "/run/x.sock", "allow_uids": [33]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"helper": BASE, "smtp": {}}, "unknown top-level key or table [smtp]"),
        ({}, "missing [helper] table"),
        ({"helper": {"allow_uids": [33]}}, "[helper] needs socket = "),
        ({"helper": {"socket": "/run/x.sock"}}, "allows no peer: set allow_uids"),
        ({"helper": dict(BASE, allow_uid=[3])}, "[helper] has unknown key 'allow_uid'"),
        ({"helper": dict(BASE, socket="run/x.sock")}, "expected an absolute path"),
        ({"helper": dict(BASE, socket_mode="rw")}, "socket_mode = 'rw'"),
        ({"helper": dict(BASE, allow_uids=["no-such-user-x"])}, "no such user on this host"),
        ({"helper": dict(BASE, tcp="10.0.0.1:80", token_file="/x")}, "expected a loopback address"),
        ({"helper": dict(BASE, tcp="127.0.0.1:7070")}, "tcp is set but token_file is not"),
        (
            {"helper": dict(BASE, max_per_peer=0)},
            "[helper] max_per_peer = 0: expected an integer >= 1",
        ),
        (
            {"helper": dict(BASE, max_concurrent=8, max_per_uid=9)},
            "[helper] max_per_uid = 9 is above max_concurrent = 8, where it would never apply",
        ),
        (
            {"helper": dict(BASE, max_connections=100, max_idle_per_uid=100)},
            "[helper] max_idle_per_uid = 100 must be below max_connections = 100",
        ),
        ({"helper": BASE, "exec": {"x": {"argv": ["echo"]}}}, "[exec.x] argv = ['echo']"),
        ({"helper": BASE, "exec": {"x": {"argv": ["/nonexistent/x"]}}}, "not an executable file"),
        (
            {"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "args": "some"}}},
            "[exec.x] args = 'some'",
        ),
        (
            {"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "args": ["("]}}},
            "[exec.x] args pattern '('",
        ),
        (
            {"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "timeout": -1}}},
            "[exec.x] timeout = -1",
        ),
        (
            {"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "max_output": "lots"}}},
            "max_output = 'lots'",
        ),
        (
            {"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "user": "nobody-x"}}},
            "[exec.x] user",
        ),
        (
            {"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "shell": True}}},
            "[exec.x] has unknown key 'shell'",
        ),
        ({"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "env": {"A B": "1"}}}}, "env.A B"),
        (
            {"helper": BASE, "exec": {"x": {"argv": ["/bin/echo"], "cwd": "/nonexistent"}}},
            "cwd = '/nonexistent'",
        ),
        ({"helper": BASE, "exec": {"bad name": {"argv": ["/bin/echo"]}}}, "[exec.bad name]"),
        ({"helper": BASE, "dns": "yes"}, "dns must be a table"),
    ],
)
def test_mistakes_name_the_key_and_value(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "[helper\n"))


def test_token_file_is_read_at_load(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdefXYZ\n")
    config = parse_config({"helper": dict(BASE, tcp="127.0.0.1:7070", token_file=str(token))})
    assert config.tcp == ("127.0.0.1", 7070)
    assert config.token == "0123456789abcdefXYZ"
    token.write_text("short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        parse_config({"helper": dict(BASE, tcp="127.0.0.1:7070", token_file=str(token))})


def test_error_codes_rebuild_the_same_class() -> None:
    exc = error_from_code("refused", "peer uid 1 is not allowed")
    assert type(exc) is PeerRefusedError
    assert str(exc) == "peer uid 1 is not allowed"


def test_running_limit_per_uid_defaults_to_three_quarters_of_max_concurrent() -> None:
    assert parse_config({"helper": BASE}).max_per_uid == 48
    assert parse_config({"helper": dict(BASE, max_concurrent=1)}).max_per_uid == 1
    assert parse_config({"helper": dict(BASE, max_per_uid=64)}).max_per_uid == 64


def test_idle_limit_per_uid_defaults_below_the_connection_limit() -> None:
    assert parse_config({"helper": BASE}).max_idle_per_uid == 64
    assert parse_config({"helper": dict(BASE, max_connections=40)}).max_idle_per_uid == 20
    assert parse_config({"helper": dict(BASE, max_idle_per_uid=8)}).max_idle_per_uid == 8

"""The [mail] table: defaults, every validation message names the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from chroot_helper.errors import ConfigError
from chroot_helper.services.mail import parse_config
from chroot_helper.services.mail.config import (
    SendmailRelay,
    SmtpRelay,
    TcpAddress,
    UnixAddress,
    parse_duration,
    parse_size,
)


def test_defaults():
    config = parse_config({"domain": "Example.ORG."})
    assert config.listen == (TcpAddress(host="127.0.0.1", port=25),)
    assert config.spool == Path("/var/spool/chroot-helper")
    assert config.relay is None
    assert config.allowed_senders == ("*@example.org",)
    assert config.max_size == 10 * 1024 * 1024
    assert (config.max_connections, config.max_per_client) == (100, 20)
    assert parse_config({"domain": "x.org", "max_connections": 5}).max_per_client == 5
    assert config.hostname == "example.org"
    assert config.sender_allowed("App@Example.org")
    assert not config.sender_allowed("app@sub.example.org")
    assert not config.sender_allowed("app@example.org.evil.example")


def test_issue_example(tmp_path):
    (tmp_path / "run").mkdir()
    config = parse_config(
        {
            "listen": ["127.0.0.1:25", f"unix:{tmp_path}/run/smtp.sock"],
            "spool": "/var/spool/chroot-helper",
            "relay": "smtp://127.0.0.1:2525",
            "allowed_senders": ["*@example.org"],
            "max_size": "10M",
        }
    )
    assert config.listen[1] == UnixAddress(path=tmp_path / "run" / "smtp.sock")
    assert config.relay == SmtpRelay(host="127.0.0.1", port=2525)
    assert parse_config({"relay": "smtp://[::1]"}).relay == SmtpRelay(host="::1", port=25)
    assert parse_config({"relay": "sendmail:/bin/true"}).relay == SendmailRelay(
        path=Path("/bin/true")
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"listen": ["10.0.0.1:25"]}, "mail.listen = '10.0.0.1:25': the submission service"),
        ({"listen": ["localhost:25"]}, "'localhost' is not an IP address"),
        ({"listen": ["127.0.0.1:99999"]}, "the port must be a number from 0 to 65535"),
        ({"listen": ["unix:relative.sock"]}, "write an absolute path"),
        ({"listen": ["unix:/no/such/dir/smtp.sock"]}, "directory '/no/such/dir' does not exist"),
        ({"listen": []}, "give at least one address"),
        ({"listen": ["127.0.0.1:25", "127.0.0.1:25"]}, "listed twice"),
        ({"relay": "smtps://x"}, "mail.relay = 'smtps://x': expected 'smtp://host:port'"),
        ({"relay": "sendmail:/no/such/sendmail"}, "is not an executable file"),
        ({"relay": "smtp://bad host:25"}, "is not a host name or address"),
        ({"relay_starttls": True}, "apply to an SMTP relay only"),
        ({"max_size": "ten"}, "mail.max_size = 'ten': expected bytes"),
        ({"max_size": 10}, "expected a size from 1K to 1G"),
        ({"max_recipients": 0}, "mail.max_recipients = 0: expected an integer 1-10000"),
        ({"max_recipients": True}, "mail.max_recipients = True: expected an integer"),
        ({"allowed_senders": ["example.org"]}, "expected an address pattern such as"),
        ({"domain": "exa mple.org"}, "mail.domain = 'exa mple.org': expected a domain name"),
        ({"max_age": "5 weeks"}, "mail.max_age = '5 weeks': expected seconds"),
        ({"retry_initial": 100, "retry_max": 10}, "mail.retry_initial = 100 is above"),
        ({"unix_mode": "rw"}, "mail.unix_mode = 'rw': expected an octal mode"),
        ({"bounce": "yes"}, "mail.bounce = 'yes': expected true or false"),
        ({"lsiten": []}, "mail.lsiten: unknown key"),
        ({"max_per_client": 0}, "mail.max_per_client = 0: expected an integer 1-100000"),
        (
            {"max_connections": 10, "max_per_client": 11},
            "mail.max_per_client = 11 is above mail.max_connections = 10",
        ),
    ],
)
def test_errors_name_key_value_and_fix(table, message):
    with pytest.raises(ConfigError) as raised:
        parse_config({"domain": "example.org", **table})
    assert message in str(raised.value)


def test_relay_auth_file_must_be_private(tmp_path):
    auth = tmp_path / "relay-auth"
    auth.write_text("user:secret\n")
    auth.chmod(0o644)
    with pytest.raises(ConfigError, match=r"lets others read the relay password; chmod 600"):
        parse_config({"relay": "smtp://127.0.0.1:2525", "relay_auth_file": str(auth)})
    auth.chmod(0o600)
    config = parse_config(
        {"relay": "smtp://127.0.0.1:2525", "relay_auth_file": str(auth), "relay_starttls": True}
    )
    assert config.relay == SmtpRelay(host="127.0.0.1", port=2525, starttls=True, auth_file=auth)
    if os.geteuid() == 0:
        os.chown(auth, 1234, 1234)
        with pytest.raises(ConfigError, match="owned by uid 1234, not by the helper"):
            parse_config({"relay": "smtp://127.0.0.1:2525", "relay_auth_file": str(auth)})


def test_relay_ca_file_is_loaded_at_start_and_needs_starttls(tmp_path):
    relay = {"relay": "smtp://127.0.0.1:2525", "relay_starttls": True}
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"mail.relay_ca_file = '.*ca.pem': cannot load it"):
        parse_config({**relay, "relay_ca_file": str(bad)})
    with pytest.raises(ConfigError, match=r"cannot load it"):
        parse_config({**relay, "relay_ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match=r"has no effect without mail.relay_starttls = true"):
        parse_config(
            {
                "relay": "smtp://127.0.0.1:2525",
                "relay_ca_file": "/etc/ssl/certs/ca-certificates.crt",
            }
        )


def test_sizes_and_durations():
    assert parse_size("512K") == 512 * 1024
    assert parse_size("10MB") == 10 * 1024**2
    assert parse_size(4096) == 4096
    assert parse_duration("5d", key="k") == 5 * 86400
    assert parse_duration("90s", key="k") == 90
    assert parse_duration(2.5, key="k") == 2.5
    assert parse_duration("15m", key="k") == 900

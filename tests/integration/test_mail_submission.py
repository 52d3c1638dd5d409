"""The submission server as a real process: ESMTP, every rejection rule, and that it keeps
serving others afterwards.  Delivery goes to a real aiosmtpd sink on another loopback port."""

from __future__ import annotations

import smtplib
import socket

import pytest
from mail_fixtures import DOMAIN, Raw, free_port, run_service, run_sink, simple_message, stop

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    with run_sink(tmp_path_factory.mktemp("sink")) as server:
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory, sink):
    tmp = tmp_path_factory.mktemp("mail")
    with run_service(
        tmp, relay=f"smtp://{sink.address}", max_size="64K", max_recipients=5
    ) as server:
        yield server


@pytest.fixture
def raw(service):
    client = Raw.greeted(service)
    yield client
    client.close()


def deliver_one(service, sink, token: str) -> None:
    """A valid message still goes through (the server kept serving)."""
    with smtplib.SMTP(service.host, service.port, timeout=30) as smtp:
        smtp.sendmail(f"app@{DOMAIN}", ["user@example.net"], simple_message(token))
    assert len(sink.wait_token(token)) == 1


def test_ehlo_extensions_and_delivery_through_smarthost(service, sink):
    with smtplib.SMTP(service.host, service.port, timeout=30) as smtp:
        code, _ = smtp.ehlo("app.local")
        assert code == 250
        for extension in ("size", "8bitmime", "smtputf8", "pipelining"):
            assert smtp.has_extn(extension), extension
        assert smtp.esmtp_features["size"] == str(64 * 1024)
        smtp.mail(f"App@{DOMAIN.upper()}")
        smtp.rcpt("one@example.net")
        smtp.rcpt("two@example.net")
        code, reply = smtp.data(simple_message("delivered"))
    assert code == 250
    queue_id = reply.decode().rsplit(" ", 1)[-1]
    assert reply.decode().startswith("2.0.0 Ok: queued as ")
    messages = sink.wait_token("delivered")
    assert len(messages) == 1
    got = messages[0]
    assert got.sender == f"App@{DOMAIN.upper()}"
    assert got.recipients == ["one@example.net", "two@example.net"]
    assert f"id {queue_id}" in got.header("Received")
    assert got.data.endswith(b"\r\n\r\nbody of delivered\r\n")
    assert f"{queue_id}: to=<two@example.net>" in service.log_text()
    assert "status=sent" in service.log_text()


def test_pipelined_commands_get_answers_in_order(service, sink, raw):
    raw.send(
        f"MAIL FROM:<app@{DOMAIN}>\r\nRCPT TO:<pipe@example.net>\r\nRCPT TO:<bad address>\r\n"
        "DATA\r\n".encode()
    )
    codes = [raw.read_reply()[0] for _ in range(4)]
    assert codes[0] == 250 and codes[1] == 250 and codes[2] in (501, 553) and codes[3] == 354
    code, text = raw.command(simple_message("pipelined") + b".")
    assert (code, text.split(" queued as ")[0]) == (250, "2.0.0 Ok:")
    received = sink.wait_token("pipelined")
    assert received and received[0].recipients == ["pipe@example.net"]


def test_smtputf8_and_8bit(service, sink):
    body = "From: app@example.org\r\nTo: jörg@exämple.net\r\nSubject: grüße\r\nX-Token: utf8\r\n"
    data = (body + "\r\nÄ body\r\n").encode()
    with smtplib.SMTP(service.host, service.port, timeout=30) as smtp:
        smtp.ehlo()
        refused = smtp.sendmail(
            f"app@{DOMAIN}", ["jörg@exämple.net"], data, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
    assert refused == {}
    got = sink.wait_token("utf8")
    assert got and got[0].recipients == ["jörg@exämple.net"]
    assert got[0].data.endswith("Ä body\r\n".encode())


def test_commands_without_mail_cannot_hold_a_connection_open(service, sink, raw):
    # NOOP restarts the idle timeout: 100 of them in a row are answered, the 101st closes.
    for _ in range(60):
        assert raw.command(b"NOOP")[0] == 250
    # An accepted message starts the count again.
    raw.send(f"MAIL FROM:<app@{DOMAIN}>\r\nRCPT TO:<junk@example.net>\r\nDATA\r\n".encode())
    assert [raw.read_reply()[0] for _ in range(3)] == [250, 250, 354]
    assert raw.command(simple_message("junk-reset") + b".")[0] == 250
    for verb in [b"NOOP", b"RSET", b"VRFY x@example.net", b"HELP"] * 25:
        assert raw.command(verb)[0] < 400
    code, text = raw.command(b"NOOP")
    assert (code, text) == (421, "4.7.0 Too many commands without mail; closing the connection")
    with pytest.raises(ConnectionError):
        raw.command(b"NOOP")
    assert "100 commands without mail; closing" in service.log_text()
    deliver_one(service, sink, "after-junk")


def test_null_sender_is_accepted_and_delivered_with_it(service, sink):
    # Auto-replies and delivery reports use MAIL FROM:<> so that nobody answers them.
    with smtplib.SMTP(service.host, service.port, timeout=30) as smtp:
        assert smtp.sendmail("", ["user@example.net"], simple_message("nullsender")) == {}
    got = sink.wait_token("nullsender")
    assert len(got) == 1 and got[0].sender == ""
    assert "from=<>, size=" in service.log_text()


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("someone@evil.example", (553, "5.7.1")),
        (f"app@sub.{DOMAIN}", (553, "5.7.1")),
        ("no-domain", (553, "5.1.3")),
        (f"a..b@{DOMAIN}", (553, "5.1.3")),
        (f"app@-bad-.{DOMAIN}", (553, "5.1.3")),
        (f"jörg@{DOMAIN}", (553, "5.6.7")),  # non-ASCII without SMTPUTF8
    ],
)
def test_sender_rejections(service, sink, raw, sender, expected):
    code, text = raw.command(f"MAIL FROM:<{sender}>".encode())
    assert (code, text.split(" ")[0]) == expected
    assert raw.command(f"MAIL FROM:<app@{DOMAIN}>".encode())[0] == 250  # same connection goes on


def test_recipient_rejections_and_limit(service, sink, raw):
    assert raw.command(f"MAIL FROM:<app@{DOMAIN}>".encode())[0] == 250
    for bad in (
        b"<>",
        b"<two@@example.net>",
        b"<u@exa mple.net>",
        b"<x@exa_mple..net>",
        b"<@example.net>",
    ):
        code, _ = raw.command(b"RCPT TO:" + bad)
        assert code in (501, 553), bad
    assert raw.command(b"RCPT TO:<cr\rinjected@example.net>")[0] == 553
    for number in range(5):
        assert raw.command(f"RCPT TO:<r{number}@example.net>".encode())[0] == 250
    code, text = raw.command(b"RCPT TO:<r6@example.net>")
    assert (code, text) == (452, "4.5.3 Too many recipients")
    deliver_one(service, sink, "after-recipient-rejections")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"Subject: hi\nBcc: victim@example.net\r\nFrom: app@example.org\r\n\r\nx\r\n", "bare"),
        (b"Subject: hi\rBcc: victim@example.net\r\n\r\nx\r\n", "bare"),
        (b"Subject: nul \x00 inside\r\n\r\nx\r\n", "NUL"),
        (b"Subject: fine\r\nno colon on this line\r\n\r\nx\r\n", "Malformed"),
        (b" folded first line\r\nSubject: x\r\n\r\nx\r\n", "Malformed"),
    ],
)
def test_header_rejections(service, sink, raw, message, reason):
    assert raw.command(f"MAIL FROM:<app@{DOMAIN}>".encode())[0] == 250
    assert raw.command(b"RCPT TO:<victim@example.net>")[0] == 250
    assert raw.command(b"DATA")[0] == 354
    code, text = raw.command(message + b".")
    assert code == 550 and text.startswith("5.6.0") and reason in text
    deliver_one(service, sink, f"after-{reason}")


def test_bare_lf_in_body_is_accepted(service, sink, raw):
    assert raw.command(f"MAIL FROM:<app@{DOMAIN}>".encode())[0] == 250
    assert raw.command(b"RCPT TO:<lf@example.net>")[0] == 250
    assert raw.command(b"DATA")[0] == 354
    code, _ = raw.command(b"Subject: ok\r\nX-Token: body-lf\r\n\r\nline\nline\r\n.")
    assert code == 250
    assert sink.wait_token("body-lf")


def test_oversize(service, sink, raw):
    assert raw.command(f"MAIL FROM:<app@{DOMAIN}> SIZE=999999".encode())[0] == 552
    assert raw.command(f"MAIL FROM:<app@{DOMAIN}>".encode())[0] == 250
    assert raw.command(b"RCPT TO:<big@example.net>")[0] == 250
    assert raw.command(b"DATA")[0] == 354
    line = b"x" * 998 + b"\r\n"
    code, _ = raw.command(b"Subject: big\r\n\r\n" + line * 80 + b".")
    assert code == 552
    deliver_one(service, sink, "after-oversize")


def test_garbage_and_long_lines_do_not_stop_the_server(service, sink, raw):
    assert raw.command(b"\xff\xfe\x00garbage")[0] == 500
    assert raw.command(b"MAIL FROM:<" + b"a" * 5000 + b"@example.org>")[0] == 500
    assert raw.command(b"RCPT TO:<x@example.net>")[0] == 503
    assert raw.command(b"DATA")[0] == 503
    raw.send(b"\x00" * 100000)  # then hang up mid-line
    raw.close()
    deliver_one(service, sink, "after-garbage")


def test_rate_limit_per_client(tmp_path, sink):
    with run_service(tmp_path, relay=f"smtp://{sink.address}", rate_limit=2) as service:
        with smtplib.SMTP(service.host, service.port, timeout=30) as smtp:
            for token in ("rate-1", "rate-2"):
                smtp.sendmail(f"app@{DOMAIN}", ["r@example.net"], simple_message(token))
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.sendmail(f"app@{DOMAIN}", ["r@example.net"], simple_message("rate-3"))
        assert refused.value.smtp_code == 450
        assert "reject: MAIL FROM <app@example.org>: 450 4.7.1" in service.log_text()


def test_listen_address_in_use_is_explained(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "taken.toml"
        config.write_text(
            f'[mail]\nlisten = ["127.0.0.1:{port}"]\nspool = "{tmp_path / "spool"}"\n'
            'domain = "example.org"\n'
        )
        import subprocess
        import sys

        done = subprocess.run(
            [sys.executable, "-m", "chroot_helper.services.mail", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 71
    assert f"mail.listen entry '127.0.0.1:{port}': address already in use" in done.stderr


def test_bad_config_names_the_key(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "bad.toml"
    config.write_text('[mail]\nlisten = ["10.1.2.3:25"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "chroot_helper.services.mail", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78
    assert "mail.listen = '10.1.2.3:25'" in done.stderr and "loopback" in done.stderr


def test_stopping_removes_nothing_queued(tmp_path):
    dead_port = free_port()
    service = None
    try:
        from mail_fixtures import start_service

        service = start_service(tmp_path, relay=f"smtp://127.0.0.1:{dead_port}")
        with smtplib.SMTP(service.host, service.port, timeout=30) as smtp:
            smtp.sendmail(f"app@{DOMAIN}", ["later@example.net"], simple_message("kept"))
    finally:
        if service is not None:
            stop(service.proc)
    rows = service.mailq()
    assert [row["recipients"] for row in rows] == [["later@example.net"]]

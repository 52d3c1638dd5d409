"""Delivery: smarthost down and back (mailq shows the error, flush retries), per-recipient
status and bounces, and the sendmail-binary transport with a fake ``sendmail`` program."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import textwrap
import time

import pytest
from chroot_helper.services.mail.spool import Envelope, Spool, new_queue_id
from mail_fixtures import (
    DOMAIN,
    free_port,
    run_service,
    run_sink,
    simple_message,
    wait_until,
)

pytestmark = [pytest.mark.root]


def submit(service, token: str, recipients=("user@example.net",), sender=f"app@{DOMAIN}") -> str:
    with smtplib.SMTP(service.host, service.port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        for rcpt in recipients:
            smtp.rcpt(rcpt)
        code, reply = smtp.data(simple_message(token, sender=sender))
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def test_smarthost_down_then_back(tmp_path):
    port = free_port()
    # Long backoff: only `flush` makes the service retry once the smarthost is back.
    with run_service(
        tmp_path, relay=f"smtp://127.0.0.1:{port}", retry_initial=3600, retry_max=3600
    ) as service:
        queue_id = submit(service, "while-down")
        rows = wait_until(
            lambda: [r for r in service.mailq() if r["attempts"] >= 1],
            "the first delivery attempt did not happen",
        )
        assert rows[0]["id"] == queue_id
        assert rows[0]["recipients"] == ["user@example.net"]
        assert rows[0]["sender"] == f"app@{DOMAIN}"
        assert "Connection refused" in rows[0]["last_error"]
        text = service.cli("mailq", "--spool", str(service.spool))
        assert text.returncode == 0
        listing = text.stdout.decode()
        assert queue_id in listing and "Connection refused" in listing
        assert "user@example.net" in listing and "1 Request." in listing
        assert f"{queue_id}: to=<user@example.net>" in service.log_text()
        assert "status=deferred" in service.log_text()

        with run_sink(tmp_path, port=port) as sink:
            flushed = service.cli("flush", "--spool", str(service.spool))
            assert flushed.returncode == 0
            assert flushed.stdout.decode().strip() == "flush requested for 1 queued message(s)"
            got = sink.wait_token("while-down")
            assert got[0].recipients == ["user@example.net"]
            wait_until(lambda: service.mailq() == [], "the queue did not empty after delivery")
        empty = service.cli("mailq", "--spool", str(service.spool)).stdout.decode()
        assert empty.strip() == "Mail queue is empty"


def test_flush_picks_up_a_message_put_back_into_the_queue(tmp_path):
    with run_sink(tmp_path) as sink, run_service(tmp_path, relay=f"smtp://{sink.address}") as svc:
        spool = Spool(svc.spool)
        envelope = Envelope(
            id=new_queue_id(),
            sender=f"app@{DOMAIN}",
            recipients=("back@example.net",),
            arrival=time.time(),
        )
        spool.write(envelope, simple_message("put-back"))  # as an operator restoring a file
        spool.sync_queue()
        assert svc.cli("flush", "--spool", str(svc.spool)).returncode == 0
        assert sink.wait_token("put-back")[0].recipients == ["back@example.net"]
        assert f"{envelope.id}: found in the queue directory; queued" in svc.log_text()


def test_permanent_rejection_of_one_recipient_bounces_to_sender(tmp_path):
    with (
        run_sink(tmp_path, reject_prefix="nosuch") as sink,
        run_service(tmp_path, relay=f"smtp://{sink.address}") as service,
    ):
        queue_id = submit(service, "partly", recipients=("ok@example.net", "nosuch@example.net"))
        delivered = sink.wait_token("partly")
        assert delivered[0].recipients == ["ok@example.net"]
        bounce = wait_until(
            lambda: [m for m in sink.messages() if m.sender == ""],
            "no bounce reached the sink",
        )[0]
        assert bounce.recipients == [f"app@{DOMAIN}"]
        assert bounce.header("Subject") == "Undelivered Mail Returned to Sender"
        text = bounce.data.decode()
        assert "<nosuch@example.net>: 5.0.0 550 5.1.1 Recipient address rejected" in text
        assert f"Queue ID: {queue_id}" in text
        assert "X-Token: partly" in text  # the original headers are quoted
        assert "body of partly" not in text  # the body is not
        log = service.log_text()
        assert f"{queue_id}: to=<ok@example.net>" in log and "status=sent" in log
        assert f"{queue_id}: to=<nosuch@example.net>" in log and "status=bounced" in log
        assert f"{queue_id}: sender non-delivery notification" in log
        wait_until(lambda: service.mailq() == [], "the queue did not empty")


def test_smarthost_auth_from_a_private_file_and_starttls_requirement(tmp_path):
    auth = tmp_path / "relay-auth"
    auth.write_text("mailer:s3cret\n")
    auth.chmod(0o600)
    with run_sink(tmp_path, auth="mailer:s3cret") as sink:
        with run_service(
            tmp_path, label="auth", relay=f"smtp://{sink.address}", relay_auth_file=str(auth)
        ) as service:
            submit(service, "with-auth")
            assert sink.wait_token("with-auth")[0].auth == "mailer"
        # The sink offers no STARTTLS: a relay that requires it keeps the message queued.
        with run_service(
            tmp_path, label="tls", relay=f"smtp://{sink.address}", relay_starttls=True
        ) as service:
            submit(service, "needs-tls")
            rows = wait_until(
                lambda: [r for r in service.mailq() if r["attempts"] >= 1], "no attempt was made"
            )
            assert "does not offer STARTTLS (mail.relay_starttls)" in rows[0]["last_error"]
            assert sink.with_token("needs-tls") == []


def self_signed_certificate(directory) -> tuple:
    """A certificate for 127.0.0.1 (its own CA) and its key, made with openssl."""
    cert, key = directory / "relay-cert.pem", directory / "relay-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=relay.test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_smarthost_starttls_checks_the_certificate_against_the_configured_ca(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    with run_sink(tmp_path, tls=(cert, key)) as sink:
        relay = f"smtp://{sink.address}"
        # Trusting the relay's CA: delivered, over TLS.
        with run_service(
            tmp_path, label="ca", relay=relay, relay_starttls=True, relay_ca_file=str(cert)
        ) as service:
            submit(service, "over-tls")
            got = sink.wait_token("over-tls")
            assert len(got) == 1 and got[0].tls
        # The system's CAs do not know it: nothing is sent, the message stays queued.
        with run_service(tmp_path, label="noca", relay=relay, relay_starttls=True) as service:
            submit(service, "untrusted")
            rows = wait_until(
                lambda: [r for r in service.mailq() if r["attempts"] >= 1], "no attempt was made"
            )
            assert "CERTIFICATE_VERIFY_FAILED" in rows[0]["last_error"]
            assert sink.with_token("untrusted") == []


FAKE_SENDMAIL = """\
#!{python}
# A stand-in for /usr/sbin/sendmail: records argv and stdin, exits as told.
import json, os, sys, time
out = {out!r}
data = sys.stdin.buffer.read()
code = 0
rule = os.path.join(out, "exit-code")
if os.path.exists(rule):
    code = int(open(rule).read())
name = os.path.join(out, "%d-%d.json" % (time.time_ns(), os.getpid()))
with open(name + ".tmp", "w") as f:
    json.dump({{"argv": sys.argv[1:], "data": data.decode("utf-8", "replace"),
               "code": code, "cwd": os.getcwd(), "env": sorted(os.environ)}}, f)
os.rename(name + ".tmp", name)
if code:
    print("fake sendmail: failing with", code, file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture
def fake_sendmail(tmp_path):
    out = tmp_path / "fake-sendmail"
    out.mkdir()
    program = tmp_path / "sendmail"
    program.write_text(FAKE_SENDMAIL.format(python=sys.executable, out=str(out)))
    program.chmod(0o755)
    return program, out


def calls(out):
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def test_sendmail_binary_transport_and_sysexits(tmp_path, fake_sendmail):
    program, out = fake_sendmail
    (out / "exit-code").write_text("75")  # EX_TEMPFAIL: deferred
    with run_service(tmp_path, relay=f"sendmail:{program}", retry_initial=0.5) as service:
        queue_id = submit(service, "via-binary", recipients=("a@example.net", "-b@example.net"))
        rows = wait_until(
            lambda: [r for r in service.mailq() if r["attempts"] >= 1], "no attempt was made"
        )
        assert "temporary failure (exit status 75)" in rows[0]["last_error"]
        assert "fake sendmail: failing with 75" in rows[0]["last_error"]
        assert rows[0]["recipients"] == ["a@example.net", "-b@example.net"]
        (out / "exit-code").unlink()  # next try succeeds
        wait_until(lambda: service.mailq() == [], "the message was not delivered on retry")
        first = calls(out)[0]
        last = calls(out)[-1]
        assert first["argv"] == [
            "-i",
            "-f",
            f"app@{DOMAIN}",
            "--",
            "a@example.net",
            "-b@example.net",
        ]
        assert last["code"] == 0 and last["cwd"] == "/"
        assert set(last["env"]) <= {"PATH", "LC_CTYPE"}  # LC_CTYPE: Python's locale coercion
        assert "\r" not in last["data"]  # LF line ends for the local binary
        assert f"with ESMTP id {queue_id}" in last["data"]
        assert "X-Token: via-binary\nMessage-ID" not in last["data"]
        assert last["data"].endswith("\n\nbody of via-binary\n")
        assert f"{queue_id}: to=<a@example.net>, relay=sendmail:{program}" in service.log_text()


def test_sendmail_binary_permanent_failure_bounces(tmp_path, fake_sendmail):
    program, out = fake_sendmail
    (out / "exit-code").write_text("67")  # EX_NOUSER: permanent
    with run_service(tmp_path, relay=f"sendmail:{program}") as service:
        queue_id = submit(service, "no-user")
        wait_until(lambda: len(calls(out)) >= 2, "the bounce was not handed to sendmail")
        bounce = calls(out)[1]
        assert bounce["argv"] == ["-i", "-f", "<>", "--", f"app@{DOMAIN}"]
        assert "<user@example.net>: 5.1.1 user unknown (exit status 67)" in bounce["data"]
        assert f"Queue ID: {queue_id}" in bounce["data"]
        # The bounce itself fails too (exit 67): logged and dropped, never bounced again.
        wait_until(
            lambda: "undeliverable bounce (null sender) dropped" in service.log_text(),
            "the failed bounce was not logged",
        )
        wait_until(lambda: service.mailq() == [], "the queue did not empty")
        time.sleep(0.5)
        assert len(calls(out)) == 2


def test_message_too_old_is_given_up_and_bounced(tmp_path, fake_sendmail):
    program, out = fake_sendmail
    script = textwrap.dedent(
        f"""\
        #!/bin/sh
        # Defers mail for the recipient, accepts everything else (the bounce).
        for arg; do [ "$arg" = "slow@example.net" ] && exit 75; done
        exec {program} "$@"
        """
    )
    wrapper = tmp_path / "sendmail-wrapper"
    wrapper.write_text(script)
    wrapper.chmod(0o755)
    with run_service(
        tmp_path, relay=f"sendmail:{wrapper}", max_age=2, retry_initial=0.5, retry_max=0.5
    ) as service:
        queue_id = submit(service, "too-old", recipients=("slow@example.net",))
        wait_until(lambda: calls(out), "the bounce was not sent", 60)
        bounce = calls(out)[0]
        assert bounce["argv"][-1] == f"app@{DOMAIN}"
        assert "<slow@example.net>: 4.3.0 temporary failure (exit status 75)" in bounce["data"]
        assert f"Queue ID: {queue_id}" in bounce["data"]
        wait_until(lambda: service.mailq() == [], "the given-up message stayed queued")
        assert "status=bounced" in service.log_text()


def test_no_relay_holds_mail_in_the_queue(tmp_path):
    with run_service(tmp_path) as service:
        queue_id = submit(service, "no-relay")
        assert "no relay configured (mail.relay): messages stay queued" in service.log_text()
        flushed = service.cli("flush", "--spool", str(service.spool))
        assert flushed.returncode == 0
        time.sleep(1)  # a flush check happens every 0.2 s: give it several chances
        rows = service.mailq()
        assert [(r["id"], r["attempts"]) for r in rows] == [(queue_id, 0)]


def test_mailq_and_flush_exit_codes(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "chroot_helper.services.mail", "flush", "--spool", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 78
    assert "is not a mail spool" in missing.stderr
    empty = subprocess.run(
        [sys.executable, "-m", "chroot_helper.services.mail", "mailq", "--spool", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (empty.returncode, empty.stdout.strip()) == (0, "Mail queue is empty")

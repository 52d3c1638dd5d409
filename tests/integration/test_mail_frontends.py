"""Front ends: ``sendmail`` (sendmail(1) flags, stdin, sysexits), ``client_sendmail``, and a
process inside an empty jail submitting through the Unix socket as uid 33."""

from __future__ import annotations

import email.header
import email.message
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from apache_server import world_readable_dir
from chroot_helper.errors import SubmitError
from chroot_helper.services.mail import client_sendmail
from mail_fixtures import DOMAIN, free_port, run_service, run_sink, wait_until

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    with run_sink(tmp_path_factory.mktemp("sink")) as server:
        yield server


@pytest.fixture(scope="module")
def run_dir():
    """A directory for the service's Unix socket, exposed as /run in the jail."""
    path = world_readable_dir("chrootwsgi-mailrun-")
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def service(tmp_path_factory, sink, run_dir):
    tmp = tmp_path_factory.mktemp("mail")
    port = free_port()
    with run_service(
        tmp,
        port=port,
        listen=[f"127.0.0.1:{port}", f"unix:{run_dir}/smtp.sock"],
        relay=f"smtp://{sink.address}",
        max_recipients=4,
    ) as server:
        yield server


def decoded(value: str) -> str:
    return str(email.header.make_header(email.header.decode_header(value)))


LF_MESSAGE = b"""\
From: App <app@example.org>
To: to@example.net
Cc: Carbon <cc@example.net>, other@example.net
Bcc: hidden@example.net
Subject: from stdin
X-Token: %s

first line
.
after a lone dot
"""


def test_sendmail_t_i_reads_recipients_and_drops_bcc(service, sink):
    done = service.cli("sendmail", "-t", "-i", stdin=LF_MESSAGE % b"dash-t")
    assert (done.returncode, done.stderr) == (0, b"")
    got = sink.wait_token("dash-t")[0]
    assert got.sender == f"app@{DOMAIN}"
    assert got.recipients == [
        "to@example.net",
        "cc@example.net",
        "other@example.net",
        "hidden@example.net",
    ]
    assert got.header("Bcc") is None and b"hidden@" not in got.data
    assert b"\r\n\r\nfirst line\r\n.\r\nafter a lone dot\r\n" in got.data
    assert b"\n" not in got.data.replace(b"\r\n", b"")


def test_sendmail_without_i_stops_at_a_lone_dot(service, sink):
    done = service.cli("sendmail", "-oi", "-t", stdin=LF_MESSAGE % b"oi")
    assert done.returncode == 0
    done = service.cli("sendmail", "-t", stdin=LF_MESSAGE % b"no-i")
    assert done.returncode == 0
    assert b"after a lone dot" in sink.wait_token("oi")[0].data
    assert b"after a lone dot" not in sink.wait_token("no-i")[0].data


def test_sendmail_f_and_F_add_a_from_header(service, sink):
    message = b"To: x@example.net\nSubject: no from\nX-Token: dash-f\n\nhello\n"
    done = service.cli(
        "sendmail",
        "-F",
        "Jörg App",
        f"-fnoreply@{DOMAIN}",
        "--",
        "x@example.net, y@example.net",
        stdin=message,
    )
    assert done.returncode == 0, done.stderr
    got = sink.wait_token("dash-f")[0]
    assert got.sender == f"noreply@{DOMAIN}"
    assert got.recipients == ["x@example.net", "y@example.net"]
    assert decoded(got.header("From")) == f"Jörg App <noreply@{DOMAIN}>"


def test_sendmail_f_null_sender_for_auto_replies(service, sink):
    message = b"From: app@example.org\nTo: x@example.net\nX-Token: null-f\n\nout of office\n"
    done = service.cli("sendmail", "-t", "-f", "<>", stdin=message)
    assert done.returncode == 0, done.stderr
    got = sink.wait_token("null-f")[0]
    assert got.sender == ""
    assert got.recipients == ["x@example.net"]


def test_sendmail_v_shows_the_conversation(service, sink):
    done = service.cli("sendmail", "-v", "-i", "v@example.net", stdin=LF_MESSAGE % b"verbose")
    assert done.returncode == 0
    stderr = done.stderr.decode()
    assert "send: 'mail FROM:<app@example.org>" in stderr and "queued as" in stderr
    sink.wait_token("verbose")


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["-x", "a@example.net"], 64, "unknown option -x"),
        (["-bp"], 64, "only -bm"),
        ([], 64, "no recipients given"),
        (["-f"], 64, "needs an argument"),
        (["-f", "app@example.org\nBcc: victim@example.net", "a@example.net"], 65, "injection"),
        (["-F", "Name\r\nBcc: victim@example.net", "a@example.net"], 65, "injection"),
        (["not an address"], 65, "is not a plain address"),
        (["-f", "boss@elsewhere.example", "a@example.net"], 77, "5.7.1 Sender address"),
    ],
)
def test_sendmail_exit_codes(service, args, code, says):
    done = service.cli("sendmail", *args, stdin=b"Subject: x\n\nbody\n" if args else b"")
    assert done.returncode == code, done.stderr
    assert says in done.stderr.decode()


def test_sendmail_tempfail_when_the_service_is_down(service):
    done = service.cli(
        "sendmail",
        "a@example.net",
        stdin=b"From: app@example.org\n\nx\n",
        env={"CHROOT_HELPER_SMTP": f"127.0.0.1:{free_port()}"},
    )
    assert done.returncode == 75
    assert b"cannot reach the mail service" in done.stderr


def test_client_sendmail_email_message_and_bytes(service, sink):
    msg = email.message.EmailMessage()
    msg["From"] = f"App <app@{DOMAIN}>"
    msg["To"] = "one@example.net"
    msg["Bcc"] = "secret@example.net"
    msg["Subject"] = "Grüße"
    msg["X-Token"] = "client-object"
    msg.set_content("Hällo\n")
    queue_id = client_sendmail(msg, address=service.address)
    got = sink.wait_token("client-object")[0]
    assert got.recipients == ["one@example.net", "secret@example.net"]
    assert got.header("Bcc") is None
    assert f"id {queue_id}" in got.header("Received")
    assert decoded(got.header("Subject")) == "Grüße"

    raw = b"From: app@example.org\nTo: two@example.net\nX-Token: client-bytes\n\nplain\n"
    client_sendmail(raw, recipients=["override@example.net"], address=service.address)
    got = sink.wait_token("client-bytes")[0]
    assert got.recipients == ["override@example.net"]
    assert got.data.endswith(b"\r\n\r\nplain\r\n")


def test_client_sendmail_is_all_or_nothing(service, sink):
    raw = b"From: app@example.org\nX-Token: too-many\n\nx\n"
    with pytest.raises(SubmitError) as refused:
        client_sendmail(
            raw, recipients=[f"r{n}@example.net" for n in range(5)], address=service.address
        )
    assert refused.value.code == 452 and refused.value.exit_code == 75
    assert "nothing was sent" in str(refused.value)
    with pytest.raises(ValueError, match="header injection"):
        client_sendmail(
            raw,
            sender="app@example.org\r\nBcc: x@example.net",
            recipients=["a@example.net"],
            address=service.address,
        )
    client_sendmail(
        b"From: app@example.org\nX-Token: marker\n\nx\n",
        recipients=["m@example.net"],
        address=service.address,
    )
    sink.wait_token("marker")  # delivered after the refused one would have been
    assert sink.with_token("too-many") == []


def test_front_ends_do_not_import_the_server_side():
    code = (
        "import sys\n"
        "from chroot_helper.services.mail import client_sendmail, sendmail_main, mailq_main\n"
        "print(sorted(m for m in sys.modules if m.startswith('aiosmtpd')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


JAILED = """\
import io, json, os, sys
import chrootwsgi
from chroot_helper.services.mail import client_sendmail, sendmail_main
state = chrootwsgi.enter_jail({root!r}, expose=[{run!r} + ":/run"])
listing = sorted(os.listdir("/"))
queue_id = client_sendmail(
    b"From: app@example.org\\nTo: jailed@example.net\\nX-Token: from-jail\\n\\nhi\\n",
    address="unix:/run/smtp.sock",
)
stderr = io.StringIO()
code = sendmail_main(
    ["-t", "-i"],
    stdin=io.BytesIO(b"From: app@example.org\\nTo: cli@example.net\\nX-Token: jail-cli\\n\\nx\\n"),
    stderr=stderr,
    environ={{"CHROOT_HELPER_SMTP": "unix:/run/smtp.sock"}},
)
print(json.dumps({{"uid": os.getuid(), "listing": listing, "queue_id": queue_id,
                  "code": code, "stderr": stderr.getvalue(),
                  "sendmail": os.path.exists("/usr/sbin/sendmail")}}))
"""


def test_jailed_process_submits_through_the_unix_socket(service, sink, jail_root, run_dir):
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(JAILED.format(root=jail_root, run=str(run_dir)))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
        user=33,
        group=33,
        extra_groups=[],
    )
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.splitlines()[-1])
    assert facts["uid"] == 33 and facts["sendmail"] is False
    assert "run" in facts["listing"]
    assert (facts["code"], facts["stderr"]) == (0, "")
    got = sink.wait_token("from-jail")[0]
    assert got.recipients == ["jailed@example.net"]
    assert f"id {facts['queue_id']}" in got.header("Received")
    assert sink.wait_token("jail-cli")[0].recipients == ["cli@example.net"]
    wait_until(
        lambda: f"{facts['queue_id']}: client=unix:uid=33" in service.log_text(),
        "the service did not log the jailed uid as the client",
    )

"""Random SMTP command streams against the real mail service process (loopback TCP).

Hypothesis writes client sessions: valid verbs in any order, bad arguments, over-long lines,
bare CR/LF and NUL inside lines, pipelined bursts, DATA bodies with dot-stuffing edge cases,
and hang-ups at any point.  What a user must see, whatever the client does:

* every reply line is ``ddd[ -]text`` with a code of class 2-5, none is aiosmtpd's catch-all
  for an exception (``500 Error: (IndexError) ...``), and each command gets one reply within
  the socket timeout (the connection is never left hanging);
* a body the policy accepts gets ``250 ... queued as ID`` and is in the spool byte-exact after
  dot-unstuffing; a body it refuses gets a 5xx and is not stored;
* the spool holds no message that was not acknowledged, except one whose final dot was sent
  just before the client hung up;
* after each session, another client completes a normal transaction.
"""

from __future__ import annotations

import re
import smtplib
import socket
from dataclasses import dataclass, field

import pytest
from chroot_helper.services.mail.policy import check_headers
from chroot_helper.services.mail.spool import Spool
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mail_fixtures import run_service, simple_message

TIMEOUT = 15.0
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)\r\n")
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]{20})")
LINE_LIMIT = 1000  # aiosmtpd: a DATA line longer than 1001 bytes with CRLF is refused

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    with run_service(tmp_path_factory.mktemp("smtp-streams")) as running:
        yield running


addresses = st.sampled_from(
    [
        "<app@example.org>",
        "<user@example.net>",
        "<>",
        "<",
        " <",
        "<a@b>",
        "<no-at-sign>",
        "<a\x00b@example.org>",
        "<ü@exämple.org> SMTPUTF8",
        "<x@example.org> SIZE=100",
        "<x@example.org> SIZE=999999999999",
        "<x@example.org> BODY=8BITMIME",
        "<x@example.org> FOO=bar",
        "app@example.org",
        "<" + "l" * 70 + "@example.org>",
        "",
    ]
)
verbs = st.sampled_from(["HELO", "EHLO", "NOOP", "RSET", "VRFY", "HELP", "EXPN", "STARTTLS"])
junk = st.binary(max_size=40).filter(lambda b: b"\n" not in b)


@st.composite
def command(draw: st.DrawFn) -> bytes:
    """One command line, ending in CRLF or a bare LF (aiosmtpd reads commands up to LF)."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        line = b"MAIL FROM:" + draw(addresses).encode()
    elif kind == 1:
        line = b"RCPT TO:" + draw(addresses).encode()
    elif kind == 2:
        line = draw(verbs).encode() + draw(st.sampled_from([b"", b" client.example", b" x y"]))
    elif kind == 3:
        line = draw(junk)  # garbage, NULs, bare CRs
    elif kind == 4:
        line = b"NOOP " + b"A" * draw(st.sampled_from([600, 1200, 5000]))  # over-long
    elif kind == 5:
        line = draw(st.sampled_from([b"mail from:<app@example.org>", b"rcpt to:<u@example.net>"]))
    else:
        line = draw(st.sampled_from([b"NO\rOP", b"NOOP\x00", b"\x00", b"  NOOP", b"DATA x"]))
    return line + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))


body_line = st.one_of(
    st.sampled_from([b"", b".", b"..", b". ", b"...x", b".\r", b"x\x00y", b" lead", b"\xff\xfe"]),
    st.binary(max_size=60).filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r")),
    st.just(b"z" * 1200),  # an over-long line
)
header_line = st.sampled_from(
    [
        b"Subject: hi",
        b"From: app@example.org",
        b"X-Long: " + b"v" * 900,
        b"\tcontinued",
        b"Subject: a\nBcc: victim@example.org",
        b"Subject: nul\x00",
        b"not a header",
        b"To: user@example.net",
    ]
)


@st.composite
def message(draw: st.DrawFn) -> list[bytes]:
    return [*draw(st.lists(header_line, max_size=4)), b"", *draw(st.lists(body_line, max_size=8))]


@dataclass
class Step:
    kind: str  # "cmd", "burst", "data", "hangup"
    lines: list[bytes] = field(default_factory=list)


steps = st.lists(
    st.one_of(
        command().map(lambda c: Step("cmd", [c])),
        st.lists(command(), min_size=2, max_size=6).map(lambda cs: Step("burst", cs)),
        message().map(lambda m: Step("data", m)),
        st.just(Step("hangup")),
    ),
    max_size=10,
)
preamble = st.sampled_from(
    [[], [b"EHLO client.example\r\n"], [b"EHLO c\r\n", b"MAIL FROM:<app@example.org>\r\n"]]
)


class Client:
    """A raw SMTP client that checks every reply it reads."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.buffer = b""
        self.closed = False

    def reply(self) -> tuple[int, bytes]:
        """Read one (possibly multi-line) reply; fail on a malformed line or a silent server."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    pytest.fail(f"no reply within {TIMEOUT} s; got so far {lines!r}")
                except ConnectionResetError:
                    chunk = b""  # the server closed (after 221 or 502) with our bytes unread
                    self.buffer = b""
                if not chunk:
                    assert not self.buffer, f"connection closed inside a reply: {self.buffer!r}"
                    self.closed = True
                    return 0, b""
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            match = REPLY_LINE.fullmatch(line + b"\r\n")
            assert match, f"malformed reply line {line!r}"
            assert not line.startswith(b"500 Error: ("), (
                f"an exception reached the client: {line!r}"
            )
            assert not lines or match.group(1) == lines[0][:3], f"code changes: {lines} {line!r}"
            lines.append(line)
            if match.group(2) == b" ":
                return int(match.group(1)), b"\r\n".join(lines)

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
        return not self.closed

    def close(self) -> None:
        self.sock.close()


def wire_body(lines: list[bytes]) -> tuple[bytes, bytes]:
    """(bytes to send, message the server must store): dot-stuffed, ended by CRLF.CRLF."""
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return stuffed + b".\r\n", b"".join(line + b"\r\n" for line in lines)


def expected_data_reply(lines: list[bytes], stored: bytes) -> int:
    stuffed_lengths = (len(line) + 2 + line.startswith(b".") for line in lines)
    if any(length > LINE_LIMIT + 1 for length in stuffed_lengths):
        return 500
    return 250 if check_headers(stored) is None else 550


def play(client: Client, session: list[Step], acked: dict[str, bytes]) -> bool:
    """Run *session*; return True if it ended by hanging up right after a final dot."""
    for step in session:
        if client.closed:
            return False
        if step.kind == "hangup":
            return False
        if step.kind == "data":
            if not client.send(b"DATA\r\n"):
                return False
            code, _text = client.reply()
            if code != 354:
                assert code in (0, 503, 501, 500, 554), f"DATA got {code}"
                continue
            data, stored = wire_body(step.lines)
            if not client.send(data):
                return True
            code, text = client.reply()
            if code == 0:
                return True
            assert code == expected_data_reply(step.lines, stored), (code, text, step.lines)
            match = QUEUED.search(text)
            if code == 250:
                assert match, text
                acked[match.group(1).decode()] = stored
            continue
        if not client.send(b"".join(step.lines)):
            return False
        for line in step.lines:
            code, text = client.reply()
            if code == 0:
                return False
            verb = line[:4].upper()
            if verb == b"QUIT":
                assert code == 221
            if verb in (b"HELO", b"EHLO") and len(line) < 500:
                assert code in (250, 501), (line, text)
            if verb == b"DATA":
                assert code >= 500, (line, text)  # "DATA x" or no recipients
    return False


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(preamble, steps, st.booleans())
def test_random_command_streams(service, start, session, quit_at_end):
    spool = Spool(service.spool)
    before = set(spool.ids())
    acked: dict[str, bytes] = {}
    client = Client((service.host, service.port))
    try:
        code, greeting = client.reply()
        assert code == 220, greeting
        hung_up_after_dot = play(client, [Step("cmd", [line]) for line in start] + session, acked)
        if quit_at_end and not client.closed and client.send(b"QUIT\r\n"):
            code, text = client.reply()
            assert code in (0, 221), text
    finally:
        client.close()

    event(f"messages acknowledged: {min(len(acked), 2)}{'+' if len(acked) > 2 else ''}")
    event(f"server closed the connection: {client.closed}")
    new = set(spool.ids()) - before
    assert set(acked) <= new, "a 250-acknowledged message is not in the spool"
    unacked = new - set(acked)
    assert len(unacked) <= int(hung_up_after_dot), f"unacknowledged messages stored: {unacked}"
    for queue_id, stored in acked.items():
        _envelope, content = spool.read(queue_id)
        assert content.split(b"\r\n", 3)[3] == stored, queue_id

    with smtplib.SMTP(service.host, service.port, timeout=TIMEOUT) as smtp:
        refused = smtp.sendmail("app@example.org", ["user@example.net"], simple_message("after"))
    assert refused == {}

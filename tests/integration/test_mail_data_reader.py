"""The DATA phase of the real mail service process (its DATA reader reads large pieces, see
``chroot_helper.services.mail.protocol``): exactly the bytes queued, the limits, the end of data
wherever the client's writes split it, and nothing accepted from a client that hangs up."""

from __future__ import annotations

import socket
import struct

import pytest
from chroot_helper.services.mail.spool import Spool
from mail_fixtures import DOMAIN, Raw, run_service

pytestmark = [pytest.mark.root]

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with run_service(tmp_path_factory.mktemp("data"), max_size=LIMIT) as server:
        yield server


@pytest.fixture
def raw(service):
    client = Raw.greeted(service, b"data.local")
    yield client
    client.close()


def start(raw: Raw, mail_options: bytes = b"") -> None:
    assert raw.command(f"MAIL FROM:<app@{DOMAIN}>".encode() + mail_options)[0] == 250
    assert raw.command(b"RCPT TO:<user@example.net>")[0] == 250
    assert raw.command(b"DATA")[0] == 354


def body_of(spool: Spool, queue_id: str) -> bytes:
    """A queued message as the client sent it (without the Received: header added)."""
    received, _, rest = spool.read(queue_id)[1].partition(b"\r\n\t")
    assert received.startswith(b"Received: from ")
    return rest.split(b"\r\n", 2)[2]


def queued(service, reply: tuple[int, str]) -> bytes:
    """The message queued for a ``250 ... queued as ID`` reply."""
    code, text = reply
    assert code == 250, text
    return body_of(Spool(service.spool), text.rsplit(" ", 1)[1])


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b".\r\n", b""),  # the end of data as the very first line: an empty message
        (b"Subject: s\r\n\r\n..\r\n.\r\n", b"Subject: s\r\n\r\n.\r\n"),
        (b"Subject: s\r\n\r\n..a\r\n...\r\nb.\r\n.\r\n", b"Subject: s\r\n\r\n.a\r\n..\r\nb.\r\n"),
        (b"Subject: s\r\n\r\nbare\nlf\n.\nx\r\n.\r\n", b"Subject: s\r\n\r\nbare\nlf\n.\nx\r\n"),
        (b"Subject: s\r\n\r\nbare\rcr\r.\r\n.\r\n", b"Subject: s\r\n\r\nbare\rcr\r.\r\n"),
        (
            b"Subject: s\r\n\r\n" + b"y" * 999 + b"\r\n.\r\n",
            b"Subject: s\r\n\r\n" + b"y" * 999 + b"\r\n",
        ),
    ],
)
def test_body_kept_exactly(service, raw, sent, kept):
    start(raw)
    raw.send(sent)
    assert queued(service, raw.read_reply()) == kept


def test_8bit_and_smtputf8_bytes_kept(service, raw):
    body = "Subject: grüße\r\n\r\nÄ\r\n".encode() + b"\xff\xfe not utf-8\r\n"
    start(raw, b" BODY=8BITMIME SMTPUTF8")
    raw.send(body + b".\r\n")
    assert queued(service, raw.read_reply()) == body


@pytest.mark.parametrize("step", [1, 2, 3, 7, 4096])
def test_end_of_data_split_across_writes_and_pipelined_quit(service, raw, step):
    """However the client's writes cut the stream, the end of data is found and what follows
    it (a pipelined QUIT in the same write) is the next command."""
    body = b"Subject: split\r\n\r\n" + b"".join(b".%d line\r\n" % n for n in range(300))
    stream = body + b".\r\nQUIT\r\n"
    start(raw)
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for offset in range(0, len(stream), step):
        raw.send(stream[offset : offset + step])
    expected = b"Subject: split\r\n\r\n" + b"".join(b"%d line\r\n" % n for n in range(300))
    assert queued(service, raw.read_reply()) == expected
    assert raw.read_reply()[0] == 221


@pytest.mark.parametrize("lines", [250, 600])  # queued by the event loop, or by a thread
def test_large_message_in_many_reads(service, raw, lines):
    body = b"Subject: large\r\n\r\n" + b"".join(
        b"%05d" % n + b"z" * 993 + b"\r\n" for n in range(lines)
    )
    start(raw)
    raw.send(body + b".\r\n")
    assert queued(service, raw.read_reply()) == body


@pytest.mark.parametrize(
    ("sent", "reply"),
    [
        (b"Subject: s\r\n\r\n" + b"y" * 1000 + b"\r\n", 500),  # 1002 bytes with its CRLF
        (b"Subject: s\r\n\r\n" + b"w" * 200000 + b"\r\n", 500),  # beyond the stream buffer
        (b"Subject: s\r\n\r\n" + (b"v" * 998 + b"\r\n") * 1100, 552),
        ((b"v" * 998 + b"\r\n") * 1100 + b"u" * 5000 + b"\r\n", 552),  # the size broke first
    ],
)
def test_limits_answer_after_the_end_of_data_and_the_session_goes_on(service, raw, sent, reply):
    start(raw)
    raw.send(sent + b".\r\n")
    assert raw.read_reply()[0] == reply
    start(raw)  # the same connection goes on, with a fresh transaction
    raw.send(b"Subject: after\r\n\r\nok\r\n.\r\n")
    assert queued(service, raw.read_reply()) == b"Subject: after\r\n\r\nok\r\n"


@pytest.mark.parametrize(
    "partial",
    [b"", b"Subject: lost\r\n\r\nbody\r\n", b"Subject: lost\r\n\r\nbody\r\n.", b"x\r\n.\r"],
)
@pytest.mark.parametrize("reset", [False, True])
def test_connection_lost_mid_data_accepts_nothing(service, partial, reset):
    client = Raw.greeted(service, b"lost.local")
    start(client)
    client.send(partial)
    if reset:  # RST instead of FIN
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    else:
        client.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):  # the server hangs up without a reply
            client.read_reply()
        client.close()
    later = Raw.greeted(service, b"later.local")
    start(later)
    later.send(b"Subject: later\r\n\r\n.\r\n")
    assert queued(service, later.read_reply()) == b"Subject: later\r\n\r\n"
    later.close()
    spool = Spool(service.spool)
    assert not list(spool.tmp.iterdir())
    bodies = [body_of(spool, queue_id) for queue_id in spool.ids()]
    assert not [body for body in bodies if b"lost" in body or body == b"x\r\n"]

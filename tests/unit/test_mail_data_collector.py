"""The DATA reader against aiosmtpd's own algorithm: same body, same reply, whatever the bytes
and however they are split into the pieces the server reads.

``aiosmtpd_data`` below is aiosmtpd 1.4's ``SMTP.smtp_DATA`` loop, line by line as it reads them
(``readuntil(b"\\r\\n")`` with the stream limit), kept as the reference.
"""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP
from chroot_helper.services.mail.protocol import (
    TOO_LONG,
    TOO_MUCH,
    DataCollector,
    FastSMTP,
    parse_path,
)
from hypothesis import given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=600, deadline=None, database=None)


def aiosmtpd_data(
    stream: bytes, size_limit: int, line_limit: int, stream_limit: int
) -> tuple[str | None, bytes | None]:
    """aiosmtpd's DATA loop on ``stream`` (which holds the end of data): (error, body)."""
    pos, num_bytes, state = 0, 0, None
    data: list[bytearray] = []
    fragments: list[bytes] = []
    while True:
        isep = stream.index(b"\r\n", pos)
        overrun = isep - pos > stream_limit  # asyncio.LimitOverrunError
        line = stream[pos:isep] if overrun else stream[pos : isep + 2]
        pos += len(line)
        if overrun:
            if state is None:
                state = TOO_LONG
            data.clear()
        if not fragments and line == b".\r\n":
            break
        num_bytes += len(line)
        if state is None and size_limit and num_bytes > size_limit:
            state = TOO_MUCH
            data.clear()
        fragments.append(line)
        if line.endswith(b"\r\n"):
            if state is None:
                joined = b"".join(fragments)
                if len(joined) > line_limit:
                    state = TOO_LONG
                    data.clear()
                else:
                    data.append(bytearray(joined))
            fragments.clear()
    if state is not None:
        return state, None
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return None, b"".join(data)


def pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``stream`` as the server reads it: up to and including each ``.CRLF``, or (the
    stream limit overrun) any prefix that holds no ``.CRLF`` and does not split one."""
    out, pos, choices = [], 0, iter(cuts)
    while pos < len(stream):
        found = stream.find(b".\r\n", pos)
        end = len(stream) if found < 0 else found + 3
        cut = pos + next(choices, 0) % (end - pos + 1)
        if cut >= end or cut == pos or (found >= 0 and cut > found):
            cut = end  # readuntil(b".\r\n")
        out.append(stream[pos:cut])
        pos = cut
    return out


def collect(stream: bytes, cuts: list[int], size: int, line: int, limit: int):
    collector = DataCollector(size, line, stream_limit=limit)
    for piece in pieces(stream, cuts):
        if collector.feed(piece):
            return collector.error, (None if collector.error else collector.content())
    raise AssertionError("no end of data seen")


# Few symbols, so that dots at line starts, bare CR/LF and CRLF splits are common.
body_bytes = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.", b"xyz"]), max_size=60
).map(b"".join)


@FAST
@given(
    body_bytes,
    st.lists(st.integers(0, 80), max_size=40),
    st.integers(0, 120),
    st.integers(2, 30),
    st.integers(1, 40),
)
def test_same_outcome_as_aiosmtpd(body, cuts, size_limit, line_limit, stream_limit):
    stream = body + b"\r\n.\r\nQUIT\r\n"
    expected = aiosmtpd_data(stream, size_limit, line_limit, stream_limit)
    assert collect(stream, cuts, size_limit, line_limit, stream_limit) == expected


@pytest.mark.parametrize(
    ("stream", "result"),
    [
        (b".\r\n", (None, b"")),  # the first line is the end of data
        (b"..\r\n.\r\n", (None, b".\r\n")),
        (b"a\r\n..b\r\n...\r\n.\r\n", (None, b"a\r\n.b\r\n..\r\n")),
        (b"a\n.\r\n.\r\n", (None, b"a\n.\r\n")),  # after a bare LF: not a line start
        (b"a\r.\r\n.\r\n", (None, b"a\r.\r\n")),
        (b"x" * 40 + b"\r\n.\r\n", (TOO_LONG, None)),
        (b"y\r\n" * 30 + b".\r\n", (TOO_MUCH, None)),
        (b"z" * 200 + b"\r\n.\r\n", (TOO_MUCH, None)),  # the size is counted before the length
        (b"z" * 700 + b"\r\n.\r\n", (TOO_LONG, None)),  # unless the stream buffer overflowed
    ],
)
def test_edge_cases(stream, result):
    assert aiosmtpd_data(stream, 60, 30, 500) == result
    for cuts in ([], [1] * 1000, [2, 3, 5, 7] * 300):
        assert collect(stream, cuts, 60, 30, 500) == result


def test_address_parsing_is_aiosmtpd_s():
    fast, plain = FastSMTP.__new__(FastSMTP), SMTP.__new__(SMTP)
    for smtp in (fast, plain):
        smtp.local_part_limit = 5
    for arg in [
        "",
        "<a@example.org>",
        "<a@example.org> SIZE=10 BODY=8BITMIME",
        " <a@example.org>",
        "a@example.org",
        "<toolong@example.org>",
        "<bad address>",
        "<@x>",
        "<a@[127.0.0.1]>",
        '<"q u"@example.org>',
        "<jörg@exämple.net> SMTPUTF8",
        "<>",
        "<a@b",
    ]:
        assert fast._getaddr(arg) == plain._getaddr(arg), arg
    assert parse_path.cache_info().hits >= 0


def test_large_body_in_overrun_pieces():
    """A body longer than the stream buffer arrives in several pieces."""
    line = b"0123456789" * 9 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 2000
    stream = body + b".\r\n"
    got = collect(stream, [65536, 65536, 30000, 65536], 10 * 1024 * 1024, 1001, 65536)
    assert got == (None, body) == aiosmtpd_data(stream, 10 * 1024 * 1024, 1001, 65536)


def test_collector_is_not_fed_after_the_end():
    collector = DataCollector(100, 50)
    assert not collector.feed(b"a\r\n")
    assert collector.feed(b".\r\n")
    assert asyncio.iscoroutinefunction(FastSMTP.smtp_DATA)
    assert collector.content() == b"a\r\n"

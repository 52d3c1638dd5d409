"""aiosmtpd's SMTP protocol with two narrow overrides for speed: the DATA reader and MAIL/RCPT
address parsing.  Everything else (commands, replies, limits, timeouts) is aiosmtpd's.

Why: aiosmtpd 1.4 reads DATA one line at a time (a ``readuntil`` and a dozen Python steps per
line: ~75 rounds for a 5 KB message) and defines a ``typing.Protocol`` class on every MAIL and
RCPT before parsing the address with :mod:`email`'s header parser.  Here DATA is read in large
pieces (up to each ``.CRLF``) and checked with bytes methods; :class:`DataCollector` applies
aiosmtpd's rules with the same outcome, reply and error precedence:

* the body ends at a line holding a single dot, also when it is the first line;
* one leading dot is removed from every other line starting with a dot (RFC 5321 4.5.2);
* lines end at CRLF only: a bare CR or LF stays in the line (the header check refuses it);
* more than ``data_size_limit`` bytes (counted before unstuffing) -> ``552`` once the client has
  sent the end of data; a line longer than ``line_length_limit`` bytes including its CRLF, or
  one that overflows the stream buffer (:data:`STREAM_LIMIT`) -> ``500``; whichever aiosmtpd
  would have seen first wins, and nothing of such a message is kept;
* a connection lost before the end of data accepts nothing.

The tests run both readers side by side (``tests/unit/test_mail_data_collector.py``) and the
edge cases against the real server (``tests/integration/test_mail_data_reader.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

from aiosmtpd.smtp import MISSING, SMTP

__all__ = ["STREAM_LIMIT", "DataCollector", "FastSMTP", "parse_path"]

log = logging.getLogger("mail.log")  # aiosmtpd's logger: its DATA messages stay where they were

STREAM_LIMIT = 64 * 1024
"""The stream buffer: aiosmtpd caps it at one line (1001 bytes), so reading a message paused and
resumed the socket (epoll_ctl twice) every few KB.  Line and command limits are still enforced
by their own checks; a longer run of bytes without a line end counts as a too-long line."""

TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH = "552 Error: Too much mail data"
_END = b"\r\n.\r\n"


@functools.lru_cache(maxsize=1024)
def parse_path(arg: str) -> tuple[str | None, str]:
    """``(address, rest)`` of a MAIL/RCPT argument as aiosmtpd parses it, or ``(None, "")``.

    Memoized: the parse is a pure function of the text, and a site sends from the same few
    senders to the same few recipients.
    """
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, rest = parse(arg)
    except HeaderParseError:
        return None, ""
    return str(address.addr_spec), rest


class DataCollector:
    """A DATA body fed in the pieces read from the client; applies aiosmtpd's rules (above).

    :param size_limit: ``data_size_limit`` (bytes as sent, before unstuffing); falsy: none.
    :param line_limit: ``line_length_limit`` (bytes including CRLF).
    :param stream_limit: the stream buffer's limit (:data:`STREAM_LIMIT`).
    """

    def __init__(
        self, size_limit: int | None, line_limit: int, stream_limit: int = STREAM_LIMIT
    ) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.stream_limit = stream_limit
        self._longest = min(line_limit, stream_limit + 2)  # the longest line both limits allow
        self.error: str | None = None
        """The reply for a refused message (:data:`TOO_LONG` or :data:`TOO_MUCH`), or None."""
        self._blocks: list[bytes] = []  # complete lines, as sent; dropped on error
        self._partial = b""  # the line being received, until its CRLF
        self._size = 0
        self._last2 = b"\r\n"  # the last two bytes fed (the DATA command's CRLF at first)

    def feed(self, piece: bytes) -> bool:
        """Take the next bytes; returns True when they end with the end-of-data line.

        The caller reads up to and including each ``.CRLF`` (never past it), or any bytes
        that hold none, so the end of data can only be at the end of a piece.
        """
        tail = piece[-5:] if len(piece) >= 5 else (self._last2 + piece)[-5:]
        self._last2 = tail[-2:]
        done = tail == _END
        if done:
            piece = piece[:-3]
        if self.error is None:
            self._take(piece)
        return done

    def content(self) -> bytes:
        """The body with dot-stuffing undone (only once :meth:`feed` returned True)."""
        body = b"".join(self._blocks)
        if body[:1] == b".":
            body = body[1:]
        return body.replace(b"\r\n.", b"\r\n")

    def _take(self, piece: bytes) -> None:
        data = self._partial + piece if self._partial else piece
        end = data.rfind(b"\r\n") + 2
        if end >= 2:
            block = data[:end]
            size = self._size + end
            limit = self.size_limit
            if (limit and size > limit) or (
                end > self._longest and max(map(len, block.split(b"\r\n"))) + 2 > self._longest
            ):
                self._refuse_in_order(block)
            else:
                self._size = size
                self._blocks.append(block)
            data = data[end:]
        if self.error is None and len(data) > self.stream_limit + 1:
            # No CRLF within the stream buffer: aiosmtpd reads such a line in fragments and
            # calls it too long before counting its bytes.
            self._fail(TOO_LONG)
        self._partial = data if self.error is None else b""

    def _refuse_in_order(self, block: bytes) -> None:
        """Line by line, in aiosmtpd's order of checks: which limit a message broke first."""
        for line in block.split(b"\r\n")[:-1]:
            length = len(line) + 2
            if length - 2 > self.stream_limit:
                return self._fail(TOO_LONG)
            self._size += length
            if self.size_limit and self._size > self.size_limit:
                return self._fail(TOO_MUCH)
            if length > self.line_limit:
                return self._fail(TOO_LONG)
        self._blocks.append(block)  # not reached: the caller saw a broken limit
        return None

    def _fail(self, reply: str) -> None:
        self.error = reply
        self._blocks.clear()


class FastSMTP(SMTP):
    """aiosmtpd's protocol, DATA read in large pieces and addresses parsed once per text."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._stream_reader._limit = STREAM_LIMIT  # type: ignore[attr-defined]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's, minus its per-call class definition, with the parse memoized.
        if not arg:
            return "", ""
        address, rest = parse_path(arg)
        if address is None:
            return None, None
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    async def smtp_DATA(self, arg: str) -> None:
        if self._decode_data or "DATA" not in self._handle_hooks:
            await super().smtp_DATA(arg)  # decoding, process_message: not used by the service
            return
        # From here to the end of data, as aiosmtpd's smtp_DATA.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        collector = DataCollector(self.data_size_limit, self.line_length_limit)
        reader = self._reader
        try:
            while True:
                try:
                    piece = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    # No ".CRLF" within the stream buffer: take what holds none, keep the rest.
                    piece = await reader.read(exc.consumed)
                if collector.feed(piece):
                    break
        except asyncio.CancelledError:
            # eof_received/connection_lost cancel the handler: nothing is accepted.
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if collector.error is not None:
            await self.push(collector.error)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = collector.content()
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

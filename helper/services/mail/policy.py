"""Acceptance rules of the submission server, as pure functions on strings and bytes.

No I/O: the SMTP handler (:mod:`.server`) calls these and sends the reply they return.  Each
check returns ``None`` when the input passes, or the full SMTP reply line to send otherwise,
so the codes live in one place::

    >>> check_address("a@example.org", smtputf8=False) is None
    True
    >>> check_headers(b"Subject: x\\nBcc: y\\r\\n\\r\\nbody\\r\\n")
    '550 5.6.0 Message header contains a bare CR or LF'

Never echo client bytes into replies: a reply goes back on the same connection, but logs and
bounces may quote them elsewhere.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Hashable

__all__ = [
    "REPLY_BAD_ADDRESS",
    "REPLY_BARE_EOL",
    "REPLY_BAD_HEADER",
    "REPLY_NUL",
    "REPLY_NEEDS_SMTPUTF8",
    "REPLY_RATE_LIMIT",
    "REPLY_SENDER_DENIED",
    "REPLY_TOO_MANY_RECIPIENTS",
    "RateLimiter",
    "check_address",
    "check_headers",
    "header_end",
]

REPLY_BAD_ADDRESS = "553 5.1.3 Bad address syntax"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter"
REPLY_SENDER_DENIED = "553 5.7.1 Sender address not allowed from this host"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_RATE_LIMIT = "450 4.7.1 Too many messages from this client; try again later"
REPLY_BARE_EOL = "550 5.6.0 Message header contains a bare CR or LF"
REPLY_NUL = "550 5.6.0 Message header contains a NUL byte"
REPLY_BAD_HEADER = "550 5.6.0 Malformed message header line"

MAX_ADDRESS = 254
MAX_LOCAL_PART = 64

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ATEXT_DOT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _is_utf8(text: str) -> bool:
    """False for bytes that were not UTF-8 (aiosmtpd keeps them as lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_address(address: str, *, smtputf8: bool) -> str | None:
    """Check an envelope address (``local@domain``, no angle brackets).

    Control characters (CR, LF, NUL, ...) are always refused: they would end up in
    ``Received:``/``Return-Path:`` headers or on a transport's command line.  So are bytes
    that are not UTF-8, which reach us as lone surrogates.

    :param smtputf8: the client sent ``SMTPUTF8``; without it non-ASCII is refused.
    """
    if not address or len(address) > MAX_ADDRESS or _has_control(address):
        return REPLY_BAD_ADDRESS
    if not _is_utf8(address):
        return REPLY_BAD_ADDRESS
    if address.isascii() is False and not smtputf8:
        return REPLY_NEEDS_SMTPUTF8
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(local.encode()) > MAX_LOCAL_PART:
        return REPLY_BAD_ADDRESS
    if local.startswith('"'):
        if not _QUOTED.fullmatch(local):
            return REPLY_BAD_ADDRESS
    elif (
        local.startswith(".")
        or local.endswith(".")
        or ".." in local
        or not (
            _ATEXT_DOT.fullmatch(local)  # the common case, in one match
            or all(_ATEXT_DOT.fullmatch(c) or (smtputf8 and not c.isascii()) for c in local)
        )
    ):
        return REPLY_BAD_ADDRESS
    if domain.startswith("[") and domain.endswith("]"):
        return (
            None
            if re.fullmatch(r"\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]", domain)
            else (REPLY_BAD_ADDRESS)
        )
    labels = domain.rstrip(".").split(".")
    for label in labels:
        if smtputf8 and not label.isascii():
            if not label or len(label.encode()) > 63 or any(c in label for c in ' @<>()[]\\,;:"'):
                return REPLY_BAD_ADDRESS
        elif not _LABEL.fullmatch(label):
            return REPLY_BAD_ADDRESS
    return None


def header_end(data: bytes) -> int:
    """Length of the header section of ``data`` including its blank line (all of it if none)."""
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4


def check_headers(data: bytes) -> str | None:
    """Check the header section of a message as received in DATA (CRLF line ends).

    Refused: a NUL byte, a CR not followed by LF or an LF not preceded by CR (a second header
    smuggled into a value: ``Subject: hi\\nBcc: victim``), a line that is neither a
    ``Name: value`` field nor a folded continuation of one.
    """
    header = data[: header_end(data)]
    if b"\0" in header:
        return REPLY_NUL
    if _BARE_LF.search(header) or _BARE_CR.search(header):
        return REPLY_BARE_EOL
    first = True
    for line in header.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if first:
                return REPLY_BAD_HEADER
        elif not _FIELD.match(line):
            return REPLY_BAD_HEADER
        first = False
    return None


class RateLimiter:
    """At most ``limit`` events per ``window`` seconds per key (a sliding window).

    :param limit: events allowed per window; 0 allows everything.
    :param clock: a monotonic clock, replaceable in tests.
    """

    def __init__(self, limit: int, *, window: float = 60.0, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._events: dict[Hashable, collections.deque[float]] = {}

    def allow(self, key: Hashable) -> bool:
        """Record one event for ``key`` and say whether it is within the limit."""
        if self.limit <= 0:
            return True
        now = self.clock()
        if len(self._events) > 10000:
            self._purge(now)
        events = self._events.setdefault(key, collections.deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def _purge(self, now: float) -> None:
        stale = [k for k, v in self._events.items() if not v or v[-1] <= now - self.window]
        for key in stale:
            del self._events[key]

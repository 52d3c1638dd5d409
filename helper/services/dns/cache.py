"""Answer cache and the fast path: stored response bytes, ID and TTLs patched per answer.

An entry keeps the response *after* its question section, rendered once by dnspython without an
OPT record, plus the offsets of every TTL field.  Serving a hit is a dictionary lookup, a splice
and one ``struct.pack_into`` per record: no parse, no rebuild.  The time is passed in by the
caller (``time.monotonic()``), so this module does no I/O and is tested with plain bytes.

Positive and negative (RFC 2308) answers share the table; an entry lives until its smallest TTL
runs out, and the TTLs it shows count down with its age.

On top of that, :meth:`AnswerCache.remember` keeps each rendered UDP reply under the raw bytes
of the query that asked for it, ID excluded.  The same query bytes again (the usual case: the
same client library asking the same names) are answered by :meth:`AnswerCache.replay` with the
new ID and the stored reply, without parsing or rendering, as long as the entry it was rendered
from is still the cached one and its age in whole seconds (hence every TTL shown) is unchanged.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import OrderedDict
from typing import NamedTuple

from .wire import (
    FLAG_RD,
    HEADER_SIZE,
    MIN_UDP_PAYLOAD,
    PlainQuery,
    build_opt,
    find_ttl_offsets,
    truncated_reply,
)

__all__ = ["AnswerCache", "CacheEntry", "make_entry", "render"]

_TTL = struct.Struct("!I")
_COUNTS = struct.Struct("!HHHH")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CacheEntry:
    """One cached response.

    :param flags: the response's flags word (RD is replaced by the client's bit when served).
    :param counts: QD, AN, NS, AR counts, the AR count without OPT.
    :param body: the records after the question, no OPT.
    :param ttl_offsets: where each TTL field sits in ``body``.
    :param ttls: the TTLs at ``stored_at``.
    :param stored_at: monotonic seconds when stored.
    :param expires_at: monotonic seconds when the entry stops being served.
    """

    flags: int
    counts: tuple[int, int, int, int]
    body: bytes
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    stored_at: float
    expires_at: float


def make_entry(wire: bytes, question_end: int, *, lifetime: int, now: float) -> CacheEntry:
    """Build an entry from a response rendered without OPT; ``question_end`` is its offset.

    :raises ValueError: if ``wire`` does not walk as a DNS message.
    """
    offsets = find_ttl_offsets(wire)
    flags = struct.unpack_from("!H", wire, 2)[0]
    counts = _COUNTS.unpack_from(wire, 4)
    body = wire[question_end:]
    rel = tuple(offset - question_end for offset in offsets)
    ttls = tuple(_TTL.unpack_from(wire, offset)[0] for offset in offsets)
    return CacheEntry(
        flags=flags,
        counts=(counts[0], counts[1], counts[2], counts[3]),
        body=body,
        ttl_offsets=rel,
        ttls=ttls,
        stored_at=now,
        expires_at=now + lifetime,
    )


def render(
    entry: CacheEntry,
    query: bytes,
    plain: PlainQuery,
    *,
    now: float,
    udp_limit: int | None,
    edns_udp_size: int,
) -> bytes:
    """The response to ``query`` from ``entry``, TTLs counted down to ``now``.

    :param udp_limit: our own UDP payload ceiling; ``None`` over TCP (no truncation).
    :param edns_udp_size: the size advertised in our OPT record when the client used EDNS.
    """
    flags = (entry.flags & ~FLAG_RD) | (FLAG_RD if plain.rd else 0)
    qd, an, ns, ar = entry.counts
    opt = build_opt(edns_udp_size) if plain.edns else b""
    head = query[:2] + struct.pack("!HHHHH", flags, qd, an, ns, ar + (1 if opt else 0))
    body = bytearray(entry.body)
    age = int(now - entry.stored_at)
    if age > 0:
        for offset, ttl in zip(entry.ttl_offsets, entry.ttls, strict=True):
            _TTL.pack_into(body, offset, ttl - age if ttl > age else 0)
    response = head + query[HEADER_SIZE : plain.question_end] + body + opt
    if udp_limit is not None:
        limit = min(plain.udp_size, udp_limit) if plain.edns else MIN_UDP_PAYLOAD
        if len(response) > max(limit, MIN_UDP_PAYLOAD):
            return truncated_reply(response, plain.question_end, opt)
    return response


class _Rendered(NamedTuple):
    """A reply rendered from ``entry`` when it was ``age`` whole seconds old, ID stripped."""

    tail: bytes
    key: bytes
    entry: CacheEntry
    age: int


class AnswerCache:
    """A bounded least-recently-used map from question key to :class:`CacheEntry`.

    :param max_entries: entries kept; 0 disables caching.  At most twice as many rendered
        replies are remembered (different spellings or EDNS sizes of one question).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._rendered: dict[bytes, _Rendered] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        """The live entry for ``key``; an expired one is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: CacheEntry) -> None:
        """Store ``entry``, evicting the least recently used beyond ``max_entries``."""
        if self.max_entries <= 0 or entry.expires_at <= entry.stored_at:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._rendered.clear()

    def remember(self, query: bytes, key: bytes, reply: bytes, now: float) -> None:
        """Keep ``reply``, rendered at ``now`` from the entry under ``key``, for :meth:`replay`.

        Only for replies whose bytes depend on nothing but the query's bytes (its ID aside),
        the entry and the entry's age: UDP replies, not truncated.
        """
        entry = self._entries.get(key)
        if entry is None:
            return
        rendered = self._rendered
        if len(rendered) >= 2 * self.max_entries:
            rendered.clear()
        rendered[query[2:]] = _Rendered(reply[2:], key, entry, int(now - entry.stored_at))

    def replay(self, query: bytes, now: float) -> bytes | None:
        """The remembered reply to the same query bytes with this query's ID, or ``None``.

        Safe to call from a thread other than the one changing the cache: each step is one
        dictionary operation, and a reply whose entry goes away meanwhile is one that raced
        with the change, as if the query had come a moment earlier.
        """
        rest = query[2:]
        found = self._rendered.get(rest)
        if found is None:
            return None
        entry = found.entry
        if (
            entry.expires_at <= now
            or int(now - entry.stored_at) != found.age
            or self._entries.get(found.key) is not entry
        ):
            self._rendered.pop(rest, None)
            return None
        try:
            self._entries.move_to_end(found.key)
        except KeyError:  # evicted since the line above
            pass
        return query[:2] + found.tail

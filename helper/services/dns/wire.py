"""Byte-level helpers for the fast path: no sockets, no clock, no full parse.

The slow path parses and builds messages with dnspython.  The fast path only needs to recognise a
*plain* query (one question, no answer/authority records, at most one OPT record) and splice a
stored response around its question::

    query     | ID | flags | QD=1 AN=0 NS=0 AR=0/1 | QNAME QTYPE QCLASS | [OPT]
    response  | ID | flags | QD AN NS AR           | question (client's bytes) | records... | [OPT]
                ^^   ^^ patched                                                ^^ TTLs patched

Anything unusual returns ``None`` and goes to the slow path, which validates with dnspython.  Do
not use this module to accept packets the slow path would refuse: it answers only what the cache
already holds for exactly the same question.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "HEADER_SIZE",
    "PlainQuery",
    "build_opt",
    "find_ttl_offsets",
    "parse_plain_query",
    "question_key",
    "truncated_reply",
]

HEADER_SIZE = 12
TYPE_OPT = 41
MAX_NAME_LENGTH = 255
MIN_UDP_PAYLOAD = 512

_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_MASK = 0x7800


class PlainQuery(NamedTuple):
    """What the fast path needs to know about a query.

    :param key: lower-cased QNAME wire bytes + QTYPE + QCLASS; the cache key.
    :param question_end: offset just past the question section.
    :param rd: the client's recursion-desired bit.
    :param edns: the query carried an OPT record.
    :param udp_size: the client's advertised UDP payload size (512 without EDNS).
    """

    key: bytes
    question_end: int
    rd: bool
    edns: bool
    udp_size: int


def question_key(name_wire: bytes, rdtype: int, rdclass: int) -> bytes:
    """The cache key of a question; ``name_wire`` is an uncompressed owner name."""
    return name_wire.lower() + struct.pack("!HH", rdtype, rdclass)


def _name_end(data: bytes, offset: int) -> int:
    """End offset of an uncompressed name at ``offset``, or -1 if it is not one."""
    total = 0
    length = len(data)
    while offset < length:
        label = data[offset]
        if label == 0:
            return offset + 1
        if label > 63:
            return -1
        total += label + 1
        if total > MAX_NAME_LENGTH:
            return -1
        offset += label + 1
    return -1


def parse_plain_query(data: bytes) -> PlainQuery | None:
    """Recognise a plain standard query, or return ``None`` for the slow path."""
    if len(data) < HEADER_SIZE + 5:
        return None
    _id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & (FLAG_QR | OPCODE_MASK | FLAG_TC) or qdcount != 1 or ancount or nscount:
        return None
    if arcount > 1:
        return None
    name_end = _name_end(data, HEADER_SIZE)
    if name_end < 0 or name_end + 4 > len(data):
        return None
    question_end = name_end + 4
    edns = False
    udp_size = MIN_UDP_PAYLOAD
    if arcount == 1:
        # Exactly one OPT RR: root name, TYPE 41, CLASS = size, TTL = ext-rcode/version/flags.
        if question_end + 11 > len(data) or data[question_end] != 0:
            return None
        rtype, size = struct.unpack_from("!HH", data, question_end + 1)
        version = data[question_end + 6]
        (rdlength,) = _U16.unpack_from(data, question_end + 9)
        if rtype != TYPE_OPT or version != 0 or question_end + 11 + rdlength != len(data):
            return None
        edns = True
        udp_size = max(MIN_UDP_PAYLOAD, size)
    elif question_end != len(data):
        return None
    # Lower-case the name only: QTYPE/QCLASS bytes may happen to be ASCII letters.
    key = data[HEADER_SIZE:name_end].lower() + data[name_end:question_end]
    return PlainQuery(key, question_end, bool(flags & FLAG_RD), edns, udp_size)


def _skip_name(data: bytes, offset: int) -> int:
    """Offset after a possibly compressed name; raises ``ValueError`` on a malformed one."""
    while True:
        if offset >= len(data):
            raise ValueError("name runs past the end of the message")
        label = data[offset]
        if label & 0xC0 == 0xC0:
            return offset + 2
        if label & 0xC0:
            raise ValueError("unknown label type")
        if label == 0:
            return offset + 1
        offset += label + 1


def find_ttl_offsets(wire: bytes) -> list[int]:
    """Offsets of the TTL field of every record after the question, OPT records excluded.

    Meant for wire this process rendered (with dnspython); raises ``ValueError`` if it does not
    walk cleanly.
    """
    _id, _flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    offset = HEADER_SIZE
    for _ in range(qdcount):
        offset = _skip_name(wire, offset) + 4
    offsets = []
    for _ in range(ancount + nscount + arcount):
        offset = _skip_name(wire, offset)
        if offset + 10 > len(wire):
            raise ValueError("record header runs past the end of the message")
        rtype = _U16.unpack_from(wire, offset)[0]
        if rtype != TYPE_OPT:
            offsets.append(offset + 4)
        (rdlength,) = _U16.unpack_from(wire, offset + 8)
        offset += 10 + rdlength
    if offset != len(wire):
        raise ValueError("trailing bytes after the last record")
    return offsets


def build_opt(udp_size: int) -> bytes:
    """An OPT pseudo-record advertising ``udp_size``, no flags, no options."""
    return b"\x00" + struct.pack("!HHIH", TYPE_OPT, udp_size, 0, 0)


def truncated_reply(response: bytes, question_end: int, opt: bytes) -> bytes:
    """The header and question of ``response`` with TC set and no records (plus ``opt``)."""
    _id, flags, _qd, _an, _ns, _ar = _HEADER.unpack_from(response)
    header = _HEADER.pack(_id, flags | FLAG_TC, 1, 0, 0, 1 if opt else 0)
    return header + response[HEADER_SIZE:question_end] + opt

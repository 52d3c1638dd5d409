"""Untrusted packets through the whole resolver (fast and slow path), without sockets.

The allow list admits nothing but ``localhost`` and the hosts file's names, so no packet is
forwarded: every input is answered or dropped locally, and each answer must be a well-formed
response to the packet's ID.
"""

from __future__ import annotations

import asyncio
import struct

import dns.message
import dns.rcode
from chroot_helper.services.dns import parse_config
from chroot_helper.services.dns.resolver import Resolver
from chroot_helper.services.dns.stats import Counters
from hypothesis import given, settings
from hypothesis import strategies as st

VALID = [
    dns.message.make_query("localhost", "A").to_wire(),
    dns.message.make_query("localhost", "AAAA", use_edns=0, payload=4096).to_wire(),
    dns.message.make_query("1.0.0.127.in-addr.arpa", "PTR").to_wire(),
    dns.message.make_query("blocked.example", "MX").to_wire(),
]


def make_resolver() -> Resolver:
    config = parse_config(
        {
            "listen": "127.0.0.1:5399",
            "upstreams": ["127.0.0.2:5300"],
            "hosts_file": "",
            "allow": ["localhost"],
        }
    )
    return Resolver(config, Counters())


def run(data: bytes, udp: bool) -> bytes | None:
    resolver = make_resolver()

    async def both() -> bytes | None:
        fast = resolver.answer_fast(data, ("127.0.0.1", 1), udp=udp)
        if fast is not None:
            return fast
        return await resolver.answer(data, ("127.0.0.1", 1), udp=udp)

    return asyncio.run(both())


def check(data: bytes, reply: bytes | None, udp: bool) -> None:
    if reply is None:
        return
    assert len(data) >= 12
    assert reply[:2] == data[:2]
    assert struct.unpack_from("!H", reply, 2)[0] & 0x8000  # QR
    if udp:
        assert len(reply) <= 1232
    dns.message.from_wire(reply, question_only=True)


@st.composite
def mutated(draw):
    """A valid query with a few bytes overwritten and possibly cut short."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=700), mutated()), st.booleans())
def test_any_packet_answered_or_dropped(data, udp):
    check(data, run(data, udp), udp)


def test_valid_queries_answered_locally():
    reply = dns.message.from_wire(run(VALID[0], True))
    assert [str(r) for r in reply.answer[0]] == ["127.0.0.1"]
    reply = dns.message.from_wire(run(VALID[3], True))
    assert reply.rcode() == dns.rcode.REFUSED
    assert run(dns.message.make_response(dns.message.make_query("x", "A")).to_wire(), True) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=700), mutated()))
def test_header_triage_settles_only_what_the_slow_path_would_settle_alike(data):
    settled, reply = make_resolver().answer_junk(data, udp=True)
    if settled:
        slow = asyncio.run(make_resolver().answer(data, ("127.0.0.1", 1), udp=True))
        assert reply == slow

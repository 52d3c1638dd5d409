"""Fuzz target: one DNS packet through the resolver's fast path, slow path and cache render.

The resolver (:class:`~chroot_helper.services.dns.resolver.Resolver`) forwards to an upstream in
this process: a UDP endpoint on a loopback port of the target's own loop that answers every
name under ``test.`` with an ``A`` record and everything else with NXDOMAIN (no host
nameserver is ever asked).  Each input is asked over UDP then over TCP, so an answer fetched
the first time is rendered from the cache by the fast path the second time.  The bytes also go
through :func:`~chroot_helper.services.dns.wire.parse_plain_query` on their own.

Broken promises (:class:`AssertionError`, or any exception escaping the resolver, which
promises an answer or ``None`` for every packet): a reply whose ID is not the query's, without
QR, longer than the UDP limit, or that dnspython cannot parse; a plain-query key that is not
the question's bytes.
"""

from __future__ import annotations

import asyncio
import atexit
import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from chroot_helper.services.dns import parse_config
from chroot_helper.services.dns.resolver import Resolver
from chroot_helper.services.dns.stats import Counters
from chroot_helper.services.dns.wire import HEADER_SIZE, parse_plain_query

__all__ = ["DnsTarget", "LocalUpstream", "test_one_input"]

ZONE = dns.name.from_text("test.")
EDNS_UDP_SIZE = 1232
PEER = ("127.0.0.1", 40000)


class LocalUpstream(asyncio.DatagramProtocol):
    """A tiny authoritative server for ``test.``: A 192.0.2.1 for every name, else NXDOMAIN."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        query = dns.message.from_wire(data)  # the resolver's own, well-formed query
        response = dns.message.make_response(query)
        question = query.question[0]
        if question.name.is_subdomain(ZONE) and question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", "192.0.2.1"))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(
                dns.rrset.from_text(ZONE, 60, "IN", "SOA", "ns.test. host.test. 1 60 60 60 30")
            )
        response.flags |= dns.flags.AA
        self.transport.sendto(response.to_wire(), addr)


def check_reply(query: bytes, reply: bytes | None, *, udp: bool) -> None:
    """What every reply the resolver sends must be (``None`` is a silent drop)."""
    if reply is None:
        return
    if len(query) < HEADER_SIZE or reply[:2] != query[:2]:
        raise AssertionError(f"reply {reply[:12]!r} does not answer query {query[:12]!r}")
    if not struct.unpack_from("!H", reply, 2)[0] & dns.flags.QR:
        raise AssertionError("reply without QR")
    if udp and len(reply) > EDNS_UDP_SIZE:
        raise AssertionError(f"UDP reply of {len(reply)} bytes over {EDNS_UDP_SIZE}")
    dns.message.from_wire(reply, question_only=True)


class DnsTarget:
    """A resolver and its local upstream on a loop of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        transport, _ = self.loop.run_until_complete(
            self.loop.create_datagram_endpoint(LocalUpstream, local_addr=("127.0.0.1", 0))
        )
        self.upstream = transport
        port = transport.get_extra_info("sockname")[1]
        config = parse_config(
            {
                "listen": "127.0.0.1:5399",  # never bound: the target calls the resolver
                "upstreams": [f"127.0.0.1:{port}"],
                "hosts_file": "",
                "cache_size": 256,
                "upstream_timeout": 0.5,
                "timeout": 0.8,
                "edns_udp_size": EDNS_UDP_SIZE,
            }
        )
        self.resolver = Resolver(config, Counters())

    async def _ask(self, data: bytes, udp: bool) -> bytes | None:
        fast = self.resolver.answer_fast(data, PEER, udp=udp)
        if fast is not None:
            return fast
        return await self.resolver.answer(data, PEER, udp=udp)

    def run(self, data: bytes) -> None:
        """Ask *data* over UDP, then over TCP (from the cache when the first got an answer)."""
        plain = parse_plain_query(data)
        if plain is not None:
            name_end = plain.question_end - 4
            if (
                plain.key
                != data[HEADER_SIZE:name_end].lower() + data[name_end : plain.question_end]
            ):
                raise AssertionError(f"plain-query key {plain.key!r} is not the question")
        for udp in (True, False):
            reply = self.loop.run_until_complete(self._ask(data, udp))
            check_reply(data, reply, udp=udp)

    def close(self) -> None:
        """Cancel upstream queries in flight and close the loop."""
        self.loop.run_until_complete(self.resolver.close())
        self.upstream.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


_target: DnsTarget | None = None


def test_one_input(data: bytes) -> None:
    """libFuzzer entry point: one packet on the process-wide :class:`DnsTarget`."""
    global _target
    if _target is None:
        _target = DnsTarget()
        atexit.register(_target.close)
    _target.run(data)

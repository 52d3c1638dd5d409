"""Forwarding to upstream resolvers: UDP with TCP retry, validation, failover, a time bound.

Every attempt uses a fresh socket (a kernel-chosen random source port) and a fresh random query
ID.  The UDP socket is connected, so the kernel drops datagrams from any other address; answers
are still checked here for source address, ID, QR, opcode and an identical question before they
are believed.  Anything else counts as a mismatch and is ignored while the real answer is awaited
(a spoofer cannot make the attempt fail early).

Upstreams are tried in order, starting from the last one that answered; a timeout, a refused
connection, SERVFAIL/REFUSED/NOTIMP/FORMERR or a broken TCP exchange moves on to the next.  When
every upstream failed or ``timeout`` ran out, :class:`~chroot_helper.errors.UpstreamError` is
raised and the caller answers SERVFAIL.

Do not use this for zone transfers or DNSSEC validation: it forwards single questions only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from ...errors import UpstreamError
from .config import DnsConfig, Endpoint
from .stats import Counters
from .wire import FLAG_QR, FLAG_TC, HEADER_SIZE

__all__ = ["UpstreamPool"]

log = logging.getLogger(__name__)

_USABLE_RCODES = frozenset({dns.rcode.NOERROR, dns.rcode.NXDOMAIN})
_TRUNCATED = object()


class _Mismatch(Exception):
    """A datagram that is not the answer to our query."""


def _same_host(addr: object, peer: Endpoint) -> bool:
    if not isinstance(addr, tuple) or len(addr) < 2:
        return False
    try:
        return bool(ipaddress.ip_address(addr[0]) == ipaddress.ip_address(peer.host)) and (
            addr[1] == peer.port
        )
    except ValueError:
        return False


def _check_answer(query: dns.message.Message, data: bytes) -> dns.message.Message | object:
    """The parsed answer, ``_TRUNCATED`` for a TC answer, or raise :class:`_Mismatch`."""
    if len(data) < HEADER_SIZE:
        raise _Mismatch("short datagram")
    ident, flags = struct.unpack_from("!HH", data)
    if ident != query.id or not flags & FLAG_QR:
        raise _Mismatch("wrong ID or not a response")
    try:
        answer = dns.message.from_wire(data, question_only=bool(flags & FLAG_TC))
    except dns.exception.DNSException as exc:
        raise _Mismatch(f"unparsable: {exc}") from None
    if not query.is_response(answer):
        raise _Mismatch("question differs")
    if answer.flags & dns.flags.TC:
        return _TRUNCATED
    return answer


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, query: dns.message.Message, peer: Endpoint, counters: Counters) -> None:
        self.query = query
        self.peer = peer
        self.counters = counters
        self.result: asyncio.Future[dns.message.Message | object] = (
            asyncio.get_running_loop().create_future()
        )

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.result.done():
            return
        try:
            if not _same_host(addr, self.peer):
                raise _Mismatch(f"from {addr!r}")
            self.result.set_result(_check_answer(self.query, data))
        except _Mismatch as exc:
            self.counters.upstream_mismatches += 1
            log.warning(
                "upstream %s: ignored a datagram that does not answer %s: %s",
                self.peer,
                self.query.question[0].name,
                exc,
            )

    def error_received(self, exc: Exception) -> None:
        if not self.result.done():
            self.result.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.result.done():
            self.result.set_exception(exc or ConnectionError("socket closed"))


class UpstreamPool:
    """Forwards one question at a time to the configured upstreams.

    :param config: supplies ``upstreams``, ``upstream_timeout``, ``timeout`` and
        ``edns_udp_size``.
    :param counters: updated in place (``upstream_queries``, ``upstream_errors``, ...).
    """

    def __init__(self, config: DnsConfig, counters: Counters) -> None:
        self.upstreams = config.upstreams
        self.attempt_timeout = config.upstream_timeout
        self.timeout = config.timeout
        self.payload = config.edns_udp_size
        self.counters = counters
        self._preferred = 0

    def _make_query(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdclass: dns.rdataclass.RdataClass,
    ) -> dns.message.Message:
        query = dns.message.make_query(
            qname, rdtype, rdclass, use_edns=0, payload=self.payload, want_dnssec=False
        )
        query.id = secrets.randbits(16)
        return query

    async def _udp(self, peer: Endpoint, query: dns.message.Message) -> object:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(query, peer, self.counters),
            remote_addr=(peer.host, peer.port),
        )
        try:
            transport.sendto(query.to_wire())
            return await protocol.result
        finally:
            transport.close()

    async def _tcp(self, peer: Endpoint, query: dns.message.Message) -> dns.message.Message:
        reader, writer = await asyncio.open_connection(peer.host, peer.port)
        try:
            wire = query.to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                try:
                    answer = _check_answer(query, data)
                except _Mismatch as exc:
                    self.counters.upstream_mismatches += 1
                    log.warning("upstream %s: ignored a TCP message: %s", peer, exc)
                    continue
                if not isinstance(answer, dns.message.Message):
                    raise UpstreamError(f"upstream {peer} set TC over TCP")
                return answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _attempt(
        self,
        peer: Endpoint,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdclass: dns.rdataclass.RdataClass,
    ) -> dns.message.Message:
        self.counters.upstream_queries += 1
        answer = await self._udp(peer, self._make_query(qname, rdtype, rdclass))
        if isinstance(answer, dns.message.Message):
            return answer
        self.counters.upstream_tcp_retries += 1
        log.debug("upstream %s: truncated answer for %s, retrying over TCP", peer, qname)
        return await self._tcp(peer, self._make_query(qname, rdtype, rdclass))

    async def resolve(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdclass: dns.rdataclass.RdataClass,
    ) -> dns.message.Message:
        """The first usable (NOERROR or NXDOMAIN) answer from an upstream.

        :raises UpstreamError: every upstream failed, or ``timeout`` ran out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        failures = []
        count = len(self.upstreams)
        for step in range(count):
            index = (self._preferred + step) % count
            peer = self.upstreams[index]
            budget = min(self.attempt_timeout, deadline - loop.time())
            if budget <= 0:
                failures.append(f"{peer}: no time left")
                break
            try:
                async with asyncio.timeout(budget):
                    answer = await self._attempt(peer, qname, rdtype, rdclass)
            except TimeoutError:
                self.counters.upstream_timeouts += 1
                failures.append(f"{peer}: no answer within {budget:.2f}s")
            except (OSError, EOFError, UpstreamError) as exc:
                failures.append(f"{peer}: {exc}")
            else:
                if answer.rcode() in _USABLE_RCODES:
                    self._preferred = index
                    return answer
                failures.append(f"{peer}: answered {dns.rcode.to_text(answer.rcode())}")
            self.counters.upstream_errors += 1
            log.warning("upstream %s failed for %s: %s", peer, qname, failures[-1])
        raise UpstreamError(f"no usable answer for {qname}: " + "; ".join(failures))

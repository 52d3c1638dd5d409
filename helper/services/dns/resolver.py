"""Query bytes in, response bytes out: fast path, policy, hosts, cache, forwarding.

This module owns no sockets; :mod:`.server` feeds it datagrams and TCP messages.  Order of
decisions for one query:

1. **fast path** (:meth:`Resolver.answer_fast`, synchronous): a plain query whose question is
   cached is answered by splicing; nothing is parsed beyond the header and question.  Over UDP,
   :meth:`Resolver.answer_junk` then drops or FORMERRs what the header alone condemns.
2. **slow path** (:meth:`Resolver.answer`): dnspython parses the packet.  Responses (QR set) and
   garbage shorter than a header are dropped; other malformed queries get FORMERR; other opcodes
   NOTIMP; zone transfers, meta types and non-IN classes REFUSED; names outside the allow/deny
   lists REFUSED; hosts-file names are answered locally; the rest come from the cache or from
   one upstream query shared by every identical question in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ...errors import UpstreamError
from .cache import AnswerCache, CacheEntry, make_entry, render
from .config import DnsConfig
from .hosts import HostsTable, parse_hosts
from .policy import NamePolicy
from .stats import Counters
from .upstream import UpstreamPool
from .wire import (
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    HEADER_SIZE,
    OPCODE_MASK,
    PlainQuery,
    build_opt,
    parse_plain_query,
)

__all__ = ["HOSTS_TTL", "MAX_UPSTREAM_FETCHES", "MAX_WAITERS_PER_QUESTION", "Resolver"]

log = logging.getLogger(__name__)

HOSTS_TTL = 60
"""TTL of answers from the hosts file, seconds."""

HOSTS_RECHECK = 2.0
"""The hosts file is re-read when its mtime changed, checked at most this often, seconds."""

MAX_UPSTREAM_FETCHES = 512
"""Distinct questions forwarded at once; past this, new ones get SERVFAIL at once (each fetch
holds a socket, so this also bounds file descriptors)."""

MAX_WAITERS_PER_QUESTION = 64
"""Queries waiting at once for the same forwarded question; more identical ones are dropped
before any work (a flood of one unanswered name cannot fill the pending-query table)."""

_FLAG_CD = 0x0010
_REFUSED_TYPES = frozenset(
    {
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
        dns.rdatatype.OPT,
        dns.rdatatype.TSIG,
        dns.rdatatype.TKEY,
        dns.rdatatype.MAILA,
        dns.rdatatype.MAILB,
    }
)
_EMPTY_HOSTS = parse_hosts("")


class _HostsFile:
    """The hosts table, re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.table = _EMPTY_HOSTS
        self._mtime: int | None = None
        self._checked = 0.0
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> HostsTable:
        now = time.monotonic()
        if self.path is None or (not force and now - self._checked < HOSTS_RECHECK):
            return self.table
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if force or mtime != self._mtime:
                self.table = parse_hosts(self.path.read_text(encoding="utf-8", errors="replace"))
                self._mtime = mtime
                log.info("hosts file %s: %d names", self.path, len(self.table))
        except OSError as exc:
            if self._mtime is not None or force:
                log.warning(
                    "hosts file %s unreadable (%s); answering localhost only",
                    self.path,
                    exc.strerror,
                )
            self.table = _EMPTY_HOSTS
            self._mtime = None
        return self.table


def _name_wire(name: dns.name.Name) -> bytes:
    wire = name.to_wire()
    assert wire is not None  # no file given: the bytes are returned
    return wire


def _formerr_from_header(data: bytes) -> bytes | None:
    """A bare FORMERR for a packet with a query header we could not parse further."""
    if len(data) < HEADER_SIZE:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    if flags & FLAG_QR:
        return None
    out_flags = FLAG_QR | (flags & 0x7800) | (flags & FLAG_RD) | FLAG_RA | dns.rcode.FORMERR
    return struct.pack("!HHHHHH", ident, out_flags, 0, 0, 0, 0)


class Resolver:
    """Answers DNS queries for one service instance.

    :param config: the validated ``[dns]`` settings.
    :param counters: updated in place.
    """

    def __init__(self, config: DnsConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.cache = AnswerCache(config.cache_size)
        self.policy = NamePolicy(allow=config.allow, deny=config.deny)
        self.upstreams = UpstreamPool(config, counters)
        self.hosts = _HostsFile(config.hosts_file)
        self._inflight: dict[bytes, asyncio.Task[CacheEntry | None]] = {}
        self._waiters: dict[bytes, int] = {}
        self._udp_limit = config.edns_udp_size

    def _count(self, udp: bool) -> None:
        counters = self.counters
        counters.queries += 1
        if udp:
            counters.udp_queries += 1
        else:
            counters.tcp_queries += 1

    def drop(self, *, udp: bool) -> None:
        """Count a query the listener drops unanswered (too many pending, or :meth:`crowded`)."""
        self._count(udp)
        self.counters.dropped += 1

    # -- fast path ----------------------------------------------------------------------------

    def answer_fast(self, data: bytes, peer: object, *, udp: bool) -> bytes | None:
        """The cached answer to a plain query, or ``None`` to take the slow path.

        A UDP answer is also remembered for :meth:`AnswerCache.replay` (unless truncated or
        ``log_queries`` is on, which wants every query to come through here).
        """
        plain = parse_plain_query(data)
        if plain is None:
            return None
        now = time.monotonic()
        cache = self.cache
        entry = cache.get(plain.key, now)
        if entry is None:
            return None
        counters = self.counters
        self._count(udp)
        counters.cache_hits += 1
        response = self._render(entry, data, plain, now, udp)
        if self.config.log_queries:
            self._log_query(peer, data, response, "cache")
        elif udp and not response[2] & (FLAG_TC >> 8):
            cache.remember(data, plain.key, response, now)
        return response

    def answer_junk(self, data: bytes, *, udp: bool) -> tuple[bool, bytes | None]:
        """Settle, from the header alone, a packet the slow path would only drop or FORMERR:
        shorter than a header, a response (QR set), or a QUERY without exactly one question.

        :returns: ``(True, reply or None to drop)`` when settled, ``(False, None)`` when the
            packet needs the slow path.  No task, no dnspython parse: a junk flood costs little.
        """
        if len(data) >= HEADER_SIZE:
            flags, qdcount = struct.unpack_from("!HH", data, 2)
            if not flags & FLAG_QR and (qdcount == 1 or flags & OPCODE_MASK):
                return False, None
        counters = self.counters
        self._count(udp)
        reply = _formerr_from_header(data)
        if reply is None:
            counters.dropped += 1
        else:
            counters.formerr += 1
        return True, reply

    def crowded(self, data: bytes) -> bool:
        """True when *data* asks a question that :data:`MAX_WAITERS_PER_QUESTION` queries
        already wait for (the caller drops it and counts it)."""
        if not self._waiters:
            return False
        plain = parse_plain_query(data)
        return plain is not None and self._waiters.get(plain.key, 0) >= MAX_WAITERS_PER_QUESTION

    def _render(
        self, entry: CacheEntry, query: bytes, plain: PlainQuery, now: float, udp: bool
    ) -> bytes:
        response = render(
            entry,
            query,
            plain,
            now=now,
            udp_limit=self._udp_limit if udp else None,
            edns_udp_size=self.config.edns_udp_size,
        )
        if udp and struct.unpack_from("!H", response, 2)[0] & FLAG_TC:
            self.counters.truncated += 1
        return response

    # -- slow path ----------------------------------------------------------------------------

    async def answer(self, data: bytes, peer: object, *, udp: bool) -> bytes | None:
        """The response to any packet, or ``None`` to drop it silently."""
        counters = self.counters
        self._count(udp)
        try:
            query = dns.message.from_wire(data)
        except dns.message.ShortHeader:
            counters.dropped += 1
            return None
        except (dns.exception.DNSException, ValueError, UnicodeError) as exc:
            log.debug("%r: malformed query (%s)", peer, exc)
            reply = _formerr_from_header(data)
            if reply is None:
                counters.dropped += 1
            else:
                counters.formerr += 1
            return reply
        response, source = await self._answer_message(query, peer, udp)
        if response is not None and self.config.log_queries:
            self._log_query(peer, data, response, source)
        return response

    async def _answer_message(
        self, query: dns.message.Message, peer: object, udp: bool
    ) -> tuple[bytes | None, str]:
        counters = self.counters
        if query.flags & dns.flags.QR:
            counters.dropped += 1  # never answer a response: no reflection loops
            return None, "drop"
        if query.opcode() != dns.opcode.QUERY:
            return self._error(query, dns.rcode.NOTIMP, udp), "notimp"
        if len(query.question) != 1:
            counters.formerr += 1
            return self._error(query, dns.rcode.FORMERR, udp), "formerr"
        if query.edns > 0:
            return self._error(query, dns.rcode.BADVERS, udp), "badvers"
        question = query.question[0]
        qname, rdtype, rdclass = question.name, question.rdtype, question.rdclass
        if rdtype in _REFUSED_TYPES or rdclass != dns.rdataclass.IN:
            counters.refused += 1
            return self._error(query, dns.rcode.REFUSED, udp), "refused"
        name_text = qname.to_text(omit_final_dot=True)
        if not self.policy.permits(name_text):
            counters.refused += 1
            log.warning("%r: refused %s (dns.allow/dns.deny)", peer, name_text)
            return self._error(query, dns.rcode.REFUSED, udp), "policy"
        hosts_reply = self._answer_hosts(query, qname, rdtype, udp)
        if hosts_reply is not None:
            counters.hosts_answers += 1
            return hosts_reply, "hosts"

        # Normalise to a plain query so the cache renders it exactly as the fast path would.
        flags = query.flags & (FLAG_RD | _FLAG_CD)
        plain_wire = (
            struct.pack("!HHHHHH", query.id, flags, 1, 0, 0, 1 if query.edns == 0 else 0)
            + _name_wire(qname)
            + struct.pack("!HH", rdtype, rdclass)
            + (build_opt(query.payload) if query.edns == 0 else b"")
        )
        plain = parse_plain_query(plain_wire)
        if plain is None:
            counters.formerr += 1
            return self._error(query, dns.rcode.FORMERR, udp), "formerr"
        now = time.monotonic()
        entry = self.cache.get(plain.key, now)
        if entry is not None:
            counters.cache_hits += 1
            return self._render(entry, plain_wire, plain, now, udp), "cache"
        counters.cache_misses += 1
        entry = await self._fetch(plain.key, qname, rdtype, rdclass)
        if entry is None:
            counters.servfail += 1
            return self._error(query, dns.rcode.SERVFAIL, udp), "servfail"
        return self._render(entry, plain_wire, plain, time.monotonic(), udp), "upstream"

    async def _fetch(
        self,
        key: bytes,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdclass: dns.rdataclass.RdataClass,
    ) -> CacheEntry | None:
        task = self._inflight.get(key)
        if task is None:
            if len(self._inflight) >= MAX_UPSTREAM_FETCHES:
                log.warning(
                    "%d upstream queries in flight; answering %s with SERVFAIL",
                    len(self._inflight),
                    qname,
                )
                return None
            task = asyncio.get_running_loop().create_task(
                self._forward(key, qname, rdtype, rdclass)
            )
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            left = self._waiters.pop(key) - 1
            if left:
                self._waiters[key] = left

    async def _forward(
        self,
        key: bytes,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdclass: dns.rdataclass.RdataClass,
    ) -> CacheEntry | None:
        try:
            answer = await self.upstreams.resolve(qname, rdtype, rdclass)
        except UpstreamError as exc:
            log.warning("%s", exc)
            return None
        try:
            entry = self._make_entry(answer, qname)
        except (dns.exception.DNSException, ValueError, struct.error) as exc:
            log.warning("answer for %s could not be stored: %s", qname, exc)
            return None
        self.cache.put(key, entry)
        return entry

    def _make_entry(self, answer: dns.message.Message, qname: dns.name.Name) -> CacheEntry:
        config = self.config
        answer.use_edns(False)
        answer.flags = (answer.flags | dns.flags.QR | dns.flags.RA) & ~(
            dns.flags.AA | dns.flags.TC | dns.flags.AD
        )
        if answer.answer:
            ttls = []
            for section in (answer.answer, answer.authority, answer.additional):
                for rrset in section:
                    rrset.ttl = max(config.min_ttl, min(config.max_ttl, rrset.ttl))
                    ttls.append(rrset.ttl)
            lifetime = min(ttls)
        else:
            # RFC 2308: negative answers live min(SOA TTL, SOA MINIMUM); without SOA, not cached.
            lifetime = 0
            for rrset in answer.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                    negative = min(rrset.ttl, rrset[0].minimum, config.max_negative_ttl)
                    rrset.ttl = negative
                    lifetime = negative
                    break
        wire = answer.to_wire()
        question_end = HEADER_SIZE + len(_name_wire(qname)) + 4
        return make_entry(wire, question_end, lifetime=lifetime, now=time.monotonic())

    def _answer_hosts(
        self,
        query: dns.message.Message,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        udp: bool,
    ) -> bytes | None:
        table = self.hosts.refresh()
        name_text = qname.to_text(omit_final_dot=True)
        response = self._response(query)
        if rdtype == dns.rdatatype.PTR:
            target = table.pointer(name_text)
            if target is None:
                return None
            response.answer.append(dns.rrset.from_text(qname, HOSTS_TTL, "IN", "PTR", target + "."))
        else:
            addresses = table.addresses(name_text)
            if addresses is None:
                return None
            want = {dns.rdatatype.A: False, dns.rdatatype.AAAA: True}.get(rdtype)
            wanted = [a for a in addresses if want is not None and (":" in a) == want]
            if wanted:
                response.answer.append(
                    dns.rrset.from_text_list(
                        qname, HOSTS_TTL, "IN", dns.rdatatype.to_text(rdtype), wanted
                    )
                )
        response.flags |= dns.flags.AA
        return self._to_wire(response, udp)

    # -- building replies ---------------------------------------------------------------------

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(
            query, recursion_available=True, our_payload=self.config.edns_udp_size
        )
        return response

    def _error(self, query: dns.message.Message, rcode: dns.rcode.Rcode, udp: bool) -> bytes:
        response = self._response(query)
        if rcode == dns.rcode.BADVERS:
            response.use_edns(0, payload=self.config.edns_udp_size)
        response.set_rcode(rcode)
        return self._to_wire(response, udp)

    def _to_wire(self, response: dns.message.Message, udp: bool) -> bytes:
        limit = 65535
        if udp:
            limit = min(response.request_payload, self._udp_limit) if response.edns >= 0 else 512
            limit = max(limit, 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            self.counters.truncated += 1
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def _log_query(self, peer: object, query: bytes, response: bytes, source: str) -> None:
        try:
            message = dns.message.from_wire(query, question_only=True)
            question = message.question[0]
            what = f"{question.name} {dns.rdatatype.to_text(question.rdtype)}"
        except (dns.exception.DNSException, IndexError, ValueError):
            what = "(malformed)"
        rcode = struct.unpack_from("!H", response, 2)[0] & 0xF
        log.info(
            "%r: %s -> %s (%s, %d bytes)",
            peer,
            what,
            dns.rcode.to_text(rcode),
            source,
            len(response),
        )

    async def close(self) -> None:
        """Cancel upstream queries in flight."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        self.cache.clear()

"""A small authoritative DNS server for the zone ``test.``, used as the stub's upstream in tests.

Run as a real process::

    python tests/integration/dns_upstream.py --listen 127.0.0.2:5300 --log q.log [--mode MODE]

Modes: ``normal`` answers from the zone below; ``blackhole`` reads and never answers;
``servfail`` answers SERVFAIL to everything.  Each query received is appended to ``--log`` as
``query proto=udp id=1234 sport=40000 name=a.test. type=A``, so tests can count what reached
the upstream.  ``ready`` is printed to stdout once both UDP and TCP listen.

Special names in ``normal`` mode:

* ``slow.test``: never answered (one upstream that times out for one name);
* ``spoof.test``: first a reply with a wrong ID and a reply for another question, both with
  address 6.6.6.6, then the real answer;
* ``big.test`` TXT: about 4 kB, so UDP answers are truncated (TC) and TCP is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

ZONE = """
test.                 60  SOA   ns.test. hostmaster.test. 1 3600 600 86400 30
a.test.               300 A     192.0.2.1
a.test.               300 AAAA  2001:db8::1
mx.test.              300 MX    10 mail.test.
mail.test.            300 A     192.0.2.25
txt.test.             300 TXT   "hello from the test upstream"
www.chain.test.       300 CNAME mid.chain.test.
mid.chain.test.       300 CNAME end.chain.test.
end.chain.test.       300 A     192.0.2.80
name.test.            300 A     192.0.2.77
web.test.             300 A     127.0.0.1
ttl.test.             100 A     192.0.2.100
short.test.           1   A     192.0.2.101
spoof.test.           300 A     192.0.2.66
"""

BIG_TXT_STRINGS = 20
UDP_LIMIT_DEFAULT = 512


def load_zone() -> dict[dns.name.Name, dict[int, dns.rrset.RRset]]:
    records: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
    for line in ZONE.strip().splitlines():
        owner, ttl, rtype, rdata = line.split(None, 3)
        rrset = dns.rrset.from_text(owner, int(ttl), "IN", rtype, rdata)
        node = records.setdefault(rrset.name, {})
        if rrset.rdtype in node:
            node[rrset.rdtype].update(rrset)
        else:
            node[rrset.rdtype] = rrset
    big = dns.name.from_text("big.test.")
    strings = " ".join(f'"{i:03d}-' + "x" * 190 + '"' for i in range(BIG_TXT_STRINGS))
    records[big] = {dns.rdatatype.TXT: dns.rrset.from_text(big, 300, "IN", "TXT", strings)}
    return records


RECORDS = load_zone()
ORIGIN = dns.name.from_text("test.")
SOA = RECORDS[ORIGIN][dns.rdatatype.SOA]


def resolve(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query, our_payload=1232)
    response.flags |= dns.flags.AA
    question = query.question[0]
    name, rdtype = question.name, question.rdtype
    if not name.is_subdomain(ORIGIN):
        response.set_rcode(dns.rcode.REFUSED)
        return response
    for _ in range(8):
        node = RECORDS.get(name)
        if node is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(SOA)
            return response
        if rdtype in node:
            response.answer.append(node[rdtype])
            return response
        cname = node.get(dns.rdatatype.CNAME)
        if cname is None:
            response.authority.append(SOA)  # NODATA
            return response
        response.answer.append(cname)
        name = cname[0].target
    return response


class Upstream:
    def __init__(self, mode: str, log_path: str) -> None:
        self.mode = mode
        self.log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.udp: asyncio.DatagramTransport | None = None

    def note(self, proto: str, query: dns.message.Message, sport: int) -> None:
        question = query.question[0] if query.question else None
        name = question.name if question is not None else "-"
        rtype = dns.rdatatype.to_text(question.rdtype) if question is not None else "-"
        self.log.write(
            f"query proto={proto} id={query.id} sport={sport} name={name} type={rtype}\n"
        )

    def answer(self, data: bytes, proto: str, sport: int) -> list[bytes]:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return []
        self.note(proto, query, sport)
        if self.mode == "blackhole" or not query.question:
            return []
        if self.mode == "servfail":
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return [response.to_wire()]
        qname = query.question[0].name
        if qname == dns.name.from_text("slow.test."):
            return []
        response = resolve(query)
        limit = 65535
        if proto == "udp":
            limit = max(query.payload if query.edns >= 0 else UDP_LIMIT_DEFAULT, 512)
        try:
            wire = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        out = [wire]
        if qname == dns.name.from_text("spoof.test.") and proto == "udp":
            forged = resolve(query)
            forged.answer[0] = dns.rrset.from_text(qname, 300, "IN", "A", "6.6.6.6")
            wrong_id = bytearray(forged.to_wire())
            struct.pack_into("!H", wrong_id, 0, (query.id + 1) % 65536)
            other = dns.message.make_query("other.test.", "A", id=query.id)
            other_resp = dns.message.make_response(other)
            other_resp.answer.append(dns.rrset.from_text("other.test.", 300, "IN", "A", "6.6.6.6"))
            out = [bytes(wrong_id), other_resp.to_wire(), wire]
        return out


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for reply in self.upstream.answer(data, "udp", addr[1]):
            self.transport.sendto(reply, addr)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--mode", default="normal", choices=["normal", "blackhole", "servfail"])
    args = parser.parse_args()
    host, port_text = args.listen.rsplit(":", 1)
    host = host.strip("[]")
    upstream = Upstream(args.mode, args.log)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: UdpProtocol(upstream), local_addr=(host, int(port_text))
    )

    async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sport = writer.get_extra_info("peername")[1]
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                for reply in upstream.answer(data, "tcp", sport):
                    writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve_tcp, host, int(port_text), reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    transport.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)

"""Benchmark: cached answers through the DNS stub vs the same queries answered by the upstream.

Starts the test upstream (``tests/integration/dns_upstream.py``) on 127.0.0.2 and the stub as a
real process on 127.0.0.1, both on free high ports; nothing leaves loopback.  Then, for the same
set of names:

* throughput: a UDP client keeps ``--window`` queries in flight for ``--seconds``;
* latency: one query at a time, p50/p99;
* in-process, no sockets: the replay of a rendered reply, the fast path (splice + TTL patch) and
  a dnspython parse and rebuild of the same answer, per query.

Prints numbers and ratios; asserts nothing.  Run with ``.venv/bin/python bench/dns_stub.py``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.rrset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from dns_fixtures import run_stub, run_upstream  # noqa: E402

NAMES = ["a.test", "mail.test", "txt.test", "www.chain.test", "name.test", "nothing.test"]


def queries() -> list[bytes]:
    out = []
    for index, name in enumerate(NAMES * 50):
        rdtype = "TXT" if name == "txt.test" else "A"
        out.append(dns.message.make_query(name, rdtype, id=index, use_edns=0).to_wire())
    return out


def throughput(host: str, port: int, wires: list[bytes], seconds: float, window: int) -> float:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.settimeout(1.0)
        sent = received = 0
        count = len(wires)
        for _ in range(window):
            sock.send(wires[sent % count])
            sent += 1
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            try:
                sock.recv(65535)
            except TimeoutError:  # a lost datagram: refill the window
                for _ in range(window - (sent - received)):
                    sock.send(wires[sent % count])
                    sent += 1
                continue
            received += 1
            sock.send(wires[sent % count])
            sent += 1
        elapsed = time.perf_counter() - started
        return received / elapsed


def latency(host: str, port: int, wires: list[bytes], rounds: int) -> list[float]:
    samples = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.settimeout(2.0)
        for index in range(rounds):
            wire = wires[index % len(wires)]
            started = time.perf_counter()
            sock.send(wire)
            sock.recv(65535)
            samples.append((time.perf_counter() - started) * 1e6)
    return samples


def in_process(rounds: int) -> tuple[float, float, float]:
    """Microseconds per answer: replay, fast path, dnspython parse + rebuild of the same answer."""
    from chroot_helper.services.dns.cache import AnswerCache, make_entry, render
    from chroot_helper.services.dns.wire import parse_plain_query

    query = dns.message.make_query("www.chain.test", "A", use_edns=0)
    response = dns.message.make_response(query)
    for text in (
        "mid.chain.test. 300 IN CNAME end.chain.test.",
        "end.chain.test. 300 IN A 192.0.2.80",
    ):
        name, ttl, _cls, rtype, rdata = text.split()
        response.answer.append(dns.rrset.from_text(name, int(ttl), "IN", rtype, rdata))
    response.use_edns(False)
    wire = response.to_wire()
    qwire = query.to_wire()
    entry = make_entry(wire, 12 + len(b"\x03www\x05chain\x04test\x00") + 4, lifetime=300, now=0.0)
    started = time.perf_counter()
    for index in range(rounds):
        plain = parse_plain_query(qwire)
        assert plain is not None
        render(entry, qwire, plain, now=float(index % 100), udp_limit=1232, edns_udp_size=1232)
    fast = (time.perf_counter() - started) / rounds * 1e6
    cache = AnswerCache(10)
    plain = parse_plain_query(qwire)
    assert plain is not None
    cache.put(plain.key, entry)
    reply = render(entry, qwire, plain, now=0.0, udp_limit=1232, edns_udp_size=1232)
    cache.remember(qwire, plain.key, reply, 0.0)
    started = time.perf_counter()
    for _ in range(rounds):
        assert cache.replay(qwire, 0.5) is not None
    replayed = (time.perf_counter() - started) / rounds * 1e6
    started = time.perf_counter()
    for _ in range(rounds):
        parsed_query = dns.message.from_wire(qwire)
        cached = dns.message.from_wire(wire)
        reply = dns.message.make_response(parsed_query, recursion_available=True)
        reply.answer = cached.answer
        reply.to_wire()
    slow = (time.perf_counter() - started) / rounds * 1e6
    return replayed, fast, slow


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=1, help="stub worker processes")
    args = parser.parse_args()
    wires = queries()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with (
            run_upstream(tmp, host="127.0.0.2") as upstream,
            run_stub(tmp, [upstream.address], workers=args.workers, stats_interval=0) as stub,
        ):
            for wire in wires[: len(NAMES)]:  # warm the cache
                latency(stub.host, stub.port, [wire], 1)
            stub_qps = throughput(stub.host, stub.port, wires, args.seconds, args.window)
            stub_lat = latency(stub.host, stub.port, wires, args.rounds)
            upstream_hits = len(upstream.queries())  # all from the stub so far
            direct_qps = throughput(upstream.host, upstream.port, wires, args.seconds, args.window)
            direct_lat = latency(upstream.host, upstream.port, wires, args.rounds)
    print(f"names={len(NAMES)} window={args.window} seconds={args.seconds} workers={args.workers}")
    print(f"direct upstream : {direct_qps:10.0f} q/s")
    print(f"stub cache hits : {stub_qps:10.0f} q/s")
    print(f"throughput ratio stub/direct = {stub_qps / direct_qps:.2f}x")
    for label, samples in (("direct upstream", direct_lat), ("stub cache hit ", stub_lat)):
        print(f"{label} latency: p50={pct(samples, 50):7.1f} us  p99={pct(samples, 99):7.1f} us")
    replay_us, fast_us, slow_us = in_process(args.rounds * 5)
    print(
        f"in-process per answer: replay {replay_us:.2f} us, fast path {fast_us:.1f} us, "
        f"dnspython parse+rebuild {slow_us:.1f} us, ratio {slow_us / fast_us:.1f}x"
    )
    print(
        f"latency ratio p50 stub/direct = {pct(stub_lat, 50) / pct(direct_lat, 50):.2f}x "
        f"(lower is faster); the stub sent {upstream_hits} queries upstream in its phases"
    )


if __name__ == "__main__":
    main()

"""The plug-in contract the helper core uses: parse_config, start, stats, close, in-process."""

from __future__ import annotations

import asyncio
import socket
import time

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from chroot_helper.errors import ListenError
from chroot_helper.services.dns import DnsStats, format_stats, parse_config, start
from chroot_helper.services.dns.udp import HANDOVER_OVERHEAD, MAX_HANDOVER_BYTES

try:  # tests/ as packages (pytest importlib/package mode) or as plain directories (prepend mode)
    from .dns_fixtures import free_port, run_upstream
except ImportError:
    from dns_fixtures import free_port, run_upstream  # type: ignore[no-redef]


def test_start_query_stats_close(tmp_path):
    with run_upstream(tmp_path, host="127.0.0.2") as upstream:
        port = free_port("127.0.0.1")
        config = parse_config(
            {"listen": f"127.0.0.1:{port}", "upstreams": [upstream.address], "hosts_file": ""}
        )

        async def scenario():
            service = await start(config)
            try:
                assert service.address == ("127.0.0.1", port)
                for _ in range(3):
                    query = dns.message.make_query("a.test", "A")
                    answer = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)
                    assert str(answer.answer[0][0]) == "192.0.2.1"
                query = dns.message.make_query("nope.test", "A")
                answer = await dns.asyncquery.tcp(query, "127.0.0.1", port=port, timeout=5)
                assert answer.rcode() == dns.rcode.NXDOMAIN
                # a second service on the same address fails at start, saying what to change
                with pytest.raises(ListenError, match="dns.listen .*already in use"):
                    await start(config)
                return service.stats()
            finally:
                await service.close()
                await service.close()  # idempotent

        stats = asyncio.run(scenario())
    assert isinstance(stats, DnsStats)
    assert (stats.queries, stats.udp_queries, stats.tcp_queries) == (4, 3, 1)
    assert (stats.cache_hits, stats.cache_misses, stats.upstream_queries) == (2, 2, 2)
    assert stats.cache_entries == 2 and stats.upstream_errors == 0
    assert "cache_hits=2" in format_stats(stats)


@pytest.mark.parametrize("udp_thread", [False, True], ids=["selector", "thread"])
def test_udp_burst_answered_by_either_listener(tmp_path, udp_thread):
    """Queries sent back to back (read several per wakeup, most replayed), then a clean close."""
    with run_upstream(tmp_path, host="127.0.0.2") as upstream:
        port = free_port("127.0.0.1")
        config = parse_config(
            {"listen": f"127.0.0.1:{port}", "upstreams": [upstream.address], "hosts_file": ""}
        )
        names = ["a.test", "mail.test", "nope.test"]

        async def scenario():
            service = await start(config, udp_thread=udp_thread)
            try:
                for name in names:  # a miss, then a fast-path hit that is remembered
                    for _ in range(2):
                        query = dns.message.make_query(name, "A")
                        await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", port))
                sent = {}
                for index in range(60):
                    query = dns.message.make_query(names[index % 3], "A", id=index)
                    sent[index] = query
                    await loop.sock_sendall(sock, query.to_wire())
                for _ in range(60):
                    async with asyncio.timeout(5):
                        reply = dns.message.from_wire(await loop.sock_recv(sock, 4096))
                    assert sent.pop(reply.id).is_response(reply)
                sock.close()
                return service.stats(), service._udp
            finally:
                await service.close()

        stats, listener = asyncio.run(scenario())
    assert (stats.queries, stats.udp_queries, stats.cache_hits) == (66, 66, 63)
    assert stats.cache_misses == 3 and stats.dropped == 0
    assert listener.sock.fileno() == -1
    if udp_thread:
        assert not listener._thread.is_alive()


SO_RCVBUFFORCE = 33  # Linux, for root; the socket module does not name it


def test_thread_listener_bounds_what_waits_for_a_busy_loop(tmp_path):
    """Garbage sent while the loop is stuck: a bounded amount waits, the rest is dropped."""
    with run_upstream(tmp_path, host="127.0.0.2") as upstream:
        port = free_port("127.0.0.1")
        config = parse_config(
            {"listen": f"127.0.0.1:{port}", "upstreams": [upstream.address], "hosts_file": ""}
        )
        count, size = 64, 60000

        async def scenario():
            service = await start(config, udp_thread=True)
            try:
                listener = service._udp
                listener.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 23)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
                    sock.connect(("127.0.0.1", port))
                    for _ in range(count):
                        sock.send(b"\x00" * size)  # a header, then junk: FORMERR
                    deadline = time.monotonic() + 10
                    while listener._handed_bytes + listener.dropped * size < count * size:
                        assert time.monotonic() < deadline, "the thread did not read them all"
                        time.sleep(0.01)  # blocks the loop, as a busy loop would
                    assert listener._handed_bytes <= MAX_HANDOVER_BYTES
                    for _ in range(100):
                        await asyncio.sleep(0.01)  # the loop takes what was handed over
                    query = dns.message.make_query("a.test", "A")
                    answer = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)
                    assert str(answer.answer[0][0]) == "192.0.2.1"
                return service.stats()
            finally:
                await service.close()

        stats = asyncio.run(scenario())
    handed = MAX_HANDOVER_BYTES // (size + HANDOVER_OVERHEAD)
    assert (stats.formerr, stats.dropped) == (handed, count - handed)
    assert stats.queries == handed + 1

"""The DNS stub as a real process, forwarding to a real test upstream on another loopback address.

Queried with ``dig`` (Debian dnsutils) and with dnspython, as a jailed app's resolver would.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

try:  # tests/ as packages (pytest importlib/package mode) or as plain directories (prepend mode)
    from .dns_fixtures import free_port, run_stub, run_upstream
except ImportError:
    from dns_fixtures import free_port, run_stub, run_upstream  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with run_upstream(tmp_path_factory.mktemp("upstream"), host="127.0.0.2") as server:
        yield server


@pytest.fixture(scope="module")
def stub(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("stub")
    hosts = tmp / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n10.1.2.3 web.site.internal webalias\n"
        "fd00::5 web.site.internal\n# comment line\n"
    )
    with run_stub(tmp, [upstream.address], hosts_file=str(hosts)) as server:
        yield server


def short(stub, *args):
    return sorted(stub.dig("+short", *args).split("\n")[:-1])


def answer_lines(stub, *args):
    out = stub.dig("+noall", "+answer", *args)
    return [line.split() for line in out.splitlines() if line.strip()]


def status(stub, *args):
    out = stub.dig(*args)
    for line in out.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig output:\n{out}")


def test_record_types_through_dig(stub):
    assert short(stub, "a.test", "A") == ["192.0.2.1"]
    assert short(stub, "a.test", "AAAA") == ["2001:db8::1"]
    assert short(stub, "mx.test", "MX") == ["10 mail.test."]
    assert short(stub, "txt.test", "TXT") == ['"hello from the test upstream"']


def test_cname_chain(stub):
    rows = answer_lines(stub, "www.chain.test", "A")
    assert [(r[0], r[3], r[4]) for r in rows] == [
        ("www.chain.test.", "CNAME", "mid.chain.test."),
        ("mid.chain.test.", "CNAME", "end.chain.test."),
        ("end.chain.test.", "A", "192.0.2.80"),
    ]


def test_positive_answer_cached(stub, upstream):
    before = len(upstream.queries("mail.test."))
    for _ in range(3):
        assert short(stub, "mail.test") == ["192.0.2.25"]
    for _ in range(3):
        assert short(stub, "MAIL.test") == ["192.0.2.25"]
    assert len(upstream.queries("mail.test.")) - before == 1


def test_nxdomain_cached_with_soa_ttl(stub, upstream):
    for _ in range(3):
        assert status(stub, "nothing-here.test") == "NXDOMAIN"
    rows = [r for r in answer_lines(stub, "+authority", "nothing-here.test") if r[3] == "SOA"]
    assert rows and int(rows[0][1]) <= 30  # min(SOA TTL 60, SOA minimum 30)
    assert len(upstream.queries("nothing-here.test.")) == 1


def test_nodata_cached(stub, upstream):
    for _ in range(2):
        response = stub.query("txt.test", "MX")
        assert response.rcode() == dns.rcode.NOERROR
        assert response.answer == []
        assert response.authority[0].rdtype == dns.rdatatype.SOA
    assert [q["type"] for q in upstream.queries("txt.test.")].count("MX") == 1


def test_ttl_counts_down(stub, upstream):
    first = stub.query("ttl.test").answer[0].ttl
    assert 98 <= first <= 100
    time.sleep(2.2)
    second = stub.query("ttl.test").answer[0].ttl
    assert second <= first - 2
    assert len(upstream.queries("ttl.test.")) == 1


def test_expired_answer_fetched_again(stub, upstream):
    assert stub.query("short.test").answer[0].ttl <= 1
    time.sleep(1.5)
    assert str(stub.query("short.test").answer[0][0]) == "192.0.2.101"
    assert len(upstream.queries("short.test.")) == 2


def test_large_txt_over_tcp_after_tc(stub, upstream):
    udp = stub.query("big.test", "TXT", use_edns=0, payload=1232)
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    tcp = stub.query("big.test", "TXT", tcp=True)
    strings = [s for rdata in tcp.answer[0] for s in rdata.strings]
    assert len(strings) == 20 and strings[19].startswith(b"019-")
    # dig retries over TCP by itself, as a resolver library would
    out = stub.dig("big.test", "TXT")
    assert "Truncated, retrying in TCP mode" in out
    assert out.count('"0') == 20
    # the stub, too, had to fetch it from the upstream over TCP after a truncated UDP answer
    protos = [q["proto"] for q in upstream.queries("big.test.")]
    assert protos == ["udp", "tcp"]


def test_small_answer_without_edns_fits_512(stub):
    response = stub.query("big.test", "TXT")  # no EDNS: 512-byte limit
    assert response.flags & dns.flags.TC
    assert response.edns == -1


def test_edns_echoed_only_when_asked(stub):
    with_edns = stub.query("a.test", use_edns=0, payload=4096)
    assert with_edns.edns == 0 and with_edns.payload == 1232
    without = stub.query("a.test")
    assert without.edns == -1
    assert str(without.answer[0][0]) == "192.0.2.1"


def test_question_case_preserved_and_cache_shared(stub, upstream):
    response = stub.query("MiXeD.a.TEST")
    assert response.rcode() == dns.rcode.NXDOMAIN
    response = stub.query("mixed.A.test")
    assert response.question[0].name.to_text() == "mixed.A.test."
    assert len(upstream.queries("mixed.a.test.")) == 1


def test_tcp_queries_pipelined_on_one_connection(stub):
    with socket.create_connection((stub.host, stub.port), timeout=5) as sock:
        wires = [dns.message.make_query(n, "A") for n in ("a.test", "mail.test", "a.test")]
        sock.sendall(b"".join(struct.pack("!H", len(w.to_wire())) + w.to_wire() for w in wires))
        answers = []
        for query in wires:
            length = struct.unpack("!H", _recv_exactly(sock, 2))[0]
            answer = dns.message.from_wire(_recv_exactly(sock, length))
            assert answer.id == query.id
            answers.append(str(answer.answer[0][0]))
    assert answers == ["192.0.2.1", "192.0.2.25", "192.0.2.1"]


def _recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "stub closed the TCP connection early"
        data += chunk
    return data


def test_upstream_sees_random_ids_and_ports(stub, upstream):
    for i in range(20):
        query = dns.message.make_query(f"rand-{i}.test", "A", id=4242)
        dns.query.udp(query, stub.host, port=stub.port, timeout=5)
    rows = [q for q in upstream.queries() if q["name"].startswith("rand-")]
    assert len(rows) == 20
    assert len({q["id"] for q in rows}) >= 18
    assert len({q["sport"] for q in rows}) >= 18
    assert "4242" not in {q["id"] for q in rows}


def test_spoofed_upstream_datagrams_ignored(stub):
    response = stub.query("spoof.test")
    assert [str(r) for r in response.answer[0]] == ["192.0.2.66"]
    log = stub.log.read_text()
    assert "wrong ID" in log and "question differs" in log


def test_hosts_file_names_answered_locally(stub, upstream):
    assert short(stub, "web.site.internal") == ["10.1.2.3"]
    assert short(stub, "WebAlias") == ["10.1.2.3"]
    assert short(stub, "web.site.internal", "AAAA") == ["fd00::5"]
    assert short(stub, "localhost", "AAAA") == ["::1"]
    assert short(stub, "-x", "10.1.2.3") == ["web.site.internal."]
    assert upstream.queries("web.site.internal.") == []
    assert upstream.queries("webalias.") == []


def test_malformed_packets_do_not_stop_service(stub):
    rng = random.Random(6)
    header = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    bad = [
        b"",
        b"\x00",
        header[:11],
        header,  # QDCOUNT=1 but no question
        header + b"\x07example",  # name runs off the end
        header + b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer to itself
        header + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # label of 64
        struct.pack("!HHHHHH", 8, 0x0100, 1, 0, 0, 1) + b"\x01a\x00\x00\x01\x00\x01\x00\x00",
        struct.pack("!HHHHHH", 9, 0x0100, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF),
        b"\xff" * 65000,  # oversized
        *(rng.randbytes(rng.randint(1, 600)) for _ in range(200)),
    ]
    valid = dns.message.make_query("a.test", "A", use_edns=0).to_wire()
    for _ in range(200):  # valid queries with a few bytes changed: the parser's corner cases
        mutated = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        bad.append(bytes(mutated[: rng.randint(12, len(mutated))]))
    good = dns.message.make_query("a.test", "A")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(5)
        for index, packet in enumerate(bad):
            sock.sendto(packet, (stub.host, stub.port))
            if index % 25 == 0:  # other clients keep being answered while garbage arrives
                client.sendto(good.to_wire(), (stub.host, stub.port))
                answer = dns.message.from_wire(client.recvfrom(4096)[0])
                assert good.is_response(answer) and str(answer.answer[0][0]) == "192.0.2.1"
    for chunk in ([b"\x00\x05abc"], [b"\x00\x00"], [b"\xff\xff" + b"\x00" * 100], [b"\x00"]):
        with socket.create_connection((stub.host, stub.port), timeout=5) as conn:
            for part in chunk:
                conn.sendall(part)
    time.sleep(0.3)
    assert stub.alive()
    assert short(stub, "a.test") == ["192.0.2.1"]
    assert stub.query("txt.test", "TXT", tcp=True).rcode() == dns.rcode.NOERROR
    assert "Traceback" not in stub.log.read_text()


def test_truncated_query_gets_formerr_and_responses_are_not_answered(stub):
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(header + b"\x07exam", (stub.host, stub.port))
        reply, _ = sock.recvfrom(4096)
        ident, flags = struct.unpack_from("!HH", reply)
        assert ident == 0x1234 and flags & 0x8000 and flags & 0xF == dns.rcode.FORMERR
        # A packet with QR set (a response, maybe spoofed to reflect) gets no reply at all.
        response = dns.message.make_response(dns.message.make_query("a.test", "A"))
        sock.sendto(response.to_wire(), (stub.host, stub.port))
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recvfrom(4096)


def test_unsupported_queries_refused_or_notimp(stub):
    transfer = stub.query("test", "AXFR", tcp=True)
    assert transfer.rcode() == dns.rcode.REFUSED
    chaos = stub.query("version.bind", "TXT", rdclass="CH")
    assert chaos.rcode() == dns.rcode.REFUSED
    notify = dns.message.make_query("a.test", "A")
    notify.set_opcode(dns.opcode.NOTIFY)
    answer = dns.query.udp(notify, stub.host, port=stub.port, timeout=5)
    assert answer.rcode() == dns.rcode.NOTIMP


def test_stats_line_on_sigusr1(stub):
    stub.query("a.test")
    os.kill(stub.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    line = ""
    while time.monotonic() < deadline and "dns stats:" not in line:
        line = "\n".join(x for x in stub.log.read_text().splitlines() if "dns stats:" in x)
        time.sleep(0.05)
    fields = dict(f.split("=") for f in line.splitlines()[-1].split("dns stats: ")[1].split())
    assert int(fields["queries"]) > 10
    assert int(fields["cache_hits"]) > 0
    assert int(fields["upstream_mismatches"]) >= 2


# -- separate stubs with their own configuration -------------------------------------------------


def test_hosts_file_edits_picked_up_and_sighup_flushes(tmp_path, upstream):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.9.9.9 app.local\n")
    with run_stub(tmp_path, [upstream.address], hosts_file=str(hosts)) as stub:
        assert short(stub, "app.local") == ["10.9.9.9"]
        hosts.write_text("10.9.9.10 app.local\n10.9.9.11 new.local\n")
        os.utime(hosts, (time.time() + 5, time.time() + 5))
        time.sleep(2.2)  # the stub re-checks the file's mtime every 2 s
        assert short(stub, "app.local") == ["10.9.9.10"]
        assert short(stub, "new.local") == ["10.9.9.11"]
        # SIGHUP flushes the cache: the next query goes upstream again
        before = len(upstream.queries("ttl.test."))
        assert short(stub, "ttl.test") == ["192.0.2.100"]
        assert short(stub, "ttl.test") == ["192.0.2.100"]
        assert len(upstream.queries("ttl.test.")) == before + 1
        os.kill(stub.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "dns cache flushed" not in stub.log.read_text():
            assert time.monotonic() < deadline, stub.log.read_text()
            time.sleep(0.05)
        assert short(stub, "ttl.test") == ["192.0.2.100"]
        assert len(upstream.queries("ttl.test.")) == before + 2


def stats_fields(stub):
    """The counters of a fresh SIGUSR1 stats line."""
    count = stub.log.read_text().count("dns stats:")
    os.kill(stub.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while stub.log.read_text().count("dns stats:") == count:
        assert time.monotonic() < deadline, stub.log.read_text()
        time.sleep(0.05)
    line = stub.log.read_text().split("dns stats: ")[-1].splitlines()[0]
    return dict(field.split("=") for field in line.split())


def test_burst_of_repeated_queries_answered_and_counted(tmp_path, upstream):
    """Many datagrams read in one wakeup, most replayed: each reply matches its own query."""
    with run_stub(tmp_path, [upstream.address]) as stub:
        kinds = [("a.test", "A", {}), ("A.Test", "AAAA", {}), ("mx.test", "MX", {"use_edns": 0})]
        for name, rdtype, extra in kinds:  # misses, then fast-path hits that are remembered
            for _ in range(2):
                assert stub.query(name, rdtype, **extra).rcode() == dns.rcode.NOERROR
        sent = {}
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(5)
            for index in range(120):
                name, rdtype, extra = kinds[index % len(kinds)]
                query = dns.message.make_query(name, rdtype, id=index, **extra)
                sent[index] = query
                sock.sendto(query.to_wire(), (stub.host, stub.port))
            replies = [dns.message.from_wire(sock.recvfrom(4096)[0]) for _ in sent]
        for reply in replies:
            query = sent.pop(reply.id)
            assert query.is_response(reply) and reply.question == query.question
            assert reply.question[0].name.to_text() == query.question[0].name.to_text()
            assert reply.answer[0].rdtype == query.question[0].rdtype
            assert reply.edns == query.edns
        assert sent == {}
        fields = stats_fields(stub)
    assert (fields["queries"], fields["udp"], fields["cache_hits"]) == ("126", "126", "123")
    assert fields["cache_misses"] == "3" and fields["dropped"] == "0"


def test_allow_and_deny_lists(tmp_path, upstream):
    with run_stub(
        tmp_path, [upstream.address], allow=["*.test", "a.test"], deny=["txt.test", "*.chain.test"]
    ) as stub:
        assert short(stub, "a.test") == ["192.0.2.1"]
        assert short(stub, "mail.test") == ["192.0.2.25"]
        assert status(stub, "txt.test", "TXT") == "REFUSED"
        assert status(stub, "www.chain.test") == "REFUSED"
        assert status(stub, "example.org") == "REFUSED"
        assert short(stub, "localhost") == ["127.0.0.1"]


def test_upstream_blackhole_gives_servfail_within_bound(tmp_path):
    with (
        run_upstream(tmp_path, host="127.0.0.3", mode="blackhole", label="hole") as hole,
        run_stub(tmp_path, [hole.address], timeout=1.0, upstream_timeout=1.0) as stub,
    ):
        started = time.monotonic()
        response = stub.query("a.test", timeout=10)
        elapsed = time.monotonic() - started
        assert response.rcode() == dns.rcode.SERVFAIL
        assert elapsed < 4.0  # configured bound 1 s; generous margin
        assert len(hole.queries("a.test.")) >= 1
        assert status(stub, "a.test") == "SERVFAIL"


def test_slow_name_does_not_block_others(tmp_path, upstream):
    with run_stub(tmp_path, [upstream.address], timeout=2.0, upstream_timeout=2.0) as stub:
        slow = dns.message.make_query("slow.test", "A")
        fast = dns.message.make_query("a.test", "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(slow.to_wire(), (stub.host, stub.port))
            sock.sendto(fast.to_wire(), (stub.host, stub.port))
            first = dns.message.from_wire(sock.recvfrom(4096)[0])
            second = dns.message.from_wire(sock.recvfrom(4096)[0])
        # the later question is answered first; the stuck one ends in SERVFAIL
        assert fast.is_response(first) and str(first.answer[0][0]) == "192.0.2.1"
        assert slow.is_response(second) and second.rcode() == dns.rcode.SERVFAIL


def test_failover_to_next_upstream(tmp_path, upstream):
    dead = f"127.0.0.4:{free_port('127.0.0.4')}"  # nothing listens: connection refused
    with (
        run_upstream(tmp_path, host="127.0.0.5", mode="servfail", label="sf") as failing,
        run_upstream(tmp_path, host="127.0.0.6", mode="blackhole", label="bh") as hole,
        run_stub(
            tmp_path,
            [dead, failing.address, hole.address, upstream.address],
            timeout=4.0,
            upstream_timeout=0.5,
        ) as stub,
    ):
        assert short(stub, "mx.test", "MX") == ["10 mail.test."]
        assert len(failing.queries("mx.test.")) == 1
        assert len(hole.queries("mx.test.")) == 1
        # the upstream that answered is preferred from now on
        assert short(stub, "txt.test", "TXT") == ['"hello from the test upstream"']
        assert failing.queries("txt.test.") == []


def test_unreachable_upstream_answers_servfail_without_waiting_out(tmp_path):
    dead = f"127.0.0.4:{free_port('127.0.0.4')}"
    with run_stub(tmp_path, [dead], timeout=3.0, upstream_timeout=3.0) as stub:
        assert stub.query("a.test").rcode() == dns.rcode.SERVFAIL
        os.kill(stub.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while "dns stats:" not in stub.log.read_text():
            assert time.monotonic() < deadline, stub.log.read_text()
            time.sleep(0.05)
        stats = stub.log.read_text().split("dns stats:")[1]
        # "connection refused" ends the attempt at once; it is not counted as a timeout
        assert "upstream_errors=1 upstream_timeouts=0" in stats
        assert "servfail=1" in stats
        assert "Connection refused" in stub.log.read_text()


def test_bad_config_exits_with_message(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[dns]\nlisten = "192.0.2.1:53"\nupstreams = ["127.0.0.2"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "chroot_helper.services.dns", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 78
    assert "dns.listen = '192.0.2.1:53'" in done.stderr and "loopback" in done.stderr


def test_address_in_use_exits_with_message(tmp_path, stub, upstream):
    config = tmp_path / "dup.toml"
    config.write_text(
        f'[dns]\nlisten = "{stub.host}:{stub.port}"\nupstreams = ["{upstream.address}"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "chroot_helper.services.dns", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 71
    assert "address already in use" in done.stderr and "dns.listen" in done.stderr


def test_ipv6_loopback_and_periodic_stats(tmp_path):
    with (
        run_upstream(tmp_path, host="::1", label="up6") as upstream6,
        run_stub(tmp_path, [upstream6.address], host="::1", stats_interval=0.2) as stub,
    ):
        assert short(stub, "a.test", "AAAA") == ["2001:db8::1"]
        assert stub.query("a.test", "AAAA", tcp=True).rcode() == dns.rcode.NOERROR
        assert len(upstream6.queries("a.test.")) == 1
        deadline = time.monotonic() + 5
        while "dns stats: queries=2 " not in stub.log.read_text():
            assert time.monotonic() < deadline, stub.log.read_text()
            time.sleep(0.05)


def test_workers_share_the_address(tmp_path, upstream):
    with run_stub(tmp_path, [upstream.address], workers=2) as stub:
        for _ in range(10):
            assert short(stub, "a.test") == ["192.0.2.1"]
        deadline = time.monotonic() + 10
        while stub.log.read_text().count("dns stub ready on") < 2:
            assert time.monotonic() < deadline, stub.log.read_text()
            time.sleep(0.05)
        pids = {
            line.split("[")[1].split("]")[0]
            for line in stub.log.read_text().splitlines()
            if "dns stub ready on" in line
        }
        assert len(pids) == 2
        # a worker does not outlive its parent, even when the parent is killed outright
        child = int((pids - {str(stub.proc.pid)}).pop())
        os.kill(stub.proc.pid, signal.SIGKILL)
        stub.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(child):
            assert time.monotonic() < deadline, f"worker {child} survived its parent"
            time.sleep(0.05)


def _pids_logging(stub, text):
    return {
        line.split("[")[1].split("]")[0]
        for line in stub.log.read_text().splitlines()
        if text in line
    }


def _ready_workers(stub, count):
    """The pids of the stub's *count* workers, once each has logged that it is ready."""
    deadline = time.monotonic() + 10
    while len(_pids_logging(stub, "dns stub ready on")) < count:
        assert time.monotonic() < deadline, stub.log.read_text()
        time.sleep(0.05)
    return _pids_logging(stub, "dns stub ready on")


def test_workers_all_get_sigusr1_and_sighup(tmp_path, upstream):
    with run_stub(tmp_path, [upstream.address], workers=2) as stub:
        workers = _ready_workers(stub, 2)
        for signum, text in ((signal.SIGUSR1, "dns stats:"), (signal.SIGHUP, "dns cache flushed")):
            os.kill(stub.proc.pid, signum)
            deadline = time.monotonic() + 10
            while _pids_logging(stub, text) != workers:
                assert time.monotonic() < deadline, stub.log.read_text()
                time.sleep(0.05)
        assert short(stub, "a.test") == ["192.0.2.1"]  # both still serving
        assert stub.alive()


def _cpus_allowed(pid):
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Cpus_allowed_list:"))
    return line.split()[1]


def _ask_from_cpu(stub, cpu, count):
    """*count* lookups, each from a new socket (a new source port), sent while on *cpu*."""
    query = dns.message.make_query("a.test", "A").to_wire()
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        for _ in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.sendto(query, (stub.host, stub.port))
                assert dns.message.from_wire(sock.recv(4096)).rcode() == dns.rcode.NOERROR
    finally:
        os.sched_setaffinity(0, mask)


def _queries_by_pid(stub, workers):
    before = stub.log.read_text().count("dns stats:")
    os.kill(stub.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while stub.log.read_text().count("dns stats:") < before + len(workers):
        assert time.monotonic() < deadline, stub.log.read_text()
        time.sleep(0.05)
    counts = {}
    for line in stub.log.read_text().splitlines()[::-1]:
        if "dns stats:" in line:
            pid = line.split("[")[1].split("]")[0]
            counts.setdefault(pid, int(line.split("queries=")[1].split()[0]))
    return counts


def test_pinned_workers_answer_the_queries_sent_from_their_cpu(tmp_path, upstream):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2, "this test needs two CPUs"
    with run_stub(tmp_path, [upstream.address], workers=2) as stub:
        workers = _ready_workers(stub, 2)
        pinned = {_cpus_allowed(pid): pid for pid in workers}
        assert sorted(pinned) == [str(cpu) for cpu in cpus]  # one CPU each
        _ask_from_cpu(stub, cpus[0], 30)
        assert _queries_by_pid(stub, workers) == {pinned[str(cpus[0])]: 30, pinned[str(cpus[1])]: 0}
        _ask_from_cpu(stub, cpus[1], 20)
        assert _queries_by_pid(stub, workers) == {
            pinned[str(cpus[0])]: 30,
            pinned[str(cpus[1])]: 20,
        }


def test_unpinned_workers_float_and_share_the_queries(tmp_path, upstream):
    with run_stub(tmp_path, [upstream.address], workers=2, pin_workers=False) as stub:
        workers = _ready_workers(stub, 2)
        everywhere = _cpus_allowed(stub.proc.pid)
        assert {_cpus_allowed(pid) for pid in workers} == {everywhere}
        _ask_from_cpu(stub, sorted(os.sched_getaffinity(0))[0], 60)
        counts = _queries_by_pid(stub, workers)
        assert sum(counts.values()) == 60 and min(counts.values()) > 0  # hashed over both


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""Load: a real ``chroot-helper serve`` keeps serving a normal client while another uid holds
1,000 idle or stalled connections to its SMTP listener and to its exec socket, and while junk
floods its DNS stub; exec concurrency limits hold per peer.

The misbehaving clients are separate processes (:mod:`load_clients`) running as www-data (uid
33), so the helper sees them as another peer; the well-behaved client is this test process
(root).  The helper runs with short timeouts (``request_timeout``, ``mail.smtp_timeout``) so that
their effect is seen within a test; no test asserts on timing beyond a socket timeout that means
"not served".  Every test records what it measured (``record_property``) for
``make security-report``.
"""

from __future__ import annotations

import json
import resource
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from chroot_helper import client
from dns_fixtures import free_port, run_stub, run_upstream
from helper_daemon import Helper, running_helper
from mail_fixtures import run_service

pytestmark = [pytest.mark.root, pytest.mark.slow]

CLIENTS = Path(__file__).with_name("load_clients.py")
ATTACKER_UID = 33  # allowed on the exec socket: it gets past the peer check
OUTSIDER_UID = 65534  # not in allow_uids
NOT_SERVED = 30.0  # a normal request without an answer in this long counts as not served
SMTP_TIMEOUT = 3
REQUEST_TIMEOUT = 3
CONNECTIONS = 1000
HOLD_SECONDS = 10.0
DOMAIN = "example.org"


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Helper, int, int]]:
    """The helper with exec, mail on loopback TCP and DNS; yields it, the SMTP and DNS ports."""
    tmp = tmp_path_factory.mktemp("load")
    smtp_port = free_port("127.0.0.1")
    dns_port = free_port("127.0.0.1")
    with run_upstream(tmp, host="127.0.0.2") as upstream:
        body = f"""
[exec.echo]
argv = ["/bin/echo"]
args = "any"
user = "nobody"

[exec.sleep]
argv = ["/bin/sleep"]
args = ["[0-9]+"]
user = "nobody"
timeout = 60

[mail]
listen = ["127.0.0.1:{smtp_port}"]
spool = "{{spool}}"
domain = "{DOMAIN}"
smtp_timeout = {SMTP_TIMEOUT}

[dns]
listen = "127.0.0.1:{dns_port}"
upstreams = ["{upstream.address}"]
hosts_file = ""
"""
        with running_helper(body, helper_table=f"request_timeout = {REQUEST_TIMEOUT}") as running:
            yield running, smtp_port, dns_port
            assert running.proc.poll() is None, "the helper died under load:\n" + running.log_text()


@pytest.fixture
def start_clients(helper, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Start load clients (as www-data unless told); kill any still running at teardown."""
    monkeypatch.setenv("CHROOT_HELPER_SOCKET", helper[0].socket)
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, user: int | None = ATTACKER_UID) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(CLIENTS), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
            cwd="/",
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def result_of(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=HOLD_SECONDS + 60)
    assert proc.returncode == 0, f"load client failed ({proc.returncode}):\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def submit(port: int, token: str) -> str:
    """One full SMTP transaction; returns the queue ID from the 250 to DATA."""
    message = f"From: app@{DOMAIN}\r\nTo: x@example.net\r\nSubject: {token}\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=NOT_SERVED) as smtp:
        smtp.ehlo()
        smtp.mail(f"app@{DOMAIN}")
        smtp.rcpt("x@example.net")
        code, reply = smtp.data(message.encode())
    assert code == 250, (code, reply)
    return reply.decode().rsplit(" ", 1)[-1]


def during(proc: subprocess.Popen[str], action, minimum: int) -> list:
    """Run *action(i)* again and again while *proc* runs (at least *minimum* times)."""
    results = []
    while proc.poll() is None or len(results) < minimum:
        results.append(action(len(results)))
        time.sleep(0.2)
    return results


def test_smtp_slowloris_leaves_a_normal_client_served(
    helper, start_clients, record_property
) -> None:
    running, smtp_port, _ = helper
    attack = start_clients(
        "smtp", "127.0.0.1", str(smtp_port),
        "--connections", str(CONNECTIONS), "--duration", str(HOLD_SECONDS),
    )  # fmt: skip
    time.sleep(1.0)  # let it open its connections first
    queue_ids = during(attack, lambda i: submit(smtp_port, f"normal-{i}"), minimum=5)
    result = result_of(attack)
    after = submit(smtp_port, "after-the-attack")
    print("smtp slowloris:", result, "normal transactions:", len(queue_ids))
    record_property("connections", result["opened"])
    record_property("peak_open", result["max_open"])
    record_property("refused", result["refused"])
    record_property("closed_by_timeout", result["closed_idle"])
    record_property("normal_served", len(queue_ids))
    record_property("normal_failed", 0)
    assert result["opened"] >= CONNECTIONS
    assert result["max_open"] >= CONNECTIONS * 0.9, "the attacker could not hold its connections"
    # Beyond mail.max_per_client the helper answers 421 at once; those it kept, it closed when
    # they stayed silent past mail.smtp_timeout (a trickled or never-ending DATA included).
    assert result["replies"].get("421", 0) > 0
    assert result["closed_idle"] > 0
    assert "mail.max_per_client = 20" in running.log_text()
    assert len(set(queue_ids + [after])) == len(queue_ids) + 1


def test_exec_slowloris_leaves_a_normal_client_served(
    helper, start_clients, record_property
) -> None:
    running, _, _ = helper
    # Five processes of one uid: each meets max_per_peer (16), and together max_idle_per_uid (64).
    per_process = CONNECTIONS // 5
    attackers = [
        start_clients(
            "exec",
            running.socket,
            "--connections",
            str(per_process),
            "--duration",
            str(HOLD_SECONDS),
        )  # fmt: skip
        for _ in range(5)
    ]
    outsider = start_clients(
        "exec", running.socket, "--connections", "100", "--duration", str(HOLD_SECONDS),
        user=OUTSIDER_UID,
    )  # fmt: skip
    time.sleep(1.0)

    def echo(i: int) -> bytes:
        done = client.run(["echo", f"normal {i}"], capture_output=True, timeout=NOT_SERVED)
        assert done.stdout == f"normal {i}\n".encode()
        return done.stdout

    served = during(attackers[0], echo, minimum=5)
    results = [result_of(proc) for proc in attackers]
    refused_outsider = result_of(outsider)
    print("exec slowloris:", results, refused_outsider, "normal requests:", len(served))
    opened = sum(r["opened"] for r in results)
    replies: dict[str, int] = {}
    for r in results:
        for key, count in r["replies"].items():
            replies[key] = replies.get(key, 0) + count
    peak = sum(r["max_open"] for r in results)
    record_property("connections", opened + refused_outsider["opened"])
    record_property("peak_open", peak)
    record_property("refused", sum(r["refused"] for r in results) + refused_outsider["refused"])
    record_property("closed_by_timeout", sum(r["closed_idle"] for r in results))
    record_property("normal_served", len(served))
    record_property("normal_failed", 0)
    assert opened >= CONNECTIONS
    assert peak >= CONNECTIONS * 0.9, "the attacker could not hold its connections"
    # Per process (max_per_peer) and per uid (max_idle_per_uid) idle connections are refused
    # with a clear reason; those held get closed after request_timeout.
    assert replies.get("max_per_peer", 0) > 0 and replies.get("max_idle_per_uid", 0) > 0, replies
    assert replies.get("request_timeout", 0) > 0, replies
    assert refused_outsider["replies"].get("peer_refused", 0) > 0, refused_outsider
    assert client.run(["echo", "after"], capture_output=True).stdout == b"after\n"


def test_exec_per_peer_limit_refuses_that_peer_and_serves_another_uid(helper, monkeypatch) -> None:
    running, _, _ = helper
    monkeypatch.setenv("CHROOT_HELPER_SOCKET", running.socket)
    # max_per_peer is 16 (the default): one www-data process starts 16 sleeps, then a 17th.
    code = """
import time
procs = [client.Popen(["sleep", "600"], stdin=client.DEVNULL) for _ in range(16)]
time.sleep(0.5)
try:
    client.run(["echo", "one too many"])
except errors.BusyError as exc:
    print("BUSY", exc, flush=True)
else:
    print("SERVED", flush=True)
sys.stdin.readline()
for proc in procs:
    proc.kill()
    proc.wait()
"""
    prelude = "import subprocess, sys\nfrom chroot_helper import client, errors\n"
    saturating = subprocess.Popen(
        [sys.executable, "-c", prelude + code],
        env=running.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=ATTACKER_UID,
        group=ATTACKER_UID,
        extra_groups=[],
        cwd="/",
    )
    try:
        assert saturating.stdout is not None and saturating.stdin is not None
        line = saturating.stdout.readline()
        assert line.startswith("BUSY"), line + (saturating.stderr.read() if not line else "")
        assert "max_per_peer = 16" in line
        # This process (root, another uid) is served while that peer is at its limit.
        assert client.run(["echo", "root"], capture_output=True).stdout == b"root\n"
        _, err = saturating.communicate("\n", timeout=30)
        assert saturating.returncode == 0, err
    finally:
        if saturating.poll() is None:
            saturating.kill()
        saturating.communicate()


def real_query(host: str, port: int, name: str, rdtype: str) -> tuple[dns.message.Message, int]:
    """Ask like a stub resolver: 1 s timeout, 3 attempts; returns the answer and attempts used."""
    query = dns.message.make_query(name, rdtype)
    for attempt in range(1, 4):
        try:
            return dns.query.udp(query, host, port=port, timeout=1.0), attempt
        except dns.exception.Timeout:
            continue
    raise AssertionError(f"{name} {rdtype}: no answer in 3 attempts of 1 s")


def dns_stats(running: Helper) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-m", "chroot_helper.cli", "dns-stats", "--config", str(running.config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        k: int(v.rstrip("s"))
        for k, v in (i.split("=") for i in done.stdout.split())
        if v.rstrip("s").isdigit()
    }


def test_dns_junk_flood_leaves_real_queries_answered(
    helper, start_clients, record_property
) -> None:
    running, _, dns_port = helper
    before = dns_stats(running)
    senders = 3
    seconds = 6.0
    floods = [
        start_clients(
            "dns",
            "127.0.0.1",
            str(dns_port),
            "--rate",
            str(10000 / senders),
            "--duration",
            str(seconds),
            "--seed",
            str(seed),
        )  # fmt: skip
        for seed in range(senders)
    ]
    expected = {
        ("a.test", "A"): "192.0.2.1",
        ("name.test", "A"): "192.0.2.77",
        ("mail.test", "A"): "192.0.2.25",
    }
    sent = answered = retries = 0
    while any(proc.poll() is None for proc in floods) or sent < 20:
        for (name, rdtype), address in expected.items():
            answer, attempts = real_query("127.0.0.1", dns_port, name, rdtype)
            sent += 1
            retries += attempts - 1
            assert answer.rcode() == dns.rcode.NOERROR and str(answer.answer[0][0]) == address
            answered += 1
        # A name never asked before goes to the upstream: not only cached answers survive.
        answer, attempts = real_query("127.0.0.1", dns_port, f"fresh{sent}.test", "A")
        sent += 1
        retries += attempts - 1
        assert answer.rcode() == dns.rcode.NXDOMAIN
        answered += 1
    flooded = [result_of(proc) for proc in floods]
    junk = sum(r["sent"] for r in flooded)
    rate = junk / max(r["seconds"] for r in flooded)
    after = dns_stats(running)
    ignored = sum(after[k] - before.get(k, 0) for k in ("dropped", "formerr"))
    print(
        f"dns junk: {junk} datagrams at {rate:.0f}/s; real queries {answered}/{sent} answered "
        f"({retries} retries); stub counted {ignored} dropped or FORMERR"
    )
    record_property("junk_sent", junk)
    record_property("junk_rate", round(rate))
    record_property("real_sent", sent)
    record_property("real_answered", answered)
    record_property("real_retries", retries)
    record_property("junk_dropped_or_formerr", ignored)
    assert answered == sent
    assert ignored > 0
    assert running.proc.poll() is None


def soft_open_files_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return int(next(line for line in limits if line.startswith("Max open files")).split()[3])


def test_every_daemon_raises_its_open_files_limit_to_the_hard_limit(tmp_path) -> None:
    # A soft limit of 1,024 would cap the connections a daemon can hold far below what the
    # load tests open; each daemon lifts it to the hard limit at start.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with running_helper('[exec.echo]\nargv = ["/bin/echo"]\n') as serve:
            assert soft_open_files_limit(serve.proc.pid) == hard
        with run_upstream(tmp_path, host="127.0.0.2") as upstream:
            with run_stub(tmp_path, [upstream.address]) as stub:
                assert soft_open_files_limit(stub.proc.pid) == hard
        with run_service(tmp_path) as mail:
            assert soft_open_files_limit(mail.proc.pid) == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

"""Submission throughput and latency: the helper's mail service vs a local Postfix smtpd.

Both queue only (nothing is delivered): the helper with no ``mail.relay`` (messages are held in
its durable spool), Postfix with every message put on hold (``static:HOLD``).  Both fsync each
accepted message before the 250.  Same machine, same run, same clients:

* throughput: ``smtp-source`` (Debian package postfix), ``-s 20`` sessions sending
  ``--messages`` (default 20 x 1000) messages of 5 KB over persistent connections (``-d``);
* latency: 20 Python smtplib clients, each timing ``--latency-messages`` transactions
  (MAIL FROM to the 250 after DATA); the p99 is compared.

Prints ratios only (helper / Postfix): accepted messages/s (goal >= 1.0) and p99 submission
latency (lower is better).  Needs root (Postfix's master) and the postfix package; runs its own
Postfix instance from a temporary config directory on a free loopback port, never the system's.

    .venv/bin/python bench/mail_throughput.py [--messages 20000] [--sessions 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SENDER = "bench@example.org"
RECIPIENT = "sink@example.net"
SIZE = 5 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            if s.recv(100).startswith(b"220"):
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not answer on 127.0.0.1:{port} within {timeout:g}s")


@contextlib.contextmanager
def helper_service(workdir: Path, workers: int) -> Iterator[int]:
    port = free_port()
    config = workdir / "helper.toml"
    config.write_text(
        "[mail]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        f'spool = "{workdir / "helper-spool"}"\n'
        'domain = "example.org"\n'
        "max_connections = 200\n"
        f"workers = {workers}\n"
    )
    log = open(workdir / "helper.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "chroot_helper.services.mail", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, "the helper's mail service")
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        log.close()


MASTER_CF = """\
{port}      inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
anvil     unix  -       -       n       -       1       anvil
proxymap  unix  -       -       n       -       -       proxymap
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.example.org
mydestination =
mynetworks = 127.0.0.0/8
smtpd_client_restrictions =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_data_restrictions = check_client_access static:HOLD
default_process_limit = 100
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
message_size_limit = 10485760
"""


@contextlib.contextmanager
def postfix_instance(workdir: Path) -> Iterator[int]:
    port = free_port()
    root = workdir / "postfix"
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "main.cf").write_text(MAIN_CF.format(root=root))
    (etc / "master.cf").write_text(MASTER_CF.format(port=f"127.0.0.1:{port}"))
    (root / "queue").mkdir()
    (root / "data").mkdir()
    shutil.chown(root / "data", "postfix")
    for path in (workdir, root, etc, root / "queue"):
        path.chmod(0o755)
    started = subprocess.run(
        [POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        log = (root / "postfix.log").read_text() if (root / "postfix.log").exists() else ""
        raise SystemExit(f"postfix -c {etc} start failed:\n{started.stdout}{started.stderr}{log}")
    try:
        wait_port(port, "the benchmark's Postfix smtpd")
        yield port
    finally:
        subprocess.run([POSTFIX, "-c", str(etc), "stop"], capture_output=True, check=False)
        pid_file = root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def run_smtp_source(port: int, messages: int, sessions: int) -> float:
    """Messages per second that ``smtp-source`` got accepted."""
    started = time.monotonic()
    done = subprocess.run(
        [
            SMTP_SOURCE,
            "-d",
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            str(SIZE),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0 or "error" in done.stderr.lower():
        raise SystemExit(f"smtp-source against port {port} failed:\n{done.stderr[-2000:]}")
    return messages / elapsed


def message(index: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency {index}\r\n"
        f"Message-ID: <lat-{index}-{time.time_ns()}@example.org>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * ((SIZE - len(head)) // len(line))


def latencies(port: int, clients: int, per_client: int) -> list[float]:
    """Seconds from MAIL FROM to the 250 after DATA, per message."""
    results: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
                smtp.ehlo("bench.local")
                for index in range(per_client):
                    data = message(number * per_client + index)
                    started = time.perf_counter()
                    smtp.sendmail(SENDER, [RECIPIENT], data)
                    elapsed = time.perf_counter() - started
                    with lock:
                        results.append(elapsed)
        except (OSError, smtplib.SMTPException) as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"latency clients failed against port {port}: {errors[:3]}")
    return results


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="total for smtp-source")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--latency-messages", type=int, default=100, help="per latency client")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per server")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="mail.workers of the helper (default: one per CPU; Postfix runs many smtpd)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark starts its own Postfix master")
    for tool in (SMTP_SOURCE, POSTFIX):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"{tool} not found: apt-get install postfix (see .ci/run)")
    work = Path(tempfile.mkdtemp(prefix="mail-bench-", dir="/tmp"))
    work.chmod(0o755)
    rates: dict[str, list[float]] = {"helper": [], "postfix": []}
    lats: dict[str, list[float]] = {"helper": [], "postfix": []}
    try:
        with (
            helper_service(work, args.workers) as helper_port,
            postfix_instance(work) as postfix_port,
        ):
            ports = {"helper": helper_port, "postfix": postfix_port}
            for _round in range(args.rounds):
                for name, port in ports.items():  # alternate so drift hits both alike
                    rates[name].append(run_smtp_source(port, args.messages, args.sessions))
                    lats[name] += latencies(port, args.sessions, args.latency_messages)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate_ratio = statistics.median(rates["helper"]) / statistics.median(rates["postfix"])
    p99_ratio = p99(lats["helper"]) / p99(lats["postfix"])
    print(
        f"mail submission, {args.sessions} sessions x {args.messages // args.sessions} "
        f"messages of {SIZE // 1024} KB, durable queue, {args.rounds} rounds, "
        f"helper workers={args.workers}"
    )
    print(f"accepted messages/s, helper / postfix: {rate_ratio:.2f}x (goal >= 1.0x)")
    print(f"p99 submission latency, helper / postfix: {p99_ratio:.2f}x (lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

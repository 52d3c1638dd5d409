"""Per-query cost of the DNS stub's cache hits: CPU time and system calls per answered query.

Absolute throughput on a shared machine says little; CPU seconds the stub process spends per
answered query, and the system calls it makes per query, do not depend much on what else runs.
Starts the test upstream and one stub process (``--workers`` to change) on loopback, warms the
cache with the 50-name file of ``bench/dns_qps.py``, then runs ``dnsperf`` at a fixed rate and
reads the stub's CPU time from ``/proc``; ``--dnsmasq`` does the same for dnsmasq over the same
upstream.  With ``--strace`` a second run is counted by ``strace -c -f`` (slow under strace;
only the counts per query matter).

Usage: ``.venv/bin/python bench/dns_cost.py [--seconds 10] [--rate 20000] [--strace]``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE))

from dns_fixtures import free_port, run_stub, run_upstream  # noqa: E402
from dns_qps import NAMES, start_dnsmasq  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def stub_pids(parent: int) -> list[int]:
    """The runner and the workers it forked."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [parent, *(int(pid) for pid in children)]


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids``."""
    user = system = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / TICKS, system / TICKS


def measure(label: str, pids: list[int], port: int, query_file: Path, args: Namespace) -> None:
    before = cpu_seconds(pids)
    answered = dnsperf(port, query_file, args.seconds, args.rate)
    after = cpu_seconds(pids)
    user, system = ((a - b) / answered * 1e6 for a, b in zip(after, before, strict=True))
    print(
        f"{label}: {answered} answered at {args.rate}/s; CPU per query {user + system:.2f} us "
        f"(user {user:.2f}, system {system:.2f})"
    )


def dnsperf(port: int, query_file: Path, seconds: float, rate: int) -> int:
    """Queries answered."""
    output = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(query_file)]
        + ["-l", str(seconds), "-c", "4", "-Q", str(rate)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(re.search(r"Queries completed:\s+(\d+)", output).group(1))


def strace_counts(pids: list[int], port: int, query_file: Path, seconds: float, rate: int) -> None:
    out = Path(tempfile.mktemp(prefix="chrootwsgi-dns-strace-"))
    args = ["strace", "-c", "-f", "-o", str(out)]
    for pid in pids:
        args += ["-p", str(pid)]
    tracer = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    answered = dnsperf(port, query_file, seconds, rate)
    os.kill(tracer.pid, signal.SIGINT)
    tracer.wait()
    print(f"system calls per answered query ({answered} queries under strace):")
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit():
            print(f"  {fields[-1]:<16} {int(fields[3]) / answered:6.2f}")
    out.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=20000, help="dnsperf -Q, queries/s")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--strace", action="store_true", help="also count system calls")
    parser.add_argument("--dnsmasq", action="store_true", help="also measure dnsmasq")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chrootwsgi-dns-cost-") as tmp_name:
        tmp = Path(tmp_name)
        query_file = tmp / "queries.txt"
        query_file.write_text("".join(f"{name} {kind}\n" for name, kind in NAMES))
        with (
            run_upstream(tmp, host="127.0.0.2") as upstream,
            run_stub(tmp, [upstream.address], workers=args.workers, stats_interval=0) as stub,
        ):
            dnsperf(stub.port, query_file, 1, 1000)  # warm the cache
            pids = stub_pids(stub.proc.pid)
            measure(f"stub, {args.workers} worker(s)", pids, stub.port, query_file, args)
            if args.strace:
                strace_counts(pids, stub.port, query_file, min(args.seconds, 5.0), args.rate)
            if args.dnsmasq:
                port = free_port("127.0.0.1")
                dnsmasq = start_dnsmasq("127.0.0.1", port, upstream.address, tmp / "dnsmasq.log")
                try:
                    dnsperf(port, query_file, 1, 1000)
                    measure("dnsmasq", [dnsmasq.pid], port, query_file, args)
                finally:
                    dnsmasq.terminate()
                    dnsmasq.wait()


if __name__ == "__main__":
    main()

"""The helper's DNS stub against dnsmasq, both caching the same local upstream, in one run.

Prints ratios (this machine is noisy; absolute numbers mislead):

- dnsperf queries/s, stub / dnsmasq (goal >= 1.0), and average latency ratio, over a 50-name
  query file, after one warm-up pass through each (``--rounds``: alternating runs, medians);
  dnsperf sends from one thread per CPU, as a site's worker processes do (a pinned stub worker
  takes the queries sent from its CPU, see ``pin_workers``);
- ``getaddrinfo`` p50 from a jailed process through the stub vs a plain process through dnsmasq
  (goal <= 1.0), five processes each, interleaved, median.  glibc asks port 53, so both listen
  on port 53 of spare loopback addresses; the plain process sees dnsmasq through a resolv.conf
  bind-mounted in its own mount namespace.

Every server is local: the upstream is the test suite's authoritative server for ``test.``.
Needs root, dnsperf and dnsmasq (Debian packages dnsperf, dnsmasq-base).
Usage: ``python bench/dns_qps.py [--seconds 30] [--rounds 1] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

from dns_fixtures import run_stub, run_upstream, spare_port53_addresses  # noqa: E402

NAMES = [
    ("a.test", "A"),
    ("a.test", "AAAA"),
    ("mx.test", "MX"),
    ("mail.test", "A"),
    ("txt.test", "TXT"),
    ("www.chain.test", "A"),
    ("name.test", "A"),
    ("web.test", "A"),
    ("ttl.test", "A"),
    ("end.chain.test", "A"),
] + [(f"missing{i}.test", "A") for i in range(40)]

GETADDRINFO = """
import json, socket, statistics, sys, time
{enter}
samples = []
for _ in range(300):
    started = time.perf_counter()
    socket.getaddrinfo("name.test", 80, type=socket.SOCK_STREAM)
    samples.append(time.perf_counter() - started)
print(json.dumps(statistics.median(samples)))
"""
GETADDRINFO_RUNS = 5
"""Processes per side, each timing 300 lookups; the ratio is of the medians."""


def dnsperf(host: str, port: int, query_file: Path, seconds: int) -> tuple[float, float]:
    """Queries/s and average latency (ms)."""
    output = subprocess.run(
        [
            "dnsperf",
            "-s",
            host,
            "-p",
            str(port),
            "-d",
            str(query_file),
            "-l",
            str(seconds),
            "-c",
            "4",
            "-T",
            str(len(os.sched_getaffinity(0))),
            "-Q",
            "200000",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", output).group(1))
    latency = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", output).group(1)) * 1000
    return qps, latency


def median_run(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median queries/s and median average latency of several dnsperf runs."""
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def start_dnsmasq(host: str, port: int, upstream: str, log: Path) -> subprocess.Popen[bytes]:
    upstream_host, upstream_port = upstream.rsplit(":", 1)
    process = subprocess.Popen(
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={host}",
            f"--port={port}",
            f"--server={upstream_host}#{upstream_port}",
            "--cache-size=10000",
            "--user=root",
            "--pid-file=",
            f"--log-facility={log}",
        ],
        stdin=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    if process.poll() is not None:
        raise SystemExit(f"dnsmasq exited with {process.returncode}; see {log}")
    return process


def getaddrinfo_p50(code: str, *, resolv_conf: Path | None = None) -> float:
    command = [sys.executable, "-c", code]
    if resolv_conf is not None:
        script = f'mount --bind {resolv_conf} /etc/resolv.conf && exec "$0" -c "$1"'
        command = ["unshare", "--mount", "sh", "-c", script, sys.executable, code]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd="/")
    return float(json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30, help="dnsperf duration per server")
    parser.add_argument("--workers", type=int, default=2, help="stub processes (SO_REUSEPORT)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="dnsperf runs per server, alternating; medians"
    )
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq", "unshare"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: apt-get install dnsperf dnsmasq-base util-linux")
    work = Path(tempfile.mkdtemp(prefix="chrootwsgi-dns-bench-"))
    work.chmod(0o755)
    query_file = work / "queries.txt"
    query_file.write_text("".join(f"{name} {kind}\n" for name, kind in NAMES))
    stub_host, dnsmasq_host = spare_port53_addresses(2)
    jail = work / "jail"
    jail.mkdir(mode=0o755)
    try:
        with (
            run_upstream(work, host="127.0.0.2") as upstream,
            run_stub(
                work,
                [upstream.address],
                host=stub_host,
                port=53,
                label="stub",
                workers=args.workers,
            ),
        ):
            dnsmasq = start_dnsmasq(dnsmasq_host, 53, upstream.address, work / "dnsmasq.log")
            try:
                for host in (stub_host, dnsmasq_host):
                    dnsperf(host, 53, query_file, 2)  # warm both caches
                runs: dict[str, list[tuple[float, float]]] = {stub_host: [], dnsmasq_host: []}
                for index in range(args.rounds):  # alternate which goes first
                    order = [stub_host, dnsmasq_host][:: 1 if index % 2 == 0 else -1]
                    for host in order:
                        runs[host].append(dnsperf(host, 53, query_file, args.seconds))
                stub = median_run(runs[stub_host])
                other = median_run(runs[dnsmasq_host])
                enter = (
                    "import chrootwsgi; chrootwsgi.enter_jail("
                    f"{str(jail)!r}, user='nobody', nameservers=[{stub_host!r}])"
                )
                resolv = work / "resolv.conf"
                resolv.write_text(f"nameserver {dnsmasq_host}\n")
                jailed_runs, host_runs = [], []
                for _ in range(GETADDRINFO_RUNS):  # interleaved: drifts hit both alike
                    code = textwrap.dedent(GETADDRINFO.format(enter=enter))
                    jailed_runs.append(getaddrinfo_p50(code))
                    code = GETADDRINFO.format(enter="")
                    host_runs.append(getaddrinfo_p50(code, resolv_conf=resolv))
                jailed = statistics.median(jailed_runs)
                host_p50 = statistics.median(host_runs)
            finally:
                dnsmasq.terminate()
                dnsmasq.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"DNS, stub ({args.workers} worker(s)) vs dnsmasq over the same local upstream "
        f"({len(NAMES)} names, {args.rounds} x {args.seconds} s each)"
    )
    print(
        f"  dnsperf qps ratio {stub[0] / other[0]:.2f} (goal >= 1.0; {stub[0]:.0f} vs "
        f"{other[0]:.0f} q/s), average latency ratio {stub[1] / other[1]:.2f} "
        f"({stub[1]:.3f} vs {other[1]:.3f} ms)"
    )
    print(
        f"  getaddrinfo p50, jailed through the stub vs host through dnsmasq: ratio "
        f"{jailed / host_p50:.2f} (goal <= 1.0; {jailed * 1e6:.0f} vs {host_p50 * 1e6:.0f} us)"
    )


if __name__ == "__main__":
    main()

"""Jailed vs unjailed: the same app through the same Apache + mod_wsgi daemon configuration.

Prints ratios measured in one run (this machine is noisy; absolute numbers mislead):

- requests/s ratio, jailed / unjailed (goal >= 0.99), for a hello-world and a 50 KB page;
- p99 latency ratio, jailed / unjailed (goal <= 1.02);
- entry time of a jailed worker (goal <= 50 ms);
- extra RSS per daemon process, jailed - unjailed (goal <= 15 MB).

Needs root (Apache starts as root, the daemon runs as www-data) and wrk.
Usage: ``python bench/jail_overhead.py [--duration 20] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

from apache_server import Apache, Site, world_readable_dir  # noqa: E402

PAGES = {"hello": "/", "50KB": "/page"}


def script(jail: str | None, *, seccomp: bool = True) -> str:
    if jail is None:
        return "from bench_app import app as application\n"
    return textwrap.dedent(
        f"""\
        from chrootwsgi import ChrootMiddleware
        from bench_app import app
        application = ChrootMiddleware(app, root={jail!r}, seccomp={seccomp!r})
        """
    )


def wrk(url: str, duration: int) -> tuple[float, float]:
    """Requests/s and p99 latency in ms."""
    output = subprocess.run(
        ["wrk", "-t2", "-c16", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", output).groups()
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, p99


def daemon_rss_kib(apache: Apache) -> list[int]:
    """VmRSS of this Apache's mod_wsgi daemon processes (display-name chrootwsgi-test)."""
    assert apache.process is not None
    parent = f"PPid:\t{apache.process.pid}\n"
    sizes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if cmdline.startswith(b"chrootwsgi-test") and parent in status:
            sizes.append(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))
    return sizes


def measure(jail: str | None, duration: int, *, seccomp: bool = True) -> dict[str, object]:
    site = Site(
        script=script(jail, seccomp=seccomp), processes=2, threads=15, python_path=(str(HERE),)
    )
    with Apache(site) as apache:
        for path in PAGES.values():
            wrk(apache.url(path), 2)  # warm up every daemon thread
        results: dict[str, object] = {
            name: wrk(apache.url(path), duration) for name, path in PAGES.items()
        }
        results["rss"] = statistics.mean(daemon_rss_kib(apache))
        if jail is not None:
            states: dict[int, dict[str, object]] = {}
            for _ in range(100):  # one state per daemon process
                state = apache.get("/state").json()
                states[state["pid"]] = state
                if len(states) == site.processes:
                    break
            results["states"] = list(states.values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant")
    parser.add_argument(
        "--filter-cost", action="store_true", help="also run jailed without the syscall filter"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    jail = world_readable_dir("chrootwsgi-bench-jail-")
    variants: dict[str, tuple[str | None, bool]] = {
        "unjailed": (None, True),
        "jailed": (str(jail), True),
    }
    if args.filter_cost:
        variants["no filter"] = (str(jail), False)
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in variants}
    try:
        for round_number in range(args.rounds):
            order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
            for name in order:  # alternate which goes first: the machine drifts
                root, seccomp = variants[name]
                runs[name].append(measure(root, args.duration, seccomp=seccomp))
    finally:
        jail.rmdir()
    print(f"jail overhead, {args.rounds} x {args.duration} s per variant and page (wrk -t2 -c16)")
    for name in PAGES:
        rps = {v: statistics.mean(r[name][0] for r in runs[v]) for v in runs}
        p99 = {v: statistics.mean(r[name][1] for r in runs[v]) for v in runs}
        print(
            f"  {name:>5}: rps ratio {rps['jailed'] / rps['unjailed']:.3f} (goal >= 0.99; "
            f"{rps['jailed']:.0f} vs {rps['unjailed']:.0f} req/s), p99 ratio "
            f"{p99['jailed'] / p99['unjailed']:.3f} (goal <= 1.02; {p99['jailed']:.2f} vs "
            f"{p99['unjailed']:.2f} ms)"
        )
        if args.filter_cost:
            print(
                f"  {name:>5}: syscall filter, rps ratio with / without "
                f"{rps['jailed'] / rps['no filter']:.3f} (goal: within noise)"
            )
    states = [state for r in runs["jailed"] for state in r["states"]]
    for origin in ("cached", "built"):
        entries = [s for s in states if s["snapshot"] == origin]
        if not entries:
            continue
        median = sorted(entries, key=lambda s: s["seconds"])[len(entries) // 2]
        steps = ", ".join(f"{k} {v * 1000:.1f}" for k, v in median["timings"].items())
        what = "snapshot mapped from the cache" if origin == "cached" else "snapshot built"
        print(
            f"  entry time, {what}: median {median['seconds'] * 1000:.1f} ms of {len(entries)} "
            f"workers (goal <= 50 ms; steps in ms: {steps})"
        )
    extra = statistics.mean(r["rss"] for r in runs["jailed"]) - statistics.mean(
        r["rss"] for r in runs["unjailed"]
    )
    print(f"  extra RSS per daemon process: {extra / 1024:.1f} MB (goal <= 15 MB)")


if __name__ == "__main__":
    main()

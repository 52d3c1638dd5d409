"""Jailed vs unjailed: the same app through the same Apache + mod_wsgi daemon configuration.

Prints ratios measured in one run (this machine is noisy; absolute numbers mislead):

- requests/s ratio, jailed / unjailed (goal >= 0.99), for a hello-world and a 50 KB page;
- p99 latency ratio, jailed / unjailed (goal <= 1.02);
- entry time of a jailed worker (goal <= 50 ms);
- extra RSS per daemon process, jailed - unjailed (goal <= 15 MB).

Each round starts one Apache per variant, all at once, and gives them turns of a few seconds
each (ABBA order), so that every variant meets the same machine conditions.

Needs root (Apache starts as root, the daemon runs as www-data) and wrk.
Usage: ``python bench/jail_overhead.py [--duration 20] [--rounds 2] [--slices 4]``.
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
import time
from collections.abc import Collection
from pathlib import Path

import requests

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


def start_servers(variants: dict[str, tuple[str | None, bool]]) -> dict[str, Apache]:
    """One Apache per variant, all up at once, each warmed on every page."""
    servers: dict[str, Apache] = {}
    try:
        for name, (root, seccomp) in variants.items():
            site = Site(
                script=script(root, seccomp=seccomp),
                processes=2,
                threads=15,
                python_path=(str(HERE),),
            )
            apache = servers[name] = Apache(site).start()
            # Warm up every daemon thread before the next server starts: a jailed worker's
            # entry time is measured on a machine that is not busy starting other servers.
            for path in PAGES.values():
                wrk(apache.url(path), 2)
    except BaseException:
        for apache in servers.values():
            apache.stop()
        raise
    return servers


def jail_states(
    apache: Apache, *, processes: int = 2, old: Collection[object] = ()
) -> list[dict[str, object]]:
    """The jail state of each daemon process of *apache* whose pid is not in *old*."""
    states: dict[int, dict[str, object]] = {}
    deadline = time.monotonic() + 30
    while len(states) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{processes - len(states)} daemon processes did not answer")
        try:
            response = apache.get("/state")
        except requests.ConnectionError:
            response = None
        if response is None or response.status_code != 200:  # Apache is replacing its children
            time.sleep(0.1)
            continue
        state = response.json()
        if state["pid"] not in old:
            states[state["pid"]] = state
    return list(states.values())


def restarted_states(apache: Apache, restarts: int) -> list[dict[str, object]]:
    """Jail states of the daemon processes now and after each of *restarts* graceful restarts."""
    states = jail_states(apache)
    collected = list(states)
    for _ in range(restarts):
        old = {state["pid"] for state in states}
        apache.graceful()
        states = jail_states(apache, old=old)
        collected += states
    return collected


def run_round(
    variants: dict[str, tuple[str | None, bool]], duration: int, slices: int, restarts: int
) -> dict[str, dict[str, object]]:
    """Start every variant's server, then measure them in turns of *duration* / *slices* seconds.

    Taking turns every few seconds puts each variant under the same machine conditions, which
    drift by several per cent from one minute to the next on a shared host. Then jailed servers
    restart gracefully *restarts* times, for more samples of a worker's entry time.
    """
    servers = start_servers(variants)
    try:
        results: dict[str, dict[str, object]] = {name: {} for name in variants}
        for page, path in PAGES.items():
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            order = list(variants)
            for _ in range(slices):
                for name in order:
                    runs[name].append(wrk(servers[name].url(path), max(1, duration // slices)))
                order.reverse()  # ABBA: neither goes first more often
            for name, measured in runs.items():
                rps = statistics.mean(rps for rps, _ in measured)
                p99 = statistics.median(p99 for _, p99 in measured)
                results[name][page] = (rps, p99)
        for name, apache in servers.items():
            results[name]["rss"] = statistics.mean(daemon_rss_kib(apache))
            if variants[name][0] is not None:
                results[name]["states"] = restarted_states(apache, restarts)
        return results
    finally:
        for apache in servers.values():
            apache.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per page and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each with fresh servers")
    parser.add_argument("--slices", type=int, default=4, help="turns per page and round")
    parser.add_argument(
        "--restarts", type=int, default=3, help="graceful restarts per round (entry times)"
    )
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
            names = list(variants) if round_number % 2 == 0 else list(reversed(variants))
            measured = run_round(
                {n: variants[n] for n in names}, args.duration, args.slices, args.restarts
            )
            for name, result in measured.items():
                runs[name].append(result)
    finally:
        jail.rmdir()
    print(
        f"jail overhead, {args.rounds} rounds x {args.duration} s per variant and page, "
        f"in {args.slices} alternating turns (wrk -t2 -c16)"
    )
    for name in PAGES:
        rps = {v: statistics.mean(r[name][0] for r in runs[v]) for v in runs}
        p99 = {v: statistics.mean(r[name][1] for r in runs[v]) for v in runs}
        per_round = ", ".join(
            f"{j[name][0] / u[name][0]:.3f}"
            for j, u in zip(runs["jailed"], runs["unjailed"], strict=True)
        )
        print(
            f"  {name:>5}: rps ratio {rps['jailed'] / rps['unjailed']:.3f} (goal >= 0.99; "
            f"{rps['jailed']:.0f} vs {rps['unjailed']:.0f} req/s; per round {per_round}), "
            f"p99 ratio {p99['jailed'] / p99['unjailed']:.3f} (goal <= 1.02; "
            f"{p99['jailed']:.2f} vs {p99['unjailed']:.2f} ms)"
        )
        if args.filter_cost:
            print(
                f"  {name:>5}: syscall filter, rps ratio with / without "
                f"{rps['jailed'] / rps['no filter']:.3f} (goal: within noise)"
            )
    states = [state for r in runs["jailed"] for state in r["states"]]
    origins = {
        "cached": "snapshot mapped from the cache",
        "built": "snapshot built",
        "waited": "snapshot mapped once another worker had built it",
    }
    for origin, what in origins.items():
        entries = [s for s in states if s["snapshot"] == origin]
        if not entries:
            continue
        median = sorted(entries, key=lambda s: s["seconds"])[len(entries) // 2]
        steps = ", ".join(f"{k} {v * 1000:.1f}" for k, v in median["timings"].items())
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

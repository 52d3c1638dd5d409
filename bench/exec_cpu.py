"""Benchmark: CPU time per exec call, by process, through chroot-helper against ``subprocess.run``.

Wall-clock ratios (``bench/exec_latency.py``) swing with whatever else runs on a shared machine;
CPU time per call moves much less, and says where the time goes.  Starts a real
``chroot-helper serve`` (the configuration of ``exec_latency.py``), runs ``/bin/true`` through
it from a jailed client process, and prints the CPU milliseconds per call spent in the client,
the daemon, and under the forker (the forker, the supervisors and the commands they run, alive
or exited); then the same for ``subprocess.run(["/bin/true"])`` (the caller, and the command).
Asserts nothing.  Usage::

    .venv/bin/python bench/exec_cpu.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import subprocess
import time
from pathlib import Path

from exec_latency import helper_latency, helper_running

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """CPU seconds of *pid* and of the children it has reaped (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return sum(int(field) for field in fields[11:15]) / _TICK


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _under(forker: int, supervisors: list[int]) -> float:
    """CPU of the forker and everything it forked: a supervisor that exits moves from its own
    count to the forker's reaped children."""
    return _cpu(forker) + sum(_cpu(pid) for pid in supervisors)


def helper_cpu(jail: Path, daemon: int, calls: int) -> dict[str, float]:
    """CPU ms per call of each process class, measured around *calls* calls."""
    queue: multiprocessing.Queue[float] = multiprocessing.Queue()
    warm = multiprocessing.Process(target=helper_latency, args=(jail, 50, queue))
    warm.start()
    queue.get(timeout=600)
    warm.join()
    forker = _children(daemon)[0]
    before_supervisors = _children(forker)
    daemon_before = _cpu(daemon)  # the forker runs on: it is not among its reaped children
    under_before = _under(forker, before_supervisors)
    proc = multiprocessing.Process(
        target=helper_latency, args=(jail, calls, queue, time.process_time)
    )
    proc.start()
    client_seconds = queue.get(timeout=600) * calls
    proc.join()
    supervisors = sorted(set(before_supervisors) | set(_children(forker)))
    under_after = _under(forker, supervisors)
    daemon_after = _cpu(daemon)
    per_call = 1e3 / calls
    return {
        "client": client_seconds * per_call,
        "daemon": (daemon_after - daemon_before) * per_call,
        "supervisors and commands": (under_after - under_before) * per_call,
    }


def host_cpu(calls: int) -> dict[str, float]:
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(calls):
        subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)

    def used(a: resource.struct_rusage, b: resource.struct_rusage) -> float:
        return (a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime) * 1e3 / calls

    return {
        "caller": used(self_after, self_before),
        "commands": used(children_after, children_before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    ns = parser.parse_args()
    multiprocessing.set_start_method("fork")
    with helper_running() as (proc, _, base):
        time.sleep(0.5)  # the forker's first supervisors
        via = helper_cpu(base / "jail", proc.pid, ns.calls)
        host = host_cpu(ns.calls)
        print("CPU ms per /bin/true call (user + system; the machine may be shared):")
        print("  helper: " + ", ".join(f"{k} {v:.3f}" for k, v in via.items()))
        print(f"          total {sum(via.values()):.3f}")
        print("  host:   " + ", ".join(f"{k} {v:.3f}" for k, v in host.items()))
        print(f"          total {sum(host.values()):.3f}")
        print(f"  ratio of totals {sum(via.values()) / sum(host.values()):.2f}")


if __name__ == "__main__":
    main()

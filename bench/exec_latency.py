"""Benchmark: exec through chroot-helper against plain ``subprocess`` on the host.

Starts a real ``chroot-helper serve`` on a temporary socket, then measures, in the same run:

1. round trip of ``/bin/true`` via :func:`chroot_helper.client.run` from a client process that has
   entered an empty jail with :func:`chrootwsgi.enter_jail` (as www-data when run as root,
   rootless otherwise; the streaming and concurrent clients below too) against
   ``subprocess.run(["/bin/true"])`` on the host, in alternating blocks of ``--block`` calls; the
   ratio is the median of the blocks' ratios (goal: ratio <= 1.2),
2. streaming N MiB of ``cat`` stdout through the helper against the same on the host, both as a
   ``Popen`` pipe read loop (the helper passes the client's pipe to the command as an fd) and as
   ``run(capture_output=True)`` (streamed in DATA frames, where ``max_output`` is enforced)
   (goal: throughput ratio >= 0.8),
3. exec calls per second with 16 concurrent client processes against 16 threads calling
   ``subprocess.run`` (goal: ratio >= 1.0), both warmed up and timed from a barrier, in the
   order host, helper, helper, host.

Prints ratios; asserts nothing.  Usage::

    .venv/bin/python bench/exec_latency.py [--iterations 3000] [--block 100] [--stream-mib 1024]
        [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

CONFIG = """
[helper]
socket = "{socket}"
socket_mode = "0666"
allow_uids = [0, {uid}, {jailed_uid}]
max_concurrent = 64
max_per_peer = 64

[exec.true]
argv = ["/bin/true"]
user = "{user}"
max_processes = 4096

[exec.cat]
argv = ["/bin/cat"]
args = "any"
user = "{user}"
timeout = 600
max_output = "64G"
max_file_size = "unlimited"
"""


#: The user a jailed client runs as when the benchmark runs as root (mod_wsgi's usual user).
JAILED_USER = "www-data"


def start_helper(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(base / "jail" / "run" / "chroot-helper.sock")
    uid = os.geteuid()
    user = "nobody" if uid == 0 else os.environ.get("USER", str(uid))
    config = base / "helper.toml"
    jailed_uid = pwd.getpwnam(JAILED_USER).pw_uid
    config.write_text(CONFIG.format(socket=sock, uid=uid, user=user, jailed_uid=jailed_uid))
    log = open(base / "helper.log", "wb")  # noqa: SIM115 - lives as long as the helper
    proc = subprocess.Popen(
        [sys.executable, "-m", "chroot_helper.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(sock) == 0:
                return proc, sock
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"helper did not start; see {base / 'helper.log'}")


@contextlib.contextmanager
def helper_running() -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A helper on a fresh temporary directory: (process, socket path, directory); stopped and
    removed afterwards.  Sets ``$CHROOT_HELPER_SOCKET``."""
    base = Path(tempfile.mkdtemp(prefix="chroot-helper-bench-"))
    base.chmod(0o755)
    proc = None
    try:
        proc, sock = start_helper(base)
        os.environ["CHROOT_HELPER_SOCKET"] = sock
        yield proc, sock, base
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def enter_empty_jail(jail: Path) -> None:
    """Enter *jail*, which holds only run/, as a jailed web worker does: with
    :func:`chrootwsgi.enter_jail`, as :data:`JAILED_USER` when root, rootless otherwise.  The
    client then finds the helper at its default path, /run/chroot-helper.sock."""
    from chrootwsgi import enter_jail

    if os.geteuid() == 0:
        enter_jail(str(jail), mode="privileged", user=JAILED_USER)
    else:
        enter_jail(str(jail), mode="rootless")
    os.environ.pop("CHROOT_HELPER_SOCKET", None)


#: Calls each concurrent client makes before the timed part (not counted).
WARMUP_CALLS = 10


def helper_latency(
    jail: Path,
    iterations: int,
    queue: multiprocessing.Queue[float],
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Put the *clock* seconds per ``/bin/true`` call through the helper on *queue*."""
    from chroot_helper import client

    enter_empty_jail(jail)
    for _ in range(20):
        client.run(["true"], stdin=client.DEVNULL, stdout=client.DEVNULL, stderr=client.DEVNULL)
    start = clock()
    for _ in range(iterations):
        client.run(["true"], stdin=client.DEVNULL, stdout=client.DEVNULL, stderr=client.DEVNULL)
    queue.put((clock() - start) / iterations)


def helper_latency_turns(jail: Path, block: int, turns: Connection) -> None:
    """In a jailed child: on each request from *turns*, time *block* calls and send the seconds
    per call back; stop on None."""
    from chroot_helper import client

    enter_empty_jail(jail)
    for _ in range(20):
        client.run(["true"], stdin=client.DEVNULL, stdout=client.DEVNULL, stderr=client.DEVNULL)
    while turns.recv() is not None:
        start = time.perf_counter()
        for _ in range(block):
            client.run(["true"], stdin=client.DEVNULL, stdout=client.DEVNULL, stderr=client.DEVNULL)
        turns.send((time.perf_counter() - start) / block)


def host_latency(calls: int) -> float:
    """Seconds per ``subprocess.run(["/bin/true"])`` over *calls* calls."""
    start = time.perf_counter()
    for _ in range(calls):
        subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) / calls


def interleaved_latency(jail: Path, iterations: int, block: int) -> tuple[list[float], list[float]]:
    """Seconds per ``/bin/true`` call on the host and through the helper, in alternating blocks
    of *block* calls (the side that goes first alternates too), so both see the same machine."""
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.Process(target=helper_latency_turns, args=(jail, block, theirs))
    child.start()
    theirs.close()
    host: list[float] = []
    via: list[float] = []
    try:
        host_latency(20)  # warm, as the child is
        for index in range(max(1, iterations // block)):
            for side in ("host", "helper") if index % 2 == 0 else ("helper", "host"):
                if side == "host":
                    host.append(host_latency(block))
                else:
                    ours.send(True)
                    via.append(ours.recv())
        ours.send(None)
    except (EOFError, OSError):
        pass  # the child has gone: its exit code says so below
    finally:
        ours.close()
        child.join(60)
    if child.exitcode != 0:
        raise SystemExit(f"the helper's client failed (exit code {child.exitcode})")
    return host, via


def helper_stream(jail: Path, path: str, mode: str, queue: multiprocessing.Queue[float]) -> None:
    from chroot_helper import client

    size = os.path.getsize(path)
    enter_empty_jail(jail)
    start = time.perf_counter()
    if mode == "capture":
        done = client.run(["cat", path], capture_output=True)
        got = len(done.stdout)
        del done
    else:
        got = 0
        with client.Popen(["cat", path], stdout=client.PIPE, stdin=client.DEVNULL) as proc:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 1 << 20):
                got += len(chunk)
    elapsed = time.perf_counter() - start
    assert got == size, (got, size)
    queue.put(size / elapsed)


def host_stream(path: str, mode: str) -> float:
    size = os.path.getsize(path)
    start = time.perf_counter()
    if mode == "capture":
        got = len(subprocess.run(["/bin/cat", path], capture_output=True).stdout)
    else:
        got = 0
        with subprocess.Popen(["/bin/cat", path], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 1 << 20):
                got += len(chunk)
    assert got == size
    return size / (time.perf_counter() - start)


def helper_rate_worker(
    jail: Path, seconds: float, start: threading.Barrier, queue: multiprocessing.Queue[float]
) -> None:
    from chroot_helper import client

    enter_empty_jail(jail)
    for _ in range(WARMUP_CALLS):  # the helper forks a resident for each concurrent client
        client.run(["true"], stdin=client.DEVNULL, stdout=client.DEVNULL, stderr=client.DEVNULL)
    start.wait()
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        client.run(["true"], stdin=client.DEVNULL, stdout=client.DEVNULL, stderr=client.DEVNULL)
        count += 1
    queue.put(count)


def helper_rate(jail: Path, workers: int, seconds: float) -> float:
    """Calls per second of *workers* client processes, timed together once all are warm."""
    queue: multiprocessing.Queue[float] = multiprocessing.Queue()
    start = multiprocessing.Barrier(workers)
    procs = [
        multiprocessing.Process(
            target=reporting, args=(helper_rate_worker, jail, seconds, start, queue)
        )
        for _ in range(workers)
    ]
    for worker in procs:
        worker.start()
    total = sum(collect(queue, len(procs)))
    for worker in procs:
        worker.join()
    return total / seconds


def host_rate(workers: int, seconds: float) -> float:
    counts = [0] * workers
    start = threading.Barrier(workers)

    def work(index: int) -> None:
        for _ in range(WARMUP_CALLS):
            subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            counts[index] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def reporting(target, *args):  # type: ignore[no-untyped-def]
    """Run *target* in a worker; a failure reaches the parent instead of leaving it waiting."""
    queue = args[-1]
    try:
        target(*args)
    except BaseException as exc:
        queue.put(exc)
        raise


def collect(queue, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    values = [queue.get(timeout=600) for _ in range(count)]
    for value in values:
        if isinstance(value, BaseException):
            raise SystemExit(f"a benchmark worker failed: {value!r}")
    return values


def in_child(target, *args):  # type: ignore[no-untyped-def]
    queue: multiprocessing.Queue[float] = multiprocessing.Queue()
    proc = multiprocessing.Process(target=reporting, args=(target, *args, queue))
    proc.start()
    (value,) = collect(queue, 1)
    proc.join()
    return value


def _quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.2f}-{high:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--stream-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=16)
    ns = parser.parse_args()
    multiprocessing.set_start_method("fork")
    with helper_running() as (_, sock, base):
        jail = base / "jail"
        where = (
            f"a jail entered with chrootwsgi.enter_jail (privileged, as {JAILED_USER})"
            if os.geteuid() == 0
            else "a jail entered with chrootwsgi.enter_jail (rootless)"
        )
        print(f"client runs in {where}; helper socket {sock}")

        hosts, vias = interleaved_latency(jail, ns.iterations, ns.block)
        host, via = statistics.median(hosts), statistics.median(vias)
        ratios = [v / h for h, v in zip(hosts, vias, strict=True)]
        print(
            f"1. /bin/true round trip: host subprocess.run {host * 1e3:.3f} ms, "
            f"helper {via * 1e3:.3f} ms, ratio {statistics.median(ratios):.2f}x (goal <= 1.2x; "
            f"median of {len(ratios)} interleaved blocks of {ns.block} calls, "
            f"quartiles {_quartiles(ratios)})"
        )

        data = base / "stream.bin"
        with open(data, "wb") as fh:
            block = os.urandom(1 << 20)
            for _ in range(ns.stream_mib):
                fh.write(block)
        data.chmod(0o644)
        os.sync()  # no writeback of the fresh file during the first measurement
        host_stream(str(data), "popen")  # and both sides read it from the page cache
        for mode, label in (
            ("popen", "Popen(stdout=PIPE) read loop, pipe passed as fd"),
            ("capture", "run(capture_output=True), streamed in DATA frames"),
        ):
            host_bps = host_stream(str(data), mode)
            via_bps = in_child(helper_stream, jail, str(data), mode)
            print(
                f"2. {ns.stream_mib} MiB of cat stdout, {label}: "
                f"host {host_bps / 2**20:.0f} MiB/s, helper {via_bps / 2**20:.0f} MiB/s, "
                f"ratio {via_bps / host_bps:.2f}x (goal >= 0.8x)"
            )
        data.unlink()

        # Host, helper, helper, host: each gets half its time on either side of the other, so
        # a machine that drifts during the run does not favour one.
        half = ns.seconds / 2
        host_cps = host_rate(ns.workers, half)
        via_cps = helper_rate(jail, ns.workers, half)
        via_cps = (via_cps + helper_rate(jail, ns.workers, half)) / 2
        host_cps = (host_cps + host_rate(ns.workers, half)) / 2
        print(
            f"3. {ns.workers} concurrent clients: host threads {host_cps:.0f} calls/s, "
            f"helper {via_cps:.0f} calls/s, ratio {via_cps / host_cps:.2f}x (goal >= 1.0x)"
        )


if __name__ == "__main__":
    main()

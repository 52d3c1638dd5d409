"""Run the DNS stub alone: ``python -m chroot_helper.services.dns --config FILE``.

Reads the ``[dns]`` table of the TOML file, starts the service, logs
``dns stub ready on HOST port PORT`` to stderr, and runs until SIGTERM or SIGINT.  SIGUSR1 logs
a stats line; one more is logged at exit.  SIGHUP flushes the cache and re-reads the hosts
file.  With ``workers > 1`` the process forks that many workers in all, sharing the address
through ``SO_REUSEPORT``, each with its own cache and counters, and (``pin_workers``) each of
the first ones pinned to one CPU, answering the queries sent from it; SIGTERM to the parent
stops them, SIGUSR1 and SIGHUP to the parent reach every worker (one stats line per worker).

Exit codes: 0 stopped by a signal, 2 bad command line, 71 cannot bind, 78 bad configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from ...errors import ListenError
from ..standalone import die_with_parent, start_runner
from .config import DnsConfig, parse_config
from .server import start
from .stats import format_stats

log = logging.getLogger("chroot_helper.services.dns")

EXIT_OK = 0
EXIT_LISTEN = 71

PASSED_ON = (signal.SIGUSR1, signal.SIGHUP)
"""Signals the parent of several workers passes on to the others."""


async def serve(config: DnsConfig, children: Sequence[int] = (), *, cpu: int | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; return the exit code.

    :param children: the other workers, when this is their parent: SIGUSR1 and SIGHUP are
        passed on to them, so every worker logs its stats or flushes its own cache.
    :param cpu: the CPU this worker is pinned to (see :func:`worker_cpus`).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        service = await start(config, udp_thread=True, cpu=cpu)
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_LISTEN

    def log_stats() -> None:
        log.info("dns stats: %s", format_stats(service.stats()))

    actions = {signal.SIGUSR1: log_stats, signal.SIGHUP: service.flush}
    for signum in PASSED_ON:
        loop.add_signal_handler(signum, _and_pass_on, actions[signum], signum, children)
    try:
        await stop.wait()
    finally:
        log.info("dns stats: %s", format_stats(service.stats()))
        await service.close()
        log.info("dns stub stopped")
    return EXIT_OK


def _and_pass_on(action: Callable[[], None], signum: int, children: Sequence[int]) -> None:
    action()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def worker_cpus(config: DnsConfig) -> list[int | None]:
    """The CPU each worker is pinned to (``pin_workers``): with several workers, the first ones
    take one allowed CPU each, so that a query is answered on the CPU that sent it (no
    cross-CPU wake-up, a warm cache); workers beyond the CPUs, or a single one, float."""
    if config.workers < 2 or not config.pin_workers:
        return [None] * config.workers
    cpus: list[int | None] = list(sorted(os.sched_getaffinity(0)))
    return (cpus + [None] * config.workers)[: config.workers]


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before the UDP thread starts: it inherits the mask


def _run_workers(config: DnsConfig) -> int:
    children = []
    parent = os.getpid()
    cpus = worker_cpus(config)
    for cpu in cpus[1:]:
        pid = os.fork()
        if pid == 0:
            code = EXIT_LISTEN
            try:
                for signum in PASSED_ON:  # until serve() handles them: not fatal meanwhile
                    signal.signal(signum, signal.SIG_IGN)
                die_with_parent(parent)
                _pin(cpu)
                code = asyncio.run(serve(config, cpu=cpu))
            finally:
                os._exit(code)
        children.append(pid)
    _pin(cpus[0])
    code = asyncio.run(serve(config, children, cpu=cpus[0]))
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        _pid, status = os.waitpid(pid, 0)
        code = code or os.waitstatus_to_exitcode(status)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    config = start_runner("dns", "Run the DNS stub alone.", argv, parse_config)
    return _run_workers(config)


if __name__ == "__main__":
    sys.exit(main())

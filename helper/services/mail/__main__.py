"""Run the mail service alone: ``python -m chroot_helper.services.mail --config FILE``.

Reads the ``[mail]`` table of the TOML file, starts the service, logs
``mail service ready on ADDRESSES`` to stderr, and runs until SIGTERM or SIGINT.  SIGUSR1
logs a stats line; SIGHUP retries every deferred message now (like ``flush``).  With
``mail.workers = N`` the process binds the listeners, forks N-1 workers that accept and spool
submissions and pass queue IDs back through a pipe, and runs the queue itself; workers die
with it (SIGTERM, even when it is killed).

The front ends run the same way: ``python -m chroot_helper.services.mail sendmail|mailq|flush
ARGS`` (what ``chroot-helper sendmail|mailq|flush`` call).

Exit codes: 0 stopped by a signal, 2 bad command line, 71 cannot bind, 73 spool unusable,
78 bad configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import Callable, Sequence

from ...errors import MailListenError, SpoolError
from ..standalone import die_with_parent, start_runner
from .config import MailConfig, UnixAddress, parse_config
from .mailq import flush_main, mailq_main
from .sendmail_cli import main as sendmail_main
from .stats import format_stats

log = logging.getLogger("chroot_helper.services.mail")

EXIT_OK = 0
EXIT_LISTEN = 71
EXIT_SPOOL = 73


async def serve(
    config: MailConfig,
    *,
    sockets: list[socket.socket] | None = None,
    notify_fd: int | None = None,
    worker_pipes: Sequence[int] = (),
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code.

    :param sockets: listening sockets bound by the parent (worker processes).
    :param notify_fd: a worker writes each committed queue ID here, one per line.
    :param worker_pipes: the queue-running process reads workers' queue IDs from these.
    """
    from .server import start

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    on_commit = None
    if notify_fd is not None:
        fd = notify_fd

        def on_commit(queue_id: str) -> None:
            try:
                os.write(fd, f"{queue_id}\n".encode())
            except OSError as exc:  # queued on disk anyway: found at the next start
                log.warning("%s: cannot tell the queue runner (%s)", queue_id, exc)

    try:
        service = await start(config, sockets=sockets, on_commit=on_commit)
    except (MailListenError, SpoolError) as exc:
        return _failed_start(exc)
    for pipe in worker_pipes:
        loop.add_reader(pipe, _read_queue_ids, loop, pipe, service.runner.enqueue, {})
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: log.info("mail stats: %s", format_stats(service.stats()))
    )
    loop.add_signal_handler(signal.SIGHUP, service.flush)
    try:
        await stop.wait()
    finally:
        await service.close()
        log.info("mail service stopped")
    return EXIT_OK


def _failed_start(exc: MailListenError | SpoolError) -> int:
    """Log why the service cannot start; return its exit code (listeners or spool)."""
    log.error("%s", exc)
    return EXIT_LISTEN if isinstance(exc, MailListenError) else EXIT_SPOOL


def _read_queue_ids(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    enqueue: Callable[[str], None],
    partial: dict[int, bytes],
) -> None:
    data = os.read(fd, 65536)
    if not data:
        loop.remove_reader(fd)
        return
    lines = (partial.pop(fd, b"") + data).split(b"\n")
    partial[fd] = lines.pop()
    for line in lines:
        queue_id = line.decode("ascii", "replace")
        if re.fullmatch(r"[0-9A-F]{20}", queue_id):
            enqueue(queue_id)


def run(config: MailConfig) -> int:
    """Run the service; with ``mail.workers > 1`` fork submission-only workers first."""
    if config.workers == 1:
        return asyncio.run(serve(config))
    from .server import bind_listeners
    from .spool import Spool

    try:
        sockets = bind_listeners(config)
        Spool(config.spool).open()
    except (MailListenError, SpoolError) as exc:
        return _failed_start(exc)
    parent = os.getpid()
    children: list[tuple[int, int]] = []
    for _ in range(config.workers - 1):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = EXIT_LISTEN
            try:
                os.close(read_fd)
                for _pid, other in children:
                    os.close(other)
                die_with_parent(parent)
                code = asyncio.run(serve(config, sockets=sockets, notify_fd=write_fd))
            finally:
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
        log.info("mail worker pid %d started", pid)
    try:
        code = asyncio.run(
            serve(config, sockets=sockets, worker_pipes=[fd for _pid, fd in children])
        )
    finally:
        for pid, fd in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            os.close(fd)
        for pid, _fd in children:
            os.waitpid(pid, 0)
        for address in config.listen:
            if isinstance(address, UnixAddress):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(address.path).st_mode):
                        os.unlink(address.path)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "sendmail":
        return sendmail_main(args_list[1:])
    if args_list and args_list[0] == "mailq":
        return mailq_main(args_list[1:])
    if args_list and args_list[0] == "flush":
        return flush_main(args_list[1:])
    config = start_runner(
        "mail",
        "Run the mail service alone (or: sendmail|mailq|flush ARGS).",
        args_list,
        parse_config,
    )
    # aiosmtpd logs every command at INFO on "mail.log", addresses included; keep it for DEBUG.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())

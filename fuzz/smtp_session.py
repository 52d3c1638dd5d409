"""Fuzz target: one SMTP client byte stream through the real submission server, in-process.

The server is the mail service's own protocol (aiosmtpd's parser with our
:class:`~chroot_helper.services.mail.server.SubmissionHandler`, :mod:`.policy` and the spool),
connected to an in-memory transport on a loop that lives as long as the process.  The input is
the client's bytes, fed as one pipelined burst; the session then ends as a real one does when
the client hangs up.  Broken promises (each raises :class:`AssertionError`):

* an exception reached aiosmtpd's catch-all (``500 Error: (...)``) or a logger with a traceback;
* a reply line is not ``ddd[ -]text``;
* the server was still busy :data:`SESSION_LIMIT` seconds after the input ended (a hang);
* a ``250 ... queued as ID`` whose message is not in the spool, or whose stored copy would
  fail the header checks (nothing accepted is lost, nothing refused is stored).

Not for concurrency or timing: the live replay in :mod:`fuzz.live` covers those.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

from chroot_helper.services.mail.config import parse_config
from chroot_helper.services.mail.policy import check_headers
from chroot_helper.services.mail.server import MailService, _Submission

from . import SCRATCH_ENV, SCRATCH_PARENT

__all__ = ["SESSION_LIMIT", "SmtpTarget", "test_one_input"]

SESSION_LIMIT = 5.0
"""Seconds the server may stay busy after the last input byte (libFuzzer's -timeout is lower)."""

_REPLY = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*")
_QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]{20})")


class MemoryTransport(asyncio.Transport):
    """A transport that keeps what the server writes and closes like a socket transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(extra={"peername": ("127.0.0.1", 40000), "socket": None})
        self.loop = loop
        self.written = bytearray()
        self.protocol: asyncio.Protocol | None = None
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closing

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _Tracebacks(logging.Handler):
    """Collects log records that carry an exception (a catch-all fired somewhere)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class SmtpTarget:
    """A mail service without listeners, on its own loop and temporary spool.

    :param spool_parent: where the temporary spool goes (``/dev/shm`` keeps fsync cheap).
    """

    def __init__(self, spool_parent: str | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="chrootwsgi-fuzz-smtp-", dir=spool_parent))
        config = parse_config(
            {
                "listen": ["127.0.0.1:0"],
                "spool": str(self.base / "spool"),
                "domain": "example.org",
                "max_size": "64K",
                "max_recipients": 5,
            }
        )
        self.loop = asyncio.new_event_loop()
        self.service = MailService(config)
        self.service.on_commit = lambda _queue_id: None  # no queue runner: keep it in the spool
        self.service.spool.open()
        self.tracebacks = _Tracebacks()
        for name in ("mail.log", "chroot_helper", "asyncio"):
            logging.getLogger(name).addHandler(self.tracebacks)
        self.queued = 0

    async def _session(self, data: bytes) -> bytes:
        transport = MemoryTransport(self.loop)
        protocol = self.service.submission_protocol()
        transport.protocol = protocol
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)
        await self._until_idle(protocol, transport)
        if not transport.closing:  # the client hangs up: EOF, then the socket closes
            protocol.eof_received()
            transport.close()
        task: Any = protocol._handler_coroutine
        deadline = self.loop.time() + SESSION_LIMIT
        while task is not None and not task.done() and self.loop.time() < deadline:
            await asyncio.sleep(0.001)
        if task is not None and not task.done():
            raise AssertionError(f"SMTP session still running {SESSION_LIMIT} s after its end")
        await asyncio.sleep(0)
        return bytes(transport.written)

    async def _until_idle(self, protocol: _Submission, transport: MemoryTransport) -> None:
        """Run until the server waits for more input (the rest of a line, or a new one), or has
        closed."""
        reader: Any = protocol._stream_reader  # type: ignore[attr-defined]
        deadline = self.loop.time() + SESSION_LIMIT
        spins = 0
        while not transport.closing:
            task = protocol._handler_coroutine
            if task is None or task.done():
                return
            if reader._waiter is not None:  # it needs bytes the input does not have
                return
            if self.loop.time() > deadline:
                raise AssertionError(f"SMTP server busy for {SESSION_LIMIT} s on one input")
            spins += 1
            await asyncio.sleep(0 if spins < 1000 else 0.001)

    def run(self, data: bytes) -> None:
        """Play *data* as one client's bytes and check what the server promised."""
        self.tracebacks.records.clear()
        written = self.loop.run_until_complete(self._session(data))
        if self.tracebacks.records:
            record = self.tracebacks.records[0]
            trace = "".join(traceback.format_exception(*record.exc_info))  # type: ignore[misc]
            raise AssertionError(f"exception logged: {record.getMessage()}\n{trace}")
        lines = written.split(b"\r\n")
        if lines[-1]:
            raise AssertionError(f"reply not ended by CRLF: {lines[-1]!r}")
        for line in lines[:-1]:
            if not _REPLY.fullmatch(line):
                raise AssertionError(f"malformed reply line {line!r}")
            if line.startswith(b"500 Error: (") or line.startswith(b"500 Error: Cannot"):
                raise AssertionError(f"exception reached aiosmtpd's catch-all: {line!r}")
        for match in _QUEUED.finditer(written):
            self._check_queued(match.group(1).decode())

    def _check_queued(self, queue_id: str) -> None:
        spool = self.service.spool
        envelope, message = spool.read(queue_id)  # FileNotFoundError: an acked message is lost
        if not envelope.recipients or not message.startswith(b"Received: "):
            raise AssertionError(f"queued {queue_id} has a broken envelope or header: {envelope}")
        stored = message.split(b"\r\n", 3)[3]  # after our three-line Received: header
        reply = check_headers(stored)
        if reply is not None:
            raise AssertionError(f"queued {queue_id} fails the header check: {reply}")
        spool.remove(queue_id)
        self.queued += 1

    def close(self) -> None:
        """Stop the loop's helpers and remove the spool."""
        for name in ("mail.log", "chroot_helper", "asyncio"):
            logging.getLogger(name).removeHandler(self.tracebacks)
        self.service._writers.shutdown(wait=True)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        shutil.rmtree(self.base, ignore_errors=True)


_target: SmtpTarget | None = None


def test_one_input(data: bytes) -> None:
    """libFuzzer entry point: one session on the process-wide :class:`SmtpTarget`."""
    global _target
    if _target is None:
        _target = SmtpTarget(spool_parent=os.environ.get(SCRATCH_ENV) or SCRATCH_PARENT)
        atexit.register(_target.close)
    _target.run(data)

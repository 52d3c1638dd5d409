"""The queue runner: delivers queued messages, retries with exponential backoff, bounces.

One asyncio task keeps a schedule (queue ID -> UNIX time of the next attempt) and starts up to
``mail.concurrency`` attempts at once.  After each attempt the per-recipient outcome is saved
in ``state/ID``; a message leaves the queue only when every recipient is finished (sent, or
bounced).  A message that is still deferred ``mail.max_age`` after arrival is given up: its
sender gets a non-delivery report (``mail.bounce``), which is itself queued durably.

Log lines follow Postfix, one per recipient and attempt::

    0005F2A1C3D4E5A1B2C3: to=<a@example.org>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.12,
        tries=1, dsn=2.0.0, status=sent (250 OK)
    0005F2A1C3D4E5A1B2C3: removed
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import heapq
import logging
import time
from collections.abc import Sequence

from ...errors import SpoolError
from .config import MailConfig
from .delivery import RecipientResult, Transport
from .spool import DirectorySync, Envelope, Spool, new_queue_id
from .stats import Counters

__all__ = ["QueueRunner", "make_bounce"]

log = logging.getLogger(__name__)

HELD = float("inf")
"""Schedule time of messages that are not tried (no relay configured)."""

ADOPT_INTERVAL = 60.0
"""Seconds between scans of ``queue/`` for files the runner does not know."""

CLOSE_GRACE = 10.0
"""Seconds :meth:`QueueRunner.close` lets deliveries in flight finish before cancelling them."""


def make_bounce(
    *,
    envelope: Envelope,
    failures: Sequence[RecipientResult],
    hostname: str,
    original: bytes,
    now: float,
) -> bytes:
    """A plain-text non-delivery report to the original sender, quoting the original headers.

    The message body is not quoted: it may be large, and it is the sender's own.
    """
    header_end = original.find(b"\r\n\r\n")
    headers = original[: header_end if header_end >= 0 else min(len(original), 8192)][:8192]
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: <{envelope.id}.bounce@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for failure in failures:
        lines.append(f"<{failure.recipient}>: {failure.dsn} {failure.reply}")
    lines += ["", f"Queue ID: {envelope.id}", "", "--- Headers of the original message ---", ""]
    text = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return text + headers + b"\r\n"


class QueueRunner:
    """Delivers what is in the spool through ``transport``.

    :param config: the validated settings (retry, age and concurrency limits).
    :param spool: the opened spool.
    :param sync: the spool's group-commit helper (bounces are committed through it).
    :param transport: the relay, or ``None`` to keep messages queued with an error.
    :param counters: shared with the submission server.
    """

    def __init__(
        self,
        config: MailConfig,
        spool: Spool,
        sync: DirectorySync,
        transport: Transport | None,
        counters: Counters,
    ) -> None:
        self.config = config
        self.spool = spool
        self.sync = sync
        self.transport = transport
        self.counters = counters
        self.schedule: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (when, id); entries not in schedule are stale
        self.active: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Schedule everything already queued (after a restart: now) and start the loop."""
        ids = await asyncio.to_thread(lambda: list(self.spool.ids()))
        for queue_id in ids:
            self.enqueue(queue_id)
        if ids:
            log.info("queue runner: %d message(s) in the queue at start", len(ids))
        if self.transport is None:
            log.warning("queue runner: no relay configured (mail.relay): messages stay queued")
        self._task = asyncio.get_running_loop().create_task(self._run())

    def enqueue(self, queue_id: str) -> None:
        """A message was just committed: try it now (or hold it when there is no relay)."""
        if self.transport is None:
            self.schedule[queue_id] = HELD
        else:
            self._set(queue_id, 0.0)
            self._wake.set()

    def _set(self, queue_id: str, when: float) -> None:
        self.schedule[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))

    def flush(self) -> int:
        """Retry every deferred message now; returns how many were scheduled."""
        for queue_id in list(self.schedule):
            self.enqueue(queue_id)
        return len(self.schedule)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts."""
        exponent = min(max(attempts - 1, 0), 30)
        return float(min(self.config.retry_initial * (2**exponent), self.config.retry_max))

    async def _run(self) -> None:
        next_flush_check = 0.0
        next_adopt = time.monotonic() + ADOPT_INTERVAL
        while True:
            now = time.time()
            if time.monotonic() >= next_flush_check:
                next_flush_check = time.monotonic() + self.config.flush_check
                if self.spool.take_flush_request():
                    await self._adopt_new_files()
                    log.info("queue runner: flush requested; retrying %d message(s)", self.flush())
                elif time.monotonic() >= next_adopt:
                    next_adopt = time.monotonic() + ADOPT_INTERVAL
                    await self._adopt_new_files()
            heap = self._heap
            while heap and len(self.active) < self.config.concurrency:
                when, queue_id = heap[0]
                if self.schedule.get(queue_id) != when or queue_id in self.active:
                    heapq.heappop(heap)  # stale: rescheduled, finished, or being tried
                    continue
                if when > now:
                    break
                heapq.heappop(heap)
                task = asyncio.get_running_loop().create_task(self._attempt(queue_id))
                self.active[queue_id] = task
                task.add_done_callback(functools.partial(self._finished, queue_id))
            timeout = self.config.flush_check
            if heap and len(self.active) < self.config.concurrency:
                timeout = min(timeout, max(heap[0][0] - now, 0.0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.01)):
                    await self._wake.wait()

    async def _adopt_new_files(self) -> None:
        """Pick up queue files this process does not know: put back by an operator, or
        committed by a worker that could not tell us."""
        ids = await asyncio.to_thread(lambda: list(self.spool.ids()))
        for queue_id in ids:
            if queue_id not in self.schedule:
                log.info("%s: found in the queue directory; queued", queue_id)
                self.enqueue(queue_id)

    def _finished(self, queue_id: str, _task: asyncio.Task[None]) -> None:
        self.active.pop(queue_id, None)
        self._wake.set()

    async def _attempt(self, queue_id: str) -> None:
        try:
            await self._deliver(queue_id)
        except asyncio.CancelledError:
            raise
        except FileNotFoundError:
            self.schedule.pop(queue_id, None)
        except SpoolError as exc:
            log.error("%s: %s", queue_id, exc)
            self.schedule.pop(queue_id, None)
        except Exception:
            log.exception("%s: delivery attempt failed; retrying later", queue_id)
            self._set(queue_id, time.time() + self.config.retry_initial)

    async def _deliver(self, queue_id: str) -> None:
        envelope, data = await asyncio.to_thread(self.spool.read, queue_id)
        state = await asyncio.to_thread(self.spool.load_state, queue_id)
        pending = [r for r in envelope.recipients if r not in state.done]
        started = time.time()
        if not pending:
            await self._remove(queue_id)
            return
        if self.transport is None:
            return  # held: no relay configured
        results = await self.transport.deliver(envelope, pending, data)
        relay = self.transport.description
        self.counters.attempts += 1
        state.attempts += 1
        now = time.time()
        give_up = now - envelope.arrival >= self.config.max_age
        failures: list[RecipientResult] = []
        deferred: list[RecipientResult] = []
        for result in results:
            if result.ok:
                status = "sent"
                state.done[result.recipient] = "sent"
                self.counters.delivered += 1
            elif result.permanent or give_up:
                status = "bounced"
                state.done[result.recipient] = "bounced"
                failures.append(result)
                self.counters.bounced += 1
            else:
                status = "deferred"
                deferred.append(result)
                self.counters.deferred += 1
            log.info(
                "%s: to=<%s>, relay=%s, delay=%.2f, attempt=%.2f, tries=%d, dsn=%s, status=%s (%s)",
                queue_id,
                result.recipient,
                relay,
                now - envelope.arrival,
                now - started,
                state.attempts,
                result.dsn,
                status,
                result.reply if status != "deferred" or not give_up else "gave up",
            )
        if failures:
            await self._bounce(envelope, failures, data)
        if not deferred:
            await self._remove(queue_id)
            return
        state.last_error = deferred[0].reply
        state.next_attempt = now + self.backoff(state.attempts)
        await asyncio.to_thread(self.spool.save_state, queue_id, state)
        if queue_id in self.schedule:
            self._set(queue_id, state.next_attempt)

    async def _remove(self, queue_id: str) -> None:
        await asyncio.to_thread(self.spool.remove, queue_id)
        self.schedule.pop(queue_id, None)
        log.info("%s: removed", queue_id)

    async def _bounce(
        self, envelope: Envelope, failures: list[RecipientResult], data: bytes
    ) -> None:
        if not envelope.sender:
            log.warning(
                "%s: undeliverable bounce (null sender) dropped after logging: %s",
                envelope.id,
                "; ".join(f"<{f.recipient}> {f.reply}" for f in failures),
            )
            return
        if not self.config.bounce:
            log.warning(
                "%s: sender=<%s> not notified (mail.bounce = false)", envelope.id, envelope.sender
            )
            return
        now = time.time()
        body = make_bounce(
            envelope=envelope,
            failures=failures,
            hostname=self.config.hostname,
            original=data,
            now=now,
        )
        bounce = Envelope(
            id=new_queue_id(),
            sender="",
            recipients=(envelope.sender,),
            arrival=now,
            client="bounce",
            smtputf8=envelope.smtputf8,
            eightbit=True,
            size=len(body),
        )
        await asyncio.to_thread(self.spool.write, bounce, body)
        await self.sync.sync(self.sync.renamed())
        log.info(
            "%s: sender non-delivery notification: %s (to=<%s>)",
            envelope.id,
            bounce.id,
            envelope.sender,
        )
        self.enqueue(bounce.id)

    async def close(self) -> None:
        """Stop starting attempts; let those in flight finish (up to :data:`CLOSE_GRACE`)."""
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        active = list(self.active.values())
        if active:
            _done, pending = await asyncio.wait(active, timeout=CLOSE_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

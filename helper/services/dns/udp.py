"""The stub's UDP listener: datagrams in, replies out, the resolver deciding.

Two ways to read the socket, one job each:

* :class:`SelectorListener` reads it from the running loop's selector, up to :data:`MAX_BATCH`
  datagrams per wakeup (no transport, no callback per datagram);
* :class:`ThreadListener` reads it with blocking ``recvfrom`` in a thread of its own, so a
  query wakes that thread directly instead of the loop's ``epoll_wait``.  Only replays of
  rendered replies (:meth:`AnswerCache.replay`) are answered in the thread; every other
  datagram is handed to the loop.  Capabilities are per thread on Linux, so a process that
  drops them after binding (``chroot-helper serve``) must not use it: the thread would keep
  them.  The standalone runner, which drops nothing, uses it.

Either way a query is first offered to the cache's replay of a reply rendered for the same
bytes, then to the resolver's synchronous fast path; junk the header alone condemns is dropped
or answered FORMERR at once, and the rest becomes a slow-path task unless too many are pending.
Replies are sent with ``MSG_DONTWAIT``; one the kernel cannot take at once is dropped (counted),
as a datagram would be on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

from .resolver import Resolver

__all__ = [
    "MAX_BATCH",
    "MAX_HANDOVER_BYTES",
    "MAX_PENDING_QUERIES",
    "SelectorListener",
    "ThreadListener",
]

log = logging.getLogger(__name__)

MAX_PENDING_QUERIES = 2048
"""Slow-path UDP queries in progress at once; beyond this new ones are dropped (counted)."""

MAX_BATCH = 64
"""Datagrams read per wakeup of :class:`SelectorListener` before the loop runs other callbacks."""

MAX_HANDOVER_BYTES = 1 << 20
"""Bytes of datagrams :class:`ThreadListener` may have handed to the loop and not yet seen
taken; past it, new ones are dropped (counted)."""

HANDOVER_OVERHEAD = 256
"""Bytes counted per handed-over datagram on top of its size (the callback and its objects)."""

MAX_DATAGRAM = 65535
"""Size of the receive buffer: every UDP datagram fits whole."""

Address = tuple[str | int, ...]


class SelectorListener:
    """Reads ``sock`` from the running loop's selector.

    :param sock: the bound UDP socket; the listener owns and closes it.
    :param resolver: answers the queries and holds the counters.
    :param tasks: where slow-path tasks are kept while they run (cancelled by the service).
    """

    def __init__(
        self, sock: socket.socket, resolver: Resolver, tasks: set[asyncio.Task[None]]
    ) -> None:
        self.sock = sock
        self.resolver = resolver
        self.tasks = tasks
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.replayed = 0
        """Queries answered by :meth:`AnswerCache.replay` (not in the resolver's counters)."""
        self.dropped = 0
        """Datagrams the reading side dropped (not in the resolver's counters): replays the
        kernel did not take and, in :class:`ThreadListener`, queries past the handover bound."""
        self._buffer = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buffer)

    def start(self) -> None:
        """Start reading; call in the running loop."""
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read_ready)

    def close(self) -> None:
        """Stop reading and close the socket; call in the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def _read_ready(self) -> None:
        replay = self.resolver.cache.replay
        recv_into = self.sock.recvfrom_into
        buffer, view = self._buffer, self._view
        now = time.monotonic()
        replayed = 0
        try:
            for _ in range(MAX_BATCH):
                try:
                    size, addr = recv_into(buffer)
                except (BlockingIOError, InterruptedError):
                    break
                data = bytes(view[:size])
                reply = replay(data, now)
                if reply is not None:
                    replayed += 1
                    if not self._send(reply, addr):
                        self.dropped += 1
                else:
                    self.answer(data, addr)
        except OSError as exc:
            log.debug("udp listener: %s", exc)
        finally:
            self.replayed += replayed

    def answer(self, data: bytes, addr: Address) -> None:
        """Answer one datagram by the fast path, or start a slow-path task; in the loop."""
        resolver = self.resolver
        try:
            reply = resolver.answer_fast(data, addr, udp=True)
        except Exception:
            log.exception("%r: fast path failed; trying the slow path", addr)
            reply = None
        if reply is not None:
            self.send(reply, addr)
            return
        settled, reply = resolver.answer_junk(data, udp=True)
        if settled:
            if reply is not None:
                self.send(reply, addr)
            return
        if len(self.tasks) >= MAX_PENDING_QUERIES or resolver.crowded(data):
            resolver.drop(udp=True)
            return
        task = asyncio.get_running_loop().create_task(self._slow(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _slow(self, data: bytes, addr: Address) -> None:
        try:
            reply = await self.resolver.answer(data, addr, udp=True)
        except Exception:
            log.exception("%r: query failed", addr)
            return
        if reply is not None:
            self.send(reply, addr)

    def send(self, reply: bytes, addr: Address) -> None:
        """Send from the loop thread; a reply not sent is counted as dropped."""
        if not self._send(reply, addr):
            self.resolver.counters.dropped += 1

    def _send(self, reply: bytes, addr: Address) -> bool:
        """Send without blocking; ``False`` if the kernel did not take the reply."""
        try:
            self.sock.sendto(reply, socket.MSG_DONTWAIT, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if self.sock.fileno() >= 0:
                log.debug("%r: reply not sent: %s", addr, exc)
            return False
        return True


class ThreadListener(SelectorListener):
    """Reads ``sock`` with blocking calls in a thread; replays there, hands the rest to the loop.

    Same parameters as :class:`SelectorListener`.  The thread touches only the cache's replay
    (safe against the loop's changes, see :meth:`AnswerCache.replay`), the socket and its own
    counts (:attr:`replayed`, :attr:`dropped`, bytes handed over); only the loop thread changes
    the resolver's counters.  Datagrams handed to the loop and not yet taken are bounded by
    :data:`MAX_HANDOVER_BYTES`; past it they are dropped, as the kernel drops datagrams when
    the selector listener's socket buffer is full.
    """

    def __init__(
        self, sock: socket.socket, resolver: Resolver, tasks: set[asyncio.Task[None]]
    ) -> None:
        super().__init__(sock, resolver, tasks)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._handed_bytes = 0  # written by the thread only
        self._taken_bytes = 0  # written by the loop only

    def start(self) -> None:
        self.sock.setblocking(True)
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="dns-udp", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):  # ENOTCONN on UDP, but the reader wakes up
            self.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
        self.sock.close()

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        replay = self.resolver.cache.replay
        recv_into = self.sock.recvfrom_into
        buffer, view = self._buffer, self._view
        hand_over = loop.call_soon_threadsafe
        monotonic = time.monotonic
        while True:
            try:
                size, addr = recv_into(buffer)
            except OSError as exc:
                if self._stopping or self.sock.fileno() < 0:
                    return
                log.debug("udp listener: %s", exc)
                continue
            if self._stopping:
                return
            data = bytes(view[:size])
            try:
                reply = replay(data, monotonic())
            except Exception:
                log.exception("%r: replay failed; trying the fast path", addr)
                reply = None
            if reply is not None:
                self.replayed += 1
                if not self._send(reply, addr):
                    self.dropped += 1
                continue
            cost = size + HANDOVER_OVERHEAD
            if self._handed_bytes - self._taken_bytes + cost > MAX_HANDOVER_BYTES:
                self.dropped += 1
                continue
            self._handed_bytes += cost
            try:
                hand_over(self._take, data, addr, cost)
            except RuntimeError:  # the loop is closed: shutting down
                return

    def _take(self, data: bytes, addr: Address, cost: int) -> None:
        self._taken_bytes += cost
        self.answer(data, addr)

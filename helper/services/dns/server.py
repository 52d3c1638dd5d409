"""UDP and TCP listeners of the DNS stub, in the running asyncio loop.

:func:`start` binds both listeners (so a taken address fails at start, with a message saying
what to change) and returns a :class:`DnsService`.  UDP is read by a listener of :mod:`.udp`
(from the loop's selector, or in a thread of its own for the standalone runner).  TCP
connections may send several length-prefixed queries; each gets ``tcp_idle_timeout`` to arrive.

With ``workers > 1`` the sockets set ``SO_REUSEPORT`` so that several processes (see
``python -m chroot_helper.services.dns``) share the address and the kernel spreads queries
between them.  Each process keeps its own cache.

Example::

    service = await start(parse_config({"listen": "127.0.0.53:53", "upstreams": ["10.0.0.1"]}))
    ...
    print(format_stats(service.stats()))
    await service.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import socket
import struct
import time

from ...errors import ListenError
from .config import DnsConfig
from .resolver import Resolver
from .stats import Counters, DnsStats, format_stats
from .udp import SelectorListener, ThreadListener

__all__ = ["DnsService", "start"]

log = logging.getLogger(__name__)

UDP_RECEIVE_BUFFER = 4 << 20
"""Bytes the kernel may queue for the UDP socket: about half a second of a 10,000/s flood, so a
stub that is briefly off the CPU does not lose real queries behind junk.  Above
``net.core.rmem_max`` only when the stub starts as root (``SO_RCVBUFFORCE``)."""


class DnsService:
    """A running DNS stub; made by :func:`start`.

    :param config: the validated settings.
    """

    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.resolver = Resolver(config, self.counters)
        self.tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._udp: SelectorListener | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._stats_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when ``listen`` asked for 0."""
        assert self._udp is not None
        sockname = self._udp.address
        return str(sockname[0]), int(sockname[1])

    def stats(self) -> DnsStats:
        """A snapshot of the counters."""
        counters = dataclasses.replace(self.counters)
        if self._udp is not None:
            replayed = self._udp.replayed
            counters.queries += replayed
            counters.udp_queries += replayed
            counters.cache_hits += replayed
            counters.dropped += self._udp.dropped
        return DnsStats.snapshot(
            counters,
            cache_entries=len(self.resolver.cache),
            uptime=time.monotonic() - self._started,
        )

    def flush(self) -> None:
        """Forget every cached answer and re-read the hosts file (``SIGHUP`` in the runner)."""
        self.resolver.cache.clear()
        self.resolver.hosts.refresh(force=True)
        log.info("dns cache flushed, hosts file re-read")

    def _socket(self, kind: socket.SocketKind, port: int) -> socket.socket:
        config = self.config
        family = socket.AF_INET6 if config.listen.is_ipv6 else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if config.workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.listen.host, port))
        except OSError as exc:
            sock.close()
            raise ListenError(_bind_message(config, exc)) from exc
        return sock

    async def _open(self, udp_thread: bool, cpu: int | None) -> None:
        loop = asyncio.get_running_loop()
        udp_sock = self._socket(socket.SOCK_DGRAM, self.config.listen.port)
        _grow_receive_buffer(udp_sock)
        if cpu is not None:
            # Linux 6.2+: among SO_REUSEPORT sockets, a datagram sent from this CPU comes here.
            udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_INCOMING_CPU, cpu)
        port = udp_sock.getsockname()[1]
        try:
            tcp_sock = self._socket(socket.SOCK_STREAM, port)
        except ListenError:
            udp_sock.close()
            raise
        listener = ThreadListener if udp_thread else SelectorListener
        self._udp = listener(udp_sock, self.resolver, self.tasks)
        self._udp.start()
        try:
            self._tcp = await asyncio.start_server(
                self._serve_tcp, sock=tcp_sock, backlog=self.config.max_tcp_clients
            )
        except BaseException:
            tcp_sock.close()
            self._udp.close()
            raise
        if self.config.stats_interval > 0:
            self._stats_task = loop.create_task(self._log_stats())

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval)
            log.info("dns stats: %s", format_stats(self.stats()))

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._tcp_writers) >= self.config.max_tcp_clients or self._closed:
            log.warning(
                "%r: too many TCP clients (dns.max_tcp_clients = %d); closing",
                peer,
                self.config.max_tcp_clients,
            )
            writer.close()
            return
        self._tcp_writers.add(writer)
        idle = self.config.tcp_idle_timeout
        resolver = self.resolver
        try:
            while True:
                async with asyncio.timeout(idle):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                reply = resolver.answer_fast(data, peer, udp=False)
                if reply is None:
                    reply = await resolver.answer(data, peer, udp=False)
                if reply is None:
                    break  # garbage or a response: do not keep talking to this peer
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("%r: TCP connection failed", peer)
        finally:
            self._tcp_writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Stop listening, finish nothing in flight, close every socket."""
        if self._closed:
            return
        self._closed = True
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_writers):
            writer.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.resolver.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        # Let transports run their connection_lost callbacks before the loop goes away.
        await asyncio.sleep(0)


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Ask for :data:`UDP_RECEIVE_BUFFER` (forced when allowed) and log what was granted."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_RECEIVE_BUFFER)
        except OSError:
            continue
        break
    # The kernel doubles the value for its bookkeeping; report what the queue may hold.
    size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    log.info("dns udp receive buffer: %d KiB", size >> 10)


def _bind_message(config: DnsConfig, exc: OSError) -> str:
    where = f"dns.listen = {str(config.listen)!r}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: address already in use (the host's own resolver?); choose another "
            "loopback address, e.g. '127.0.0.53:53', and point the jail's resolv.conf there"
        )
    if exc.errno == errno.EACCES:
        return f"{where}: ports below 1024 need root or CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no local interface has this address; use one on 'lo'"
    return f"{where}: cannot bind ({exc.strerror})"


async def start(
    config: DnsConfig, *, udp_thread: bool = False, cpu: int | None = None
) -> DnsService:
    """Bind UDP and TCP on ``config.listen`` in the running loop and start answering.

    :param udp_thread: read UDP in a thread of its own (:class:`~.udp.ThreadListener`); only
        for a process that does not drop capabilities later, since the thread would keep them.
    :param cpu: the CPU this worker is pinned to: queries sent from it are steered here
        (``SO_INCOMING_CPU``), so that they are answered without waking another CPU.
    :raises ListenError: the address cannot be bound; the message says what to change.
    """
    service = DnsService(config)
    await service._open(udp_thread, cpu)
    host, port = service.address
    log.info(
        "dns stub ready on %s port %d (udp+tcp), upstreams %s, hosts %s",
        host,
        port,
        ", ".join(str(u) for u in config.upstreams),
        config.hosts_file or "(none)",
    )
    return service

"""The chroot-helper daemon: sockets, peer checks, fd passing, limits and the event loop.

One process, one asyncio loop.  It listens on a Unix stream socket (normally inside the jail
directory, so the jailed app reaches it at a jail path) and optionally on a loopback TCP port.  Each
connection carries one request (see :mod:`chroot_helper.protocol`):

1. Unix peers are checked with ``SO_PEERCRED`` against ``allow_uids``/``allow_gids`` before a byte
is
   read; TCP requests must carry the token.
2. The request frame is read (within ``request_timeout``), with up to three fds beside it; a
   peer process may keep at most ``max_per_peer`` connections waiting at this step, and one uid
   (all its processes) at most ``max_idle_per_uid``.  A refused connection no longer counts
   against ``max_connections`` while it gets its error reply.
3. The connection counts against ``max_concurrent``, ``max_per_peer`` and ``max_per_uid``.
4. The request goes to the service method ``handle_<op>`` (see :class:`Service`), which talks to the
   client through a :class:`Channel`.
5. Whatever the handler raises becomes an Error frame; the daemon keeps serving everyone else.

Services plug in by subclassing :class:`Service`; :meth:`Service.start` and :meth:`Service.stop` are
where a service starts and stops listeners of its own (DNS, SMTP) on the same loop::

    class DnsService(Service):
        name = "dns"

        async def start(self) -> None:
            self.transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(...)

        async def stop(self) -> None:
            self.transport.close()

        async def handle_resolve(self, request: Request, channel: Channel) -> None:
            await channel.send(Response(result={"addresses": [...]}))

Do not import this module from a jailed app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import importlib
import logging
import os
import socket
import stat
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .config import HelperConfig
from .errors import (
    BusyError,
    ConfigError,
    HelperError,
    PeerRefusedError,
    ProtocolError,
    RemoteProtocolError,
    RequestError,
    error_code,
)
from .fdpass import ancillary_space, recv_into
from .privileges import drop_capabilities
from .protocol import (
    CLOSED,
    MAX_FDS,
    NEED_DATA,
    Connection,
    Error,
    Event,
    Request,
    Role,
)

__all__ = [
    "Peer",
    "Channel",
    "Service",
    "Handler",
    "HelperServer",
    "load_services",
    "serve",
    "wait_fd",
]

log = logging.getLogger(__name__)

_PEERCRED: Final = struct.Struct("3i")
#: Where every connection's reads land before they are copied out (one loop, one read at a time).
_RECV_BUFFER: Final = bytearray(256 * 1024)
_SNDBUF: Final = 2 << 20
_FD_SPACE: Final = ancillary_space(MAX_FDS)
#: Connections accepted in one go when the listener turns readable.
_ACCEPT_BATCH: Final = 64
LISTEN_BACKLOG: Final = 1024
"""Connections the kernel queues before the daemon accepts them (capped by
``net.core.somaxconn``): a burst of clients waits in the queue instead of failing to connect."""


@dataclass(frozen=True, kw_only=True)
class Peer:
    """Who is on the other end of a connection.

    :param transport: ``"unix"`` or ``"tcp"``.
    :param pid: the peer's pid (Unix only, from SO_PEERCRED).
    :param uid: the peer's uid (Unix only).
    :param gid: the peer's gid (Unix only).
    :param address: the TCP peer address, ``""`` on Unix.
    """

    transport: Literal["unix", "tcp"]
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    address: str = ""

    @property
    def key(self) -> str:
        """What ``max_per_peer`` counts by: the peer process, or the TCP client host (all TCP
        clients are local, and each connection has its own source port)."""
        if self.transport == "unix":
            return f"pid:{self.pid}"
        return "tcp:" + self.address.rsplit(":", 1)[0]

    @property
    def owner(self) -> str:
        """What ``max_per_uid`` and ``max_idle_per_uid`` count by: the peer uid (every process it
        runs), or the TCP client host."""
        if self.transport == "unix":
            return f"uid:{self.uid}"
        return "tcp host " + self.address.rsplit(":", 1)[0]

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"pid={self.pid} uid={self.uid} gid={self.gid}"
        return f"tcp {self.address}"


class Channel:
    """What a service handler sees of its connection.

    Handlers send events with :meth:`send`, read the client's further events (stdin data, signals)
    with :meth:`receive`, and own the descriptors they :meth:`take_fds`.
    """

    def __init__(
        self,
        conn: _ServerConnection,
        peer: Peer,
        fds: list[int],
        release: Callable[[], None] = lambda: None,
        resume: Callable[[bytes, list[int]], None] | None = None,
    ) -> None:
        self._conn = conn
        self.peer = peer
        self._fds = fds
        self._release = release
        self._resume = resume
        #: The handler called :meth:`keep`: the request outlives it.
        self.kept = False

    def release(self) -> None:
        """Stop counting this request against the concurrency limits now, before the handler
        returns (its work is over; see :meth:`Service.settle`)."""
        self._release()

    def keep(self) -> None:
        """Keep the connection open and the request counted after the handler returns, until
        :meth:`close` (the handler's work goes on elsewhere, e.g. in a process it handed the
        connection to)."""
        self.kept = True

    def close(self) -> None:
        """End a kept request: release it and close the connection."""
        self._release()
        _close_fds(self.take_fds())
        self._conn.sock.close()

    def serve_again(self, data: bytes, fds: list[int]) -> None:
        """End a kept request and serve the connection's next one, of which the process that had
        the connection read *data* and *fds* (the server owns them now)."""
        self._release()
        if self._resume is None:
            _close_fds(fds)
            self._conn.sock.close()
            return
        self._resume(data, fds)

    def send_now(self, event: Event) -> None:
        """Send a small final *event* without waiting; a client that does not take it at once
        loses it (for a kept request, whose handler has returned)."""
        with contextlib.suppress(OSError):
            self._conn.sock.send(self._conn.proto.send(event))

    def handoff_fd(self) -> int | None:
        """The connection's socket, for a handler that hands the rest of the exchange to another
        process (which gets a duplicate); None when the client has already sent more than the
        request, which the other process would miss."""
        if self._conn.proto.buffered:
            return None
        return self._conn.sock.fileno()

    def take_fds(self) -> list[int]:
        """Return the fds that came with the request; the caller must close them."""
        fds, self._fds = self._fds, []
        return fds

    async def send(self, event: Event) -> None:
        """Send *event* to the client (DATA, EXIT, RESPONSE or ERROR)."""
        await self._conn.send(event)

    async def receive(self) -> Event | None:
        """Return the client's next event, or None once it has closed its end.

        :raises RemoteProtocolError: the client sent something invalid.
        """
        event = await self._conn.next_event()
        return None if event is CLOSED else event  # type: ignore[return-value]


Handler = Callable[[Request, Channel], Awaitable[None]]


class Service:
    """Base class of the helper's services.

    A service defines ``async def handle_<op>(self, request, channel)`` methods; the server routes a
    REQUEST whose ``op`` is ``<op>`` there.  A handler ends the request by sending EXIT, RESPONSE or
    ERROR on the channel, or by raising :class:`~chroot_helper.errors.RequestError` (sent as ERROR).

    :meth:`start` runs once before the daemon accepts connections and :meth:`stop` once at shutdown;
    the default ones do nothing.
    """

    name = "service"
    #: Capabilities (numbers, see :mod:`chroot_helper.privileges`) this service needs after start
    #: when the daemon runs as root; every other capability is dropped.
    capabilities: frozenset[int] = frozenset()

    async def start(self) -> None:
        """Start listeners or background tasks of this service on the running loop."""

    async def stop(self) -> None:
        """Stop what :meth:`start` started."""

    def settle(self) -> None:
        """Without waiting, release (:meth:`Channel.release`) the requests whose work has already
        ended; the server calls this before it refuses a request as over a concurrency limit."""

    async def release_idle(self) -> None:
        """Give up the slots that idle kept connections hold (see :meth:`Channel.keep`); the
        server awaits this when a request still meets a limit after :meth:`settle`."""

    def handlers(self) -> dict[str, Handler]:
        """Return ``{op: bound handle_<op> method}``."""
        found: dict[str, Handler] = {}
        for attr in dir(self):
            if attr.startswith("handle_") and callable(getattr(self, attr)):
                found[attr.removeprefix("handle_")] = getattr(self, attr)
        return found


def load_services(config: HelperConfig) -> list[Service]:
    """Build the exec service and one service per ``[dns]``/``[mail]`` table present.

    A table ``[NAME]`` is served by module ``chroot_helper.services.NAME``, which must define
    ``create_service(config: HelperConfig, table: Mapping[str, object]) -> Service``; that function
    validates its table and raises :class:`~chroot_helper.errors.ConfigError`.
    """
    from .services.exec import ExecService

    services: list[Service] = [ExecService(config.commands, idle_timeout=config.request_timeout)]
    for name, table in config.service_tables.items():
        try:
            module = importlib.import_module(f"{__package__}.services.{name}")
        except ImportError as exc:
            raise ConfigError(
                f"[{name}] is configured but its service module chroot_helper.services.{name} "
                f"cannot be imported ({exc}); remove the [{name}] table or install that service"
            ) from None
        factory: Callable[[HelperConfig, Mapping[str, object]], Service] = module.create_service
        services.append(factory(config, table))
    return services


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_fd(fd: int, *, write: bool = False) -> None:
    """Wait until the non-blocking *fd* is readable (or writable) on the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    if write:
        loop.add_writer(fd, _wake, fut)
    else:
        loop.add_reader(fd, _wake, fut)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _ServerConnection:
    """One accepted socket: reads with recvmsg (collecting fds), writes under a lock."""

    def __init__(self, sock: socket.socket, *, accept_fds: bool) -> None:
        self.sock = sock
        self.proto = Connection(Role.SERVER)
        self.fds: list[int] = []
        self.accept_fds = accept_fds
        self._write_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()

    async def _read_more(self) -> None:
        while True:
            try:
                data, fds, flags = recv_into(
                    self.sock, _RECV_BUFFER, _FD_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await wait_fd(self.sock.fileno())
                continue
            except ConnectionResetError:
                data, fds, flags = b"", [], 0
            break
        if fds:
            if (
                not self.accept_fds
                or flags & socket.MSG_CTRUNC
                or len(self.fds) + len(fds) > MAX_FDS
            ):
                _close_fds(fds)
                raise RemoteProtocolError(
                    f"file descriptors are accepted only beside the request, at most {MAX_FDS}, "
                    "and only on the Unix socket"
                )
            self.fds.extend(fds)
        self.proto.receive_data(data)

    async def next_event(self) -> Event | object:
        while True:
            event = self.proto.next_event()
            if event is not NEED_DATA:
                return event
            await self._read_more()

    async def send(self, event: Event) -> None:
        frame = self.proto.send(event)
        async with self._write_lock:
            await self._loop.sock_sendall(self.sock, frame)


class HelperServer:
    """The daemon: listeners, the service registry and the limits.

    :param config: the validated configuration.
    :param services: the services to serve (see :func:`load_services`); two services may not
        handle the same op.
    """

    def __init__(self, config: HelperConfig, services: Sequence[Service]) -> None:
        self.config = config
        self.services = list(services)
        self.handlers: dict[str, Handler] = {}
        for service in self.services:
            for op, handler in service.handlers().items():
                if op in self.handlers:
                    raise ConfigError(f"two services handle op {op!r}; rename one handle_{op}")
                self.handlers[op] = handler
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0
        self._running: Counter[str] = Counter()  # requests by peer key and by peer owner
        self._connections = 0
        self._waiting: Counter[str] = Counter()  # connections that have not sent their request

    async def start(self) -> None:
        """Bind the sockets, start the services, and start accepting."""
        started: list[Service] = []
        try:
            self._listeners.append(self._bind_unix())
            if self.config.tcp is not None:
                self._listeners.append(self._bind_tcp(*self.config.tcp))
            for service in self.services:
                await service.start()
                started.append(service)
        except BaseException:
            for service in reversed(started):
                await service.stop()
            self._close_listeners()
            raise
        keep = frozenset().union(*(service.capabilities for service in self.services))
        try:
            drop_capabilities(keep)
        except BaseException:
            await self.close()
            raise
        for listener in self._listeners:
            self._listen(listener)
        log.info(
            "serving %s%s; ops: %s",
            self.config.socket,
            f" and tcp {self.config.tcp[0]}:{self.config.tcp[1]}" if self.config.tcp else "",
            ", ".join(sorted(self.handlers)),
        )

    async def close(self) -> None:
        """Stop accepting, end every connection (their commands are killed), stop the services."""
        self._close_listeners()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping service %s failed", service.name)
        log.info("stopped")

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.remove_reader(listener.fileno())
            if listener.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    if os.stat(self.config.socket).st_ino == os.fstat(listener.fileno()).st_ino:
                        os.unlink(self.config.socket)
            listener.close()
        self._listeners.clear()

    def _bind_unix(self) -> socket.socket:
        path = self.config.socket
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(
                    f"[helper] socket = {path!r} exists and is not a socket; remove it"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket left by a helper that died
            else:
                raise ConfigError(f"[helper] socket = {path!r} is in use by another running helper")
            finally:
                probe.close()
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"[helper] socket = {path!r}: cannot bind ({exc.strerror})") from None
        finally:
            os.umask(old_umask)
        if self.config.socket_uid is not None or self.config.socket_gid is not None:
            uid = -1 if self.config.socket_uid is None else self.config.socket_uid
            gid = -1 if self.config.socket_gid is None else self.config.socket_gid
            os.chown(path, uid, gid)
        os.chmod(path, self.config.socket_mode)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"[helper] tcp = {host}:{port}: cannot bind ({exc.strerror})"
            ) from None
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listen(self, listener: socket.socket) -> None:
        """Accept on *listener* whenever it is readable (one registration for its whole life)."""
        if listener.fileno() >= 0:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def _accept(self, listener: socket.socket) -> None:
        """Accept every connection waiting (at most :data:`_ACCEPT_BATCH`), each in a task."""
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(0.1, self._listen, listener)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # room for a few DATA frames in flight
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            self._spawn(self._serve_connection(sock, address))

    def _peer_of(self, sock: socket.socket, address: object) -> Peer:
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            return Peer(transport="unix", pid=pid, uid=uid, gid=gid)
        host, port = address[:2]  # type: ignore[index]  # AF_INET/AF_INET6 addresses are tuples
        return Peer(transport="tcp", address=f"{host}:{port}")

    def _check_peer(self, peer: Peer) -> None:
        if peer.transport != "unix":
            return
        if peer.uid in self.config.allow_uids or peer.gid in self.config.allow_gids:
            return
        raise PeerRefusedError(
            f"peer uid {peer.uid} gid {peer.gid} is not allowed; "
            "add it to [helper] allow_uids or allow_gids if it should be"
        )

    def _check_token(self, peer: Peer, request: Request) -> None:
        if peer.transport != "tcp":
            return
        expected = self.config.token or ""
        if not request.token or not hmac.compare_digest(request.token.encode(), expected.encode()):
            raise PeerRefusedError("wrong or missing token on the TCP listener")

    async def _take_slot(self, peer: Peer) -> Callable[[], None]:
        """Count a request of *peer* against the concurrency limits; return what releases it
        (once, however often it is called).

        :raises BusyError: a limit is reached, even after the services settled.
        """
        running = self._running
        keys = (peer.key, peer.owner)
        if self._busy(peer):
            for service in self.services:
                service.settle()
            if self._busy(peer):
                for service in self.services:
                    await service.release_idle()
            reason = self._busy(peer)
            if reason:
                raise BusyError(f"{reason}; retry later")
        self._active += 1
        running.update(keys)
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._active -= 1
                running.subtract(keys)
                for key in keys:
                    if not running[key]:
                        del running[key]

        return release

    def _busy(self, peer: Peer) -> str:
        """Why a new request of *peer* must wait (which limit it meets), or ``""``."""
        config = self.config
        if self._active >= config.max_concurrent:
            return (
                f"{self._active} requests are running, the limit [helper] max_concurrent = "
                f"{config.max_concurrent}"
            )
        if self._running[peer.key] >= config.max_per_peer:
            return (
                f"this peer already runs {self._running[peer.key]} requests, the limit "
                f"[helper] max_per_peer = {config.max_per_peer}"
            )
        if self._running[peer.owner] >= config.max_per_uid:
            return (
                f"{peer.owner} already runs {self._running[peer.owner]} requests, the limit "
                f"[helper] max_per_uid = {config.max_per_uid}"
            )
        return ""

    def _check_idle(self, peer: Peer) -> None:
        """Idle connections count per process and per uid, so no peer fills max_connections."""
        if self._waiting[peer.key] >= self.config.max_per_peer:
            raise BusyError(
                f"this peer has {self._waiting[peer.key]} connections without a request, "
                f"the limit [helper] max_per_peer = {self.config.max_per_peer}; retry later"
            )
        if self._waiting[peer.owner] >= self.config.max_idle_per_uid:
            raise BusyError(
                f"{peer.owner} has {self._waiting[peer.owner]} connections without a request, "
                f"the limit [helper] max_idle_per_uid = {self.config.max_idle_per_uid}; "
                "retry later"
            )

    async def _read_request(self, conn: _ServerConnection, peer: Peer) -> Event | object:
        self._check_idle(peer)
        keys = (peer.key, peer.owner)
        self._waiting.update(keys)
        try:
            async with asyncio.timeout(self.config.request_timeout):
                return await conn.next_event()
        except TimeoutError:
            raise RemoteProtocolError(
                f"no request within [helper] request_timeout = {self.config.request_timeout} s"
            ) from None
        finally:
            self._waiting.subtract(keys)
            for key in keys:
                if not self._waiting[key]:
                    del self._waiting[key]

    async def _serve_connection(
        self,
        sock: socket.socket,
        address: object,
        initial: tuple[bytes, list[int]] | None = None,
    ) -> None:
        """Serve the connection's request; *initial* is what another process read of it."""
        conn: _ServerConnection | None = None
        peer: Peer | None = None
        channel: Channel | None = None
        self._connections += 1
        counted = True

        def release_connection() -> None:  # before an error reply: a refused client holds no slot
            nonlocal counted
            if counted:
                self._connections -= 1
                counted = False

        try:
            conn = _ServerConnection(sock, accept_fds=sock.family == socket.AF_UNIX)
            if initial is not None:
                data, conn.fds = initial
                conn.proto.receive_data(data)
            peer = self._peer_of(sock, address)
            if self._connections > self.config.max_connections:
                raise BusyError(
                    f"{self._connections - 1} connections are open, the limit "
                    f"[helper] max_connections = {self.config.max_connections}; retry later"
                )
            self._check_peer(peer)
            event = await self._read_request(conn, peer)
            if event is CLOSED:
                return
            assert isinstance(event, Request)  # the protocol allows nothing else first
            conn.accept_fds = False  # descriptors travel with the request frame only
            self._check_token(peer, event)
            if len(conn.fds) != event.fds:
                raise RemoteProtocolError(
                    f"the request announced {event.fds} fds but {len(conn.fds)} arrived"
                )
            handler = self.handlers.get(event.op)
            if handler is None:
                raise RequestError(
                    f"unknown op {event.op!r}; this helper serves: "
                    f"{', '.join(sorted(self.handlers))}"
                )
            log.debug("%s: request %s", peer, event.op)
            release = await self._take_slot(peer)
            fds, conn.fds = conn.fds, []

            def resume(data: bytes, fds: list[int]) -> None:
                self._spawn(self._serve_connection(sock, address, initial=(data, fds)))

            channel = Channel(conn, peer, fds, release, resume)
            try:
                await handler(event, channel)
            finally:
                if not channel.kept:
                    release()
                    _close_fds(channel.take_fds())
        except HelperError as exc:
            level = (
                logging.WARNING if isinstance(exc, RequestError | ProtocolError) else logging.ERROR
            )
            log.log(level, "%s: %s", peer or "peer", exc)
            release_connection()
            await self._send_error(conn, error_code(exc), str(exc))
        except (ConnectionError, BrokenPipeError) as exc:
            log.info("%s: connection lost (%s)", peer or "peer", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: internal error", peer or "peer")
            release_connection()
            await self._send_error(conn, "request", "internal error in chroot-helper; see its log")
        finally:
            release_connection()
            if conn is not None:
                _close_fds(conn.fds)
            if channel is None or not channel.kept:
                sock.close()

    @staticmethod
    async def _send_error(conn: _ServerConnection | None, code: str, message: str) -> None:
        if conn is None:
            return
        _close_fds(conn.fds)  # before the reply, so the client sees them closed once it has it
        conn.fds = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.send(Error(code=code, message=message)), 1.0)
            # Let the client read the error before the close: a close with unread bytes would
            # turn into a reset on its side.  Drain what it still sends, for a moment.
            conn.sock.shutdown(socket.SHUT_WR)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(1.0):
                while await loop.sock_recv(conn.sock, 65536):
                    pass


async def serve(
    config: HelperConfig,
    services: Sequence[Service],
    stop: asyncio.Event,
    *,
    ready: Callable[[], None] | None = None,
) -> None:
    """Run a :class:`HelperServer` until *stop* is set; call *ready* once it accepts connections."""
    server = HelperServer(config, services)
    await server.start()
    # What exists now lives as long as the daemon: keep it out of the collector's full passes,
    # which would otherwise walk it all every few hundred requests.
    gc.freeze()
    try:
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        await server.close()

"""The submission server: aiosmtpd on loopback TCP and Unix sockets, in the running loop.

:func:`start` opens the spool, binds every ``mail.listen`` address (a taken address fails at
start with a message saying what to change), starts the queue runner and returns a
:class:`MailService`.  aiosmtpd parses SMTP (DATA and address parsing overridden for speed in
:mod:`.protocol`); the handler here applies :mod:`.policy` and answers ``250`` to DATA only
after the message is durably in the spool.

ESMTP extensions offered: SIZE, 8BITMIME, SMTPUTF8, PIPELINING.  Clients on a Unix socket are
identified by uid (``SO_PEERCRED``), TCP clients by address; ``mail.rate_limit`` counts per
client.  ``mail.max_per_client`` caps the connections of one uid (on loopback TCP too, where the
kernel names the owner of the client's socket, see :mod:`chroot_helper.peercred`), so one app
holding idle connections cannot use up ``mail.max_connections`` for the others; a silent client
is dropped after ``mail.smtp_timeout``.

Example::

    service = await start(parse_config({"listen": ["127.0.0.1:2525"], "domain": "example.org",
                                        "relay": "smtp://127.0.0.1:2526"}))
    ...
    print(format_stats(service.stats()))
    await service.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import errno
import functools
import logging
import os
import re
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import AnyStr, cast

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from ...errors import MailListenError, SpoolError, SubmitError
from ...peercred import loopback_peer_uid
from .client import exit_code_for
from .config import MailConfig, TcpAddress, UnixAddress
from .delivery import make_transport
from .policy import (
    REPLY_RATE_LIMIT,
    REPLY_SENDER_DENIED,
    REPLY_TOO_MANY_RECIPIENTS,
    RateLimiter,
    check_address,
    check_headers,
)
from .protocol import FastSMTP
from .runner import QueueRunner
from .sendmail_cli import (
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_USAGE,
    DataError,
    UsageError,
    build_submission,
)
from .sendmail_cli import parse_args as parse_sendmail_args
from .spool import DirectorySync, Envelope, Spool, new_queue_id
from .stats import Counters, MailStats, format_stats

__all__ = ["MailService", "bind_listeners", "start"]

log = logging.getLogger(__name__)

IDENT = "chroot-helper"
SPOOL_WRITERS = 32
"""Threads writing and fsyncing queue files; more concurrent submissions wait for one."""
INLINE_WRITE = 256 * 1024
"""Messages up to this size are written to the page cache by the event loop itself."""
REPLY_TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections; try again later\r\n"
REPLY_TOO_MANY_FROM_CLIENT = b"421 4.7.0 Too many connections from you; try again later\r\n"
REPLY_SPOOL_ERROR = "451 4.3.0 Error: queue file write error; try again later"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

JUNK_COMMAND_LIMIT = 100
"""Commands that move no mail (NOOP, RSET, VRFY, HELP) a connection may send since its last
accepted message; each restarts ``mail.smtp_timeout``, so without a limit they would hold an
idle connection open for ever (Postfix's ``smtpd_junk_command_limit`` is also 100)."""
REPLY_TOO_MANY_JUNK = "421 4.7.0 Too many commands without mail; closing the connection"


def _counted_as_junk(name: str) -> Callable[..., Awaitable[None]]:
    """aiosmtpd's ``smtp_NAME``, first counted against :data:`JUNK_COMMAND_LIMIT`."""
    original = getattr(FastSMTP, name)

    @functools.wraps(original)  # keeps aiosmtpd's syntax attributes (used by HELP)
    async def command(self: _Submission, arg: str) -> None:
        self.junk += 1
        if self.junk > JUNK_COMMAND_LIMIT:
            log.warning("%s: %d commands without mail; closing", self.client, JUNK_COMMAND_LIMIT)
            await self.push(REPLY_TOO_MANY_JUNK)
            assert self._handler_coroutine is not None and self.transport is not None
            self._handler_coroutine.cancel()  # as aiosmtpd's QUIT ends a session
            self.transport.close()
            return
        await original(self, arg)

    return command


NULL_SENDER = "<>"
"""How aiosmtpd gives ``MAIL FROM:<>``; :meth:`MailService.commit` queues it as ``""``."""


def _check_sender(config: MailConfig, address: str, *, smtputf8: bool) -> str | None:
    """The reply refusing envelope sender *address*, or ``None``.  The null sender (``<>``, used
    by auto-replies and delivery reports so that nobody answers them; ``""`` once queued) is
    always accepted (RFC 5321, 4.5.5); this service never bounces a message that has it."""
    if address in ("", NULL_SENDER):
        return None
    reply = check_address(address, smtputf8=smtputf8)
    if reply is None and not config.sender_allowed(address):
        reply = REPLY_SENDER_DENIED
    return reply


def _sanitize(text: str, limit: int = 64) -> str:
    """Client-chosen text made safe for a header or a log line."""
    return _UNSAFE.sub("?", text)[:limit]


class _Refuse(asyncio.Protocol):
    """Answers 421 and hangs up (over ``mail.max_connections``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(REPLY_TOO_MANY_CONNECTIONS)
        transport.close()


class _Submission(FastSMTP):
    """aiosmtpd's protocol (see :mod:`.protocol`), counting connections and naming the client."""

    def __init__(self, service: MailService, **kwargs: object) -> None:
        super().__init__(service.handler, **kwargs)
        self.service = service
        self.client = "unknown"
        self.rate_key: object = None
        self.owner: object = None
        self.refused = False
        self.junk = 0  # commands without mail since the last accepted message

    async def push(self, status: AnyStr) -> None:
        """Send a reply line, control bytes replaced: aiosmtpd echoes an unknown command verb
        (``500 Error: command "NO\\rOP" not recognized``), and a bare CR or NUL in a reply can
        desynchronise the client's reply parser."""
        if isinstance(status, str):
            status = _CONTROL.sub("?", status)
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser; the stdlib parser under it raises IndexError on a lone
        ``<`` (``MAIL FROM:<``), which would reach aiosmtpd's catch-all as ``500 Error:
        (IndexError) ...``.  Such an argument is a malformed address (``553 5.1.3``)."""
        try:
            return super()._getaddr(arg)
        except IndexError:
            return None, None

    smtp_NOOP = _counted_as_junk("smtp_NOOP")
    smtp_RSET = _counted_as_junk("smtp_RSET")
    smtp_VRFY = _counted_as_junk("smtp_VRFY")
    smtp_HELP = _counted_as_junk("smtp_HELP")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        owner: object = None
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            self.client = f"unix:uid={uid},pid={pid}"
            self.rate_key = owner = ("uid", uid)
        elif isinstance(peer, tuple):
            self.client = f"{peer[0]}:{peer[1]}"
            self.rate_key = ("ip", peer[0])
            uid = loopback_peer_uid(sock) if sock is not None else None
            owner = self.rate_key if uid is None else ("uid", uid)
        if not self.service.admit(self, owner):
            self.refused = True
            cast(asyncio.WriteTransport, transport).write(REPLY_TOO_MANY_FROM_CLIENT)
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        self.service.release(self)
        super().connection_lost(error)


class SubmissionHandler:
    """aiosmtpd handler: policy on MAIL, RCPT and DATA; DATA ends in a durable commit.

    :param service: the running service (config, spool, counters, runner).
    """

    def __init__(self, service: MailService) -> None:
        self.service = service

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    def _reject(self, server: SMTP, reply: str, command: str, address: str | None) -> str:
        self.service.counters.rejected += 1
        client = cast(_Submission, server).client
        log.warning(
            "%s: reject: %s <%s>: %s", client, command, _sanitize(address or "", 300), reply
        )
        return reply

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        config = self.service.config
        smtputf8 = "SMTPUTF8" in mail_options
        if not self.service.limiter.allow(cast(_Submission, server).rate_key):
            return self._reject(server, REPLY_RATE_LIMIT, "MAIL FROM", address)
        reply = _check_sender(config, address, smtputf8=smtputf8)
        if reply is not None:
            return self._reject(server, reply, "MAIL FROM", address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.service.config.max_recipients:
            return self._reject(server, REPLY_TOO_MANY_RECIPIENTS, "RCPT TO", address)
        reply = check_address(address, smtputf8=envelope.smtp_utf8)
        if reply is not None:
            return self._reject(server, reply, "RCPT TO", address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        submission = cast(_Submission, server)
        data = envelope.original_content or b""
        reply = check_headers(data)
        if reply is not None:
            return self._reject(server, reply, "DATA from", envelope.mail_from)
        assert envelope.mail_from is not None
        try:
            # Shielded: if the client hangs up now, the commit still finishes and the message
            # is queued for delivery (it may have been durable already).
            queue_id = await asyncio.shield(
                self.service.commit(
                    sender=envelope.mail_from,
                    recipients=envelope.rcpt_tos,
                    data=data,
                    client=submission.client,
                    helo=session.host_name or "",
                    smtputf8=envelope.smtp_utf8,
                    eightbit="BODY=8BITMIME" in envelope.mail_options,
                )
            )
        except (OSError, SpoolError) as exc:
            log.error("%s: cannot queue a message: %s", submission.client, exc)
            return REPLY_SPOOL_ERROR
        submission.junk = 0
        return f"250 2.0.0 Ok: queued as {queue_id}"


class MailService:
    """A running mail service; made by :func:`start`.

    :param config: the validated settings.
    """

    def __init__(self, config: MailConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.spool = Spool(config.spool)
        self.sync = DirectorySync(self.spool)
        self.handler = SubmissionHandler(self)
        self.limiter = RateLimiter(config.rate_limit, clock=time.monotonic)
        self.runner = QueueRunner(
            config, self.spool, self.sync, make_transport(config), self.counters
        )
        self.connections: set[_Submission] = set()
        self._per_client: Counter[object] = Counter()
        self.on_commit: Callable[[str], None] | None = None
        # Writes wait on fsync, not on the CPU: one thread per concurrent submission lets the
        # file system batch their journal commits (as Postfix's parallel cleanup processes do).
        self._writers = concurrent.futures.ThreadPoolExecutor(
            max_workers=SPOOL_WRITERS, thread_name_prefix="mail-spool"
        )
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._started = time.monotonic()
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        """Bound addresses: ``host:port`` (the real port when ``listen`` asked for 0) or
        ``unix:PATH``."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if sock.family == socket.AF_UNIX:
                    out.append(f"unix:{name}")
                elif sock.family == socket.AF_INET6:
                    out.append(f"[{name[0]}]:{name[1]}")
                else:
                    out.append(f"{name[0]}:{name[1]}")
        return out

    def admit(self, connection: _Submission, owner: object) -> bool:
        """Count *connection* for *owner* (a uid or an address); False over max_per_client."""
        limit = self.config.max_per_client
        if self._per_client[owner] >= limit:
            log.warning(
                "%s: %s has %d connections (mail.max_per_client = %d); answering 421",
                connection.client,
                " ".join(map(str, owner)) if isinstance(owner, tuple) else owner,
                self._per_client[owner],
                limit,
            )
            return False
        connection.owner = owner
        self._per_client[owner] += 1
        self.connections.add(connection)
        return True

    def release(self, connection: _Submission) -> None:
        """Forget a connection :meth:`admit` counted."""
        if connection in self.connections:
            self.connections.discard(connection)
            self._per_client[connection.owner] -= 1
            if not self._per_client[connection.owner]:
                del self._per_client[connection.owner]

    def stats(self) -> MailStats:
        """A snapshot of the counters."""
        return MailStats.snapshot(
            self.counters,
            queued=len(self.runner.schedule),
            connections=len(self.connections),
            uptime=time.monotonic() - self._started,
        )

    def flush(self) -> int:
        """Retry every deferred message now; returns how many are queued."""
        return self.runner.flush()

    async def commit(
        self,
        *,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        client: str,
        helo: str = "",
        smtputf8: bool = False,
        eightbit: bool = False,
    ) -> str:
        """Write the message durably (file and directory fsynced) and queue it for delivery.

        No policy checks: callers check first (the SMTP handler, :meth:`submit`).  The null
        sender, ``<>`` as aiosmtpd gives it, is queued as ``""``.
        :returns: the queue ID, once the message survives a crash.
        """
        if sender == NULL_SENDER:
            sender = ""
        queue_id = new_queue_id()
        now = time.time()
        protocol = "UTF8ESMTP" if smtputf8 else "ESMTP"
        received = (
            f"Received: from {_sanitize(helo) or 'unknown'} ({_sanitize(client)})\r\n"
            f"\tby {self.config.hostname} ({IDENT}) with {protocol} id {queue_id};\r\n"
            f"\t{email.utils.formatdate(now, localtime=False)}\r\n"
        ).encode("ascii")
        message = received + data
        envelope = Envelope(
            id=queue_id,
            sender=sender,
            recipients=tuple(recipients),
            arrival=now,
            client=client,
            smtputf8=smtputf8,
            eightbit=eightbit,
            size=len(message),
        )
        loop = asyncio.get_running_loop()
        if len(message) > INLINE_WRITE:
            await loop.run_in_executor(self._writers, self.spool.write, envelope, message)
        else:
            # A small message goes to the page cache from the loop (which may wait for the
            # journal, ~1 ms under load); only the fsync waits in a thread.  A thread doing
            # open/write/fsync/close/rename must win the GIL back from the busy loop after each
            # of them, which made commits several times slower (see Spool.begin).
            fd = self.spool.begin(envelope, message)
            try:
                await loop.run_in_executor(self._writers, os.fsync, fd)
            except BaseException:
                self.spool.abandon(queue_id, fd)
                raise
            self.spool.finish(queue_id, fd)
        await self.sync.sync(self.sync.renamed())
        self.counters.received += 1
        log.info(
            "%s: client=%s, from=<%s>, size=%d, nrcpt=%d (queue active)",
            queue_id,
            client,
            sender,
            len(message),
            len(recipients),
        )
        if self.on_commit is not None:
            self.on_commit(queue_id)
        else:
            self.runner.enqueue(queue_id)
        return queue_id

    async def submit(
        self,
        *,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        client: str = "in-process",
    ) -> str:
        """Submit without SMTP (the exec shim's ``/usr/sbin/sendmail``): same rules, same spool.

        ``data`` must have CRLF line ends (see :func:`.sendmail_cli.build_submission`).

        :returns: the queue ID.
        :raises SubmitError: the message breaks a rule; ``code`` is the SMTP code it would get.
        """
        smtputf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        checks = [
            (_check_sender(self.config, sender, smtputf8=smtputf8), sender),
            *((check_address(r, smtputf8=smtputf8), r) for r in recipients),
            (None if recipients else "554 5.5.1 No valid recipients", ""),
            (
                REPLY_TOO_MANY_RECIPIENTS if len(recipients) > self.config.max_recipients else None,
                "",
            ),
            (REPLY_TOO_BIG if len(data) > self.config.max_size else None, ""),
            (check_headers(data), ""),
        ]
        for reply, _subject in checks:
            if reply is not None:
                self.counters.rejected += 1
                log.warning("%s: reject: %s", client, reply)
                raise SubmitError(reply, code=int(reply[:3]))
        return await self.commit(
            sender=sender,
            recipients=recipients,
            data=data,
            client=client,
            smtputf8=smtputf8,
            eightbit=any(b > 127 for b in data),
        )

    async def sendmail(
        self, argv: Sequence[str], stdin: bytes, *, client: str = "shim"
    ) -> tuple[int, str]:
        """Run a jailed ``/usr/sbin/sendmail ARGV`` in-process (the exec shim's path, no fork).

        :param argv: the arguments after the program name.
        :param stdin: everything the caller wrote to its standard input.
        :returns: the sysexits code and the text for its stderr (``""`` on success).
        """
        try:
            args = parse_sendmail_args(argv)
            raw = stdin if args.ignore_dots else _until_dot(stdin)
            submission = build_submission(args, raw)
        except UsageError as exc:
            return EX_USAGE, f"{exc}\n"
        except DataError as exc:
            return EX_DATAERR, f"{exc}\n"
        try:
            queue_id = await self.submit(
                sender=submission.sender,
                recipients=submission.recipients,
                data=submission.data,
                client=client,
            )
        except SubmitError as exc:
            return exit_code_for(exc.code, str(exc)[4:]), f"sendmail: {exc}\n"
        except (OSError, SpoolError) as exc:
            log.error("%s: cannot queue a message: %s", client, exc)
            return EX_TEMPFAIL, "sendmail: 451 4.3.0 queue file write error; try again later\n"
        return 0, f"sendmail: queued as {queue_id}\n" if args.verbose else ""

    def _factory(self) -> asyncio.Protocol:
        if len(self.connections) >= self.config.max_connections or self._closed:
            log.warning(
                "too many SMTP clients (mail.max_connections = %d); answering 421",
                self.config.max_connections,
            )
            return _Refuse()
        return self.submission_protocol()

    def submission_protocol(self) -> _Submission:
        """The SMTP protocol for one client connection, on the running loop."""
        return _Submission(
            self,
            data_size_limit=self.config.max_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.config.hostname,
            ident=IDENT,
            timeout=self.config.smtp_timeout,
            loop=asyncio.get_running_loop(),
        )

    async def _open(self, sockets: Sequence[socket.socket] | None, run_queue: bool) -> None:
        loop = asyncio.get_running_loop()
        if sockets is None:
            queued = await asyncio.to_thread(self.spool.open)
            if queued:
                log.info("spool %s: %d message(s) waiting", self.config.spool, queued)
        try:
            for index, address in enumerate(self.config.listen):
                if sockets is None:
                    sock = _bind(address, self.config)
                    if isinstance(address, UnixAddress):
                        self._unix_paths.append(str(address.path))
                else:
                    sock = sockets[index]
                try:
                    if sock.family == socket.AF_UNIX:
                        server = await loop.create_unix_server(self._factory, sock=sock)
                    else:
                        server = await loop.create_server(self._factory, sock=sock, backlog=256)
                except BaseException:
                    sock.close()
                    raise
                self._servers.append(server)
        except BaseException:
            await self._close_servers()
            raise
        if run_queue:
            await self.runner.start()

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
        self._servers.clear()

    async def close(self) -> None:
        """Stop listening, drop clients (nothing unacknowledged is lost), stop the runner."""
        if self._closed:
            return
        self._closed = True
        await self._close_servers()
        await self.runner.close()
        self._writers.shutdown(wait=True)
        log.info("mail stats: %s", format_stats(self.stats()))
        # Let transports run their connection_lost callbacks before the loop goes away.
        for _ in range(3):
            await asyncio.sleep(0)


def _until_dot(data: bytes) -> bytes:
    """``data`` up to a line holding a single ``.`` (sendmail without ``-i``)."""
    lines = data.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.rstrip(b"\r\n") == b".":
            return b"".join(lines[:index])
    return data


def _bind(address: TcpAddress | UnixAddress, config: MailConfig) -> socket.socket:
    where = f"mail.listen entry {str(address)!r}"
    if isinstance(address, UnixAddress):
        path = str(address.path)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise MailListenError(
                    f"{where}: {path} exists and is not a socket; remove it or choose another path"
                )
            os.unlink(path)  # a stale socket of a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, config.unix_mode)
            sock.listen(256)
        except OSError as exc:
            sock.close()
            raise MailListenError(f"{where}: cannot bind ({exc.strerror})") from exc
        sock.setblocking(False)
        return sock
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            message = (
                f"{where}: address already in use (the host's own MTA?); stop it, or listen "
                "on another loopback address or port, e.g. '127.0.0.2:25'"
            )
        elif exc.errno == errno.EACCES:
            message = f"{where}: ports below 1024 need root or CAP_NET_BIND_SERVICE"
        elif exc.errno == errno.EADDRNOTAVAIL:
            message = f"{where}: no local interface has this address; use one on 'lo'"
        else:
            message = f"{where}: cannot bind ({exc.strerror})"
        raise MailListenError(message) from exc
    sock.setblocking(False)
    return sock


def bind_listeners(config: MailConfig) -> list[socket.socket]:
    """Bind every ``mail.listen`` address (for :func:`start` in several processes).

    :raises MailListenError: an address cannot be bound; the message says what to change.
    """
    sockets: list[socket.socket] = []
    try:
        for address in config.listen:
            sockets.append(_bind(address, config))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def start(
    config: MailConfig,
    *,
    sockets: Sequence[socket.socket] | None = None,
    on_commit: Callable[[str], None] | None = None,
) -> MailService:
    """Open the spool, bind every ``mail.listen`` address, start the queue runner.

    The keyword arguments serve the standalone runner's worker processes (``mail.workers``):
    ``sockets`` are already bound (from :func:`bind_listeners`, one per ``listen`` entry, the
    spool already opened by the parent) and ``on_commit``, if given, receives each committed
    queue ID instead of a queue runner in this process (none is started).

    :raises MailListenError: an address cannot be bound; the message says what to change.
    :raises SpoolError: the spool directory cannot be used.
    """
    service = MailService(config)
    service.on_commit = on_commit
    await service._open(sockets, run_queue=on_commit is None)
    log.info(
        "mail service ready on %s, spool %s, relay %s",
        ", ".join(service.addresses),
        config.spool,
        config.relay or "(none: messages stay queued)",
    )
    return service

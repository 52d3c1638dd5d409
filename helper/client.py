"""Run allowlisted commands through chroot-helper, from inside a jail, like :mod:`subprocess`.

This is the only module a jailed app imports.  It is pure Python and uses the standard library only;
every import happens when the module is imported (before the jail is entered), and no call reads a
file: the helper is found through ``$CHROOT_HELPER_SOCKET`` (default ``/run/chroot-helper.sock``,
the jail-relative path of the default socket), or ``$CHROOT_HELPER_ADDRESS`` (``127.0.0.1:PORT``)
plus ``$CHROOT_HELPER_TOKEN`` for the optional TCP listener.

``argv[0]`` names a command configured in the helper as ``[exec.NAME]``: its ``NAME``, the path in
its ``argv[0]``, or that path's basename.  Do not use this to run arbitrary programs: the helper
runs only what its administrator configured, and says so in a
:class:`~chroot_helper.errors.CommandError`.

Example::

    from chroot_helper import client

    done = client.run(["convert", "in.png", "-resize", "50%", "png:-"], capture_output=True)
    thumbnail = done.stdout

    with client.Popen(["cat"], stdin=client.PIPE, stdout=client.PIPE) as proc:
        out, _ = proc.communicate(b"hello")

Mail: :func:`sendmail` (``chroot_helper.services.mail.client_sendmail``) submits a message to the
helper's SMTP listener at ``$CHROOT_HELPER_SMTP`` (``host:port`` or ``unix:PATH``).

Differences from :mod:`subprocess`: there is no shell, no ``env``/``cwd`` (the helper's config sets
them), ``pid`` is None, and when the helper kills a command for passing ``max_output``,
:func:`run` raises :class:`OutputLimitExceeded`.  :class:`Popen` pipes are the caller's own pipes,
passed to the command, so ``max_output`` does not apply to them (``max_file_size`` does for files).

:func:`run` keeps the connection when the helper offers to (a command handed to a resident
supervisor, on the Unix socket) and sends the process's next call over it, which spares the helper
daemon that call; a process holds at most :data:`KEEP_IDLE` such idle connections, and a child
process never uses its parent's.
"""

from __future__ import annotations

import io
import os
import select
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Final, Literal, NoReturn, overload

from .errors import HelperError, LocalProtocolError, RemoteProtocolError, error_from_code
from .fdpass import scm_rights
from .protocol import (
    CLOSED,
    MAX_DATA_PAYLOAD,
    NEED_DATA,
    STDERR,
    STDIN,
    STDOUT,
    Connection,
    Data,
    Error,
    Exit,
    Request,
    Response,
    Role,
    Signal,
    Started,
    State,
    encode_event,
)
from .services.mail.client import client_sendmail as sendmail

__all__ = [
    "PIPE",
    "STDOUT_TO",
    "DEVNULL",
    "DEFAULT_SOCKET",
    "OutputLimitExceeded",
    "HelperUnavailable",
    "Popen",
    "run",
    "helper_address",
    "sendmail",
    "KEEP_IDLE",
]

PIPE: Final = subprocess.PIPE
#: Alias of :data:`subprocess.STDOUT` (``stderr=STDOUT_TO`` merges stderr into stdout).
STDOUT_TO: Final = subprocess.STDOUT
DEVNULL: Final = subprocess.DEVNULL
DEFAULT_SOCKET: Final = "/run/chroot-helper.sock"
#: Grace, in seconds, past the command's timeout for the helper's final EXIT frame.
_GRACE: Final = 5.0
_CHUNK: Final = MAX_DATA_PAYLOAD - 1
_RECV: Final = 1 << 20
#: Idle connections a process keeps for its next :func:`run` calls.
KEEP_IDLE: Final = 2

Stream = int | IO[bytes] | IO[str] | None

_local = threading.local()


def _scratch() -> memoryview:
    """This thread's receive buffer, allocated once (a fresh megabyte per call would cost its page
    faults every time); what is read into it is copied into the parser at once."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(_RECV))
    return view


class HelperUnavailable(HelperError, ConnectionError):
    """The helper's socket cannot be reached (not running, wrong path, or no permission)."""


class OutputLimitExceeded(subprocess.SubprocessError):
    """The helper killed the command because its output passed the configured ``max_output``.

    :param cmd: the argv.
    :param output: stdout received before the limit.
    :param stderr: stderr received before the limit.
    """

    def __init__(self, cmd: Sequence[str], output: bytes | str | None, stderr: bytes | str | None):
        super().__init__(cmd, output, stderr)
        self.cmd = cmd
        self.output = output
        self.stderr = stderr

    def __str__(self) -> str:
        return f"Command {list(self.cmd)!r} was killed: its output passed the helper's max_output"


def helper_address() -> tuple[str, str | None]:
    """Return ``(address, token)``: a socket path, or ``host:port`` with the TCP token."""
    tcp = os.environ.get("CHROOT_HELPER_ADDRESS")
    if tcp:
        return tcp, os.environ.get("CHROOT_HELPER_TOKEN")
    return os.environ.get("CHROOT_HELPER_SOCKET") or DEFAULT_SOCKET, None


def _is_unix(address: str) -> bool:
    return address.startswith("/") or ":" not in address


def _connect(address: str) -> socket.socket:
    if _is_unix(address):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = address
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    try:
        sock.connect(target)
    except OSError as exc:
        sock.close()
        hint = "set $CHROOT_HELPER_SOCKET to the socket's path inside the jail"
        raise HelperUnavailable(
            f"cannot reach chroot-helper at {address!r}: {exc.strerror or exc}; "
            f"is it running? {hint}"
        ) from None
    return sock


class _Stale(Exception):
    """A kept connection was closed before the helper read the request (send it again)."""


class _Kept:
    """This process's idle kept connections, newest last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._idle: list[tuple[str, socket.socket, Connection]] = []

    def take(self, address: str) -> tuple[socket.socket, Connection] | None:
        """An open kept connection to *address*, if there is one."""
        with self._lock:
            if self._pid != os.getpid():  # a child: the connections are the parent's
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                kept_address, sock, conn = self._idle.pop()
                if kept_address == address and _is_idle(sock):
                    return sock, conn
                sock.close()
        return None

    def put(self, address: str, sock: socket.socket, conn: Connection) -> None:
        """Keep *conn* (its request is over, its EXIT kept it) for the next call."""
        conn.start_next_cycle()
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < KEEP_IDLE:
                self._idle.append((address, sock, conn))
                return
        sock.close()


def _is_idle(sock: socket.socket) -> bool:
    """Open, with nothing unread: the helper has not closed it or sent anything since."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)  # input, end of stream, hang-up and errors all show up


_kept = _Kept()


def _fileno(value: int | IO[bytes] | IO[str]) -> int:
    return value if isinstance(value, int) else value.fileno()


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _exec_request(
    argv: list[str],
    modes: dict[str, str],
    fds: int,
    timeout: float | None,
    started: bool,
    token: str | None,
) -> Request:
    """The exec request for a call; a process tends to make the same calls again, and the frame
    of a request it has sent before is ready (see :class:`~chroot_helper.protocol.Request`)."""
    key = None
    if timeout is None or type(timeout) is float or type(timeout) is int:
        key = (*argv, None, *modes.items(), fds, type(timeout), timeout, started, token)
        request = _requests.get(key)
        if request is not None:
            return request
    params: dict[str, object] = {"command": argv[0], "args": argv[1:], **modes}
    if timeout is not None:
        params["timeout"] = timeout
    if not started:
        params["started"] = False  # run() only waits: no STARTED frame to read
    request = Request(op="exec", params=params, fds=fds, token=token)
    if key is not None and len(encode_event(request)) <= _MAX_REMEMBERED_FRAME:
        if len(_requests) >= _MAX_REQUESTS:
            _requests.clear()  # one call, safe from any thread
        _requests[key] = request
    return request


#: The exec requests made lately, by call (see :func:`_exec_request`).
_requests: dict[tuple[object, ...], Request] = {}
_MAX_REQUESTS: Final = 32
_MAX_REMEMBERED_FRAME: Final = 4096


class _Session:
    """One connection: send the request with fds, then exchange frames."""

    def __init__(
        self,
        argv: Sequence[str],
        modes: dict[str, str],
        fds: list[int],
        timeout: float | None,
        *,
        started: bool = True,
        reuse: bool = False,
        helper: tuple[str, str | None] | None = None,
    ):
        if isinstance(argv, str | bytes) or not argv:
            raise TypeError("argv must be a non-empty list of strings (there is no shell)")
        self.argv = [os.fsdecode(a) for a in argv]
        address, token = helper or helper_address()
        self.address = address
        self.fds = fds
        #: Bytes received so far (a kept connection that ends before any is :class:`_Stale`).
        self.received = 0
        request = _exec_request(self.argv, modes, len(fds), timeout, started, token)
        kept = _kept.take(address) if reuse else None
        self.reused = kept is not None
        if kept is not None:
            self.sock, self.conn = kept
            try:
                self._send_request(self.conn.send(request))
                return
            except (BrokenPipeError, ConnectionResetError):
                self.sock.close()  # closed while idle: the helper never read it
                self.reused = False
            except BaseException:
                self.sock.close()
                raise
        self.conn = Connection(Role.CLIENT)
        # The frame is ready before the connection exists: it follows the connect at once, and
        # the helper, woken by the connect, finds it there instead of waiting for it.
        frame = self.conn.send(request)
        self.sock = _connect(address)
        try:
            self._send_request(frame)
        except BrokenPipeError:
            pass  # refused before reading: the error frame is waiting
        except BaseException:
            self.close()
            raise

    def _send_request(self, frame: bytes) -> None:
        fds = self.fds
        if fds:
            if self.sock.family != socket.AF_UNIX:
                raise ValueError("file descriptors can be passed only over the Unix socket")
            sent = self.sock.sendmsg([frame], scm_rights(fds))
            if sent < len(frame):
                self.sock.sendall(frame[sent:])
        else:
            self.sock.sendall(frame)

    def finish(self) -> None:
        """Keep the connection if the helper kept it, else close it."""
        if self.conn.kept:
            _kept.put(self.address, self.sock, self.conn)
        else:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, event: Data | Signal) -> None:
        if self.conn.our_state is State.DONE or self.sock.fileno() < 0:
            return  # the command has finished; nothing to send to
        try:
            self.sock.sendall(self.conn.send(event))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the helper has finished; its final frame tells why

    def wait_started(self) -> None:
        """Block until the helper reports the command running; raise its error if it refused."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, Started):
                return
            if isinstance(event, Error):
                self.close()
                _raise_error(event)
            if event is CLOSED:
                self.close()
                raise RemoteProtocolError("the helper closed the connection without a reply")
            if event is not NEED_DATA:
                self.close()
                raise RemoteProtocolError(f"expected STARTED, got {type(event).__name__}")
            self.pull()

    def pull(self, *, final: bool = False) -> Exit | Error | None:
        """Receive what the socket has (blocking unless it is non-blocking) into the parser.

        With *final* (the caller handles a final frame), return the final frame's event when it is
        all that came; it is not buffered then.
        """
        view = _scratch()
        try:
            count = self.sock.recv_into(view)
        except ConnectionResetError:
            if self.reused and not self.received:
                raise _Stale from None  # closed with the request unread
            count = 0
        self.received += count
        if final:
            return self.conn.receive_final(view[:count])
        self.conn.receive_data(view[:count])
        return None

    def recv_event(self, deadline: float | None) -> Data | Exit | Response | Error:
        """Block (until *deadline*) for the next frame from the helper, skipping STARTED."""
        while True:
            event = self.conn.next_event()
            if event is CLOSED:
                self.close()
                raise HelperUnavailable(
                    "the connection to chroot-helper ended before the command's exit status; "
                    "the helper stopped (its commands are killed when it does)"
                )
            if isinstance(event, Started):
                continue
            if event is not NEED_DATA:
                assert isinstance(event, Data | Exit | Response | Error)
                return event
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.sock.settimeout(remaining)
            try:
                self.pull()
            finally:
                self.sock.settimeout(None)


def _raise_error(event: Error) -> NoReturn:
    raise error_from_code(event.code, event.message)


def call(op: str, **params: object) -> Mapping[str, object]:
    """Ask a service other than exec (e.g. ``"dns_stats"``) and return its answer.

    :raises HelperUnavailable: the helper cannot be reached or hung up.
    :raises RequestError: the helper refused the request (unknown op, peer not allowed, ...).
    """
    address, token = helper_address()
    conn = Connection(Role.CLIENT)
    frame = conn.send(Request(op=op, params=params, token=token))
    with _connect(address) as sock:
        sock.sendall(frame)
        while True:
            event = conn.next_event()
            if isinstance(event, Response):
                return event.result
            if isinstance(event, Error):
                _raise_error(event)
            if event is CLOSED:
                raise HelperUnavailable(
                    f"chroot-helper closed the connection without answering {op!r}"
                )
            if event is not NEED_DATA:
                raise RemoteProtocolError(
                    f"expected a RESPONSE to {op!r}, got {type(event).__name__}"
                )
            conn.receive_data(sock.recv(65536))


@overload
def run(
    argv: Sequence[str],
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    stdin: Stream = None,
    stdout: Stream = None,
    stderr: Stream = None,
    timeout: float | None = None,
    check: bool = False,
    text: Literal[True],
    encoding: str | None = None,
    errors: str | None = None,
) -> subprocess.CompletedProcess[str]: ...


@overload
def run(
    argv: Sequence[str],
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    stdin: Stream = None,
    stdout: Stream = None,
    stderr: Stream = None,
    timeout: float | None = None,
    check: bool = False,
    text: Literal[False] = False,
    encoding: str | None = None,
    errors: str | None = None,
) -> subprocess.CompletedProcess[bytes]: ...


def run(
    argv: Sequence[str],
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    stdin: Stream = None,
    stdout: Stream = None,
    stderr: Stream = None,
    timeout: float | None = None,
    check: bool = False,
    text: bool = False,
    encoding: str | None = None,
    errors: str | None = None,
) -> subprocess.CompletedProcess[bytes] | subprocess.CompletedProcess[str]:
    """Run a configured command through the helper and wait for it, like :func:`subprocess.run`.

    :param argv: ``[command, *args]``; ``command`` is a configured name or path.
    :param input: bytes (or str with *text*) streamed to the command's stdin.
    :param capture_output: capture stdout and stderr (streamed through the helper).
    :param stdin: None (inherit this process's fd 0), :data:`DEVNULL`, :data:`PIPE` with *input*,
        or a file object / fd passed to the command with SCM_RIGHTS.
    :param stdout: None (inherit fd 1), :data:`PIPE`, :data:`DEVNULL`, or a file object / fd.
    :param stderr: as *stdout*, plus :data:`STDOUT_TO` to merge into stdout.
    :param timeout: seconds; the helper kills the whole tree and this raises
        :class:`subprocess.TimeoutExpired`.  The configured timeout applies in any case.
    :param check: raise :class:`subprocess.CalledProcessError` on a non-zero return code.
    :param text: decode output and encode *input* (UTF-8 unless *encoding*).
    :raises CommandError: the command or its arguments are not allowed, or it could not start.
    :raises HelperUnavailable: the helper cannot be reached.
    :raises OutputLimitExceeded: the helper killed the command for passing ``max_output``.
    """
    if capture_output:
        if stdout is not None or stderr is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        stdout = stderr = PIPE
    if input is not None:
        if stdin is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        stdin = PIPE
    text = text or encoding is not None or errors is not None
    codec = encoding or "utf-8"
    if isinstance(input, str):
        input = input.encode(codec, errors or "strict")
    modes: dict[str, str] = {}
    fds: list[int] = []
    forward: dict[int, int] = {}  # stream -> local fd to copy streamed data to (TCP inherit)
    helper = helper_address()
    unix = _is_unix(helper[0])
    for index, (name, value) in enumerate(
        (("stdin", stdin), ("stdout", stdout), ("stderr", stderr))
    ):
        if value == PIPE:
            modes[name] = "pipe"
        elif value == DEVNULL:
            modes[name] = "null"
        elif value == STDOUT_TO and index == 2:
            modes[name] = "stdout"
        elif value is None:
            if not _fd_is_open(index):
                modes[name] = "null"
            elif unix:
                modes[name] = "fd"
                fds.append(index)
            elif index == 0:
                modes[name] = "null"
            else:
                modes[name] = "pipe"
                forward[index] = index
        else:
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{name}={value} is not a file descriptor or a known constant")
            modes[name] = "fd"
            fds.append(_fileno(value))
    for reuse in (True, False):
        session = _Session(argv, modes, fds, timeout, started=False, reuse=reuse, helper=helper)
        out: dict[int, list[bytes]] = {STDOUT: [], STDERR: []}
        try:
            exit_event = _exchange(
                session, input if modes["stdin"] == "pipe" else None, out, forward, timeout
            )
        except _Stale:
            session.close()
            continue
        except BaseException:
            session.close()
            raise
        session.finish()
        break

    def decode(stream: int) -> bytes | str | None:
        if modes[("stdin", "stdout", "stderr")[stream]] != "pipe" or stream in forward:
            return None
        data = b"".join(out[stream])
        return data.decode(codec, errors or "strict") if text else data

    stdout_data, stderr_data = decode(STDOUT), decode(STDERR)
    if exit_event.timed_out:
        raise subprocess.TimeoutExpired(session.argv, timeout or 0.0, stdout_data, stderr_data)
    if exit_event.output_limited:
        raise OutputLimitExceeded(session.argv, stdout_data, stderr_data)
    done: subprocess.CompletedProcess[bytes | str | None] = subprocess.CompletedProcess(
        session.argv, exit_event.returncode, stdout_data, stderr_data
    )
    if check:
        done.check_returncode()
    # Like subprocess, stdout/stderr are None when not captured; the overloads say bytes/str.
    return done  # type: ignore[return-value]


def _exchange(
    session: _Session,
    input: bytes | None,
    out: dict[int, list[bytes]],
    forward: dict[int, int],
    timeout: float | None,
) -> Exit:
    """Send *input* while receiving output, until the EXIT frame (never blocks on one side)."""
    deadline = None if timeout is None else time.monotonic() + timeout + _GRACE
    if input is None:
        return _receive(session, out, forward, deadline, timeout)
    view: memoryview | None = memoryview(input)
    pending = b""
    sock = session.sock
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while True:
            exit_event = _handle_buffered(session, out, forward)
            if exit_event is not None:
                return exit_event
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(session.argv, timeout or 0.0)
            for _, mask in sel.select(remaining):
                if mask & selectors.EVENT_WRITE:
                    if not pending and view is not None:
                        chunk, view = view[:_CHUNK], view[_CHUNK:]
                        pending = session.conn.send(Data(stream=STDIN, data=bytes(chunk)))
                        if not chunk:
                            view = None  # that was the end-of-stdin frame
                    try:
                        pending = pending[sock.send(pending) :]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        pending, view = b"", None  # the helper is done; its reply says why
                    if not pending and view is None:
                        sel.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        session.pull()
                    except BlockingIOError:
                        continue


def _receive(
    session: _Session,
    out: dict[int, list[bytes]],
    forward: dict[int, int],
    deadline: float | None,
    timeout: float | None,
) -> Exit:
    """Receive output until the EXIT frame, blocking in ``recv`` (there is nothing to send)."""
    sock = session.sock
    while True:
        exit_event = _handle_buffered(session, out, forward)
        if exit_event is not None:
            return exit_event
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(session.argv, timeout or 0.0)
            sock.settimeout(remaining)
        try:
            final = session.pull(final=True)
        except TimeoutError:
            continue  # the deadline check above raises
        if isinstance(final, Error):
            _raise_error(final)
        if final is not None:
            return final


def _handle_buffered(
    session: _Session, out: dict[int, list[bytes]], forward: dict[int, int]
) -> Exit | None:
    """Handle every complete frame already received; return the EXIT frame once it is there."""
    while True:
        event = session.conn.next_event()
        if event is NEED_DATA:
            return None
        if event is CLOSED:
            raise RemoteProtocolError("the helper closed the connection without a reply")
        if isinstance(event, Data):
            if event.stream in forward:
                _write_fd(forward[event.stream], event.data)
            else:
                out[event.stream].append(event.data)
        elif isinstance(event, Exit):
            return event
        elif isinstance(event, Error):
            _raise_error(event)
        elif not isinstance(event, Started):
            raise LocalProtocolError(f"unexpected {type(event).__name__} for exec")


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Popen:
    """A command running in the helper, like :class:`subprocess.Popen` (streaming, long output).

    With :data:`PIPE`, :attr:`stdin`, :attr:`stdout` and :attr:`stderr` are ends of local pipes
    whose other ends were passed to the command, so output arrives while it runs.  Needs the Unix
    socket.

    :param argv: ``[command, *args]`` as for :func:`run`.
    :param stdin: None (inherit fd 0), :data:`PIPE`, :data:`DEVNULL`, or a file object / fd.
    :param stdout: None (inherit fd 1), :data:`PIPE`, :data:`DEVNULL`, or a file object / fd.
    :param stderr: as *stdout*, plus :data:`STDOUT_TO`.
    :param text: wrap the pipes in text mode (UTF-8 unless *encoding*).
    :param timeout: seconds before the helper kills the whole tree (capped by the configuration).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        text: bool = False,
        encoding: str | None = None,
        errors: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.args = list(argv)
        self.pid: int | None = None
        self.returncode: int | None = None
        self.timed_out = False
        self.output_limited = False
        self.stdin: IO[bytes] | IO[str] | None = None
        self.stdout: IO[bytes] | IO[str] | None = None
        self.stderr: IO[bytes] | IO[str] | None = None
        self._timeout = timeout
        text = text or encoding is not None or errors is not None
        modes: dict[str, str] = {}
        fds: list[int] = []
        theirs: list[int] = []
        ours: list[tuple[int, int]] = []
        try:
            for index, (name, value) in enumerate(
                (("stdin", stdin), ("stdout", stdout), ("stderr", stderr))
            ):
                if value == DEVNULL:
                    modes[name] = "null"
                elif value == STDOUT_TO and index == 2:
                    modes[name] = "stdout"
                elif value == PIPE:
                    r, w = os.pipe()
                    mine, other = (w, r) if index == 0 else (r, w)
                    ours.append((index, mine))
                    theirs.append(other)
                    modes[name] = "fd"
                    fds.append(other)
                elif value is None:
                    modes[name] = "fd" if _fd_is_open(index) else "null"
                    if modes[name] == "fd":
                        fds.append(index)
                else:
                    modes[name] = "fd"
                    fds.append(_fileno(value))
            self._session = _Session(argv, modes, fds, timeout)
            self._session.wait_started()
        except BaseException:
            for _, fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        for index, fd in ours:
            raw = open(fd, "wb" if index == 0 else "rb", buffering=0 if index == 0 else -1)  # noqa: SIM115
            stream: IO[bytes] | IO[str] = raw
            if text:
                stream = io.TextIOWrapper(
                    raw,
                    encoding=encoding or "utf-8",
                    errors=errors or "strict",
                    write_through=index == 0,
                )
            setattr(self, ("stdin", "stdout", "stderr")[index], stream)

    def __enter__(self) -> Popen:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        try:
            if self._session.sock.fileno() >= 0:  # not after an error or a lost helper
                self.wait()
        finally:
            self._session.close()

    def _finish(self, event: Data | Exit | Response | Error) -> int:
        if isinstance(event, Error):
            self._session.close()
            _raise_error(event)
        if not isinstance(event, Exit):
            raise LocalProtocolError(f"unexpected {type(event).__name__} while waiting for EXIT")
        self.returncode = event.returncode
        self.timed_out = event.timed_out
        self.output_limited = event.output_limited
        self._session.close()
        return event.returncode

    def poll(self) -> int | None:
        """Return the return code if the command has finished, else None."""
        if self.returncode is not None or self._session.sock.fileno() < 0:
            return self.returncode
        try:
            event = self._session.recv_event(time.monotonic())
        except TimeoutError:
            return None
        return self._finish(event)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the command (and its whole tree) to end; return its return code.

        :raises subprocess.TimeoutExpired: *timeout* passed first (the command keeps running).
        """
        if self.returncode is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            event = self._session.recv_event(deadline)
        except TimeoutError:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        return self._finish(event)

    def communicate(
        self, input: bytes | str | None = None, timeout: float | None = None
    ) -> tuple[bytes | str | None, bytes | str | None]:
        """Send *input*, read stdout/stderr to EOF, wait: :meth:`subprocess.Popen.communicate`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: dict[int, list[bytes]] = {}
        if self.stdin is not None:
            try:
                if input:
                    self.stdin.write(input)  # type: ignore[arg-type]  # matches the pipe's mode
                    self.stdin.flush()
                self.stdin.close()
            except BrokenPipeError:
                pass
        with selectors.DefaultSelector() as sel:
            for index, stream in ((STDOUT, self.stdout), (STDERR, self.stderr)):
                if stream is not None:
                    sel.register(stream.fileno(), selectors.EVENT_READ, index)
                    chunks[index] = []
            while sel.get_map():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
                for key, _ in sel.select(remaining):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.data].append(data)
                    else:
                        sel.unregister(key.fd)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.wait(remaining)
        except subprocess.TimeoutExpired:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        results: list[bytes | str | None] = []
        for index, stream in ((STDOUT, self.stdout), (STDERR, self.stderr)):
            if stream is None:
                results.append(None)
                continue
            data = b"".join(chunks[index])
            if isinstance(stream, io.TextIOWrapper):
                results.append(data.decode(stream.encoding, stream.errors or "strict"))
            else:
                results.append(data)
            stream.close()
        return results[0], results[1]

    def send_signal(self, sig: int) -> None:
        """Forward *sig* to the command's process group (the helper allows TERM, INT, HUP, KILL,
        QUIT, USR1, USR2)."""
        if self.returncode is None:
            self._session.send(Signal(signal=int(sig)))

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.send_signal(15)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(9)

"""The chroot-helper wire protocol, without any I/O.

Bytes go in through :meth:`Connection.receive_data`, events come out of
:meth:`Connection.next_event` (or :data:`NEED_DATA`), and :meth:`Connection.send` turns an event
into bytes.  Nothing here touches a socket, a file descriptor or a loop, so the parser can be fed
arbitrary bytes in a test or a fuzzer.  Do not use this module from a jailed app: use
:mod:`chroot_helper.client`, which drives it.

Every frame has an 8-byte header::

    0      2         3        4                   8
    +------+---------+--------+-------------------+-----------------------+
    | "CH" | version | type   | length (u32, BE)  | payload (length bytes) |
    +------+---------+--------+-------------------+-----------------------+

    type  name      direction        payload
    1     REQUEST   client -> server UTF-8 JSON {"op": str, "params": {...}, "fds": 0-3,
                                     "token": str|null}
    2     DATA      both             1 byte stream (0 stdin, 1 stdout, 2 stderr) + raw bytes;
                                     only the stream byte = end of that stream
    3     SIGNAL    client -> server JSON {"signal": int}
    4     EXIT      server -> client JSON {"returncode": int, "timed_out": bool,
                                     "output_limited": bool, "keep": bool (optional)}
    5     RESPONSE  server -> client JSON object (services other than exec)
    6     ERROR     both             JSON {"code": str, "message": str}
    7     STARTED   server -> client JSON {} (exec: the command is running)

A connection carries one request at a time::

    client                                   server
      REQUEST (+ fds in SCM_RIGHTS) ------->
                          <---------------- STARTED (exec)
      DATA stdin, SIGNAL ... -------------->
                          <---------------- DATA stdout/stderr ...
                          <---------------- EXIT | RESPONSE | ERROR   (then both sides close)

unless the EXIT frame says ``"keep": true``: then the server waits for another REQUEST on the
same connection (both sides call :meth:`Connection.start_next_cycle`), and may close it at any
time it is idle without reading what arrived, so that the client sees a reset or a broken pipe,
never a clean end, for a request that was not read (and may safely send it again elsewhere).

File descriptors travel beside the REQUEST frame as ``SCM_RIGHTS`` ancillary data on the same
``sendmsg`` call (which therefore always carries at least one byte of payload: the frame itself);
the ``fds`` field says how many the server must have received.  JSON frames are limited to
:data:`MAX_JSON_PAYLOAD` bytes and data frames to :data:`MAX_DATA_PAYLOAD`; anything larger, an
unknown type or version, or a frame out of turn raises
:class:`~chroot_helper.errors.RemoteProtocolError`.

Example::

    conn = Connection(Role.SERVER)
    conn.receive_data(raw_bytes)
    event = conn.next_event()
    if isinstance(event, Request):
        reply = conn.send(Exit(returncode=0))
"""

from __future__ import annotations

import enum
import functools
import json
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from itertools import compress
from operator import not_
from typing import Final, Literal

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER",
    "MAX_JSON_PAYLOAD",
    "MAX_DATA_PAYLOAD",
    "MAX_FDS",
    "STDIN",
    "STDOUT",
    "STDERR",
    "Role",
    "State",
    "Request",
    "Data",
    "Signal",
    "Started",
    "Exit",
    "Response",
    "Error",
    "Event",
    "NEED_DATA",
    "CLOSED",
    "Connection",
    "exit_frame",
    "request_payload",
]

MAGIC: Final = b"CH"
VERSION: Final = 1
HEADER: Final = struct.Struct("!2sBBI")
#: Largest JSON payload (REQUEST, SIGNAL, EXIT, RESPONSE, ERROR) in bytes.
MAX_JSON_PAYLOAD: Final = 64 * 1024
#: Largest DATA payload in bytes (stream byte included).
MAX_DATA_PAYLOAD: Final = 256 * 1024 + 1
#: Most file descriptors a REQUEST may carry (stdin, stdout, stderr).
MAX_FDS: Final = 3

STDIN: Final = 0
STDOUT: Final = 1
STDERR: Final = 2

_REQUEST, _DATA, _SIGNAL, _EXIT, _RESPONSE, _ERROR, _STARTED = 1, 2, 3, 4, 5, 6, 7


class Role(enum.Enum):
    """Which end of the connection a :class:`Connection` plays."""

    CLIENT = "client"
    SERVER = "server"

    __hash__ = object.__hash__  # members are singletons: identity, without a Python-level call


class State(enum.Enum):
    """Life of the single request a connection carries."""

    IDLE = "idle"  # no request yet
    RUNNING = "running"  # request sent/received, no final frame yet
    DONE = "done"  # EXIT, RESPONSE or ERROR seen or sent

    __hash__ = object.__hash__


_SCALARS: Final = (str, int, float, type(None))  # bool is an int
_SCALAR_TYPES: Final = frozenset({str, int, float, bool, type(None)})
_STR_TYPE: Final = frozenset({str})
#: Deepest nesting of a JSON payload: its values are at most this many containers down.
MAX_DEPTH: Final = 32


def _check_json(value: object, where: str, depth: int = 0) -> None:
    """Raise LocalProtocolError unless *value*, a container at *depth*, is JSON within limits."""
    if isinstance(value, list | tuple):
        items: Collection[object] = value
    elif isinstance(value, dict | Mapping):
        if not set(map(type, value)) <= _STR_TYPE:
            for key in value:
                if not isinstance(key, str):
                    raise LocalProtocolError(f"{where} has a non-string key {key!r}")
        items = value.values()
    else:
        raise LocalProtocolError(f"{where} holds {type(value).__name__}, which JSON cannot carry")
    if items and depth >= MAX_DEPTH:
        raise LocalProtocolError(f"{where} nests deeper than {MAX_DEPTH} levels")
    # Only the items that are not plain scalars need a look, and finding them takes no loop in
    # Python: this runs for every frame.
    for item in compress(items, map(not_, map(_SCALAR_TYPES.__contains__, map(type, items)))):
        if isinstance(item, _SCALARS):
            continue
        if type(item) is list and set(map(type, item)) <= _SCALAR_TYPES and depth + 1 < MAX_DEPTH:
            continue  # a list of plain scalars (exec's args) needs no call of its own
        _check_json(item, where, depth + 1)


@dataclass(frozen=True, kw_only=True)
class Request:
    """A client asks a service to do something.

    :param op: the operation, e.g. ``"exec"``; the server routes it to ``handle_<op>``.
    :param params: JSON-able operation parameters.
    :param fds: how many file descriptors travel with this frame (0 to 3).
    :param token: the shared secret, needed only on the TCP listener.
    """

    op: str
    params: Mapping[str, object] = field(default_factory=dict)
    fds: int = 0
    token: str | None = None

    def __post_init__(self) -> None:
        if not self.op or not self.op.isidentifier():
            raise LocalProtocolError(f"Request op {self.op!r} is not an identifier")
        if not 0 <= self.fds <= MAX_FDS:
            raise LocalProtocolError(f"Request fds={self.fds} is outside 0..{MAX_FDS}")
        _check_json(self.params, "Request params")

    @functools.cached_property
    def _frame(self) -> bytes:
        """This request's frame, built once: a client may send the same request again."""
        fields = {"op": self.op, "params": self.params, "fds": self.fds, "token": self.token}
        return _json_frame(_REQUEST, _dump(fields), "Request")


@dataclass(frozen=True, kw_only=True)
class Data:
    """Bytes of one standard stream; empty *data* ends that stream.

    :param stream: :data:`STDIN`, :data:`STDOUT` or :data:`STDERR`.
    :param data: at most ``MAX_DATA_PAYLOAD - 1`` bytes.
    """

    stream: int
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.stream not in (STDIN, STDOUT, STDERR):
            raise LocalProtocolError(f"Data stream {self.stream} is not 0, 1 or 2")
        if len(self.data) >= MAX_DATA_PAYLOAD:
            raise LocalProtocolError(
                f"Data of {len(self.data)} bytes exceeds {MAX_DATA_PAYLOAD - 1}; split it"
            )


@dataclass(frozen=True, kw_only=True)
class Signal:
    """The client asks for a signal to be sent to the running command.

    :param signal: the signal number (the server decides which ones it forwards).
    """

    signal: int

    def __post_init__(self) -> None:
        if not 1 <= self.signal <= 64:
            raise LocalProtocolError(f"Signal {self.signal} is outside 1..64")


@dataclass(frozen=True, kw_only=True)
class Started:
    """The exec service started the command (sent once, before any output)."""


@dataclass(frozen=True, kw_only=True)
class Exit:
    """The command ended.

    :param returncode: like :attr:`subprocess.Popen.returncode`: negative for a signal.
    :param timed_out: the helper killed it because its timeout passed.
    :param output_limited: the helper killed it because its output passed ``max_output``.
    :param keep: the server keeps the connection open for another request.
    """

    returncode: int
    timed_out: bool = False
    output_limited: bool = False
    keep: bool = False


@dataclass(frozen=True, kw_only=True)
class Response:
    """A service's final answer (for services other than exec).

    :param result: a JSON object.
    """

    result: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_json(self.result, "Response result")


@dataclass(frozen=True, kw_only=True)
class Error:
    """The request failed or was refused; ends the connection.

    :param code: a short machine-readable code (see :mod:`chroot_helper.errors`).
    :param message: what failed, the value, and what to change.
    """

    code: str
    message: str


Event = Request | Data | Signal | Started | Exit | Response | Error


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


#: :meth:`Connection.next_event` needs more bytes.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: The peer closed the connection cleanly, between frames.
CLOSED: Final = _Sentinel.CLOSED

_FINAL = (Exit, Response, Error)
# Which events each role may send, by our state.
_MAY_SEND: Final[dict[tuple[Role, State], tuple[type, ...]]] = {
    (Role.CLIENT, State.IDLE): (Request, Error),
    (Role.CLIENT, State.RUNNING): (Data, Signal, Error),
    (Role.SERVER, State.IDLE): (Error,),
    (Role.SERVER, State.RUNNING): (Started, Data, Exit, Response, Error),
}
_DATA_STREAMS: Final[dict[Role, tuple[int, ...]]] = {
    Role.CLIENT: (STDIN,),
    Role.SERVER: (STDOUT, STDERR),
}


_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dump(obj: Mapping[str, object]) -> bytes:
    return _encode_json(obj).encode()


def _load_object(payload: bytes, what: str) -> dict[str, object]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{what} payload is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} payload is {type(obj).__name__}, not a JSON object")
    return obj


def _get_str(obj: Mapping[str, object], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{what} field {key!r} is {value!r}, expected a string")
    return value


def _get_int(obj: Mapping[str, object], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RemoteProtocolError(f"{what} field {key!r} is {value!r}, expected an integer")
    return value


def _get_bool(obj: Mapping[str, object], key: str, what: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"{what} field {key!r} is {value!r}, expected true or false")
    return value


def encode_event(event: Event) -> bytes:
    """Return the frame for *event* (no state checks; :meth:`Connection.send` adds those)."""
    if isinstance(event, Data):
        return (
            HEADER.pack(MAGIC, VERSION, _DATA, len(event.data) + 1)
            + bytes((event.stream,))
            + event.data
        )
    if isinstance(event, Request):
        return event._frame
    if isinstance(event, Signal):
        kind, payload = _SIGNAL, _dump({"signal": event.signal})
    elif isinstance(event, Exit):
        return exit_frame(event.returncode, event.timed_out, event.output_limited, event.keep)
    elif isinstance(event, Response):
        kind, payload = _RESPONSE, _dump(event.result)
    elif isinstance(event, Started):
        kind, payload = _STARTED, b"{}"
    else:
        kind, payload = _ERROR, _dump({"code": event.code, "message": event.message[:4096]})
    return _json_frame(kind, payload, type(event).__name__)


def _json_frame(kind: int, payload: bytes, name: str) -> bytes:
    if len(payload) > MAX_JSON_PAYLOAD:
        raise LocalProtocolError(f"{name} frame of {len(payload)} bytes exceeds {MAX_JSON_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


@functools.lru_cache(maxsize=256)
def exit_frame(returncode: int, timed_out: bool, output_limited: bool, keep: bool) -> bytes:
    """The frame of ``Exit(returncode, timed_out, output_limited, keep)``, without building the
    event or checking any state: for a server that tracks its one request itself.  A few return
    codes come over and over: cached."""
    fields: dict[str, object] = {
        "returncode": returncode,
        "timed_out": timed_out,
        "output_limited": output_limited,
    }
    if keep:
        fields["keep"] = True
    payload = _dump(fields)
    return HEADER.pack(MAGIC, VERSION, _EXIT, len(payload)) + payload


def _decode_exit(payload: bytes) -> Exit:
    obj = _load_object(payload, "EXIT")
    return Exit(
        returncode=_get_int(obj, "returncode", "EXIT"),
        timed_out=_get_bool(obj, "timed_out", "EXIT"),
        output_limited=_get_bool(obj, "output_limited", "EXIT"),
        keep="keep" in obj and _get_bool(obj, "keep", "EXIT"),
    )


#: The same few EXIT payloads arrive over and over; a peer's junk raises and is not cached, and
#: only payloads up to _CACHED_EXIT bytes are.
_exit_event = functools.lru_cache(maxsize=256)(_decode_exit)
_CACHED_EXIT: Final = 128


def decode_frame(kind: int, payload: bytes) -> Event:
    """Turn one frame's type and payload into an event; raise RemoteProtocolError if invalid."""
    try:
        if kind == _DATA:
            return Data(stream=payload[0], data=payload[1:])
        if kind == _REQUEST:
            obj = _load_object(payload, "REQUEST")
            params = obj.get("params", {})
            if not isinstance(params, dict):
                raise RemoteProtocolError(f"REQUEST field 'params' is {params!r}, not an object")
            token = obj.get("token")
            if token is not None and not isinstance(token, str):
                raise RemoteProtocolError("REQUEST field 'token' must be a string or null")
            return Request(
                op=_get_str(obj, "op", "REQUEST"),
                params=params,
                fds=_get_int(obj, "fds", "REQUEST"),
                token=token,
            )
        if kind == _SIGNAL:
            obj = _load_object(payload, "SIGNAL")
            return Signal(signal=_get_int(obj, "signal", "SIGNAL"))
        if kind == _EXIT:
            return _exit_event(payload) if len(payload) <= _CACHED_EXIT else _decode_exit(payload)
        if kind == _RESPONSE:
            return Response(result=_load_object(payload, "RESPONSE"))
        if kind == _STARTED:
            _load_object(payload, "STARTED")
            return Started()
        if kind == _ERROR:
            obj = _load_object(payload, "ERROR")
            return Error(
                code=_get_str(obj, "code", "ERROR"),
                message=_get_str(obj, "message", "ERROR"),
            )
    except LocalProtocolError as exc:
        # Event constructors raise LocalProtocolError; here the bytes came from the peer.
        raise RemoteProtocolError(str(exc)) from None
    raise RemoteProtocolError(f"unknown frame type {kind}")


def request_payload(
    buffer: bytes | bytearray,
) -> bytes | Literal[_Sentinel.NEED_DATA] | None:
    """The payload of the REQUEST frame that makes up all of *buffer*, without a Connection.

    Returns :data:`NEED_DATA` while *buffer* can still become one, and None when it cannot
    (another frame type, a bad header, or bytes after the frame): a :class:`Connection` fed the
    same bytes says what is wrong.  For a server that expects one request and nothing after it.
    """
    size = len(buffer)
    if size < HEADER.size:
        return NEED_DATA
    magic, version, kind, length = HEADER.unpack_from(buffer)
    if magic != MAGIC or version != VERSION or kind != _REQUEST or length > MAX_JSON_PAYLOAD:
        return None
    end = HEADER.size + length
    if size != end:
        return NEED_DATA if size < end else None
    return bytes(buffer[HEADER.size :])


class Connection:
    """One end of one helper connection: a state machine over bytes.

    :param role: :attr:`Role.CLIENT` in the jailed app, :attr:`Role.SERVER` in the daemon.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.our_state = State.IDLE
        self.their_state = State.IDLE
        self._buffer = bytearray()
        self._offset = 0
        self._eof = False
        self._their_ended: set[int] = set()
        self._kept = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return len(self._buffer) - self._offset

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its end."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RemoteProtocolError("received data after end of stream")
        if self._offset and self._offset * 2 >= len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def receive_final(self, data: bytes | bytearray | memoryview) -> Exit | Error | None:
        """:meth:`receive_data` for a client that expects the final frame next: when *data* is
        exactly one EXIT or ERROR frame and nothing is buffered, return its event at once (the
        state advances as :meth:`next_event` would); else buffer *data* and return None.

        :raises RemoteProtocolError: the frame's payload is invalid.
        """
        size = len(data) - HEADER.size
        if size > 0 and self._offset == len(self._buffer) and not self._eof:
            magic, version, kind, length = HEADER.unpack_from(data)
            if (
                length == size <= MAX_JSON_PAYLOAD
                and (kind == _EXIT or kind == _ERROR)
                and magic == MAGIC
                and version == VERSION
                and self.their_state is State.RUNNING
                and self._peer is Role.SERVER
            ):
                payload = bytes(data[HEADER.size :])
                small_exit = kind == _EXIT and size <= _CACHED_EXIT
                event = _exit_event(payload) if small_exit else decode_frame(kind, payload)
                assert isinstance(event, Exit | Error)
                self._advance(event, mine=False)
                return event
        self.receive_data(data)
        return None

    def next_event(self) -> Event | _Sentinel:
        """Return the next complete event, :data:`NEED_DATA`, or :data:`CLOSED` at a clean EOF.

        :raises RemoteProtocolError: the bytes are not a valid frame, or the frame is out of turn.
        """
        available = len(self._buffer) - self._offset
        if available < HEADER.size:
            if self._eof:
                if available:
                    raise RemoteProtocolError(
                        f"connection closed inside a frame header ({available} B)"
                    )
                return CLOSED
            return NEED_DATA
        magic, version, kind, length = HEADER.unpack_from(self._buffer, self._offset)
        if magic != MAGIC:
            raise RemoteProtocolError(
                f"bad frame magic {bytes(magic)!r}; is this a chroot-helper peer?"
            )
        if version != VERSION:
            raise RemoteProtocolError(
                f"frame version {version} is not supported (this side speaks {VERSION})"
            )
        limit = MAX_DATA_PAYLOAD if kind == _DATA else MAX_JSON_PAYLOAD
        if length > limit or (kind == _DATA and length < 1):
            raise RemoteProtocolError(f"frame type {kind} of {length} bytes is outside 1..{limit}")
        if available < HEADER.size + length:
            if self._eof:
                raise RemoteProtocolError("connection closed inside a frame")
            return NEED_DATA
        start = self._offset + HEADER.size
        self._offset = start + length
        with memoryview(self._buffer) as view:
            if kind == _DATA:  # the hot path: one copy, straight into the event
                if view[start] not in (STDIN, STDOUT, STDERR):
                    raise RemoteProtocolError(f"Data stream {view[start]} is not 0, 1 or 2")
                event: Event = Data(
                    stream=view[start], data=bytes(view[start + 1 : start + length])
                )
            else:
                event = decode_frame(kind, bytes(view[start : start + length]))
        self._check_receive(event)
        return event

    def _check_receive(self, event: Event) -> None:
        them = self._peer
        allowed = _MAY_SEND.get((them, self.their_state), ())
        if not isinstance(event, allowed):
            raise RemoteProtocolError(
                f"{type(event).__name__} frame from the {them.value} "
                f"in state {self.their_state.value}"
            )
        if isinstance(event, Data):
            if event.stream not in _DATA_STREAMS[them]:
                raise RemoteProtocolError(
                    f"the {them.value} may not send data on stream {event.stream}"
                )
            if event.stream in self._their_ended:
                raise RemoteProtocolError(f"data on stream {event.stream} after its end")
            if not event.data:
                self._their_ended.add(event.stream)
        self._advance(event, mine=False)

    def _advance(self, event: Event, *, mine: bool) -> None:
        if isinstance(event, Request):
            self.our_state = self.their_state = State.RUNNING
        elif isinstance(event, _FINAL):
            self.our_state = self.their_state = State.DONE
            self._kept = isinstance(event, Exit) and event.keep

    @property
    def kept(self) -> bool:
        """The request is over and the server keeps the connection for another one."""
        return self.our_state is State.DONE and self._kept

    def start_next_cycle(self) -> None:
        """Get ready for the next request on a kept connection.

        :raises LocalProtocolError: the request is not over, or its EXIT did not keep the
            connection.
        """
        if not self.kept:
            raise LocalProtocolError(
                f"no next request in state {self.our_state.value}: "
                "only an EXIT frame with keep ends a request and keeps the connection"
            )
        self.our_state = self.their_state = State.IDLE
        self._their_ended.clear()
        self._kept = False

    def send(self, event: Event) -> bytes:
        """Return the bytes for *event*.

        :raises LocalProtocolError: this role may not send *event* now.
        """
        allowed = _MAY_SEND.get((self.role, self.our_state), ())
        if not isinstance(event, allowed):
            raise LocalProtocolError(
                f"the {self.role.value} may not send {type(event).__name__} "
                f"in state {self.our_state.value}"
            )
        if isinstance(event, Data) and event.stream not in _DATA_STREAMS[self.role]:
            raise LocalProtocolError(
                f"the {self.role.value} may not send data on stream {event.stream}"
            )
        frame = encode_event(event)
        self._advance(event, mine=True)
        return frame

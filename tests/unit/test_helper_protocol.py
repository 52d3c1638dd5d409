"""The sans-IO protocol: bytes in, events out, no sockets."""

from __future__ import annotations

import json

import pytest
from chroot_helper import protocol
from chroot_helper.errors import LocalProtocolError, RemoteProtocolError
from chroot_helper.protocol import (
    CLOSED,
    HEADER,
    NEED_DATA,
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
)
from hypothesis import given, settings
from hypothesis import strategies as st


def feed(conn: Connection, data: bytes) -> list[object]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if event is CLOSED:
            break
    return events


def frame(kind: int, payload: bytes, *, magic: bytes = b"CH", version: int = 1) -> bytes:
    return HEADER.pack(magic, version, kind, len(payload)) + payload


def test_a_whole_exec_exchange_round_trips() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    request = Request(op="exec", params={"command": "cat", "args": ["-u"]}, fds=1, token=None)
    to_server = (
        client.send(request) + client.send(Data(stream=0, data=b"in")) + client.send(Data(stream=0))
    )
    to_server += client.send(Signal(signal=15))
    assert feed(server, to_server) == [
        request,
        Data(stream=0, data=b"in"),
        Data(stream=0),
        Signal(signal=15),
    ]
    replies = [
        Started(),
        Data(stream=1, data=b"out"),
        Data(stream=2, data=b"err"),
        Exit(returncode=-9, timed_out=True),
    ]
    to_client = b"".join(server.send(e) for e in replies)
    assert feed(client, to_client) == replies
    assert client.their_state is State.DONE and server.our_state is State.DONE


def test_events_survive_being_fed_one_byte_at_a_time() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    request = Request(op="resolve", params={"name": "example.org", "nested": {"a": [1, 2.5, None]}})
    events = []
    for byte in client.send(request):
        events += feed(server, bytes([byte]))
    assert events == [request]
    reply = server.send(Response(result={"addresses": ["127.0.0.1"]}))
    assert feed(client, reply) == [Response(result={"addresses": ["127.0.0.1"]})]


def test_clean_eof_between_frames_is_closed() -> None:
    server = Connection(Role.SERVER)
    assert feed(server, b"") == [CLOSED]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "bad frame magic"),
        (frame(1, b"{}", version=2), "frame version 2 is not supported"),
        (HEADER.pack(b"CH", 1, 1, protocol.MAX_JSON_PAYLOAD + 1), "outside 1..65536"),
        (HEADER.pack(b"CH", 1, 2, 1 << 31), "of 2147483648 bytes"),
        (frame(9, b"{}"), "unknown frame type 9"),
        (frame(1, b"\xff\xfe"), "not valid UTF-8 JSON"),
        (frame(1, b"[1]"), "not a JSON object"),
        (frame(1, b"[" * 5000 + b"]" * 5000), "not valid UTF-8 JSON"),
        (frame(1, json.dumps({"op": "exec", "fds": "3"}).encode()), "'fds' is '3'"),
        (frame(1, json.dumps({"op": "exec", "fds": 7}).encode()), "fds=7 is outside 0..3"),
        (frame(1, json.dumps({"op": "../x", "fds": 0}).encode()), "is not an identifier"),
        (frame(1, json.dumps({"op": "exec", "fds": True}).encode()), "expected an integer"),
        (frame(2, b"\x01x"), "Data frame from the client in state idle"),
        (frame(3, b'{"signal": 15}'), "Signal frame from the client in state idle"),
    ],
)
def test_invalid_bytes_raise_remote_protocol_errors(data: bytes, message: str) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=message.replace("(", r"\(").replace("[", r"\[")):
        server.next_event()


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(HEADER.pack(b"CH", 1, 1, 10 << 20))  # no payload needed to decide
    with pytest.raises(RemoteProtocolError, match="outside"):
        server.next_event()


def test_eof_inside_a_frame_is_an_error() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(1, b'{"op": "exec", "fds": 0}')[:-3])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed inside a frame"):
        server.next_event()


def test_client_may_not_send_output_streams_and_server_may_not_send_stdin() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    client.send(Request(op="exec"))
    with pytest.raises(LocalProtocolError, match="may not send data on stream 1"):
        client.send(Data(stream=1, data=b"x"))
    feed(server, Connection(Role.CLIENT).send(Request(op="exec")))
    with pytest.raises(LocalProtocolError, match="may not send data on stream 0"):
        server.send(Data(stream=0, data=b"x"))


def test_peer_sending_stdout_data_is_rejected() -> None:
    server = Connection(Role.SERVER)
    feed(server, Connection(Role.CLIENT).send(Request(op="exec")))
    server.receive_data(frame(2, b"\x01evil"))
    with pytest.raises(RemoteProtocolError, match="may not send data on stream 1"):
        server.next_event()


def test_data_after_end_of_stream_is_rejected() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    data = client.send(Request(op="exec")) + client.send(Data(stream=0))
    feed(server, data)
    server.receive_data(frame(2, b"\x00late"))
    with pytest.raises(RemoteProtocolError, match="after its end"):
        server.next_event()


def test_nothing_may_follow_the_final_frame() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    feed(server, client.send(Request(op="exec")))
    server.send(Exit(returncode=0))
    with pytest.raises(LocalProtocolError, match="in state done"):
        server.send(Data(stream=1, data=b"x"))


def test_either_side_may_send_an_error_first() -> None:
    server = Connection(Role.SERVER)
    data = server.send(Error(code="refused", message="peer uid 65534 is not allowed"))
    client = Connection(Role.CLIENT)
    client.send(Request(op="exec"))
    assert feed(client, data) == [Error(code="refused", message="peer uid 65534 is not allowed")]


def test_event_constructors_validate() -> None:
    with pytest.raises(LocalProtocolError, match="stream 5"):
        Data(stream=5)
    with pytest.raises(LocalProtocolError, match="JSON cannot carry"):
        Request(op="exec", params={"x": object()})
    with pytest.raises(LocalProtocolError, match="outside 1..64"):
        Signal(signal=0)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        Data(stream=1, data=b"x" * protocol.MAX_DATA_PAYLOAD)


def test_a_request_too_large_for_a_frame_is_refused_each_time_it_is_sent() -> None:
    request = Request(op="exec", params={"args": ["x" * protocol.MAX_JSON_PAYLOAD]})
    conn = Connection(Role.CLIENT)
    for _ in range(2):
        with pytest.raises(LocalProtocolError, match="Request frame of .* exceeds"):
            conn.send(request)
    assert conn.our_state is State.IDLE  # nothing was sent: a smaller request may go


def test_a_request_sent_again_is_the_same_frame() -> None:
    request = Request(op="exec", params={"command": "echo", "args": ["a"]}, fds=1)
    first, second = Connection(Role.CLIENT), Connection(Role.CLIENT)
    data = first.send(request)
    assert second.send(request) == data
    assert feed(Connection(Role.SERVER), data) == [request]


def nested(levels: int) -> dict[str, object]:
    """Params whose deepest value sits *levels* containers below the params object."""
    value: object = 1
    for _ in range(levels):
        value = [value]
    return {"x": value}


def test_json_may_nest_32_levels_and_no_deeper() -> None:
    Request(op="exec", params=nested(protocol.MAX_DEPTH - 1))
    with pytest.raises(LocalProtocolError, match="nests deeper than 32 levels"):
        Request(op="exec", params=nested(protocol.MAX_DEPTH))
    with pytest.raises(LocalProtocolError, match="non-string key 1"):
        Request(op="exec", params={"x": {1: "a"}})
    payload = json.dumps({"op": "exec", "params": nested(protocol.MAX_DEPTH), "fds": 0}).encode()
    with pytest.raises(RemoteProtocolError, match="nests deeper than 32 levels"):
        feed(Connection(Role.SERVER), frame(1, payload))


def test_buffer_is_compacted_as_frames_are_consumed() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    feed(server, client.send(Request(op="exec")))
    for _ in range(100):
        assert feed(server, client.send(Data(stream=0, data=b"z" * 1000))) == [
            Data(stream=0, data=b"z" * 1000)
        ]
    assert server.buffered == 0


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_remote_protocol_error(data: bytes) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(data)
    server.receive_data(b"")
    try:
        while server.next_event() not in (NEED_DATA, CLOSED):
            pass
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(min_size=0, max_size=512), st.integers(min_value=1, max_value=7))
def test_random_payloads_under_valid_headers_only_raise_remote_protocol_error(
    payload: bytes, kind: int
) -> None:
    for role in (Role.SERVER, Role.CLIENT):
        conn = Connection(role)
        conn.our_state = conn.their_state = State.RUNNING
        conn.receive_data(frame(kind, payload))
        try:
            conn.next_event()
        except RemoteProtocolError:
            pass


def test_a_kept_connection_carries_the_next_request() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    feed(server, client.send(Request(op="exec", params={"command": "true"})))
    assert feed(client, server.send(Exit(returncode=3, keep=True))) == [
        Exit(returncode=3, keep=True)
    ]
    assert client.kept and server.kept
    client.start_next_cycle()
    server.start_next_cycle()
    second = Request(op="exec", params={"command": "echo"})
    assert feed(server, client.send(second)) == [second]
    assert feed(client, server.send(Exit(returncode=0))) == [Exit(returncode=0)]
    assert not client.kept
    with pytest.raises(LocalProtocolError, match="no next request in state done"):
        client.start_next_cycle()


def test_only_a_kept_exit_allows_another_request() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="no next request in state idle"):
        client.start_next_cycle()
    feed(server, client.send(Request(op="exec")))
    with pytest.raises(LocalProtocolError, match="in state running"):
        server.start_next_cycle()
    feed(client, server.send(Error(code="command", message="no")))
    with pytest.raises(LocalProtocolError, match="only an EXIT frame with keep"):
        client.start_next_cycle()
    server.receive_data(Connection(Role.CLIENT).send(Request(op="exec")))
    with pytest.raises(RemoteProtocolError, match="Request frame from the client in state done"):
        server.next_event()


def test_keep_is_optional_on_the_wire_and_must_be_a_boolean() -> None:
    assert b"keep" not in protocol.encode_event(Exit(returncode=0))
    client = Connection(Role.CLIENT)
    client.send(Request(op="exec"))
    client.receive_data(
        frame(4, b'{"returncode":0,"timed_out":false,"output_limited":false,"keep":1}')
    )
    with pytest.raises(RemoteProtocolError, match="'keep' is 1, expected true or false"):
        client.next_event()


def test_request_payload_finds_one_whole_request_and_nothing_else() -> None:
    request = frame(1, b'{"op":"exec","params":{}}')
    assert protocol.request_payload(request) == b'{"op":"exec","params":{}}'
    for part in (b"", b"CH", request[:8], request[:-1]):
        assert protocol.request_payload(part) is NEED_DATA
    for other in (
        request + b"C",  # the start of another frame after it
        request + request,
        frame(3, b'{"signal":15}'),
        frame(1, b"{}", version=2),
        frame(1, b"{}", magic=b"XX"),
        HEADER.pack(b"CH", 1, 1, protocol.MAX_JSON_PAYLOAD + 1),
    ):
        assert protocol.request_payload(other) is None


_FRAMES = st.builds(
    lambda kind, payload, cut, extra: (frame(kind, payload) + extra)[:cut],
    st.integers(min_value=0, max_value=8),
    st.sampled_from([b"{}", b'{"op":"exec","params":{"command":"x"},"fds":0}', b"[1]", b"\x00"]),
    st.integers(min_value=0, max_value=80),
    st.binary(max_size=12),
)


@settings(max_examples=400, deadline=None, database=None)
@given(st.one_of(st.binary(max_size=40), _FRAMES))
def test_request_payload_agrees_with_a_connection(data: bytes) -> None:
    found = protocol.request_payload(data)
    server = Connection(Role.SERVER)
    if data:  # no bytes would mean the end of the stream
        server.receive_data(data)
    try:
        event: object = server.next_event()
    except RemoteProtocolError:
        event = None  # invalid: what request_payload hands on for a Connection to report
    if found is NEED_DATA:
        assert event is NEED_DATA
    elif found is None:
        assert not isinstance(event, Request) or server.buffered
    else:
        assert found == data[HEADER.size :]
        assert server.buffered == 0
        assert event is None or isinstance(event, Request)


def _running_client() -> Connection:
    client = Connection(Role.CLIENT)
    client.send(Request(op="exec", params={"command": "true"}))
    return client


def _drain(conn: Connection) -> list[object]:
    events: list[object] = []
    try:
        while (event := conn.next_event()) not in (NEED_DATA, CLOSED):
            events.append(event)
    except RemoteProtocolError as exc:
        events.append(type(exc))
    return events


def test_receive_final_returns_a_lone_final_frame_at_once() -> None:
    server = Connection(Role.SERVER)
    feed(server, Connection(Role.CLIENT).send(Request(op="exec")))
    exit_frame = server.send(Exit(returncode=3, keep=True))
    client = _running_client()
    assert client.receive_final(exit_frame) == Exit(returncode=3, keep=True)
    assert client.kept and client.buffered == 0
    client = _running_client()
    error = protocol.encode_event(Error(code="command", message="no"))
    assert client.receive_final(memoryview(error)) == Error(code="command", message="no")
    assert client.our_state is State.DONE and not client.kept
    # Anything else is buffered for next_event: other frames, more than one, a part of one.
    for data in (protocol.encode_event(Started()) + exit_frame, exit_frame + b"C", exit_frame[:-1]):
        client = _running_client()
        assert client.receive_final(data) is None
        assert client.buffered == len(data)
    client = _running_client()
    with pytest.raises(RemoteProtocolError, match="EXIT payload is not valid UTF-8 JSON"):
        client.receive_final(frame(4, b"{nope}"))


_SERVER_FRAMES = st.lists(
    st.sampled_from(
        [
            protocol.encode_event(Started()),
            protocol.encode_event(Data(stream=1, data=b"out")),
            protocol.encode_event(Exit(returncode=0)),
            protocol.encode_event(Exit(returncode=-9, timed_out=True, keep=True)),
            protocol.encode_event(Error(code="command", message="no")),
            protocol.encode_event(Request(op="exec")),
            frame(4, b'{"returncode":"0"}'),
            frame(6, b"{}"),
            b"\x00" * 9,
        ]
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None, database=None)
@given(_SERVER_FRAMES, st.integers(min_value=0, max_value=200), st.booleans())
def test_receive_final_agrees_with_receive_data(
    frames: list[bytes], cut: int, started_before: bool
) -> None:
    data = b"".join(frames)
    first, rest = data[:cut], data[cut:]
    results = []
    for shortcut in (False, True):
        conn = _running_client()
        if started_before:
            conn.receive_data(protocol.encode_event(Started()))
        events: list[object] = []
        for chunk in (first, rest):
            if not chunk:
                continue
            if shortcut:
                try:
                    final = conn.receive_final(chunk)
                except RemoteProtocolError as exc:
                    events.append(type(exc))
                    break
                if final is not None:
                    events.append(final)
            else:
                conn.receive_data(chunk)
            events += _drain(conn)
            if events and events[-1] is RemoteProtocolError:
                break
        results.append((events, conn.our_state, conn.kept))
    assert results[0] == results[1]

"""Fuzz target: the helper's frame protocol (:mod:`chroot_helper.protocol`) and fd ancillary data.

The first input byte picks the role and how the rest is cut into reads; the parser must turn
any bytes into events, :data:`~chroot_helper.protocol.NEED_DATA`, :data:`~chroot_helper.protocol.
CLOSED` or a :class:`~chroot_helper.errors.RemoteProtocolError`, nothing else.  Every event it
returns must encode back to a frame that decodes to the same bytes again (the daemon relays
what it parsed).  The ancillary-data reader (:func:`chroot_helper.fdpass.fds_from_ancdata`) is
fed the same bytes as an ``SCM_RIGHTS`` payload.
"""

from __future__ import annotations

import socket

from chroot_helper.errors import LocalProtocolError, RemoteProtocolError
from chroot_helper.fdpass import fds_from_ancdata
from chroot_helper.protocol import (
    CLOSED,
    HEADER,
    NEED_DATA,
    Connection,
    Event,
    Role,
    decode_frame,
    encode_event,
)

__all__ = ["test_one_input"]

MAX_EVENTS = 10_000


def _chunks(data: bytes, step: int) -> list[bytes]:
    if step == 0:
        return [data]
    return [data[i : i + step] for i in range(0, len(data), step)]


def _check_round_trip(event: Event) -> None:
    """Whatever the parser accepted re-encodes stably (or is refused as too large to send)."""
    try:
        frame = encode_event(event)
    except LocalProtocolError:
        return  # e.g. JSON numbers re-expanded past the limit: the sender refuses, no crash
    _magic, _version, kind, _length = HEADER.unpack_from(frame)
    again = decode_frame(kind, frame[HEADER.size :])
    if encode_event(again) != frame:
        raise AssertionError(f"{event!r} changes when re-encoded: {again!r}")


def test_one_input(data: bytes) -> None:
    """Parse *data* as frames from a peer; raise only when the parser broke its promise."""
    if not data:
        return
    control, body = data[0], data[1:]
    role = Role.SERVER if control & 1 else Role.CLIENT
    conn = Connection(role)
    try:
        for piece in [*_chunks(body, control >> 1), b""]:
            conn.receive_data(piece)
            for _ in range(MAX_EVENTS):
                event = conn.next_event()
                if event is NEED_DATA or event is CLOSED:
                    break
                _check_round_trip(event)
            else:
                raise AssertionError(f"more than {MAX_EVENTS} events from {len(data)} bytes")
            if event is CLOSED:
                break
    except RemoteProtocolError:
        pass
    fds = fds_from_ancdata([(socket.SOL_SOCKET, socket.SCM_RIGHTS, body)])
    if len(fds) != len(body) // 4:
        raise AssertionError(f"{len(body)} bytes of SCM_RIGHTS gave {len(fds)} fds")

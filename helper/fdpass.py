"""Build and read ``SCM_RIGHTS`` ancillary data: file descriptors passed over Unix sockets.

Used by the daemon, the client and the exec supervisors; stdlib only, so the client can import it
from inside a jail.
"""

from __future__ import annotations

import array
import socket

__all__ = ["ancillary_space", "fds_from_ancdata", "recv_into", "scm_rights"]

_INT = array.array("i").itemsize


def ancillary_space(count: int) -> int:
    """Bytes of ancillary buffer ``recvmsg`` needs to receive *count* descriptors."""
    return socket.CMSG_SPACE(count * _INT)


def scm_rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes *fds* with ``sendmsg`` (empty when there are none)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors received in *ancdata* (the caller owns and must close them)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            items = array.array("i")
            items.frombytes(data[: len(data) - len(data) % _INT])
            fds.extend(items)
    return fds


def recv_into(
    sock: socket.socket, buffer: bytearray, fd_space: int, flags: int = 0
) -> tuple[bytes, list[int], int]:
    """One ``recvmsg`` into the caller's reusable *buffer*: ``(data, fds, msg_flags)``.

    Unlike ``recvmsg(size)``, it allocates only the bytes received, not *size* of them each call
    (a large buffer costs an mmap, page faults and an munmap per message).
    """
    count, ancdata, msg_flags, _ = sock.recvmsg_into([buffer], fd_space, flags)
    return bytes(memoryview(buffer)[:count]), fds_from_ancdata(ancdata), msg_flags

"""Who is on the other end of a loopback TCP connection: the uid owning the client's socket.

Unix sockets tell the server their peer with ``SO_PEERCRED``; TCP has no such option, and on
loopback every client has the same address, so the host address cannot tell a flooding app from
a well-behaved one.  The kernel knows the owner of the client's socket, though: one
``NETLINK_SOCK_DIAG`` request for that exact socket (both ends are in this network namespace)
returns its uid.  No privilege is needed; it costs one netlink round trip.

Do not use this for connections that may come from another host: there, the uid is not known.

Example::

    conn, _ = listener.accept()
    uid = loopback_peer_uid(conn)   # None when no process holds the other end (any more)
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Final

__all__ = ["loopback_peer_uid"]

_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 1
_NLMSG_ERROR: Final = 2
_NOCOOKIE: Final = 0xFFFFFFFF
_NLMSGHDR: Final = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid: ports and
# addresses in network order, interface and cookie in host order.
_REQUEST: Final = struct.Struct("=BBBBI")
_PORTS: Final = struct.Struct("!HH")
_TAIL: Final = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid,
# inode.
_UID_OFFSET: Final = _NLMSGHDR.size + 4 + 48 + 12
_OWNER: Final = struct.Struct("=II")


def _address(family: int, host: str) -> bytes:
    packed = ipaddress.ip_address(host).packed
    return packed.ljust(16, b"\0") if family == socket.AF_INET else packed


def loopback_peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the client end of the accepted TCP socket *sock*, or None if unknown."""
    try:
        local = sock.getsockname()
        remote = sock.getpeername()
        family = sock.family
        if family not in (socket.AF_INET, socket.AF_INET6):
            return None
        body = (
            _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + _PORTS.pack(remote[1], local[1])
            + _address(family, remote[0])
            + _address(family, local[0])
            + _TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
        )
        message = (
            _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
            + body
        )
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.send(message)
            reply = nl.recv(8192)
    except (OSError, ValueError):
        return None
    if len(reply) < _UID_OFFSET + _OWNER.size:
        return None
    _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(reply)
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None
    uid, inode = _OWNER.unpack_from(reply, _UID_OFFSET)
    # A client that already closed its socket leaves it orphaned or in TIME_WAIT, reported with
    # no inode and (TIME_WAIT) uid 0: no process owns it, so its uid means nothing.
    return int(uid) if inode else None

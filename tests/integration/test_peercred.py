"""loopback_peer_uid names the uid that owns the client end of a loopback TCP connection."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from chroot_helper.peercred import loopback_peer_uid

pytestmark = [pytest.mark.root]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_kernel_names_the_client_socket_owner(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = f"import socket; s = socket.create_connection(({host!r}, {port})); s.recv(1)"
        other = subprocess.Popen([sys.executable, "-c", code], user=33, group=33, extra_groups=[])
        try:
            conn, _ = listener.accept()
            with conn:
                assert loopback_peer_uid(conn) == 33
                conn.sendall(b"x")
        finally:
            other.wait(timeout=30)
        with socket.create_connection((host, port)):
            conn, _ = listener.accept()
            with conn:
                assert loopback_peer_uid(conn) == 0


def test_unknown_ends_give_none() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert loopback_peer_uid(left) is None


def test_a_client_that_already_closed_has_no_owner() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        code = (
            "import socket; s = socket.create_connection(('127.0.0.1', "
            f"{listener.getsockname()[1]})); s.close()"
        )
        subprocess.run([sys.executable, "-c", code], user=33, group=33, extra_groups=[], check=True)
        conn, _ = listener.accept()
        with conn:
            assert loopback_peer_uid(conn) is None  # not 0, which TIME_WAIT sockets report

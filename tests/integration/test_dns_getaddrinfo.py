"""glibc's resolver (getaddrinfo, gethostbyname) resolving through the stub.

glibc always asks port 53, so this test binds the stub on port 53 of a spare loopback address
and runs the client in its own mount namespace, where a generated resolv.conf naming only that
address is bind-mounted over /etc/resolv.conf: the host's real nameservers are not reachable by
the client, and the names asked exist only in the test upstream's zone.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

from dns_fixtures import run_stub, run_upstream

CANDIDATES = ["127.53.0.1", "127.0.0.53", "127.53.0.2", "127.53.0.3", "127.54.0.1"]

CLIENT = r"""
import json, socket
result = {}
result["getaddrinfo"] = sorted({ai[4][0] for ai in socket.getaddrinfo("name.test", 80,
                                type=socket.SOCK_STREAM)})
result["gethostbyname"] = socket.gethostbyname("www.chain.test")
try:
    socket.getaddrinfo("missing.test", 80)
    result["missing"] = "resolved"
except socket.gaierror as exc:
    result["missing"] = exc.errno
print(json.dumps(result))
"""


def spare_port53_address() -> str:
    for host in CANDIDATES:
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            ):
                udp.bind((host, 53))
                tcp.bind((host, 53))
        except OSError:
            continue
        return host
    raise AssertionError(
        f"port 53 is taken on every candidate loopback address {CANDIDATES}; "
        "free one of them for this test"
    )


def test_getaddrinfo_in_private_mount_namespace(tmp_path):
    unshare = shutil.which("unshare")
    assert unshare, "install util-linux (unshare) to run this test"
    host = spare_port53_address()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {host}\noptions timeout:3 attempts:1\n")
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("hosts: files dns\n")
    with (
        run_upstream(tmp_path, host="127.0.0.2") as upstream,
        run_stub(tmp_path, [upstream.address], host=host, port=53, log_queries=True) as stub,
    ):
        script = (
            f"mount --bind {resolv} /etc/resolv.conf && "
            f"mount --bind {nsswitch} /etc/nsswitch.conf && "
            f'exec "$0" -c "$1"'
        )
        done = subprocess.run(
            [
                unshare,
                "--user",
                "--map-root-user",
                "--mount",
                "sh",
                "-c",
                script,
                sys.executable,
                CLIENT,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

        result = json.loads(done.stdout)
        assert result["getaddrinfo"] == ["192.0.2.77"]
        assert result["gethostbyname"] == "192.0.2.80"
        assert result["missing"] == socket.EAI_NONAME
        assert len(upstream.queries("name.test.")) >= 1
        assert "name.test. A -> NOERROR" in stub.log.read_text()

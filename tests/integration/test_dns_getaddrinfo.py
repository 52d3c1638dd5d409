"""glibc's resolver (getaddrinfo, gethostbyname, requests) resolving through the stub.

glibc always asks port 53, so this test binds the stub on port 53 of a spare loopback address
and runs the client in its own user+mount namespace, where the resolv.conf and nsswitch.conf
that :mod:`chroot_helper.services.dns.resolvconf` generates for a jail are bind-mounted over
/etc: the client cannot reach the host's real nameservers, nor read the host's /etc/hosts, and
the names asked exist only in the test upstream's zone or the stub's hosts file.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading

from chroot_helper.services.dns import JAIL_NSSWITCH_CONF, jail_resolv_conf, parse_config

try:  # tests/ as packages (pytest importlib/package mode) or as plain directories (prepend mode)
    from .dns_fixtures import Hello, run_stub, run_upstream, spare_port53_address
except ImportError:
    from dns_fixtures import (  # type: ignore[no-redef]
        Hello,
        run_stub,
        run_upstream,
        spare_port53_address,
    )

CLIENT = r"""
import json, socket, sys
import requests

result = {}
result["getaddrinfo"] = sorted({ai[4][0] for ai in socket.getaddrinfo("name.test", 80,
                                type=socket.SOCK_STREAM)})
result["gethostbyname"] = socket.gethostbyname("www.chain.test")
result["localhost"] = socket.gethostbyname("localhost")
result["alias"] = socket.gethostbyname("webalias")
try:
    socket.getaddrinfo("missing.test", 80)
    result["missing"] = "resolved"
except socket.gaierror as exc:
    result["missing"] = exc.errno
result["http"] = requests.get(f"http://web.test:{sys.argv[1]}/", timeout=10).text
print(json.dumps(result))
"""


def test_glibc_resolves_through_stub_in_private_mount_namespace(tmp_path):
    unshare = shutil.which("unshare")
    assert unshare, "install util-linux (unshare) to run this test"
    host = spare_port53_address()
    config = parse_config({"listen": f"{host}:53", "upstreams": ["127.0.0.2:5300"]})
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(jail_resolv_conf(config))
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text(JAIL_NSSWITCH_CONF)
    hosts = tmp_path / "stub-hosts"
    hosts.write_text("127.0.0.1 localhost\n10.1.2.3 web.site.internal webalias\n")
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        with (
            run_upstream(tmp_path, host="127.0.0.2") as upstream,
            run_stub(
                tmp_path,
                [upstream.address],
                host=host,
                port=53,
                log_queries=True,
                hosts_file=str(hosts),
            ) as stub,
        ):
            script = (
                f"mount --bind {resolv} /etc/resolv.conf && "
                f"mount --bind {nsswitch} /etc/nsswitch.conf && "
                f"mount --bind /dev/null /etc/hosts && "
                'exec "$0" -c "$1" "$2"'
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
                    str(web.server_address[1]),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result["getaddrinfo"] == ["192.0.2.77"]
            assert result["gethostbyname"] == "192.0.2.80"
            assert result["localhost"] == "127.0.0.1"
            assert result["alias"] == "10.1.2.3"
            assert result["missing"] == socket.EAI_NONAME
            assert result["http"] == "hello through the stub"
            assert len(upstream.queries("name.test.")) >= 1
            log = stub.log.read_text()
            assert "name.test. A -> NOERROR" in log
            assert "webalias. A -> NOERROR (hosts" in log
    finally:
        web.shutdown()
        web.server_close()
        thread.join(timeout=5)

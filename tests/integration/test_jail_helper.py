"""A jailed Apache worker and the real chroot-helper beside it: exec and DNS through the helper.

The helper's socket lives in the jail directory (``<jail>/run/chroot-helper.sock``), so the jailed
worker reaches it at ``/run/chroot-helper.sock``; its ``[dns]`` table starts the stub on port 53
of a spare loopback address, which the jail's resolv.conf names.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from apache_server import Apache, Site, jailed_script
from dns_fixtures import run_upstream, spare_port53_address
from helper_daemon import running_helper

pytestmark = [pytest.mark.apache, pytest.mark.root]


def test_jailed_worker_uses_exec_and_dns_of_the_helper(tmp_path):
    host = spare_port53_address()
    with run_upstream(tmp_path, host="127.0.0.2") as upstream:
        config = f"""
[exec.echo]
argv = ["/bin/echo"]
args = "any"
user = "nobody"

[dns]
listen = "{host}:53"
upstreams = ["{upstream.address}"]
hosts_file = ""

[mail]
listen = ["unix:{{socket_dir}}/smtp.sock"]
spool = "{{spool}}"
domain = "example.org"
"""
        with running_helper(config) as helper:
            jail = os.path.dirname(os.path.dirname(helper.socket))
            script = jailed_script(
                root=jail, nameservers=[host], exec_shim=True, require_helper=True
            )
            with Apache(Site(script=script)) as apache:
                result = apache.get("/helper").json()
                assert result["bin_echo_exists"] is False
                assert result["echo"] == {"ok": True, "result": "from the helper\n"}
                assert result["not_allowed"]["ok"] is False
                assert "rm" in result["not_allowed"]["error"]
                shimmed = apache.get("/shim").json()
                assert shimmed["run"] == {"ok": True, "result": "via shim\n"}
                assert shimmed["sendmail_run"] == {"ok": True, "result": 0}
                assert shimmed["sendmail_pipe"] == {"ok": True, "result": 0}
                assert shimmed["sendmail_refused"] == {"ok": True, "result": 77}  # EX_NOPERM
                mailq = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "chroot_helper.cli",
                        "mailq",
                        "--config",
                        str(helper.config),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                assert mailq.count("someone@example.org") == 2, mailq
                resolved = apache.get("/resolve").json()
                assert resolved["getaddrinfo"] == {"ok": True, "result": ["192.0.2.77"]}
            stats = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "chroot_helper.cli",
                    "dns-stats",
                    "--config",
                    str(helper.config),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            counters = dict(item.split("=", 1) for item in stats.split())
            assert int(counters["queries"]) >= 1, stats
            assert int(counters["cache_misses"]) >= 1, stats
        assert upstream.queries("name.test.")

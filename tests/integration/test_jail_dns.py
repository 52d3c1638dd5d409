"""A jailed Apache worker resolves names through the helper's DNS stub (issue: DNS, jail side).

The jail's private /etc/resolv.conf names the stub; glibc always asks port 53, so the stub binds
port 53 of a spare loopback address. The names exist only in the test upstream's zone.
"""

from __future__ import annotations

import http.server
import threading

import pytest
from apache_server import Apache, Site, jailed_script
from dns_fixtures import Hello, run_stub, run_upstream, spare_port53_address

pytestmark = [pytest.mark.apache, pytest.mark.root]


def test_jailed_worker_resolves_through_the_stub(tmp_path, jail_root):
    host = spare_port53_address()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    script = jailed_script(root=jail_root, nameservers=[host])
    try:
        with (
            run_upstream(tmp_path, host="127.0.0.2") as upstream,
            run_stub(tmp_path, [upstream.address], host=host, port=53, log_queries=True) as stub,
            Apache(Site(script=script)) as apache,
        ):
            result = apache.get(f"/resolve?port={web.server_address[1]}").json()
            assert result["getaddrinfo"] == {"ok": True, "result": ["192.0.2.77"]}
            assert result["gethostbyname"] == {"ok": True, "result": "192.0.2.80"}
            assert result["missing"]["ok"] is False
            assert result["http"] == {"ok": True, "result": "hello through the stub"}
            assert upstream.queries("name.test."), "the stub never asked the upstream"
            assert "name.test. A -> NOERROR" in stub.log.read_text()
    finally:
        web.shutdown()
        web.server_close()
        thread.join(timeout=5)

"""A real Apache + mod_wsgi daemon (www-data) serving an app from an EMPTY jail, rootless mode."""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import os
import signal
import time
from collections.abc import Iterator

import certifi
import pytest
import requests
from apache_server import Apache, Site, jailed_script, world_readable_dir

pytestmark = [pytest.mark.apache, pytest.mark.root]


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[Apache, str, str]]:
    jail = world_readable_dir("chrootwsgi-jail-")
    os.chown(jail, 0, 0)
    exposed = world_readable_dir("chrootwsgi-exposed-")
    (exposed / "hello.txt").write_text("hello from the host\n")
    (exposed / "hello.txt").chmod(0o644)
    apache = Apache(Site(script=""))
    apache.site.script = jailed_script(
        root=str(jail),
        expose=[f"{exposed}:/exposed", f"{apache.docroot}:/htdocs"],
    )
    with apache:
        yield apache, str(jail), str(exposed)
    assert os.listdir(jail) == [], "the jail directory on disk must stay empty"
    os.rmdir(jail)
    (exposed / "hello.txt").unlink()
    os.rmdir(exposed)


def test_root_shows_nothing_of_the_host(site):
    apache, _, _ = site
    facts = apache.get("/facts").json()
    expected = {"dev", "etc", "tmp", "usr", "exposed", "htdocs", certifi.where().split("/")[1]}
    assert set(facts["root_listing"]) == expected
    assert not facts["proc_exists"]


def test_host_passwd_is_not_readable(site):
    apache, _, _ = site
    passwd = apache.get("/facts").json()["etc_passwd"]
    assert passwd["ok"], passwd
    assert passwd["result"].splitlines() == ["www-data:x:33:33::/var/www:/usr/sbin/nologin"]


def test_worker_is_www_data_without_capabilities(site):
    apache, _, _ = site
    facts = apache.get("/facts").json()
    assert (facts["uid"], facts["gid"]) == (33, 33)
    assert facts["cap_effective"] == 0


def test_lazily_read_host_data_still_works(site):
    apache, _, _ = site
    facts = apache.get("/facts").json()
    assert facts["localhost"] == {"ok": True, "result": ["127.0.0.1"]}
    assert facts["berlin"] == {"ok": True, "result": "Europe/Berlin"}
    assert facts["ca_certs"] > 0


def test_what_a_plain_late_chroot_breaks_still_works(site):
    apache, _, _ = site
    lazy = apache.get("/lazy").json()
    assert lazy == {
        "getpwuid": {"ok": True, "result": "www-data"},
        "tempfile": {"ok": True, "result": "/tmp"},
        "cp1252": {"ok": True, "result": "€"},
        "idna": {"ok": True, "result": "xn--bcher-kva.example"},
        "certifi": {"ok": True, "result": lazy["certifi"]["result"]},
        "metadata": {"ok": True, "result": importlib.metadata.version("requests")},
        "resources": {"ok": True, "result": os.path.getsize(certifi.where())},
        "traceback": {"ok": True, "result": 'int("not a number")'},
        "decimal": {"ok": True, "result": "3.30"},
    }
    assert lazy["certifi"]["result"] > 100


def test_stdlib_module_first_imported_after_entry(site):
    apache, _, _ = site
    facts = apache.get("/facts").json()
    first = facts["first_import"]
    assert first["file"] == f"/usr/lib/python3.11/{first['name']}.py"


def test_request_paths_are_rewritten_to_jail_paths(site):
    apache, _, _ = site
    environ = apache.get("/facts").json()["environ"]
    assert environ["DOCUMENT_ROOT"] == "/htdocs"
    assert environ["CONTEXT_DOCUMENT_ROOT"] == "/htdocs"
    assert environ["SCRIPT_FILENAME"] == str(apache.script)
    assert environ["chrootwsgi.jailed"] is True


def test_read_only_exposure(site):
    apache, _, exposed = site
    result = apache.get("/exposure").json()
    assert result["read"] == {"ok": True, "result": "hello from the host\n"}
    assert result["write"] == {"ok": False, "errno": "EROFS"}
    assert os.listdir(exposed) == ["hello.txt"]


def test_every_request_is_served_jailed(site):
    apache, _, _ = site
    pids = set()
    for _ in range(20):
        facts = apache.get("/facts").json()
        assert facts["uid"] == 33 and facts["cap_effective"] == 0 and not facts["proc_exists"]
        pids.add(facts["pid"])
    assert pids, "no daemon process answered"


def test_no_request_reaches_the_script_file_warning(site):
    apache, _, _ = site
    apache.get("/facts")
    assert "WSGI0083" not in apache.error_log()
    assert "Traceback" not in apache.error_log()


def _jailed_pids(apache: Apache, requests: int) -> set[int]:
    pids = set()
    for _ in range(requests):
        response = apache.get("/facts")
        assert response.status_code == 200, response.text
        facts = response.json()
        assert facts["uid"] == 33 and facts["cap_effective"] == 0, facts
        assert "bin" not in facts["root_listing"]
        pids.add(facts["pid"])
    return pids


def test_maximum_requests_restarts_are_jailed(jail_root):
    site = Site(script=jailed_script(root=jail_root), processes=1, threads=1, maximum_requests=3)
    with Apache(site) as apache:
        pids = _jailed_pids(apache, 12)
    assert len(pids) >= 3, f"expected several daemon processes, saw {pids}"


def _await_new_jailed_worker(apache: Apache, old: set[int]) -> int:
    """Poll until a daemon process not in *old* answers; every answer must come from a jail."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            response = apache.get("/facts")
        except requests.ConnectionError:
            continue  # Apache is replacing its children
        assert b"not running in its jail" not in response.content
        if response.status_code == 200:
            facts = response.json()
            assert facts["uid"] == 33 and facts["cap_effective"] == 0, facts
            assert not facts["proc_exists"]
            if facts["pid"] not in old:
                return facts["pid"]
    raise AssertionError(f"no daemon process other than {old} answered within 30 s")


def test_graceful_restart_new_workers_are_jailed(jail_root):
    site = Site(script=jailed_script(root=jail_root), processes=1, threads=2)
    with Apache(site) as apache:
        before = _jailed_pids(apache, 3)
        apache.graceful()
        _await_new_jailed_worker(apache, before)


def test_worker_killed_during_a_request_is_replaced_by_a_jailed_one(jail_root):
    site = Site(script=jailed_script(root=jail_root), processes=1, threads=2)
    with Apache(site) as apache:
        (pid,) = _jailed_pids(apache, 2)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(apache.get, "/sleep")
            time.sleep(0.5)  # the request is now inside the worker
            os.kill(pid, signal.SIGKILL)
            # the request in flight is lost with its worker; it is not replayed elsewhere
            assert slow.result().status_code == 502
        _await_new_jailed_worker(apache, {pid})

"""Privileged mode: gunicorn started as root, --preload, each worker enters in post_fork."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import requests
from apache_server import world_readable_dir
from gunicorn_server import Gunicorn

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory) -> Iterator[Gunicorn]:
    jail = world_readable_dir("chrootwsgi-jail-")
    with Gunicorn(tmp_path_factory.mktemp("gunicorn"), str(jail)) as server:
        yield server
    assert os.listdir(jail) == [], "the jail directory on disk must stay empty"
    jail.rmdir()


def test_workers_are_jailed_as_www_data(gunicorn, jail_root):
    facts = requests.get(gunicorn.url + "/facts", timeout=10).json()
    assert (facts["uid"], facts["gid"]) == (33, 33)
    assert facts["cap_effective"] == 0
    assert not facts["proc_exists"]
    assert "bin" not in facts["root_listing"] and "etc" in facts["root_listing"]
    assert facts["localhost"] == {"ok": True, "result": ["127.0.0.1"]}
    assert facts["ca_certs"] > 0


def test_master_stays_root_and_replaces_killed_workers_with_jailed_ones(gunicorn):
    first = requests.get(gunicorn.url + "/facts", timeout=10).json()["pid"]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    seen: set[int] = set()
    while time.monotonic() < deadline and not (seen - {first}):
        try:
            facts = requests.get(gunicorn.url + "/facts", timeout=10).json()
        except requests.ConnectionError:
            time.sleep(0.1)
            continue
        assert facts["uid"] == 33 and facts["cap_effective"] == 0
        seen.add(facts["pid"])
    assert seen - {first}
    with open(f"/proc/{gunicorn.process.pid}/status") as status:
        assert "Uid:\t0\t0\t0\t0" in status.read(), "the gunicorn master must not be jailed"


def test_worker_that_never_entered_answers_503(tmp_path, jail_root):
    with Gunicorn(tmp_path, jail_root, enter_in_post_fork=False) as server:
        response = server.get("/facts")
        assert response.status_code == 503
        assert "X-App" not in response.headers
    assert "never entered its jail" in server.stderr()

"""Privileged mode: gunicorn started as root, --preload, each worker enters in post_fork."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from apache_server import APPS, free_port, world_readable_dir

pytestmark = [pytest.mark.root]


def start_gunicorn(
    directory: Path, root: str, *, enter_in_post_fork: bool
) -> subprocess.Popen[bytes]:
    port = free_port()
    (directory / "wsgi.py").write_text(
        textwrap.dedent(
            f"""\
            from chrootwsgi import ChrootMiddleware
            from facts import app
            application = ChrootMiddleware(app, root={root!r}, user="www-data", enter=False)
            """
        )
    )
    hook = f"enter_jail({root!r}, user='www-data')" if enter_in_post_fork else "pass"
    (directory / "gunicorn.conf.py").write_text(
        f'bind = "127.0.0.1:{port}"\n'
        "workers = 2\n"
        'user = "www-data"\n'  # gunicorn hands its worker heartbeat file to this user
        'group = "www-data"\n'
        "preload_app = True\n"
        "graceful_timeout = 5\n"  # a worker stopped while still entering its jail is killed
        f'pythonpath = "{directory},{APPS}"\n'
        f'errorlog = "{directory}/error.log"\n'
        "from chrootwsgi import enter_jail\n"
        "def post_fork(server, worker):\n"
        f"    {hook}\n"
    )
    with (directory / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                str(directory / "gunicorn.conf.py"),
                "wsgi:application",
            ],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, (directory / "error.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        raise RuntimeError(f"gunicorn did not listen on {port}; see {directory}/error.log")
    process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return process


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory) -> Iterator[subprocess.Popen[bytes]]:
    jail = world_readable_dir("chrootwsgi-jail-")
    process = start_gunicorn(
        tmp_path_factory.mktemp("gunicorn"), str(jail), enter_in_post_fork=True
    )
    yield process
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
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


def test_every_escape_attempt_fails(gunicorn):
    results = requests.get(gunicorn.url + "/escapes", timeout=10).json()
    assert len(results) >= 7, results  # the same battery as under mod_wsgi
    assert {name: r for name, r in results.items() if r["ok"]} == {}


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
    with open(f"/proc/{gunicorn.pid}/status") as status:
        assert "Uid:\t0\t0\t0\t0" in status.read(), "the gunicorn master must not be jailed"


def test_worker_that_never_entered_answers_503(tmp_path, jail_root):
    process = start_gunicorn(tmp_path, jail_root, enter_in_post_fork=False)
    try:
        response = requests.get(process.url + "/facts", timeout=10)  # type: ignore[attr-defined]
        assert response.status_code == 503
        assert "X-App" not in response.headers
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert "never entered its jail" in (tmp_path / "stderr.log").read_text()

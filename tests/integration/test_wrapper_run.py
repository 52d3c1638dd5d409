"""`chrootwsgi run`: mod_wsgi-express serving an app through the wrapper from an EMPTY jail."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from apache_server import APPS, free_port

pytestmark = [pytest.mark.apache, pytest.mark.root]

CHROOTWSGI = os.path.join(sys.prefix, "bin", "chrootwsgi")
READY_TIMEOUT = 90.0


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                if text.encode() in file.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def wait_for(url: str, process: subprocess.Popen[str]) -> requests.Response:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chrootwsgi run exited with {process.returncode}")
        try:
            return requests.get(url, timeout=10)
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError(
        f"chrootwsgi run did not answer {url} within {READY_TIMEOUT} s; raise READY_TIMEOUT on a "
        "slow machine or read the server output above"
    )


def test_run_serves_jailed_and_stops_cleanly_on_term(jail_root):
    port = free_port()
    process = subprocess.Popen(
        [
            CHROOTWSGI,
            "run",
            "facts:app",
            "--root",
            jail_root,
            "--port",
            str(port),
            "--python-path",
            str(APPS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        facts = wait_for(f"http://127.0.0.1:{port}/facts", process).json()
        assert (facts["uid"], facts["cap_effective"]) == (33, 0)
        assert facts["etc_passwd"]["result"] == "www-data:x:33:33::/var/www:/usr/sbin/nologin\n"
        assert not {"bin", "home", "root", "var"} & set(facts["root_listing"])
        assert os.listdir(jail_root) == []
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert f"serving http://127.0.0.1:{port}/ jailed" in output
    server_root = re.search(r"Server Root\s*: (\S+)", output)
    assert server_root is not None, output
    assert processes_mentioning(server_root[1]) == [], "Apache outlived chrootwsgi run"
    assert not os.path.exists(server_root[1])


def test_run_refuses_a_bad_app_spec_before_starting(jail_root):
    result = subprocess.run(
        [CHROOTWSGI, "run", "not a spec", "--root", jail_root],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "app = 'not a spec': expected \"module:callable\"" in result.stderr

"""`make demo`, then curl shows the jailed page; `make demo-stop` leaves no process behind."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from apache_server import free_port

pytestmark = [pytest.mark.apache, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]


def make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=900,
    )


def processes_mentioning(*markers: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                cmdline = file.read()
        except OSError:
            continue
        if any(marker.encode() in cmdline for marker in markers):
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {words}")
    return found


@pytest.fixture
def demo_env(tmp_path):
    state = f"/tmp/chrootwsgi-demo-test-{os.getpid()}"
    env = dict(
        os.environ,
        PORT=str(free_port()),
        DEMO_DIR=state,
        # A loopback address of its own, so the stub's port 53 is free whatever else runs.
        DEMO_DNS=f"127.{random.randint(100, 200)}.{random.randint(1, 250)}.1",
        VIRTUAL_ENV=sys.prefix,
    )
    env.pop("CHROOTWSGI_CONFIG", None)
    yield env
    if os.path.exists(state):  # the test failed half-way: stop what make demo started
        subprocess.run(
            [os.path.join(sys.prefix, "bin", "python"), str(REPO / "apache/demo/run.py"), "stop"],
            env=env,
            check=False,
        )
        shutil.rmtree(state, ignore_errors=True)


def test_make_demo_serves_the_jailed_page_and_demo_stop_cleans_up(demo_env):
    port, state, dns = demo_env["PORT"], demo_env["DEMO_DIR"], demo_env["DEMO_DNS"]
    started = make("demo", demo_env)
    assert started.returncode == 0, started.stdout + started.stderr
    url = f"http://127.0.0.1:{port}/"
    assert f"chrootwsgi demo: {url}" in started.stdout
    assert "stop it with: make demo-stop" in started.stdout

    curl = subprocess.run(
        ["curl", "-sS", "--max-time", "30", url], capture_output=True, text=True, check=False
    )
    assert curl.returncode == 0, curl.stderr
    page = curl.stdout
    assert "<h1>Served from an empty jail</h1>" in page
    listing = page.split("ls / (the jail&#x27;s root)</th><td><pre>")[1].split("</pre>")[0]
    shown = set(listing.split())
    assert {"dev/", "etc/", "tmp/"} <= shown
    assert not shown & {"bin/", "home/", "root/", "var/", "proc/", "boot/"}
    assert "<pre>33 / 33 / " in page
    assert "<pre>effective 0x0, permitted 0x0</pre>" in page
    assert f"demo.chrootwsgi.test -&gt; 192.0.2.80 (asked of {dns})" in page
    uname = subprocess.run(["uname", "-sr"], capture_output=True, text=True, check=True).stdout
    exec_row = "command through the helper (exec)</th><td><pre>"
    assert f"{exec_row}uname -sr -&gt; {uname.strip()} (exit 0)" in page
    assert "mail through the helper</th><td><pre>queued as " in page
    mailq = subprocess.run(
        [
            os.path.join(sys.prefix, "bin", "chroot-helper"),
            "mailq",
            "--config",
            f"{state}/helper.toml",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "root@localhost" in mailq and "demo@localhost" in mailq, mailq
    assert "<pre>www-data:x:33:33::/var/www:/usr/sbin/nologin</pre>" in page
    assert "FileNotFoundError: [Errno 2] No such file or directory: &#x27;/etc/shadow&#x27;" in page
    assert os.listdir(f"{state}/jail") == ["run"]  # only the helper's socket directory

    stopped = make("demo-stop", demo_env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert processes_mentioning(state, "(wsgi:chrootwsgi-demo)") == []
    assert not os.path.exists(state)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()

"""Every way entry can fail yields 503 and one log line; the wrapped app is never called."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from apache_server import Apache, Site, jailed_script

pytestmark = [pytest.mark.apache, pytest.mark.root]

NOT_JAILED_BODY = "Service Unavailable: this worker is not running in its jail.\n"


def assert_fails_closed(apache: Apache, reason: str) -> None:
    for path in ("/", "/facts", "/lazy"):
        response = apache.get(path)
        assert response.status_code == 503, response.text
        assert response.text == NOT_JAILED_BODY
        assert "X-App" not in response.headers, "the wrapped app was called"
    log = apache.error_log()
    assert reason in log, log[-2000:]
    lines = [line for line in log.splitlines() if "answering 503 to every request" in line]
    assert 1 <= len(lines) <= apache.site.processes, lines  # once per daemon process


def test_missing_root(tmp_path):
    missing = "/tmp/chrootwsgi-no-such-jail"
    with Apache(Site(script=jailed_script(root=missing))) as apache:
        assert_fails_closed(apache, f"root '{missing}' does not exist")


def test_root_writable_by_the_worker(jail_root):
    os.chmod(jail_root, 0o777)
    try:
        with Apache(Site(script=jailed_script(root=jail_root))) as apache:
            assert_fails_closed(apache, "writable by others")
    finally:
        os.chmod(jail_root, 0o755)


def test_privileged_mode_without_root(jail_root):
    script = jailed_script(root=jail_root, mode="privileged", user="www-data")
    with Apache(Site(script=script)) as apache:
        assert_fails_closed(apache, "mode 'privileged' needs root")


def test_threads_already_running(jail_root):
    started_thread = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    )
    with Apache(Site(script=started_thread + jailed_script(root=jail_root))) as apache:
        assert_fails_closed(apache, "the process has 2 threads; entering a jail needs exactly one")


def test_user_namespaces_disabled(jail_root):
    launcher = [sys.executable, str(Path(__file__).with_name("userns_disabled.py"))]
    with Apache(Site(script=jailed_script(root=jail_root), launcher=launcher)) as apache:
        assert_fails_closed(apache, "unprivileged user namespaces are disabled here")


def test_preload_failure(jail_root):
    script = jailed_script(root=jail_root, preload_modules=["no_such_module_for_the_jail"])
    with Apache(Site(script=script)) as apache:
        assert_fails_closed(apache, "preload.modules: cannot import 'no_such_module_for_the_jail'")


def test_required_helper_missing(jail_root):
    with Apache(Site(script=jailed_script(root=jail_root, require_helper=True))) as apache:
        assert_fails_closed(apache, "require_helper is set but chroot-helper does not answer")

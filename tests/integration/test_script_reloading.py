"""mod_wsgi stats (and may reload) the WSGI script on every request, also after entry."""

from __future__ import annotations

import os
import time

import pytest
import requests
from apache_server import Apache, Site, jailed_script

pytestmark = [pytest.mark.apache, pytest.mark.root]


def test_reloading_on_keeps_serving_and_touch_restarts_into_the_jail(jail_root):
    site = Site(script=jailed_script(root=jail_root), script_reloading=True, processes=1)
    with Apache(site) as apache:
        first = apache.get("/facts")
        assert first.status_code == 200, first.text
        pid = first.json()["pid"]
        assert apache.get("/facts").json()["pid"] == pid  # no reload without a change
        later = time.time() + 5
        os.utime(apache.script, (later, later))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                response = apache.get("/facts")
            except requests.ConnectionError:
                continue
            if response.status_code == 200 and response.json()["pid"] != pid:
                break
            time.sleep(0.1)
        else:
            pytest.fail("touching the script did not restart the daemon process")
        facts = response.json()
        assert facts["uid"] == 33 and facts["cap_effective"] == 0 and not facts["proc_exists"]
        assert "WSGI0083" not in apache.error_log()


def test_hidden_script_with_reloading_on_is_explained(jail_root):
    site = Site(script=jailed_script(root=jail_root, expose_script=False), script_reloading=True)
    with Apache(site) as apache:
        response = apache.get("/facts")
        assert response.status_code == 500
        assert "set WSGIScriptReloading Off, or leave expose_script on" in apache.error_log()


def test_hidden_script_with_reloading_off_serves(jail_root):
    site = Site(script=jailed_script(root=jail_root, expose_script=False))
    with Apache(site) as apache:
        response = apache.get("/facts")
        assert response.status_code == 200
        assert response.json()["environ"]["SCRIPT_FILENAME"] is None

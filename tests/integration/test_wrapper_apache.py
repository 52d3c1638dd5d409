"""The drop-in wrapper, configured by `chrootwsgi apache-config`, in a real Apache + mod_wsgi.

An unmodified Flask app (templates, static files) is served from an EMPTY jail by the packaged
wrapper script; the only jail-specific pieces are the generated Apache snippet and the config
file. Static files go through Apache's Alias as the snippet sets it up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from apache_server import APPS, Apache, Site, world_readable_dir

pytestmark = [pytest.mark.apache, pytest.mark.root]

FLASK_APP = APPS / "flask_sample"
CHROOTWSGI = os.path.join(sys.prefix, "bin", "chrootwsgi")


def chrootwsgi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROOTWSGI, *args], capture_output=True, text=True, check=False, env=env, timeout=60
    )


class SnippetApache(Apache):
    """The test harness's server, with the site's mod_wsgi lines replaced by a snippet file."""

    def __init__(self, snippet: str) -> None:
        super().__init__(Site(script="# unused: the snippet names the wrapper\n"))
        self.snippet = self.dir / "site.conf"
        self.snippet.write_text(snippet)

    def config(self) -> str:
        replaced = re.compile(r"\s*WSGI(DaemonProcess|ScriptReloading|ImportScript|ScriptAlias)")
        kept = [line for line in super().config().splitlines() if not replaced.match(line)]
        return "\n".join(kept) + f"\nInclude {self.snippet}\n"


@pytest.fixture
def config_dir():
    path = world_readable_dir("chrootwsgi-etc-")
    yield path
    for item in path.iterdir():
        item.unlink()
    path.rmdir()


@pytest.fixture
def data_dir():
    path = world_readable_dir("chrootwsgi-data-")
    (path / "greeting.txt").write_text("Hello from an exposed directory\n")
    (path / "greeting.txt").chmod(0o644)
    yield path
    (path / "greeting.txt").unlink()
    path.rmdir()


def snippet_for(jail_root: str, name: str, env: dict[str, str]) -> str:
    result = chrootwsgi(
        "apache-config",
        "--app",
        "flask_sample:app",
        "--root",
        jail_root,
        "--name",
        name,
        "--processes",
        "1",
        "--threads",
        "4",
        "--python-path",
        str(APPS),
        "--static",
        f"/assets={FLASK_APP / 'static'}",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def served(jail_root, config_dir, data_dir, monkeypatch):
    """The Flask app behind the generated snippet; its config found by process group name."""
    monkeypatch.setenv("CHROOTWSGI_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("FLASK_SAMPLE_DATA", "/data")
    monkeypatch.delenv("CHROOTWSGI_CONFIG", raising=False)
    (config_dir / "flasksite.toml").write_text(
        f'app = "flask_sample:app"\nroot = "{jail_root}"\n'
        f'expose = ["{data_dir}:/data", "{FLASK_APP}"]\n'
    )
    (config_dir / "flasksite.toml").chmod(0o644)
    apache = SnippetApache(snippet_for(jail_root, "flasksite", dict(os.environ)))
    with apache:
        yield apache


def test_flask_app_renders_its_template_from_the_empty_jail(served, jail_root):
    page = served.get("/")
    assert page.status_code == 200, served.error_log()
    assert "<h1>Hello from an exposed directory</h1>" in page.text
    assert '<p id="uid">uid 33</p>' in page.text
    listing = re.search(r'<p id="listing">(.*)</p>', page.text)
    assert listing is not None
    shown = set(listing.group(1).split())
    assert {"data", "etc", "dev", "tmp"} <= shown
    assert not shown & {"bin", "boot", "home", "root", "var", "proc"}
    assert os.listdir(jail_root) == []


def test_static_files_through_flask_and_through_apache(served):
    by_flask = served.get("/static/style.css")
    by_apache = served.get("/assets/style.css")
    assert by_flask.status_code == by_apache.status_code == 200
    assert by_flask.text == by_apache.text == (FLASK_APP / "static" / "style.css").read_text()


def test_host_passwd_is_replaced_by_the_jails(served):
    passwd = served.get("/passwd")
    assert passwd.status_code == 200
    assert passwd.text.splitlines() == ["www-data:x:33:33::/var/www:/usr/sbin/nologin"]


def test_config_named_in_the_environment(jail_root, config_dir, data_dir, monkeypatch):
    config = config_dir / "elsewhere.toml"
    config.write_text(f'app = "flask_sample:app"\nroot = "{jail_root}"\nexpose = ["{FLASK_APP}"]\n')
    config.chmod(0o644)
    monkeypatch.setenv("CHROOTWSGI_CONFIG", str(config))
    with SnippetApache(snippet_for(jail_root, "othername", dict(os.environ))) as apache:
        page = apache.get("/")
        assert page.status_code == 200, apache.error_log()
        assert "no greeting" in page.text  # /data is not exposed by this config


def test_missing_config_fails_closed_and_names_the_file(jail_root, config_dir, monkeypatch):
    monkeypatch.setenv("CHROOTWSGI_CONFIG_DIR", str(config_dir))
    monkeypatch.delenv("CHROOTWSGI_CONFIG", raising=False)
    with SnippetApache(snippet_for(jail_root, "noconfig", dict(os.environ))) as apache:
        response = apache.get("/")
        assert response.status_code == 503
        expected = f"config file '{config_dir}/noconfig.toml' does not exist"
        assert expected in apache.error_log()


def test_app_that_cannot_be_imported_fails_closed(jail_root, config_dir, monkeypatch):
    monkeypatch.setenv("CHROOTWSGI_CONFIG_DIR", str(config_dir))
    (config_dir / "broken.toml").write_text(f'app = "no_such_module:app"\nroot = "{jail_root}"\n')
    (config_dir / "broken.toml").chmod(0o644)
    with SnippetApache(snippet_for(jail_root, "broken", dict(os.environ))) as apache:
        response = apache.get("/")
        assert response.status_code == 503
        assert "cannot import 'no_such_module'" in apache.error_log()


def test_generated_snippet_passes_apachectl_configtest(tmp_path, jail_root):
    snippet = Path(world_readable_dir("chrootwsgi-snippet-")) / "site.conf"
    try:
        snippet.write_text(snippet_for(jail_root, "checked", dict(os.environ)))
        result = subprocess.run(
            ["apache2ctl", "-t", "-c", f"Include {snippet}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "Syntax OK" in result.stderr
    finally:
        snippet.unlink()
        snippet.parent.rmdir()

"""`chrootwsgi doctor`: what an app touches while serving that the jail will not show."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from apache_server import world_readable_dir

pytestmark = [pytest.mark.root]

CHROOTWSGI = os.path.join(sys.prefix, "bin", "chrootwsgi")
EXIT_OK, EXIT_WILL_BREAK = 0, 4

LEAKY_APP = """\
import subprocess

with open("{import_time}") as file:  # read at import: before entry, never reported
    STARTUP = file.read()


def app(environ, start_response):
    with open("{host_file}") as file:
        secret = file.read()
    with open("{exposed}/hello.txt") as file:
        hello = file.read()
    year = subprocess.run(["date", "+%Y"], capture_output=True, text=True).stdout
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [secret.encode(), hello.encode(), year.encode()]
"""

CLEAN_APP = """\
import json, tempfile


def app(environ, start_response):
    with tempfile.TemporaryFile() as scratch:
        scratch.write(b"x")
    body = json.dumps({"path": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
"""


@pytest.fixture
def site(jail_root, exposed_dir):
    """A directory holding an app module, a host file it reads and its config."""
    path = world_readable_dir("chrootwsgi-doctor-")
    (path / "host-only.txt").write_text("not in the jail\n")
    (path / "startup.txt").write_text("read at import\n")
    (path / "leaky.py").write_text(
        LEAKY_APP.format(
            import_time=path / "startup.txt",
            host_file=path / "host-only.txt",
            exposed=exposed_dir,
        )
    )
    (path / "clean.py").write_text(CLEAN_APP)
    for name in ("leaky", "clean"):
        (path / f"{name}.toml").write_text(
            f'app = "{name}:app"\nroot = "{jail_root}"\nexpose = ["{exposed_dir}"]\n'
        )
    for item in path.iterdir():
        item.chmod(0o644)
    yield path
    shutil.rmtree(path)


def doctor(site, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    # No helper in these tests: its socket is named explicitly, and absent.
    env = dict(os.environ, CHROOT_HELPER_SOCKET=str(site / "no-helper.sock"))
    return subprocess.run(
        [CHROOTWSGI, "doctor", "--config", str(site / f"{name}.toml"), "--python-path", str(site)]
        + list(args),
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=120,
    )


def row(output: str, detail: str) -> str:
    rows = [line for line in output.splitlines() if detail in line]
    assert len(rows) == 1, f"no single row for {detail!r} in:\n{output}"
    return " ".join(rows[0].split())


def test_host_file_and_subprocess_are_listed_with_fixes(site, exposed_dir):
    result = doctor(site, "leaky")
    assert result.returncode == EXIT_WILL_BREAK, result.stdout + result.stderr
    out = result.stdout
    assert "app leaky:app: GET / -> 200 OK" in out
    host_file = site / "host-only.txt"
    assert row(out, str(host_file)) == (
        f'breaks open {host_file} show it read-only: [preload] files = ["{host_file}"], '
        f'or expose = ["{site}"]'
    )
    assert row(out, "date +%Y") == (
        "breaks exec date +%Y run it through the helper's exec service "
        "(chroot_helper.client.run) and allow it in /etc/chroot-helper.toml "
        "(the helper does not run here yet: see below)"
    )
    assert row(out, f"{exposed_dir}/hello.txt").startswith("ok open")
    assert "startup.txt" not in out
    assert out.rstrip().endswith("something will break in the jail: apply the fixes above")


def test_app_that_needs_nothing_from_the_host_passes(site, jail_root):
    result = doctor(site, "clean", "--path", "/one", "--path", "/two")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    out = result.stdout
    assert "app clean:app: GET /one -> 200 OK, GET /two -> 200 OK" in out
    assert "ok open (write) /tmp/" in " ".join(out.split())  # the jail's private /tmp
    assert row(out, "user namespaces").startswith("ok user namespaces www-data can create one")
    assert row(out, "jail directory") == f"ok jail directory {jail_root}: root:root 0755"
    assert not [line for line in out.splitlines() if line.startswith("breaks")]
    assert out.rstrip().endswith("nothing found that the jail breaks")


def test_unsafe_jail_directory_is_refused_with_the_fix(site, jail_root):
    os.chmod(jail_root, 0o775)
    try:
        result = doctor(site, "clean")
    finally:
        os.chmod(jail_root, 0o755)
    # load_config refuses the root before any probe: the error names the fix.
    assert result.returncode == 1
    assert "chown root:root" in result.stderr and "chmod 755" in result.stderr


def test_app_that_cannot_be_imported(site):
    (site / "broken.toml").write_text(
        (site / "clean.toml").read_text().replace("clean:app", "clean:no_such")
    )
    (site / "broken.toml").chmod(0o644)
    result = doctor(site, "broken")
    assert result.returncode == 1
    assert "module 'clean' has no attribute 'no_such'" in result.stderr


def test_helper_is_shown_as_not_configured(site):
    result = doctor(site, "clean")
    assert row(result.stdout, "no-helper.sock") == (
        f"note helper not configured (no socket at {site / 'no-helper.sock'}) exec and mail "
        "through the helper are unavailable until chroot-helper runs"
    )

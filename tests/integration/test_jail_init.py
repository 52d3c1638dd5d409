"""`chrootwsgi jail init` on good and bad directories, as root (as an administrator runs it)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from apache_server import world_readable_dir

pytestmark = [pytest.mark.root]

CHROOTWSGI = os.path.join(sys.prefix, "bin", "chrootwsgi")
EXIT_OK, EXIT_UNSAFE_JAIL = 0, 3


def jail_init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROOTWSGI, "jail", "init", *args], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.fixture
def base():
    path = world_readable_dir("chrootwsgi-init-")
    yield path
    shutil.rmtree(path)


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_creates_a_missing_jail_with_its_parents(base):
    jail = base / "srv" / "jail"
    result = jail_init(str(jail))
    assert result.returncode == EXIT_OK, result.stderr
    assert f"created {jail} (root:root, 0755)" in result.stdout
    st = os.stat(jail)
    assert (st.st_uid, st.st_gid, mode_of(jail)) == (0, 0, 0o755)
    assert os.listdir(jail) == []
    check = subprocess.run(
        [CHROOTWSGI, "check-config", "/dev/stdin"],
        input=f'root = "{jail}"\n',
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_checks_an_existing_good_jail_and_changes_nothing(base):
    jail = base / "jail"
    jail.mkdir(mode=0o755)
    before = os.stat(jail)
    result = jail_init(str(jail))
    assert result.returncode == EXIT_OK, result.stderr
    assert f"checked {jail}: owned by root, mode 0755" in result.stdout
    assert "checked that www-data (uid 33) cannot write" in result.stdout
    assert os.stat(jail).st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize(
    ("damage", "problem", "fix"),
    [
        (lambda j: os.chmod(j, 0o777), "has mode 0777, not 0755", "chmod 0755 {jail}"),
        (lambda j: os.chown(j, 33, 33), "is owned by uid 33 gid 33", "chown root:root {jail}"),
        (lambda j: os.chmod(j.parent, 0o777), "is writable by others (mode 0777)", "chmod go-w"),
    ],
    ids=["world-writable", "owned-by-worker", "parent-writable"],
)
def test_refuses_an_unsafe_jail_with_the_fix(base, damage, problem, fix):
    jail = base / "parent" / "jail"
    jail.mkdir(parents=True, mode=0o755)
    damage(jail)
    before = (mode_of(jail), os.stat(jail).st_uid)
    result = jail_init(str(jail))
    assert result.returncode == EXIT_UNSAFE_JAIL
    assert problem in result.stderr
    assert f"fix: {fix.format(jail=jail)}" in result.stderr
    assert (mode_of(jail), os.stat(jail).st_uid) == before, "a refusal changes nothing"


def test_refuses_dangerous_contents(base):
    jail = base / "jail"
    jail.mkdir(mode=0o755)
    setuid = jail / "tool"
    setuid.write_text("#!/bin/sh\n")
    os.chmod(setuid, 0o4755)
    os.mknod(jail / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    planted = jail / "writable"
    planted.mkdir()
    os.chown(planted, 33, 33)
    result = jail_init(str(jail))
    assert result.returncode == EXIT_UNSAFE_JAIL
    assert f"{setuid}: is set-user/group-ID (mode 4755)\n    fix: chmod ug-s {setuid}" in (
        result.stderr
    )
    assert f"{jail / 'null'}: is a device node" in result.stderr
    assert f"{planted}: is owned by uid 33\n    fix: chown root:root {planted}" in result.stderr


def test_refuses_a_symlink_naming_the_real_path(base):
    jail = base / "jail"
    jail.mkdir(mode=0o755)
    link = base / "link"
    link.symlink_to(jail)
    result = jail_init(str(link))
    assert result.returncode == EXIT_UNSAFE_JAIL
    assert f"{link}: is a symlink to {jail}\n    fix: chrootwsgi jail init {jail}" in result.stderr


@pytest.mark.parametrize("system_dir", ["/", "/etc", "/var/www"])
def test_refuses_system_directories(system_dir):
    result = jail_init(system_dir)
    assert result.returncode == EXIT_UNSAFE_JAIL
    assert f"{system_dir}: is a system directory" in result.stderr


def test_shared_tmp_and_mount_points_for_exposures(base):
    jail = base / "jail"
    static = base / "static"
    static.mkdir()
    settings = base / "settings.json"
    settings.write_text("{}")
    config = base / "site.toml"
    config.write_text(
        f'root = "{jail}"\n'
        f'expose = ["{static}:/srv/app/static", "{settings}:/etc/app/settings.json"]\n'
    )
    jail.mkdir(mode=0o755)
    result = jail_init("--config", str(config), "--tmp")
    assert result.returncode == EXIT_OK, result.stderr
    assert mode_of(jail / "tmp") == 0o1777
    assert os.path.isdir(jail / "srv" / "app" / "static")
    assert os.path.isfile(jail / "etc" / "app" / "settings.json")
    assert os.path.getsize(jail / "etc" / "app" / "settings.json") == 0
    assert (
        f"created {jail / 'srv' / 'app' / 'static'} (root:root, 0755, mount point directory)"
        in (result.stdout)
    )
    again = jail_init("--config", str(config), "--tmp")
    assert again.returncode == EXIT_OK, again.stderr
    assert "created" not in again.stdout


def test_unknown_worker_user_is_a_config_error(base):
    result = jail_init(str(base / "jail"), "--user", "no-such-user-here")
    assert result.returncode == 1
    assert "--user 'no-such-user-here': no such user" in result.stderr

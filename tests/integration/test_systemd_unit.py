"""apache/chroot-helper.service: systemd accepts it as written, and it is locked down."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from chroot_helper import client
from helper_daemon import running_helper

UNIT = Path(__file__).parents[2] / "apache" / "chroot-helper.service"
INSTALLED_PATH = "/usr/local/bin/chroot-helper"
# The helper's console script in this virtualenv: verify checks that ExecStart is executable.
HELPER = os.path.join(sys.prefix, "bin", "chroot-helper")


@pytest.fixture
def unit(tmp_path) -> Path:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PATH} serve --config /etc/chroot-helper.toml" in text
    path = tmp_path / "chroot-helper.service"
    path.write_text(text.replace(INSTALLED_PATH, HELPER))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_systemd_analyze_verify_accepts_it_without_a_warning(unit):
    result = analyze("verify", str(unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_verify_reports_a_broken_unit(unit):
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notfiy"))
    result = analyze("verify", str(unit))
    assert "Failed to parse service type, ignoring: notfiy" in result.stderr


def test_security_exposure_is_ok(unit):
    result = analyze("security", "--offline=true", str(unit))
    match = re.search(
        r"Overall exposure level for chroot-helper.service: (\d+\.\d) (\w+)", result.stdout
    )
    assert match is not None, result.stdout + result.stderr
    assert float(match[1]) <= 3.0 and match[2] == "OK", match[0]
    readme = (UNIT.parents[1] / "README.md").read_text()
    assert match[0] in readme, f"README.md should quote the current score: {match[0]}"
    for setting in ("ProtectSystem=", "PrivateTmp=", "PrivateDevices=", "NoNewPrivileges="):
        assert re.search(rf"✓ {re.escape(setting)}\s", result.stdout), setting


def _settings(name: str) -> list[str]:
    return re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)


@functools.cache
def _syscalls(name: str) -> frozenset[str]:
    """The system calls *name* stands for: itself, or a group's members, expanded by systemd."""
    if not name.startswith("@"):
        return frozenset({name})
    listing = analyze("syscall-filter", name).stdout.splitlines()[1:]
    members = (line.strip() for line in listing)
    return frozenset().union(*(_syscalls(m) for m in members if m and not m.startswith("#")))


def test_the_system_call_filter_allows_what_the_helper_calls() -> None:
    # The unit's lines in order: an allow list, then what they take away and give back.
    lines = _settings("SystemCallFilter")
    assert not lines[0].startswith("~"), "the first SystemCallFilter= must be an allow list"
    allowed: set[str] = set()
    for value in lines:
        names = set().union(*(_syscalls(name) for name in value.lstrip("~").split()))
        if value.startswith("~"):
            allowed -= names
        else:
            allowed |= names
    # Dropping its capabilities, running commands as their users under their limits, and the
    # exec service's own calls.
    needed = {"capset", "prctl", "setresuid", "setresgid", "setgroups", "prlimit64"}
    needed |= {"clone3", "execve", "wait4", "kill", "sched_yield", "memfd_create", "sendmsg"}
    needed |= {"unshare", "setns"}  # the forker's PID namespaces for supervisors
    assert needed - allowed == set()
    assert _settings("RestrictNamespaces") == ["pid"]


def test_the_helper_starts_and_serves_with_the_units_capabilities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # systemd does not run this machine: start the helper as the unit would, as far as its
    # capability bounding set and no_new_privs go, and use it.
    (capabilities,) = _settings("CapabilityBoundingSet")
    keep = [f"+{name.removeprefix('CAP_').lower()}" for name in capabilities.split()]
    assert _settings("NoNewPrivileges") == ["yes"]
    prefix = ["setpriv", "--bounding-set", ",".join(["-all", *keep]), "--no-new-privs"]
    commands = '[exec.sh]\nargv = ["/bin/sh", "-c"]\nargs = "any"\n'
    with running_helper(commands, prefix=prefix) as helper:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", helper.socket)
        done = client.run(["sh", "echo under the unit, parent $PPID"], capture_output=True)
        assert done.stdout == b"under the unit, parent 1\n"  # in a PID namespace
        log = helper.log_text()
        assert "kept capabilities [6, 7]; dropped the rest" in log  # the daemon
        assert "kept capabilities [6, 7, 8, 21]; dropped the rest" in log  # its forker

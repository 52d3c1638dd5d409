"""apache/chroot-helper.service: systemd accepts it as written, and it is locked down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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

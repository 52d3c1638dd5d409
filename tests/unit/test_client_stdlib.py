"""The client a jailed app imports needs nothing but the standard library at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import chroot_helper

# Run in a fresh interpreter with only the standard library and chroot_helper on sys.path
# (-I: no environment, no user site; -S: no site-packages, so nothing a .pth file loads),
# as in a jail that holds nothing else.
PROBE = """
import sys
sys.path.insert(0, {package_parent!r})
import chroot_helper.client
import chroot_helper.shim
for name in sorted(sys.modules):
    top = name.partition(".")[0]
    if top not in ("chroot_helper", "__main__") and top not in sys.stdlib_module_names:
        print(name)
"""


def test_client_and_shim_import_only_the_standard_library() -> None:
    package_parent = str(Path(chroot_helper.__file__).parent.parent)
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE.format(package_parent=package_parent)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], "modules outside the standard library were imported"

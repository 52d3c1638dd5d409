"""The escape battery: every way out we know of, from inside a jailed worker, in both modes,
with and without the syscall filter, so the table shows what the filter adds.

Modes: rootless (Apache + mod_wsgi daemon as www-data) and privileged (gunicorn as root, workers
drop to www-data after entry). Each attempt is a named test; each must fail, except those listed
in :data:`OPEN_WITHOUT_FILTER`, which only the filter stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from apache_server import Apache, Site, jailed_script, world_readable_dir
from gunicorn_server import Gunicorn

pytestmark = [pytest.mark.root]

ATTEMPTS = [
    "second_chroot",
    "fchdir_inherited_fds",
    "openat_inherited_fds",
    "proc_pid1_root",
    "proc_pid1_cwd",
    "proc_self_root",
    "proc_parent_fds",
    "mount_tmpfs",
    "umount_root",
    "pivot_root",
    "setuid_root",
    "setgid_root",
    "setgroups_root",
    "capset_sys_admin",
    "nested_user_namespace",
    "ptrace_parent",
    "ptrace_sibling",
    "signal_parent",
    "signal_sibling",
    "signal_process_group",
    "symlink_to_host_file",
    "hardlink_across_mounts",
    "host_unix_sockets",
    "write_jail_root",
]

#: Sibling workers share the uid, so without the filter a worker can signal them.
OPEN_WITHOUT_FILTER = {"signal_sibling", "signal_process_group"}

VARIANTS = [
    ("rootless", True),
    ("rootless", False),
    ("privileged", True),
    ("privileged", False),
]


def _two_worker_pids(get) -> list[int]:
    """Both workers' pids; the second may still be entering its jail when the first answers."""
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids.add(get("/pid").json()["pid"])
        if len(pids) == 2:
            return sorted(pids)
        time.sleep(0.02)
    raise AssertionError(f"only saw worker(s) {pids} within 60 s; the battery needs two")


@pytest.fixture(
    scope="module",
    params=VARIANTS,
    ids=[f"{mode}-{'filter' if f else 'nofilter'}" for mode, f in VARIANTS],
)
def battery(request, tmp_path_factory) -> Iterator[tuple[str, bool, dict[str, dict]]]:
    mode, seccomp = request.param
    jail = world_readable_dir("chrootwsgi-jail-")
    try:
        if mode == "rootless":
            script = jailed_script("battery:app", root=str(jail), seccomp=seccomp)
            server = Apache(Site(script=script, processes=2, threads=2))
            get = server.get
        else:
            server = Gunicorn(
                tmp_path_factory.mktemp("gunicorn"), str(jail), app="battery:app", seccomp=seccomp
            )
            get = server.get
        with server:
            pids = _two_worker_pids(get)
            report = get(f"/battery?pids={pids[0]},{pids[1]}").json()
            assert report["sibling"] in pids and report["pid"] in pids
            yield mode, seccomp, report["results"]
        assert os.listdir(jail) == [], "the jail directory on disk must stay empty"
    finally:
        jail.rmdir()


@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_escape_attempt(battery, attempt, record_property):
    mode, seccomp, results = battery
    outcome = results[attempt]
    record_property("blocked", outcome["ok"] is False)  # for make security-report
    if not seccomp and attempt in OPEN_WITHOUT_FILTER:
        assert outcome["ok"] is True, f"{attempt} is expected to need the filter: {outcome}"
    else:
        assert outcome["ok"] is False, (
            f"{attempt} got through ({mode}, seccomp={seccomp}): {outcome}"
        )


def test_battery_covers_every_attempt(battery):
    _, _, results = battery
    assert sorted(results) == sorted(ATTEMPTS)


def test_readme_says_what_the_jail_does_not_protect_against():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as file:
        readme = file.read()
    section = readme.split("## Security model and limits", 1)[1].split("\n## ", 1)[0]
    for limit in ("network", "abstract Unix sockets", "kernel"):
        assert limit in section, limit

"""enter_jail() in plain processes: both modes, the fd audit, idempotence, forks, jail contents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from apache_server import world_readable_dir

pytestmark = [pytest.mark.root]

PRELUDE = """\
import json, os, sys
import chrootwsgi
def report(**values):
    print(json.dumps(values), flush=True)
"""


def run_python(code: str, *, user: int | None = None) -> dict:
    """Run *code* in a fresh interpreter (as *user*) and return what it reported."""
    kwargs = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        **kwargs,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_rootless_entry_as_www_data(jail_root):
    facts = run_python(
        f"""
        state = chrootwsgi.enter_jail({jail_root!r})
        report(mode=state.mode, uid=os.getuid(), listing=sorted(os.listdir("/")),
               tmp_writable=os.access("/tmp", os.W_OK), seconds=state.seconds)
        """,
        user=33,
    )
    assert facts["mode"] == "rootless"
    assert facts["uid"] == 33
    assert {"etc", "dev", "tmp"} <= set(facts["listing"])
    assert not {"bin", "home", "root", "var", "proc", "sys"} & set(facts["listing"])
    assert facts["tmp_writable"] is True


def test_privileged_entry_drops_to_the_configured_user(jail_root):
    facts = run_python(
        f"""
        state = chrootwsgi.enter_jail({jail_root!r}, user="nobody")
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        report(mode=state.mode, ids=[os.getresuid(), os.getresgid()], groups=os.getgroups(),
               regained=regained, passwd=open("/etc/passwd").read())
        """
    )
    assert facts["mode"] == "privileged"
    assert facts["ids"] == [[65534] * 3, [65534] * 3]
    assert facts["groups"] == [65534]
    assert facts["regained"] is False
    assert facts["passwd"].startswith("nobody:x:65534:65534:")


def test_directory_descriptors_are_closed_before_entry(jail_root):
    facts = run_python(
        f"""
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        state = chrootwsgi.enter_jail({jail_root!r})
        try:
            os.fchdir(fd)
            escaped = sorted(os.listdir(".."))
        except OSError as exc:
            escaped = exc.strerror
        report(closed=list(state.closed_fds), escaped=escaped)
        """,
        user=33,
    )
    assert "/" in facts["closed"]
    assert facts["escaped"] == "Bad file descriptor"


def test_entry_is_idempotent_and_forked_children_stay_jailed(jail_root):
    facts = run_python(
        f"""
        first = chrootwsgi.enter_jail({jail_root!r})
        again = chrootwsgi.enter_jail({jail_root!r})
        try:
            chrootwsgi.enter_jail("/srv/another-jail")
            other = "entered"
        except chrootwsgi.EntryError as exc:
            other = str(exc)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, json.dumps([chrootwsgi.is_jailed(), sorted(os.listdir("/"))]).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = json.loads(os.read(read, 65536))
        report(same=first is again, other=other, child=child, listing=sorted(os.listdir("/")))
        """,
        user=33,
    )
    assert facts["same"] is True
    assert "already jailed in" in facts["other"]
    assert facts["child"] == [True, facts["listing"]]


def test_rootless_mode_as_root_is_refused(jail_root):
    facts = run_python(
        f"""
        try:
            chrootwsgi.enter_jail({jail_root!r}, mode="rootless")
            outcome = "entered"
        except chrootwsgi.EntryError as exc:
            outcome = str(exc)
        report(outcome=outcome, jailed=chrootwsgi.is_jailed(), listing=len(os.listdir("/")))
        """
    )
    assert "would leave the jailed worker uid 0" in facts["outcome"]
    assert facts["jailed"] is False


def test_contents_of_the_jail_directory_are_shown():
    root = world_readable_dir("chrootwsgi-jail-")
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    (root / "lib").symlink_to("/usr/lib")
    (root / "motd").write_text("inside\n")
    facts = run_python(
        f"""
        chrootwsgi.enter_jail({str(root)!r})
        with open("/tmp/written", "w") as file:
            file.write("x")
        report(motd=open("/motd").read(), lib=os.path.exists("/lib/python3.11"),
               lib_link=os.readlink("/lib"))
        """,
        user=33,
    )
    assert facts == {"motd": "inside\n", "lib": False, "lib_link": "/usr/lib"}
    assert (root / "tmp" / "written").read_text() == "x"  # the jail's own tmp/, on disk
    shutil.rmtree(root)


def test_unreachable_root_is_explained(tmp_path):
    root = tmp_path / "jail"  # pytest's base directory is private to root
    root.mkdir(mode=0o755)
    facts = run_python(
        f"""
        try:
            chrootwsgi.enter_jail({str(root)!r})
        except chrootwsgi.ConfigError as exc:
            report(error=str(exc))
        """,
        user=33,
    )
    assert facts["error"] == (
        f"root {str(root)!r} cannot be reached by uid 33: give it and every directory above "
        "it mode 755 (a+rx)"
    )


def test_no_mount_point_is_ever_created_in_a_host_directory(jail_root):
    uploads = world_readable_dir("chrootwsgi-exposed-")
    static = world_readable_dir("chrootwsgi-ro-")
    os.chmod(uploads, 0o777)  # a writable exposure
    try:
        facts = run_python(
            f"""
            chrootwsgi.enter_jail(
                {jail_root!r},
                expose=[
                    {{"host": {str(uploads)!r}, "jail": "/data", "writable": True}},
                    {{"host": {str(static)!r}, "jail": "/data/static"}},
                ],
            )
            report(listing=sorted(os.listdir("/data")))
            """,
            user=33,
        )
        assert facts["listing"] == []  # /data/static would need a mount point in the host dir
        assert os.listdir(uploads) == [], "a mount point was created in the host's exposed dir"
    finally:
        shutil.rmtree(uploads)
        shutil.rmtree(static)

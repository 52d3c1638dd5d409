"""The exec service's rlimits, enforced on real commands as a user of the client sees them.

``test_exec.py`` reads the limits back with ``ulimit``; these tests run commands that go past
each one.  They run as users nothing else on a test host uses, because RLIMIT_NPROC counts every
process of the uid (the supervisors included): ``games`` for most, ``uucp`` for max_processes
alone, so that the idle residents kept for the other commands do not count against it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from chroot_helper import client
from helper_daemon import Helper, running_helper

pytestmark = [pytest.mark.root]

USER = "games"
NPROC_USER = "uucp"
MAX_FILE_SIZE = 1 << 20
MAX_MEMORY = 256 << 20
MAX_OPEN_FILES = 32
MAX_PROCESSES = 24

COMMANDS = f"""
[exec.fsize]
argv = ["/bin/sh", "-c"]
args = "any"
user = "{USER}"
max_file_size = {MAX_FILE_SIZE}

[exec.memory]
argv = ["/usr/bin/python3", "-c"]
args = "any"
user = "{USER}"
max_memory = "256M"

[exec.spin]
argv = ["/bin/sh", "-c"]
args = "any"
user = "{USER}"
cpu = 1
timeout = 20

[exec.nofile]
argv = ["/usr/bin/python3", "-c"]
args = "any"
user = "{USER}"
max_open_files = {MAX_OPEN_FILES}

[exec.nproc]
argv = ["/usr/bin/python3", "-c"]
args = "any"
user = "{NPROC_USER}"
max_processes = {MAX_PROCESSES}
"""

#: Allocates ``sys.argv[1]`` bytes; exits 1 with "MemoryError" on stderr when it cannot.
ALLOCATE = """
import sys
try:
    data = bytearray(int(sys.argv[1]))
except MemoryError:
    sys.exit("MemoryError")
print("allocated", len(data))
"""

#: Opens /dev/null until it fails; prints how many it got, the highest fd and the error.
OPEN_FILES = """
import errno, os
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    print(len(fds), max(fds), errno.errorcode[exc.errno])
"""

#: Forks children that wait for it to exit, until fork fails; prints how many it forked, how many
#: tasks its uid then has (this one, its children, its supervisors) and the error.
FORK = """
import errno, os
r, w = os.pipe()
children = 0
try:
    while True:
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        children += 1
except OSError as exc:
    failure = errno.errorcode[exc.errno]
tasks = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        continue
    tasks += threads if uid == os.getuid() else 0
print(children, tasks, failure)
"""


@pytest.fixture(scope="module")
def helper() -> Iterator[Helper]:
    with running_helper(COMMANDS) as running:
        yield running


@pytest.fixture(autouse=True)
def helper_env(helper: Helper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROOT_HELPER_SOCKET", helper.socket)
    monkeypatch.delenv("CHROOT_HELPER_ADDRESS", raising=False)


@pytest.fixture
def writable_dir() -> Iterator[Path]:
    """A directory the command's user may write to (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="chroot-helper-limits-"))
    path.chmod(0o755)
    user = pwd.getpwnam(USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path)


def test_writing_past_max_file_size_kills_the_command_and_stops_the_file_at_the_limit(
    writable_dir: Path,
) -> None:
    big = writable_dir / "big"
    done = client.run(["fsize", f"exec head -c {2 * MAX_FILE_SIZE} /dev/zero > {big}"])
    assert done.returncode == -signal.SIGXFSZ
    assert big.stat().st_size == MAX_FILE_SIZE


def test_a_file_within_max_file_size_is_written_whole(writable_dir: Path) -> None:
    small = writable_dir / "small"
    done = client.run(["fsize", f"exec head -c {MAX_FILE_SIZE} /dev/zero > {small}"])
    assert done.returncode == 0
    assert small.stat().st_size == MAX_FILE_SIZE


def test_allocating_past_max_memory_fails_with_memory_error() -> None:
    done = client.run(["memory", ALLOCATE, str(2 * MAX_MEMORY)], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "MemoryError\n")


def test_allocating_well_under_max_memory_works() -> None:
    size = MAX_MEMORY // 4
    done = client.run(["memory", ALLOCATE, str(size)], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"allocated {size}\n", "")


def test_a_busy_loop_is_ended_by_the_cpu_limit_not_the_timeout() -> None:
    # cpu = 1 (soft) sends SIGXCPU after one second of CPU time; timeout = 20 would raise
    # subprocess.TimeoutExpired here instead of returning.
    done = client.run(["spin", "while :; do :; done"], capture_output=True)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGXCPU, b"", b"")


def test_a_busy_loop_that_ignores_sigxcpu_is_killed_at_the_hard_cpu_limit() -> None:
    # The hard limit is cpu + 1: the kernel sends SIGKILL then, which cannot be ignored.
    done = client.run(["spin", "trap '' XCPU; while :; do :; done"], capture_output=True)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGKILL, b"", b"")


def test_opening_more_files_than_max_open_files_fails_at_the_limit() -> None:
    done = client.run(["nofile", OPEN_FILES], capture_output=True, text=True)
    opened, highest, error = done.stdout.split()
    assert (done.returncode, done.stderr, error) == (0, "", "EMFILE")
    assert int(highest) == MAX_OPEN_FILES - 1  # every descriptor below the limit, none above
    assert int(opened) <= MAX_OPEN_FILES - 3  # stdin, stdout and stderr are open too


def test_forking_more_than_max_processes_fails_at_the_limit() -> None:
    done = client.run(["nproc", FORK], capture_output=True, text=True)
    children, tasks, error = done.stdout.split()
    assert (done.returncode, done.stderr, error) == (0, "", "EAGAIN")
    # The kernel refused the fork when the uid had max_processes tasks: this command, its children
    # and its supervisors (the one running it, and a spare the helper may fork beside it).  Only
    # such a spare can start after the refusal (as root, then setuid, which the limit does not
    # stop): at most one more.
    assert MAX_PROCESSES <= int(tasks) <= MAX_PROCESSES + 1
    assert 0 < int(children) < MAX_PROCESSES - 1

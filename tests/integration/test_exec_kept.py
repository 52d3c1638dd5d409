"""Kept connections: a resident supervisor runs a client's next requests on the same connection.

A real helper, the real client; what the client's process sees: which sockets it holds, what each
call returns, and that nothing breaks when the helper closes or takes back an idle connection.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chroot_helper import client
from chroot_helper.errors import CommandError
from helper_daemon import Helper, run_and_kill_its_supervisor, running_helper, wait_until

COMMANDS = """
[exec.echo]
argv = ["/bin/echo"]
args = "any"

[exec.sh]
argv = ["/bin/sh", "-c"]
args = "any"
timeout = 20

[exec.offline]
argv = ["/bin/cat", "/proc/net/dev"]
network = false

[exec.slow]
argv = ["/bin/sleep"]
args = ["[0-9.]+"]
timeout = 1
"""


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helper]:
    # A command only root may execute: the helper accepts it (it checks as root), but it cannot
    # start as the command's user.
    root_only = tmp_path_factory.mktemp("root-only") / "root-only"
    root_only.write_text("#!/bin/sh\necho never\n")
    root_only.chmod(0o700)
    commands = f'{COMMANDS}\n[exec.rootonly]\nargv = ["{root_only}"]\n'
    # max_concurrent = 2: an idle kept connection holds a slot until the helper takes it back.
    with running_helper(
        commands, helper_table="request_timeout = 2\nmax_concurrent = 2\nmax_per_uid = 2"
    ) as run:
        yield run


@pytest.fixture(autouse=True)
def helper_env(helper: Helper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROOT_HELPER_SOCKET", helper.socket)
    monkeypatch.delenv("CHROOT_HELPER_ADDRESS", raising=False)


def sockets() -> set[int]:
    """Inodes of the Unix sockets this process holds."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        if stat.S_ISSOCK(info.st_mode):
            found.add(info.st_ino)
    return found


def echo(text: str, out: Path) -> int:
    with open(out, "ab") as fh:
        return client.run(["echo", text], stdin=client.DEVNULL, stdout=fh).returncode


def residents(helper: Helper) -> list[int]:
    """The helper's resident supervisors (the forker's children)."""
    pid = helper.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        forker = int(fh.read().split()[0])
    with open(f"/proc/{forker}/task/{forker}/children") as fh:
        return [int(child) for child in fh.read().split()]


def test_the_next_call_uses_the_same_connection(tmp_path: Path) -> None:
    echo("warm", tmp_path / "out")
    held = sockets()
    for n in range(5):
        assert echo(f"call {n}", tmp_path / "out") == 0
        assert sockets() == held  # no connection opened or left behind
    assert (tmp_path / "out").read_text().splitlines() == ["warm"] + [f"call {n}" for n in range(5)]


def test_what_the_resident_cannot_run_goes_back_to_the_daemon(tmp_path: Path) -> None:
    echo("kept", tmp_path / "out")
    # Piped output, a command of other limits, a refused command and refused arguments: the
    # daemon serves or refuses each as it would on a new connection.
    assert client.run(["echo", "piped"], capture_output=True).stdout == b"piped\n"
    echo("kept", tmp_path / "out")
    assert client.run(["slow", "0"], stdin=client.DEVNULL).returncode == 0
    echo("kept", tmp_path / "out")
    with pytest.raises(CommandError, match="command 'rm' is not allowed"):
        client.run(["rm", "-rf", "/"], stdin=client.DEVNULL)
    echo("kept", tmp_path / "out")
    with pytest.raises(CommandError, match=r"argument 1 '--help' matches none"):
        client.run(["slow", "--help"], stdin=client.DEVNULL)
    assert echo("after", tmp_path / "out") == 0
    assert (tmp_path / "out").read_text().split() == ["kept"] * 4 + ["after"]


def test_a_command_with_namespaces_of_its_own_never_runs_in_a_kept_resident(
    tmp_path: Path,
) -> None:
    # Same user and limits as echo, so the same resident identity; only its supervisor, not a
    # resident, may give it the empty network namespace it is configured with.
    echo("kept", tmp_path / "out")
    with open(tmp_path / "net", "wb") as fh:
        assert client.run(["offline"], stdin=client.DEVNULL, stdout=fh).returncode == 0
    lines = (tmp_path / "net").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in lines] == ["lo"]


def test_a_kept_call_times_out_and_the_next_one_runs() -> None:
    client.run(["echo"], stdin=client.DEVNULL, stdout=client.DEVNULL)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        client.run(["sh", "sleep 30"], stdin=client.DEVNULL, stdout=client.DEVNULL, timeout=0.5)
    assert time.monotonic() - started < 10
    assert client.run(["sh", "exit 7"], stdin=client.DEVNULL).returncode == 7


def test_an_idle_connection_is_closed_after_request_timeout(tmp_path: Path) -> None:
    echo("before", tmp_path / "out")
    held = sockets()
    time.sleep(3)  # request_timeout = 2: the helper closes the idle connection
    assert echo("after", tmp_path / "out") == 0
    assert sockets() != held  # a new connection replaced the closed one
    assert (tmp_path / "out").read_text().split() == ["before", "after"]


def test_the_helper_takes_back_idle_connections_when_a_limit_is_reached(helper: Helper) -> None:
    # This process keeps one connection, another process a second: max_concurrent = 2 is
    # reached by idle connections alone, and a third process must still get its turn.
    client.run(["echo"], stdin=client.DEVNULL, stdout=client.DEVNULL)
    code = (
        "for _ in range(3):\n"
        "    client.run(['echo'], stdin=client.DEVNULL, stdout=client.DEVNULL)\n"
        "import time; time.sleep(1)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", "from chroot_helper import client\n" + code],
        env=helper.env(),
    )
    try:
        time.sleep(0.5)
        done = helper.run_client("print(client.run(['echo', 'third'], capture_output=True).stdout)")
        assert done.stdout == "b'third\\n'\n"
    finally:
        assert holder.wait(30) == 0
    assert client.run(["echo", "on"], capture_output=True).stdout == b"on\n"


def test_a_killed_idle_resident_costs_the_client_nothing(helper: Helper, tmp_path: Path) -> None:
    echo("before", tmp_path / "out")
    killed = residents(helper)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not set(killed) & set(residents(helper)), what="the residents to be reaped")
    assert echo("after", tmp_path / "out") == 0
    assert (tmp_path / "out").read_text().split() == ["before", "after"]


def test_a_kept_command_whose_supervisor_dies_gets_sigkill() -> None:
    client.run(["echo"], stdin=client.DEVNULL, stdout=client.DEVNULL)
    held = sockets()
    killed = run_and_kill_its_supervisor("sleep 3631", stdin=client.DEVNULL, stdout=client.DEVNULL)
    assert killed == -signal.SIGKILL
    assert sockets() <= held  # that connection was the kept one, and it is gone
    assert client.run(["echo", "on"], capture_output=True).stdout == b"on\n"


def test_a_child_process_never_uses_its_parents_connection(tmp_path: Path) -> None:
    echo("parent", tmp_path / "out")
    held = sockets()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            # Its own connection; the copy of the parent's is dropped (closing it here leaves
            # the parent's open).
            code = 0 if echo("child", tmp_path / "out") == 0 and sockets() - held else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert echo("parent again", tmp_path / "out") == 0
    assert sockets() == held
    assert (tmp_path / "out").read_text().splitlines() == ["parent", "child", "parent again"]


def test_a_kept_command_that_cannot_start_is_reported_under_its_own_name(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the command runs as another user than the helper")
    out = tmp_path / "out"
    assert echo("first", out) == 0  # the connection is kept by a resident of this identity
    with pytest.raises(CommandError, match=r"^\[exec\.rootonly\] could not start: .*denied"):
        client.run(["rootonly"], stdin=client.DEVNULL, stdout=client.DEVNULL)
    assert echo("after", out) == 0
    assert out.read_text() == "first\nafter\n"


def test_every_kept_exit_is_logged_and_a_run_of_repeats_is_counted() -> None:
    # Like syslog's "last message repeated N times": the first line of a run at once, the count
    # with the next different line, or once the client has been idle a second (here while the
    # connection is still kept: request_timeout is 30 s and the client sleeps).
    code = (
        "null = dict(stdin=client.DEVNULL, stdout=client.DEVNULL)\n"
        "for _ in range(5): client.run(['echo'], **null)\n"
        "client.run(['sh', 'exit 3'], **null)\n"
        "for _ in range(3): client.run(['echo'], **null)\n"
        "import os, time; print(os.getpid(), flush=True); time.sleep(60)\n"
    )
    with running_helper(COMMANDS, helper_table="request_timeout = 30") as helper:
        process = subprocess.Popen(
            [sys.executable, "-c", "from chroot_helper import client\n" + code],
            env=helper.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            pid = int(process.stdout.readline())

            def lines() -> list[str]:
                log = helper.log_text().splitlines()
                mine = (line for line in log if f"pid={pid} " in line and " exited " in line)
                return [line.split(": ", 2)[-1] for line in mine]

            wait_until(lambda: len(lines()) == 5, what="the repeats to be logged")
            assert process.poll() is None  # still sleeping, its connection kept
            assert lines() == [
                "echo exited 0",
                "echo exited 0 (4 more times)",
                "sh exited 3",
                "echo exited 0",
                "echo exited 0 (2 more times)",
            ]
        finally:
            process.kill()
            process.wait()
            if process.stdout:
                process.stdout.close()

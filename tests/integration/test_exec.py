"""The exec service end to end: a real ``chroot-helper serve``, the real client, real commands."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chroot_helper import client, protocol
from chroot_helper.errors import BusyError, CommandError
from helper_daemon import (
    SUPERVISOR,
    Helper,
    processes_with,
    run_and_kill_its_supervisor,
    running_helper,
    wait_until,
)

COMMANDS = """
[exec.echo]
argv = ["/bin/echo"]
args = "any"

[exec.cat]
argv = ["/bin/cat"]
args = "any"
max_output = "64M"

[exec.sh]
argv = ["/bin/sh", "-c"]
args = "any"
timeout = 20
max_output = "80M"

[exec.slow]
argv = ["/bin/sleep"]
args = ["[0-9]+"]
timeout = 1

[exec.yes]
argv = ["/usr/bin/yes"]
args = "none"
max_output = "1M"

[exec.env]
argv = ["/usr/bin/env"]
env = { LANG = "C.UTF-8" }

[exec.offline]
argv = ["/bin/cat", "/proc/net/dev"]
network = false

[exec.orphans]
argv = ["/bin/sh", "-c", "i=0; while [ $i -lt 600 ]; do (true &); i=$((i+1)); done; echo done"]
max_processes = 64

[exec.pidns]
argv = ["/bin/sh", "-c", "echo $$; sleep 3101 & sleep 3102 & echo started"]
pid_namespace = true

[exec.pwd]
argv = ["/bin/pwd"]
cwd = "{workdir}"

[exec.pwd_offline]
argv = ["/bin/pwd"]
cwd = "{workdir}"
network = false
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    """A directory (world-traversable, so ``nobody`` can enter it) for ``cwd = "{workdir}"``."""
    path = tempfile.mkdtemp(prefix="chroot-helper-cwd-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def helper(workdir: str) -> Iterator[Helper]:
    config = COMMANDS.replace("{workdir}", workdir)
    with running_helper(config, helper_table="max_per_peer = 3") as running:
        yield running


@pytest.fixture(autouse=True)
def helper_env(helper: Helper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROOT_HELPER_SOCKET", helper.socket)
    monkeypatch.delenv("CHROOT_HELPER_ADDRESS", raising=False)


def test_echo_returns_output_and_status() -> None:
    done = client.run(["echo", "hello", "world"], capture_output=True)
    assert done.returncode == 0
    assert done.stdout == b"hello world\n"
    assert done.stderr == b""
    assert done.args == ["echo", "hello", "world"]


def test_command_found_by_its_path_and_text_mode() -> None:
    done = client.run(["/bin/echo", "-n", "päth"], capture_output=True, text=True)
    assert done.stdout == "päth"


def test_cat_with_stdin_round_trips_a_megabyte() -> None:
    data = os.urandom(3 << 20)
    done = client.run(["cat"], input=data, capture_output=True)
    assert done.stdout == data


def test_popen_streams_stdin_and_stdout_incrementally() -> None:
    with client.Popen(["cat"], stdin=client.PIPE, stdout=client.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for line in (b"first\n", b"second\n"):
            proc.stdin.write(line)
            proc.stdin.flush()
            # The echo comes back while the command still runs and stdin is still open.
            assert proc.stdout.readline() == line
            assert proc.poll() is None
        proc.stdin.close()
        assert proc.stdout.read() == b""
    assert proc.returncode == 0


def test_large_output_streams_through_the_helper() -> None:
    size = 48 << 20
    done = client.run(["sh", f"head -c {size} /dev/zero; echo done >&2"], capture_output=True)
    assert len(done.stdout) == size
    assert done.stderr == b"done\n"


def test_popen_reads_long_output_while_it_is_produced() -> None:
    with client.Popen(
        ["sh", "for i in 1 2 3; do echo line $i; done; sleep 30"], stdout=client.PIPE
    ) as p:
        assert p.stdout is not None
        assert [p.stdout.readline() for _ in range(3)] == [b"line 1\n", b"line 2\n", b"line 3\n"]
        p.terminate()
    assert p.returncode == -signal.SIGTERM


def _read_events_until(
    sock: socket.socket, conn: protocol.Connection, wanted: Callable[[object], bool]
) -> list[object]:
    """Read events from the helper up to and including the first one *wanted* accepts; fail,
    with the events seen, if the connection ends (or a final frame comes) before it."""
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is protocol.NEED_DATA:
            try:
                conn.receive_data(sock.recv(65536))
            except TimeoutError:
                raise AssertionError(
                    f"no expected event within {sock.gettimeout()} s; got {events}"
                ) from None
            continue
        if event is protocol.CLOSED:
            raise AssertionError(f"the helper closed the connection after {events}")
        events.append(event)
        if wanted(event):
            return events
        if isinstance(event, protocol.Exit | protocol.Error):
            raise AssertionError(f"the call ended before the expected event: {events}")


def test_streamed_output_arrives_while_the_command_still_runs(helper: Helper) -> None:
    conn = protocol.Connection(protocol.Role.CLIENT)
    request = protocol.Request(
        op="exec",
        params={
            "command": "sh",
            "args": ['echo first; read line; echo "got $line"'],
            "stdin": "pipe",
            "stdout": "pipe",
            "stderr": "pipe",
        },
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(helper.socket)
        sock.sendall(conn.send(request))
        # Nothing has been written to stdin yet: the command is blocked in `read`, so the first
        # line has to come back before the command ends.
        before = _read_events_until(
            sock,
            conn,
            lambda e: isinstance(e, protocol.Data) and e.stream == protocol.STDOUT and e.data,
        )
        assert before[0] == protocol.Started()
        assert before[-1] == protocol.Data(stream=protocol.STDOUT, data=b"first\n")
        sock.sendall(conn.send(protocol.Data(stream=protocol.STDIN, data=b"second\n")))
        sock.sendall(conn.send(protocol.Data(stream=protocol.STDIN)))
        after = _read_events_until(sock, conn, lambda e: isinstance(e, protocol.Exit))
    stdout = b"".join(
        e.data for e in after if isinstance(e, protocol.Data) and e.stream == protocol.STDOUT
    )
    assert stdout == b"got second\n"
    assert after[-1] == protocol.Exit(returncode=0)


def test_passed_fds_are_used_directly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.txt"
    source.write_bytes(b"from a file\n")
    target = tmp_path / "out.txt"
    with open(source, "rb") as fin, open(target, "wb") as fout:
        done = client.run(["cat"], stdin=fin, stdout=fout, stderr=client.DEVNULL)
    assert done.returncode == 0
    assert done.stdout is None
    assert target.read_bytes() == b"from a file\n"


def test_stderr_merged_into_stdout() -> None:
    done = client.run(["sh", "echo out; echo err >&2"], stdout=client.PIPE, stderr=client.STDOUT_TO)
    assert sorted(done.stdout.splitlines()) == [b"err", b"out"]


def test_exit_status_and_signal_are_returned() -> None:
    assert client.run(["sh", "exit 7"]).returncode == 7
    assert client.run(["sh", "kill -TERM $$"]).returncode == -signal.SIGTERM
    with pytest.raises(subprocess.CalledProcessError) as info:
        client.run(["sh", "echo partial; exit 3"], capture_output=True, check=True)
    assert info.value.returncode == 3
    assert info.value.output == b"partial\n"


def test_client_timeout_kills_the_tree() -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        client.run(["sh", "echo begun; sleep 3201 & sleep 3202"], capture_output=True, timeout=1)
    assert info.value.output == b"begun\n"
    assert processes_with("sleep 320") == []


def test_client_timeout_kills_detached_children_too() -> None:
    script = (
        "setsid sleep 3701 & "  # its own session
        "(sleep 3702 &) ; "  # double fork: re-parented away from the shell
        "setsid sh -c 'sleep 3703 &' ; "  # a new session, then orphaned there
        # Report only once all three run, so that the timeout surely catches them.
        "until [ \"$(pgrep -c -f '^sleep 370[123]')\" -ge 3 ]; do sleep 0.05; done; "
        "echo begun; sleep 3704"
    )
    with pytest.raises(subprocess.TimeoutExpired) as info:
        client.run(["sh", script], capture_output=True, timeout=2)
    assert info.value.output == b"begun\n"
    wait_until(lambda: processes_with("sleep 370") == [], what="every sleep 370x to be killed")


def test_configured_timeout_applies_without_a_client_timeout() -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        client.run(["slow", "3300"])
    assert processes_with("sleep 3300") == []


def test_output_cap_kills_the_command() -> None:
    with pytest.raises(client.OutputLimitExceeded) as info:
        client.run(["yes"], capture_output=True)
    assert len(info.value.output) == 1 << 20
    assert set(info.value.output) == set(b"y\n")


def test_background_children_are_gone_after_the_command_ends() -> None:
    script = (
        "sleep 3401 & "  # plain background child
        "setsid sleep 3402 & "  # detached into its own session
        "(sleep 3403 &) ; "  # double fork: re-parented away from the shell
        "setsid sh -c 'sleep 3404 &' ; "
        "echo started"
    )
    done = client.run(["sh", script], capture_output=True)
    assert done.stdout == b"started\n"
    assert processes_with("sleep 340") == []


def test_orphans_that_exit_are_reaped_while_the_command_runs() -> None:
    # 600 double-forked children exit one after another, each re-parented to the supervisor;
    # zombies count against max_processes until reaped, so the command runs out of processes
    # unless they are reaped as they exit.
    done = client.run(["orphans"], capture_output=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"done\n", b"")


def test_client_disconnect_kills_the_tree(helper: Helper) -> None:
    code = (
        "p = client.Popen(['sh', 'sleep 3501 & setsid sleep 3502 & echo up; sleep 3503'],"
        " stdout=client.PIPE)\n"
        "print(p.stdout.readline().decode().strip(), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", "from chroot_helper import client\n" + code],
        env=helper.env(),
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"
        wait_until(lambda: len(processes_with("sleep 350")) == 3, what="three sleeps to start")
    finally:
        child.kill()
        child.wait()
        if child.stdout:
            child.stdout.close()
    wait_until(lambda: processes_with("sleep 350") == [], what="the tree to be killed")


@pytest.mark.parametrize(
    ("streams", "marker"),
    [
        pytest.param("capture_output=True", "sleep 391", id="output-relayed"),
        pytest.param("input=b'in'", "sleep 392", id="input-relayed"),
    ],
)
def test_client_disconnect_kills_the_tree_when_the_helper_relays_the_streams(
    helper: Helper, streams: str, marker: str
) -> None:
    script = f"{marker}1 & setsid {marker}2 & ({marker}3 &) ; {marker}4"
    code = f"from chroot_helper import client\nclient.run(['sh', {script!r}], {streams})\n"
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=helper.env(), stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: len(processes_with(marker)) == 4, what=f"four {marker}x to start")
        assert child.poll() is None  # the client is still waiting for its command
    finally:
        child.kill()
        child.wait()
    wait_until(lambda: processes_with(marker) == [], what="the tree to be killed")


def test_a_command_cannot_look_into_its_supervisor() -> None:
    # The supervisor has the command's uid and serves one client after another: its memory,
    # environment and descriptors stay closed to the commands it runs.
    script = (
        SUPERVISOR + "echo $supervisor; "
        "cat /proc/$supervisor/environ; ls /proc/$supervisor/fd; head -c1 /proc/$supervisor/mem"
    )
    done = client.run(["sh", script], capture_output=True, text=True)
    supervisor = int(done.stdout)
    assert b"chroot_helper" in Path(f"/proc/{supervisor}/cmdline").read_bytes()
    assert done.stderr.count("Permission denied") == 3, done.stderr


def test_a_command_can_signal_nothing_outside_its_supervisors_pid_namespace() -> None:
    # The resident is PID 1 of a namespace of its own: its commands see only their own
    # processes and it. Signals to PID 1 that it has no handler for (SIGKILL) are dropped, and
    # another process of the same uid is out of reach.
    outsider = subprocess.Popen(["sleep", "3621"], user=65534, group=65534, extra_groups=[])
    try:
        script = f"echo $PPID; kill -9 $PPID; echo survived; kill -9 {outsider.pid}"
        done = client.run(["sh", script], capture_output=True, text=True)
        assert done.stdout.split() == ["1", "survived"]
        assert "No such process" in done.stderr
        assert done.returncode != 0
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


def test_without_cap_sys_admin_residents_share_the_helpers_pid_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As under the shipped systemd unit: no namespaces, so the process group and the subreaper
    # alone kill the tree, and the log says why.
    no_admin = ["setpriv", "--bounding-set", "-sys_admin"]
    commands = '[exec.sh]\nargv = ["/bin/sh", "-c"]\nargs = "any"\n'  # needs no namespaces
    with running_helper(commands, prefix=no_admin) as limited:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", limited.socket)
        script = "echo $PPID; sleep 3641 & setsid sleep 3642 &"
        done = client.run(["sh", script], capture_output=True)
        assert int(done.stdout) != 1
        assert processes_with("sleep 364") == []
        assert "no PID namespaces for residents" in limited.log_text()


def test_a_supervisor_that_dies_ends_the_call_with_sigkill_and_leaves_no_process() -> None:
    # Whether the supervisor talks to the client itself or the daemon relays (capture_output),
    # its death ends the call like a kill; the kernel kills everything in its namespace, the
    # command's background and setsid children too.
    script = "sleep 3611 & setsid sleep 3612 & sleep 3613"
    for streams in ({"stdin": client.DEVNULL, "stdout": client.DEVNULL}, {"capture_output": True}):
        assert run_and_kill_its_supervisor(script, **streams) == -signal.SIGKILL
        wait_until(lambda: processes_with("sleep 361") == [], what="the tree to be killed")
    assert client.run(["echo", "on"], capture_output=True).stdout == b"on\n"


def test_environment_is_clean() -> None:
    done = client.run(["env"], capture_output=True, text=True)
    assert sorted(done.stdout.splitlines()) == ["LANG=C.UTF-8", "PATH=/usr/local/bin:/usr/bin:/bin"]


def test_command_runs_in_its_configured_cwd_and_in_root_by_default(workdir: str) -> None:
    # pwd (resident supervisors) and pwd_offline (a supervisor forked for the one call) both
    # have cwd = workdir; sh has none. The helper itself runs in the test's directory, not "/".
    for command in ("pwd", "pwd_offline"):
        done = client.run([command], capture_output=True, text=True)
        assert (done.returncode, done.stdout) == (0, workdir + "\n"), command
    assert client.run(["sh", "pwd"], capture_output=True, text=True).stdout == "/\n"


def test_runs_as_nobody_with_rlimits() -> None:
    script = "id -u; ulimit -n; ulimit -t; ulimit -f; ulimit -v; ulimit -p"
    done = client.run(["sh", script], capture_output=True, text=True)
    uid, nofile, cpu, fsize, address_space, processes = done.stdout.split()
    assert uid == "65534"
    assert nofile == "256"
    assert cpu == "21"  # cpu defaults to the timeout + 1
    assert int(fsize) * 512 == 64 << 20 or int(fsize) * 1024 == 64 << 20
    assert int(address_space) * 1024 == 1 << 30  # max_memory = "1G"
    assert processes == "256"


def test_no_network_namespace_has_only_loopback() -> None:
    done = client.run(["offline"], capture_output=True, text=True)
    interfaces = [line.split(":")[0].strip() for line in done.stdout.splitlines()[2:]]
    assert interfaces == ["lo"]


def test_pid_namespace_makes_the_command_pid_1_and_cleans_up() -> None:
    done = client.run(["pidns"], capture_output=True, text=True)
    assert done.stdout.split() == ["1", "started"]
    assert processes_with("sleep 310") == []


def test_disallowed_command_is_refused_clearly() -> None:
    with pytest.raises(CommandError, match=r"'/usr/bin/wget' is not allowed.*\[exec\.wget\]"):
        client.run(["/usr/bin/wget", "http://example.invalid/"])


def test_disallowed_arguments_are_refused_clearly() -> None:
    with pytest.raises(CommandError, match=r"argument 1 '--help' matches none of.*\[0-9\]\+"):
        client.run(["slow", "--help"])
    with pytest.raises(CommandError, match=r"takes no arguments"):
        client.run(["yes", "no"])


def test_per_peer_concurrency_limit_leaves_others_served(helper: Helper) -> None:
    procs = [client.Popen(["sh", "sleep 3601"], stdin=client.DEVNULL) for _ in range(3)]
    try:
        with pytest.raises(BusyError, match=r"max_per_peer = 3"):
            client.run(["echo", "one too many"])
        # Another peer process is still served.
        other = helper.run_client(
            "print(client.run(['echo', 'other'], capture_output=True).stdout)"
        )
        assert other.stdout.strip() == "b'other\\n'"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert processes_with("sleep 3601") == []
    assert client.run(["echo", "again"], capture_output=True).stdout == b"again\n"


def test_cli_exec_passes_the_exit_status_through(helper: Helper) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chroot_helper.cli", "exec", "sh", "echo via cli; exit 5"],
        env=helper.env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 5
    assert done.stdout == "via cli\n"
    refused = subprocess.run(
        [sys.executable, "-m", "chroot_helper.cli", "exec", "rm", "-rf", "/"],
        env=helper.env(),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 125
    assert "'rm' is not allowed" in refused.stderr


def test_helper_keeps_only_the_capabilities_it_needs(helper: Helper) -> None:
    text = Path(f"/proc/{helper.proc.pid}/status").read_text()
    status = dict(line.split(":\t", 1) for line in text.splitlines())
    # CAP_SETGID (6), CAP_SETUID (7), and CAP_SYS_ADMIN (21) for network = false / pid_namespace.
    expected = (1 << 6) | (1 << 7) | (1 << 21)
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[key], 16) == expected, key
    assert int(status["CapInh"], 16) == 0
    # Commands inherit that bounding set, so not even a user = "root" command gets more.
    done = client.run(["sh", "grep CapBnd /proc/self/status"], capture_output=True, text=True)
    assert int(done.stdout.split()[1], 16) == expected


def test_shim_gives_subprocess_semantics(helper: Helper) -> None:
    code = (
        "from chroot_helper import shim\n"
        "shim.install()\n"
        "try:\n"
        "    subprocess.check_output(['sh', 'echo partial; exit 4'])\n"
        "except subprocess.CalledProcessError as exc:\n"
        "    print('failed', exc.returncode, exc.output)\n"
        "try:\n"
        "    subprocess.run(['sh', 'sleep 3801'], timeout=0.5)\n"
        "except subprocess.TimeoutExpired as exc:\n"
        "    print('timeout', exc.timeout)\n"
        "print('call', subprocess.call(['echo'], stdout=subprocess.DEVNULL))\n"
        "p = subprocess.Popen(['cat'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
        "print('text', p.communicate('typed'))\n"
    )
    assert helper.run_client(code).stdout.splitlines() == [
        "failed 4 b'partial\\n'",
        "timeout 0.5",
        "call 0",
        "text ('typed', None)",
    ]
    assert processes_with("sleep 3801") == []

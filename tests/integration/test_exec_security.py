"""chroot-helper against hostile or unexpected peers, from jailed processes, and over TCP."""

from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chroot_helper import client, protocol
from chroot_helper.errors import BusyError, CommandError
from helper_daemon import Helper, processes_with, running_helper, wait_until

COMMANDS = """
[exec.echo]
argv = ["/bin/echo"]
args = "any"

[exec.cat]
argv = ["/bin/cat"]
args = "any"
"""


@pytest.fixture(scope="module")
def helper() -> Iterator[Helper]:
    with running_helper(COMMANDS) as running:
        yield running


def _raw_exchange(path: str, payload: bytes, fds: list[int] | None = None) -> list[object]:
    """Send raw bytes (and fds); return the events the helper answers with."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        return _send_raw(sock, payload, fds)


def _send_raw(sock: socket.socket, payload: bytes, fds: list[int] | None = None) -> list[object]:
    """Send raw bytes (and fds) on *sock*; return the events the helper answers with, up to the
    end of the connection or an EXIT that keeps it."""
    conn = protocol.Connection(protocol.Role.CLIENT)
    conn.our_state = conn.their_state = protocol.State.RUNNING  # read whatever it sends
    events: list[object] = []
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        sock.sendmsg([payload], anc)
    except BrokenPipeError:
        pass
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        conn.receive_data(data)
        while (event := conn.next_event()) not in (protocol.NEED_DATA, protocol.CLOSED):
            events.append(event)
        last = events[-1] if events else None
        if not data or isinstance(last, protocol.Exit) and last.keep:
            return events  # the end, or a kept connection that waits for another request


@contextlib.contextmanager
def _kept_connection(path: str) -> Iterator[socket.socket]:
    """A connection the helper keeps after a first request (a resident waits on it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        first = _send_raw(sock, _request_frame({"command": "echo", "started": False}))
        assert first == [protocol.Exit(returncode=0, keep=True)]
        yield sock


def _request_frame(params: dict[str, object], fds: int = 0) -> bytes:
    body = json.dumps({"op": "exec", "params": params, "fds": fds, "token": None}).encode()
    return protocol.HEADER.pack(b"CH", 1, 1, len(body)) + body


def _assert_still_serving() -> None:
    assert client.run(["echo", "still serving"], capture_output=True).stdout == b"still serving\n"


@pytest.fixture(autouse=True)
def helper_env(helper: Helper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROOT_HELPER_SOCKET", helper.socket)


def test_peer_uid_not_in_allow_uids_is_refused(helper: Helper) -> None:
    code = "client.run(['echo', 'x'])"
    done = helper.run_client(code, user=65534, check=False)
    assert done.returncode != 0
    assert "PeerRefusedError: peer uid 65534 gid 65534 is not allowed" in done.stderr
    assert "allow_uids" in done.stderr
    assert "peer uid 65534" in helper.log_text()
    _assert_still_serving()


def test_allowed_uid_is_served(helper: Helper) -> None:
    done = helper.run_client(
        "print(client.run(['echo', 'www'], capture_output=True).stdout)", user=33
    )
    assert done.stdout.strip() == "b'www\\n'"


GARBAGE = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
    pytest.param(b"\x00" * 64, id="zeros"),
    pytest.param(protocol.HEADER.pack(b"CH", 9, 1, 2) + b"{}", id="bad-version"),
    pytest.param(protocol.HEADER.pack(b"CH", 1, 77, 2) + b"{}", id="unknown-type"),
    pytest.param(protocol.HEADER.pack(b"CH", 1, 1, 5) + b"[1,2]", id="json-array"),
    pytest.param(protocol.HEADER.pack(b"CH", 1, 1, 1 << 30), id="oversized"),
    pytest.param(protocol.HEADER.pack(b"CH", 1, 2, 3) + b"\x00ab", id="data-before-request"),
    pytest.param(protocol.HEADER.pack(b"CH", 1, 1, 2) + b"\xff}", id="not-utf-8"),
    pytest.param(protocol.HEADER.pack(b"CH", 1, 1, 200) + b"[" * 100 + b"]" * 100, id="deep"),
]


@pytest.mark.parametrize("payload", GARBAGE)
def test_garbage_gets_an_error_frame_and_the_helper_keeps_serving(
    payload: bytes, helper: Helper
) -> None:
    with client.Popen(["cat"], stdin=client.PIPE, stdout=client.PIPE) as busy:
        assert busy.stdin is not None and busy.stdout is not None
        events = _raw_exchange(helper.socket, payload)
        assert len(events) == 1
        error = events[0]
        assert isinstance(error, protocol.Error)
        assert error.code == "protocol"
        assert error.message
        # A connection that was already running is unaffected, and new ones are served.
        busy.stdin.write(b"alive\n")
        busy.stdin.flush()
        assert busy.stdout.readline() == b"alive\n"
        busy.stdin.close()
    _assert_still_serving()


@pytest.mark.parametrize("payload", GARBAGE)
def test_garbage_on_a_kept_connection_gets_the_same_error_frame(
    payload: bytes, helper: Helper
) -> None:
    with _kept_connection(helper.socket) as sock:
        events = _send_raw(sock, payload)
    assert len(events) == 1
    assert isinstance(events[0], protocol.Error)
    assert events[0].code == "protocol"
    assert events[0] == _raw_exchange(helper.socket, payload)[0]
    _assert_still_serving()


def test_a_kept_connection_refuses_bad_parameters_with_the_same_message(helper: Helper) -> None:
    for params in (
        {"command": "echo", "args": "not a list"},
        {"command": "echo", "args": ["\ud800"]},
        {"command": "echo", "stdout": "fd"},
        {"command": "echo", "started": "no"},
        {"command": "echo", "timeout": True},
        {"command": "rm"},
        {"command": "echo", "shell": True},
    ):
        with _kept_connection(helper.socket) as sock:
            events = _send_raw(sock, _request_frame(params))
        assert len(events) == 1
        assert isinstance(events[0], protocol.Error)
        assert events[0].code == "command"
        assert events == _raw_exchange(helper.socket, _request_frame(params))
    _assert_still_serving()


def test_a_kept_connection_reads_a_request_that_arrives_in_pieces(helper: Helper) -> None:
    r, w = os.pipe()
    try:
        frame = _request_frame({"command": "echo", "args": ["in pieces"], "stdout": "fd"}, fds=1)
        with _kept_connection(helper.socket) as sock:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())]
            sock.sendmsg([frame[:5]], anc)  # the descriptor comes with the first piece
            time.sleep(0.2)
            sock.sendall(frame[5:20])
            time.sleep(0.2)
            events = _send_raw(sock, frame[20:])
        assert events == [protocol.Started(), protocol.Exit(returncode=0, keep=True)]
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as out:
            r = -1
            assert out.read() == b"in pieces\n"
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_a_repeated_request_on_a_kept_connection_uses_the_descriptors_it_brings(
    helper: Helper,
) -> None:
    frame = _request_frame({"command": "echo", "args": ["again"], "stdout": "fd"}, fds=1)
    pipes = [os.pipe(), os.pipe()]
    try:
        with _kept_connection(helper.socket) as sock:
            for _, w in pipes:
                events = _send_raw(sock, frame, [w])
                assert events == [protocol.Started(), protocol.Exit(returncode=0, keep=True)]
            without_fd = _send_raw(sock, frame)
        for r, w in pipes:
            os.close(w)
            assert os.read(r, 100) == b"again\n"
    finally:
        for fd in (fd for pipe in pipes for fd in pipe):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert len(without_fd) == 1
    assert isinstance(without_fd[0], protocol.Error)
    assert without_fd == _raw_exchange(helper.socket, frame)
    _assert_still_serving()


def test_a_second_request_before_the_first_ends_ends_the_connection(helper: Helper) -> None:
    # One request at a time: the second is not run, and the connection is not kept (whether the
    # first command had finished or is killed depends on when the helper reads the second).
    frame = _request_frame({"command": "echo", "started": False})
    with _kept_connection(helper.socket) as sock:
        kept = _send_raw(sock, frame + frame)
    fresh = _raw_exchange(helper.socket, frame + frame)
    for events in (kept, fresh):
        assert len(events) == 1
        assert isinstance(events[0], protocol.Exit | protocol.Error)
        assert not isinstance(events[0], protocol.Exit) or not events[0].keep
    _assert_still_serving()


def test_a_kept_connection_closed_inside_a_frame_gets_the_same_error(helper: Helper) -> None:
    def close_inside_a_frame(sock: socket.socket) -> list[object]:
        sock.sendall(_request_frame({"command": "echo"})[:12])
        sock.shutdown(socket.SHUT_WR)
        return _send_raw(sock, b"")

    with _kept_connection(helper.socket) as sock:
        kept = close_inside_a_frame(sock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(helper.socket)
        fresh = close_inside_a_frame(sock)
    assert (
        kept
        == fresh
        == [protocol.Error(code="protocol", message="connection closed inside a frame")]
    )
    _assert_still_serving()


def _has_no_reader(fd: int) -> bool:
    try:
        os.write(fd, b"x")
    except BrokenPipeError:
        return True
    return False


def test_a_kept_command_gets_signals_and_is_killed_when_the_client_hangs_up(
    helper: Helper,
) -> None:
    started = protocol.encode_event(protocol.Started())
    term = protocol.encode_event(protocol.Signal(signal=signal.SIGTERM))
    frame = _request_frame({"command": "cat", "stdin": "fd"}, fds=1)
    pipes = [os.pipe(), os.pipe()]
    try:
        with _kept_connection(helper.socket) as sock:
            (r1, _), (r2, w2) = pipes
            sock.sendmsg(
                [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(array.array("i", [r1])))]
            )
            assert sock.recv(100) == started  # cat waits on its stdin
            assert _send_raw(sock, term) == [protocol.Exit(returncode=-15, keep=True)]
            sock.sendmsg(
                [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(array.array("i", [r2])))]
            )
            assert sock.recv(100) == started
            os.close(r2)
            pipes[1] = (-1, w2)
            assert not _has_no_reader(w2)  # cat holds it
        wait_until(lambda: _has_no_reader(w2), what="cat killed after the client hung up")
    finally:
        for fd in (fd for pair in pipes for fd in pair if fd >= 0):
            os.close(fd)
    _assert_still_serving()


def test_bad_request_parameters_get_a_clear_error(helper: Helper) -> None:
    events = _raw_exchange(helper.socket, _request_frame({"command": "echo", "args": "not a list"}))
    assert events == [
        protocol.Error(code="command", message="exec parameter 'args' must be a list of strings")
    ]
    events = _raw_exchange(helper.socket, _request_frame({"command": "echo", "args": ["\ud800"]}))
    assert events == [
        protocol.Error(code="command", message="[exec.echo] argument 1 is not valid text")
    ]
    with pytest.raises(CommandError, match=r"\[exec\.echo\] argument 2 contains a NUL byte"):
        client.run(["echo", "fine", "nul\0byte"])
    events = _raw_exchange(helper.socket, _request_frame({"command": "echo", "stdout": "fd"}))
    assert events == [
        protocol.Error(code="command", message="1 streams use mode 'fd' but 0 fds were passed")
    ]
    _assert_still_serving()


def test_started_frame_is_sent_unless_the_request_declines_it(helper: Helper) -> None:
    # On the Unix socket the helper keeps the connection for another request (EXIT says so).
    events = _raw_exchange(helper.socket, _request_frame({"command": "echo"}))
    assert events == [protocol.Started(), protocol.Exit(returncode=0, keep=True)]
    events = _raw_exchange(helper.socket, _request_frame({"command": "echo", "started": False}))
    assert events == [protocol.Exit(returncode=0, keep=True)]
    events = _raw_exchange(helper.socket, _request_frame({"command": "echo", "started": "no"}))
    assert events == [
        protocol.Error(
            code="command", message="exec parameter 'started' = 'no'; expected true or false"
        )
    ]


def test_extra_fds_are_refused_and_closed(helper: Helper) -> None:
    r, w = os.pipe()
    try:
        frame = _request_frame({"command": "echo"}, fds=0)
        events = _raw_exchange(helper.socket, frame, fds=[r, r])
        assert isinstance(events[0], protocol.Error)
        assert "announced 0 fds but 2 arrived" in events[0].message
    finally:
        os.close(r)
    # The helper closed its copies: the pipe has no reader left.
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)
    _assert_still_serving()


def test_setuid_binary_does_not_elevate(monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = Path(tempfile.mkdtemp(prefix="chroot-helper-suid-"))
    try:
        bindir.chmod(0o755)
        suid_id = bindir / "id"
        shutil.copy2("/usr/bin/id", suid_id)
        os.chown(suid_id, 0, 0)
        suid_id.chmod(0o4755)
        # Control: the copy really elevates when no_new_privs is not set.
        control = subprocess.run(
            [str(suid_id)], user=65534, group=65534, extra_groups=[], capture_output=True, text=True
        )
        assert "euid=0(root)" in control.stdout
        with running_helper(f'[exec.suid-id]\nargv = ["{suid_id}"]\nuser = "nobody"\n') as helper:
            monkeypatch.setenv("CHROOT_HELPER_SOCKET", helper.socket)
            done = client.run(["suid-id"], capture_output=True, text=True)
        assert done.stdout.startswith("uid=65534(nobody) gid=65534(nogroup)")
        assert "euid" not in done.stdout
    finally:
        shutil.rmtree(bindir)


def test_client_and_shim_work_from_an_empty_chroot(helper: Helper) -> None:
    jail = Path(helper.socket).parent.parent  # the socket is at <jail>/run/chroot-helper.sock
    assert sorted(p.name for p in jail.iterdir()) == ["run"]
    code = (
        "import os, subprocess\n"
        "from chroot_helper import client, shim, errors\n"
        f"os.chroot({str(jail)!r}); os.chdir('/')\n"
        "assert not os.path.exists('/bin/echo') and not os.path.exists('/bin/sh')\n"
        "os.environ.pop('CHROOT_HELPER_SOCKET', None)  # the default jail path must work\n"
        "print(client.run(['echo', 'jailed'], capture_output=True).stdout.decode(), end='')\n"
        "shim.install()\n"
        "print(subprocess.check_output(['/bin/echo', 'via', 'shim']).decode(), end='')\n"
        "print(subprocess.run(['cat'], input='typed', capture_output=True, text=True).stdout)\n"
        "try:\n"
        "    subprocess.run(['convert', 'a.png', 'b.jpg'])\n"
        "except errors.CommandError as exc:\n"
        "    print('refused:', exc)\n"
        "try:\n"
        "    subprocess.run('echo hi', shell=True)\n"
        "except errors.CommandError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=helper.env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["jailed", "via shim", "typed"]
    assert lines[3].startswith("refused: command 'convert' is not allowed")
    assert lines[4].startswith("refused: shell=True")


def test_shim_with_a_command_list_refuses_others_locally(helper: Helper) -> None:
    code = (
        "from chroot_helper import shim\n"
        "shim.install(commands=['echo'])\n"
        "print(subprocess.run(['echo', 'ok'], capture_output=True).stdout)\n"
        "try:\n"
        "    subprocess.run(['cat'])\n"
        "except errors.CommandError as exc:\n"
        "    print(exc)\n"
        "shim.uninstall()\n"
        "print(subprocess.run(['/bin/echo', 'host'], capture_output=True).stdout)\n"
    )
    out = helper.run_client(code).stdout.splitlines()
    assert out[0] == "b'ok\\n'"
    assert out[1].startswith("'cat' is not routed to chroot-helper (routed: echo)")
    assert out[2] == "b'host\\n'"


def test_tcp_listener_needs_the_token() -> None:
    token_dir = Path(tempfile.mkdtemp(prefix="chroot-helper-token-"))
    try:
        token_file = token_dir / "token"
        token_file.write_text("s3cret-token-0123456789\n")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        extra = f'tcp = "127.0.0.1:{port}"\ntoken_file = "{token_file}"\n'
        with running_helper(COMMANDS, helper_table=extra) as tcp_helper:
            good = tcp_helper.env(
                CHROOT_HELPER_ADDRESS=f"127.0.0.1:{port}",
                CHROOT_HELPER_TOKEN="s3cret-token-0123456789",
            )
            code = "print(client.run(['echo', 'over tcp'], capture_output=True).stdout)"
            assert tcp_helper.run_client(code, env=good).stdout.strip() == "b'over tcp\\n'"
            bad = dict(good, CHROOT_HELPER_TOKEN="wrong-token-0123456789")
            refused = tcp_helper.run_client(code, env=bad, check=False)
            assert refused.returncode != 0
            assert "PeerRefusedError: wrong or missing token" in refused.stderr
    finally:
        shutil.rmtree(token_dir)


def test_refused_error_type_is_rebuilt_on_the_client(helper: Helper) -> None:
    done = helper.run_client(
        "try:\n    client.run(['echo'])\n"
        "except errors.PeerRefusedError as exc:\n    print('refused')\n",
        user=65534,
    )
    assert done.stdout.strip() == "refused"


def test_invalid_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[helper]\nsocket = "/tmp/x.sock"\nallow_uids = [33]\n[exec.echo]\nargv = ["/bin/echo"]\n'
        "timeout = -1\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "chroot_helper.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 78
    assert "[exec.echo] timeout = -1" in done.stderr


def test_a_missing_capability_fails_at_start_naming_it_and_what_needs_it(tmp_path: Path) -> None:
    config = tmp_path / "offline.toml"
    config.write_text(
        f'[helper]\nsocket = "{tmp_path}/helper.sock"\nallow_uids = [33]\n'
        '[exec.offline]\nargv = ["/bin/true"]\nnetwork = false\n'
    )
    done = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_admin"]
        + [sys.executable, "-m", "chroot_helper.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78
    assert "needs CAP_SYS_ADMIN (for commands with network = false" in done.stderr
    assert "CapabilityBoundingSet=" in done.stderr
    assert "Traceback" not in done.stderr


def test_unreachable_helper_names_the_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHROOT_HELPER_SOCKET", str(tmp_path / "absent.sock"))
    with pytest.raises(client.HelperUnavailable, match=r"absent\.sock.*CHROOT_HELPER_SOCKET"):
        client.run(["echo"])


@contextlib.contextmanager
def running_cats(count: int) -> Iterator[None]:
    """*count* ``cat`` commands of this process, running until the block ends (then exit 0)."""
    procs = [client.Popen(["cat"], stdin=client.PIPE, stdout=client.DEVNULL) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
    assert [proc.returncode for proc in procs] == [0] * count


def test_global_concurrency_limit_refuses_every_peer_then_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running_helper(COMMANDS, helper_table="max_concurrent = 2\nmax_per_uid = 2") as small:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", small.socket)
        with running_cats(2):
            refused = small.run_client("client.run(['echo', 'x'])", check=False)
            assert "BusyError: 2 requests are running" in refused.stderr
            assert "max_concurrent = 2" in refused.stderr
        assert small.run_client("client.run(['echo', 'x'])").returncode == 0


def test_per_uid_limit_counts_every_process_of_that_uid_and_serves_other_uids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = "max_per_peer = 2\nmax_per_uid = 3"
    with running_helper(COMMANDS, helper_table=table) as limited:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", limited.socket)
        # Two commands from this process (its max_per_peer), a third from another root process:
        # uid 0 then runs max_per_uid = 3, and a fourth from yet another process is refused.
        with running_cats(2):
            code = (
                "p = client.Popen(['cat'], stdin=client.PIPE, stdout=client.DEVNULL)\n"
                "print('holding', flush=True)\n"
                "sys.stdin.readline()\n"
                "p.stdin.close()\n"
                "print(p.wait())\n"
            )
            holder = subprocess.Popen(
                [sys.executable, "-c", "import sys\nfrom chroot_helper import client\n" + code],
                env=limited.env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
            refused = limited.run_client("client.run(['echo', 'x'])", check=False)
            assert "BusyError: uid:0 already runs 3 requests" in refused.stderr, refused.stderr
            assert "max_per_uid = 3" in refused.stderr
            # Another uid is served while uid 0 is at its limit.
            code = "print(client.run(['echo', 'www'], capture_output=True).stdout)"
            assert limited.run_client(code, user=33).stdout.strip() == "b'www\\n'"
            assert holder.communicate("\n", timeout=30)[0].strip() == "0"
        assert limited.run_client("client.run(['echo', 'x'])").returncode == 0


def test_a_client_may_run_again_as_soon_as_it_has_the_exit_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The supervisor reports the end to the daemon before it sends EXIT to the client, and the
    # daemon takes that report into account before refusing a request as over the limit.
    with running_helper(COMMANDS, helper_table="max_per_peer = 1") as single:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", single.socket)
        for _ in range(300):
            done = client.run(["echo", "x"], stdin=client.DEVNULL, stdout=client.DEVNULL)
            assert done.returncode == 0


def test_idle_connection_is_dropped_after_request_timeout() -> None:
    with running_helper(COMMANDS, helper_table="request_timeout = 0.5") as quick:
        events = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(quick.socket)
            conn = protocol.Connection(protocol.Role.CLIENT)
            conn.send(protocol.Request(op="exec"))  # pretend we sent it; we send nothing at all
            while data := sock.recv(65536):
                conn.receive_data(data)
                while (event := conn.next_event()) is not protocol.NEED_DATA:
                    events.append(event)
        assert events == [
            protocol.Error(
                code="protocol", message="no request within [helper] request_timeout = 0.5 s"
            )
        ]


def test_commands_die_with_the_helper_and_a_restart_reuses_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running_helper('[exec.sh]\nargv = ["/bin/sh", "-c"]\nargs = "any"\n') as doomed:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", doomed.socket)
        with client.Popen(
            ["sh", "setsid sleep 3701 & echo up; sleep 3702"], stdout=client.PIPE
        ) as p:
            assert p.stdout is not None
            assert p.stdout.readline() == b"up\n"
            wait_until(lambda: len(processes_with("sleep 370")) == 2, what="both sleeps")
            doomed.proc.kill()  # no cleanup in the daemon: the supervisors must notice alone
            doomed.proc.wait()
            wait_until(lambda: processes_with("sleep 370") == [], what="the orphaned tree to die")
            with pytest.raises(client.HelperUnavailable, match="the helper stopped"):
                p.wait()
        # The dead helper left its socket file behind; a new one replaces the stale socket.
        assert os.path.exists(doomed.socket)
        log = doomed.base / "restart.log"
        with open(log, "wb") as log_fh:
            again = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chroot_helper.cli",
                    "serve",
                    "--config",
                    str(doomed.config),
                ],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(lambda: "serving" in log.read_text(), what="the restarted helper")
            assert client.run(["sh", "echo back"], capture_output=True).stdout == b"back\n"
        finally:
            again.terminate()
            again.wait(10)


def test_exec_keeps_working_when_the_forker_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    with running_helper(COMMANDS) as alone:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", alone.socket)
        assert client.run(["echo", "pooled"], capture_output=True).stdout == b"pooled\n"
        pid = alone.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1  # the forker; supervisors are its children, not the daemon's
        forker = int(children[0])
        pooled = Path(f"/proc/{forker}/task/{forker}/children").read_text().split()
        assert len(pooled) >= 1
        os.kill(forker, signal.SIGKILL)
        # Its idle supervisors notice and exit; another forker takes its place.
        wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pooled), what="pool exit")
        assert client.run(["echo", "fallback"], capture_output=True).stdout == b"fallback\n"
        assert client.run(["echo", "again"], capture_output=True).stdout == b"again\n"
        assert "the forker is gone" in alone.log_text()


def _exited(pid: int) -> bool:
    """*pid* has exited: it is a zombie (no command line) or gone."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True


def test_after_the_forker_dies_a_command_that_kills_its_supervisor_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The forker is the subreaper that kills what a killed supervisor leaves: another one takes
    # its place, and without CAP_SYS_ADMIN (dropped by the daemon) its residents share the
    # helper's PID namespace, so a command can kill its supervisor again.
    body = '[exec.sh]\nargv = ["/bin/sh", "-c"]\nargs = "any"\n'
    with running_helper(body) as alone:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", alone.socket)
        pid = alone.proc.pid
        (forker,) = map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
        os.kill(forker, signal.SIGKILL)
        wait_until(lambda: _exited(forker), what="the forker to exit")
        script = "sleep 3661 & setsid sleep 3662 & sleep 0.3; kill -9 $PPID; sleep 3663"
        done = client.run(["sh", script], stdin=client.DEVNULL, stdout=client.DEVNULL)
        assert done.returncode == -signal.SIGKILL
        wait_until(lambda: processes_with("sleep 366") == [], what="the orphans to be killed")
        assert client.run(["sh", "echo on"], capture_output=True).stdout == b"on\n"
        assert "starting another forker" in alone.log_text()


def test_helper_started_without_root_runs_commands_as_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = '[exec.id]\nargv = ["/usr/bin/id"]\nuser = "www-data"\n'
    with running_helper(body, as_user=33) as unprivileged:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", unprivileged.socket)
        done = client.run(["id"], capture_output=True, text=True)
        assert done.stdout.startswith("uid=33(www-data) gid=33(www-data)")
    # Another user needs root, and the helper says so when it starts.
    with pytest.raises(AssertionError, match=r"needs the helper to start as root"):
        with running_helper('[exec.id]\nargv = ["/usr/bin/id"]\n', as_user=33):
            pass


def test_client_that_stops_reading_cannot_hold_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    body = '[exec.flood]\nargv = ["/usr/bin/yes"]\ntimeout = 1\nmax_output = "1G"\n' + COMMANDS
    with running_helper(body, helper_table="max_concurrent = 1") as tight:
        monkeypatch.setenv("CHROOT_HELPER_SOCKET", tight.socket)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
            stuck.connect(tight.socket)
            stuck.sendall(_request_frame({"command": "flood", "stdout": "pipe"}))
            # This connection never reads; the command fills the socket and blocks.
            with pytest.raises(BusyError):
                client.run(["echo", "blocked"])

            def served() -> bool:
                try:
                    return client.run(["echo", "ok"], capture_output=True).stdout == b"ok\n"
                except BusyError:
                    return False

            wait_until(served, timeout=30, what="the stuck connection's slot to be released")
        assert "read no output" in tight.log_text()


def test_one_peer_cannot_fill_the_connection_table(helper: Helper) -> None:
    # The module's helper allows max_per_peer = 16 (the default) idle connections per process.
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(17)]
    try:
        for sock in idle:
            sock.connect(helper.socket)
        idle[-1].settimeout(10)
        assert b"without a request" in idle[-1].recv(65536)
        # Other peers are still served while these sit idle.
        other = helper.run_client("print(client.run(['echo', 'x'], capture_output=True).stdout)")
        assert other.stdout.strip() == "b'x\\n'"
    finally:
        for sock in idle:
            sock.close()

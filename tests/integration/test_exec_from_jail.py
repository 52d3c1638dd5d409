"""The exec service seen from a real jail: a client that entered the helper's empty jail with
:func:`chrootwsgi.enter_jail` (privileged mode, as www-data) runs commands through the helper.

One jailed process runs every check and reports them as one JSON object; each test below asserts
on one part of it. A second jailed process, as a uid the helper does not allow, is refused. Where
the host's view matters (children a command leaves behind), the jailed process stops at a sync
point and the fixture looks at ``/proc`` from outside before letting it go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helper_daemon import Helper, processes_with, running_helper, wait_until

pytestmark = [pytest.mark.root]

ZEROS = 64 << 20  # bytes of output streamed from the jail's point of view
CAP = 64 << 10  # max_output of [exec.yes]
WATCHDOG = 120  # seconds a jailed process may take before the fixture gives up on it

COMMANDS = """
[exec.echo]
argv = ["/bin/echo"]
args = "any"

[exec.cat]
argv = ["/bin/cat"]
args = "any"

[exec.zeros]
argv = ["/usr/bin/head", "-c", "{zeros}", "/dev/zero"]
args = "none"
max_output = "80M"

[exec.sleep]
argv = ["/bin/sleep"]
args = ["[0-9]+"]
timeout = 20

[exec.yes]
argv = ["/usr/bin/yes"]
args = "none"
max_output = "{cap}"

[exec.sh]
argv = ["/bin/sh", "-c"]
args = "any"

[exec.word]
argv = ["/bin/echo"]
args = ["[a-z]+"]

[exec.suid-id]
argv = ["{suid_id}"]
user = "nobody"
"""

# Leaves four sleeps behind (background, own session, double fork, own session of a child),
# says so, waits for its stdin to close, and exits 0 while they still run.
LEAVE_CHILDREN = (
    "{ sleep 4941 & setsid sleep 4942 & (sleep 4943 &) ; setsid sh -c 'sleep 4944 &' ; } "
    "</dev/null >/dev/null 2>&1; echo started; read line; echo leaving"
)

# Runs in a fresh interpreter: argv[1] is the jail root, argv[2] LEAVE_CHILDREN. Everything it
# needs is imported before it enters the jail.
BATTERY = """\
import hashlib, json, os, socket, subprocess, sys
import chrootwsgi
from chroot_helper import client, errors, protocol

# Private ends for the report and the sync points; fds 0 and 1, which a command inherits when
# the call does not say otherwise, become /dev/null.
control = os.fdopen(os.dup(0), "r")
report_to = os.fdopen(os.dup(1), "w")
null = os.open("/dev/null", os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
os.close(null)
os.environ.pop("CHROOT_HELPER_SOCKET", None)  # the default jail path must work
results = {}


def sync(marker):
    report_to.write(marker + "\\n")
    report_to.flush()
    control.readline()


def check(name, fn):
    try:
        results[name] = {"value": fn()}
    except Exception as exc:
        output = getattr(exc, "output", None)
        results[name] = {
            "raised": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "output_length": None if output is None else len(output),
        }


state = chrootwsgi.enter_jail(sys.argv[1], mode="privileged", user="www-data", require_helper=True)
results["jail"] = {
    "mode": state.mode,
    "ids": [os.getresuid(), os.getresgid()],
    "listing": sorted(os.listdir("/")),
    "host_tools": {p: os.path.exists(p) for p in ("/bin/sh", "/bin/echo", "/bin/cat")},
}


def echo():
    done = client.run(["echo", "hello", "from the jail"], capture_output=True)
    return [done.returncode, done.stdout.decode(), done.stderr.decode()]


def cat_round_trip():
    data = os.urandom(1 << 20)
    done = client.run(["cat"], input=data, capture_output=True)
    return {
        "returncode": done.returncode,
        "length": len(done.stdout),
        "same": hashlib.sha256(done.stdout).digest() == hashlib.sha256(data).digest(),
    }


def zeros_captured():
    done = client.run(["zeros"], capture_output=True)
    return {"returncode": done.returncode, "length": len(done.stdout),
            "only_zeros": not done.stdout.strip(b"\\0")}


def zeros_popen():
    length, only_zeros = 0, True
    with client.Popen(["zeros"], stdin=client.DEVNULL, stdout=client.PIPE) as proc:
        while chunk := proc.stdout.read(1 << 20):
            length += len(chunk)
            only_zeros = only_zeros and not chunk.strip(b"\\0")
        returncode = proc.wait()
    return {"returncode": returncode, "length": length, "only_zeros": only_zeros}


def own_pipe():
    r, w = os.pipe()
    try:
        done = client.run(["echo", "into", "my pipe"], stdout=w)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as reader:
        data = reader.read()
    return {"returncode": done.returncode, "stdout": done.stdout, "read": data.decode()}


def leave_children():
    with client.Popen(["sh", sys.argv[2]], stdin=client.PIPE, stdout=client.PIPE) as proc:
        first = proc.stdout.readline().decode()
        sync("children-started")
        proc.stdin.close()
        rest = proc.stdout.read().decode()
        returncode = proc.wait()
    sync("command-returned")
    return {"returncode": returncode, "output": first + rest}


def raw_exchange(payload):
    conn = protocol.Connection(protocol.Role.CLIENT)
    conn.our_state = conn.their_state = protocol.State.RUNNING  # read whatever it sends
    events = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect("/run/chroot-helper.sock")
        try:
            sock.sendall(payload)
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
            if not data:
                break
    return [[type(e).__name__, getattr(e, "code", None), getattr(e, "message", None)]
            for e in events]


check("echo", echo)
check("cat", cat_round_trip)
check("zeros_captured", zeros_captured)
check("zeros_popen", zeros_popen)
check("own_pipe", own_pipe)
check("timeout", lambda: client.run(["sleep", "4931"], timeout=0.5).returncode)
check("output_cap", lambda: client.run(["yes"], capture_output=True).returncode)
check("children", leave_children)
check("suid", lambda: client.run(["suid-id"], capture_output=True, text=True).stdout)
check("not_allowed", lambda: client.run(["rm", "-rf", "/"]).returncode)
check("bad_arg", lambda: client.run(["word", "--bad"]).returncode)
check("good_arg", lambda: client.run(["word", "fine"], capture_output=True).stdout.decode())
check("garbage_http", lambda: raw_exchange(b"GET / HTTP/1.1\\r\\n\\r\\n"))
check("echo_after_http", lambda: client.run(["echo", "after"], capture_output=True).stdout.decode())
check("garbage_oversized", lambda: raw_exchange(protocol.HEADER.pack(b"CH", 1, 1, 1 << 30)))
check("echo_after_oversized",
      lambda: client.run(["echo", "after"], capture_output=True).stdout.decode())
report_to.write(json.dumps(results) + "\\n")
report_to.flush()
"""

REFUSED = """\
import json, os, sys
import chrootwsgi
from chroot_helper import client, errors

os.environ.pop("CHROOT_HELPER_SOCKET", None)
chrootwsgi.enter_jail(sys.argv[1], mode="privileged", user="nobody", require_helper=True)
try:
    outcome = {"value": client.run(["echo", "x"], capture_output=True).stdout.decode()}
except Exception as exc:
    outcome = {"raised": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc)}
print(json.dumps({"ids": [os.getresuid(), os.getresgid()], "outcome": outcome}))
"""


@dataclass
class Observed:
    """What the jailed processes reported, and what the host saw around them."""

    results: dict[str, dict]
    refused: dict
    suid_control: str
    sleeps_while_running: list[int]
    sleeps_after_return: list[int]
    sleeps_after_timeout: list[int]
    helper_log: str
    served_after_refusal: str


def _jailed_python(code: str, helper: Helper, name: str, *args: str) -> subprocess.Popen[str]:
    """Start *code* in a fresh root interpreter that enters the helper's jail itself; its stderr
    goes to ``<base>/<name>.err``."""
    env = helper.env()
    env.pop("CHROOT_HELPER_SOCKET")
    with open(helper.base / f"{name}.err", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(helper.base / "jail"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd="/",
            env=env,
        )


def _report(proc: subprocess.Popen[str], helper: Helper, name: str, on_marker: dict) -> dict:
    """Read the jailed process's output: answer its sync points, return its JSON report."""
    assert proc.stdin is not None and proc.stdout is not None
    report = None
    watchdog = threading.Timer(WATCHDOG, proc.kill)  # a hung client must not hang the suite
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                report = json.loads(line)
                continue
            try:  # a sync point: look, then let the client go on
                on_marker[line.strip()]()
            finally:
                proc.stdin.write("\n")
                proc.stdin.flush()
        proc.stdin.close()
        returncode = proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    if returncode != 0 or report is None:
        raise AssertionError(
            f"the jailed client {name} exited with {returncode} without a report; its stderr:\n"
            f"{(helper.base / f'{name}.err').read_text()}"
            f"\nthe helper's log:\n{helper.log_text()}"
        )
    return report


@pytest.fixture(scope="module")
def observed() -> Iterator[Observed]:
    bindir = Path(tempfile.mkdtemp(prefix="chroot-helper-suid-"))
    try:
        bindir.chmod(0o755)
        suid_id = bindir / "id"
        shutil.copy2("/usr/bin/id", suid_id)
        os.chown(suid_id, 0, 0)
        suid_id.chmod(0o4755)
        # Control: the copy really elevates when no_new_privs is not set.
        suid_control = subprocess.run(
            [str(suid_id)], user=65534, group=65534, extra_groups=[], capture_output=True, text=True
        ).stdout
        body = COMMANDS.format(zeros=ZEROS, cap=CAP, suid_id=suid_id)
        with running_helper(body) as helper:
            jail = helper.base / "jail"
            assert sorted(p.name for p in jail.iterdir()) == ["run"]
            seen: dict[str, list[int]] = {}

            def children_started() -> None:
                with contextlib.suppress(AssertionError):  # the test checks what was seen
                    wait_until(lambda: len(processes_with("sleep 494")) == 4, what="four sleeps")
                seen["running"] = processes_with("sleep 494")

            def command_returned() -> None:
                seen["returned"] = processes_with("sleep 494")

            refused = _report(_jailed_python(REFUSED, helper, "refused"), helper, "refused", {})
            battery = _jailed_python(BATTERY, helper, "battery", LEAVE_CHILDREN)
            try:
                results = _report(
                    battery,
                    helper,
                    "battery",
                    {"children-started": children_started, "command-returned": command_returned},
                )
            finally:
                if battery.poll() is None:
                    battery.kill()
                    battery.wait()
            served = helper.run_client(
                "sys.stdout.write(client.run(['echo', 'served'], capture_output=True, text=True)"
                ".stdout)",
                user=33,
            ).stdout
            yield Observed(
                results=results,
                refused=refused,
                suid_control=suid_control,
                sleeps_while_running=seen.get("running", []),
                sleeps_after_return=seen.get("returned", []),
                sleeps_after_timeout=processes_with("sleep 4931"),
                helper_log=helper.log_text(),
                served_after_refusal=served,
            )
    finally:
        shutil.rmtree(bindir)


def _value(observed: Observed, name: str) -> object:
    outcome = observed.results[name]
    assert "value" in outcome, f"{name} raised {outcome.get('raised')}: {outcome.get('message')}"
    return outcome["value"]


def _raised(observed: Observed, name: str) -> dict:
    outcome = observed.results[name]
    assert "raised" in outcome, f"{name} did not raise; it returned {outcome.get('value')!r}"
    return outcome


def test_the_client_runs_as_www_data_in_an_empty_jail_without_host_tools(
    observed: Observed,
) -> None:
    jail = observed.results["jail"]
    assert jail["mode"] == "privileged"
    assert jail["ids"] == [[33] * 3, [33] * 3]
    assert jail["host_tools"] == {"/bin/sh": False, "/bin/echo": False, "/bin/cat": False}
    assert "bin" not in jail["listing"]  # only what the jail view mounts: etc, dev, run, ...
    assert "run" in jail["listing"]


def test_echo_with_arguments(observed: Observed) -> None:
    assert _value(observed, "echo") == [0, "hello from the jail\n", ""]


def test_cat_returns_a_mebibyte_of_random_input_unchanged(observed: Observed) -> None:
    assert _value(observed, "cat") == {"returncode": 0, "length": 1 << 20, "same": True}


def test_large_output_is_captured_through_the_helper(observed: Observed) -> None:
    assert _value(observed, "zeros_captured") == {
        "returncode": 0,
        "length": ZEROS,
        "only_zeros": True,
    }


def test_large_output_is_read_from_a_popen_pipe(observed: Observed) -> None:
    assert _value(observed, "zeros_popen") == {
        "returncode": 0,
        "length": ZEROS,
        "only_zeros": True,
    }


def test_a_pipe_of_the_jailed_process_is_passed_as_stdout(observed: Observed) -> None:
    assert _value(observed, "own_pipe") == {
        "returncode": 0,
        "stdout": None,
        "read": "into my pipe\n",
    }


def test_a_client_timeout_raises_timeout_expired_and_kills_the_command(
    observed: Observed,
) -> None:
    outcome = _raised(observed, "timeout")
    assert outcome["raised"] == "subprocess.TimeoutExpired"
    assert "timed out after 0.5 seconds" in outcome["message"]
    assert observed.sleeps_after_timeout == []


def test_the_output_cap_raises_output_limit_exceeded(observed: Observed) -> None:
    outcome = _raised(observed, "output_cap")
    assert outcome["raised"] == "chroot_helper.client.OutputLimitExceeded"
    assert "max_output" in outcome["message"]
    assert outcome["output_length"] == CAP


def test_children_left_behind_are_gone_when_the_call_returns(observed: Observed) -> None:
    assert _value(observed, "children") == {"returncode": 0, "output": "started\nleaving\n"}
    assert len(observed.sleeps_while_running) == 4  # the host saw them all while it ran
    assert observed.sleeps_after_return == []
    wait_until(lambda: processes_with("sleep 494") == [], what="no sleep 494x on the host")


def test_a_setuid_root_binary_does_not_elevate(observed: Observed) -> None:
    assert "euid=0(root)" in observed.suid_control  # the copy does elevate outside the helper
    stdout = _value(observed, "suid")
    assert isinstance(stdout, str)
    assert stdout.startswith("uid=65534(nobody) gid=65534(nogroup)")
    assert "euid" not in stdout


def test_a_command_that_is_not_configured_is_refused_by_name(observed: Observed) -> None:
    outcome = _raised(observed, "not_allowed")
    assert outcome["raised"] == "chroot_helper.errors.CommandError"
    assert outcome["message"].startswith("command 'rm' is not allowed: no [exec.rm] table")


def test_an_argument_outside_the_patterns_is_refused_naming_the_pattern(
    observed: Observed,
) -> None:
    assert _value(observed, "good_arg") == "fine\n"
    outcome = _raised(observed, "bad_arg")
    assert outcome["raised"] == "chroot_helper.errors.CommandError"
    assert outcome["message"] == (
        "[exec.word] argument 1 '--bad' matches none of the allowed patterns ['[a-z]+']"
    )


@pytest.mark.parametrize("payload", ["http", "oversized"])
def test_garbage_from_the_jail_gets_a_protocol_error_and_the_helper_keeps_serving(
    observed: Observed, payload: str
) -> None:
    events = _value(observed, f"garbage_{payload}")
    assert isinstance(events, list) and len(events) == 1
    kind, code, message = events[0]
    assert (kind, code) == ("Error", "protocol")
    assert message
    assert _value(observed, f"echo_after_{payload}") == "after\n"


def test_a_jailed_uid_not_in_allow_uids_is_refused_and_others_are_served(
    observed: Observed,
) -> None:
    assert observed.refused["ids"] == [[65534] * 3, [65534] * 3]
    outcome = observed.refused["outcome"]
    assert outcome.get("raised") == "chroot_helper.errors.PeerRefusedError", outcome
    assert outcome["message"].startswith("peer uid 65534 gid 65534 is not allowed")
    assert "allow_uids" in outcome["message"]
    assert "peer uid 65534" in observed.helper_log
    assert _value(observed, "echo")[1] == "hello from the jail\n"  # the jailed www-data, later
    assert observed.served_after_refusal == "served\n"

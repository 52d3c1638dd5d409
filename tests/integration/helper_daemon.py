"""Start a real ``chroot-helper serve`` for a test, and stop it again.

Used by ``test_exec*.py``::

    with running_helper(tmp_path, COMMANDS) as helper:
        done = helper.run_client("print(client.run(['echo', 'hi'], capture_output=True).stdout)")
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 10.0
HELPER = [sys.executable, "-m", "chroot_helper.cli"]


@dataclass
class Helper:
    """A running helper: its socket, config, log and process."""

    socket: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]
    base: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHROOT_HELPER_")}
        env["CHROOT_HELPER_SOCKET"] = self.socket
        env.update(extra)
        return env

    def run_client(
        self,
        code: str,
        *,
        user: int | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run *code* in a fresh Python process with ``client`` imported; return its result."""
        prelude = "import subprocess, sys\nfrom chroot_helper import client, errors\n"
        done = subprocess.run(
            [sys.executable, "-c", prelude + code],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
            cwd="/",
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"client failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def log_text(self) -> str:
        return self.log.read_text()


def _wait_ready(path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"chroot-helper exited with {proc.returncode} before serving; its log:\n"
                + log.read_text()
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                time.sleep(0.02)
                continue
            return
    raise AssertionError(
        f"chroot-helper did not listen on {path} within {READY_TIMEOUT} s; raise "
        f"helper_daemon.READY_TIMEOUT if the machine is slow. Its log:\n{log.read_text()}"
    )


@contextlib.contextmanager
def running_helper(
    config_body: str,
    *,
    helper_table: str = "",
    as_user: int | None = None,
    prefix: Sequence[str] = (),
) -> Iterator[Helper]:
    """Write a config (a world-traversable temp dir, so other uids reach the socket), start the
    helper, wait until it accepts connections, and stop it (by PID) afterwards.

    *config_body* holds the ``[exec.*]`` (and ``[dns]``, ``[mail]``) tables, where
    ``{socket_dir}`` stands for the jail's ``run/`` directory and ``{spool}`` for a fresh spool
    directory; *helper_table* extra ``[helper]`` lines; *as_user* starts the helper as that uid;
    *prefix* is a command that runs it (``setpriv ...``).
    """
    base = Path(tempfile.mkdtemp(prefix="chroot-helper-test-"))
    base.chmod(0o755)
    if as_user is not None:
        os.chown(base, as_user, as_user)
    sock = str(base / "jail" / "run" / "chroot-helper.sock")
    if "{socket_dir}" in config_body:
        os.makedirs(os.path.dirname(sock), mode=0o755)
    config_body = config_body.replace("{socket_dir}", os.path.dirname(sock))
    config_body = config_body.replace("{spool}", str(base / "spool"))
    config = base / "helper.toml"
    config.write_text(
        f'[helper]\nsocket = "{sock}"\nsocket_mode = "0666"\nallow_uids = [0, 33]\n'
        f"{helper_table}\n{config_body}"
    )
    log = base / "helper.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [*prefix, *HELPER, "serve", "--config", str(config), "--log-level", "DEBUG"],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=as_user,
            group=as_user,
            extra_groups=[] if as_user is not None else None,
        )
    try:
        _wait_ready(sock, proc, log)
        (base / "jail" / "run").chmod(0o755)
        (base / "jail").chmod(0o755)
        yield Helper(socket=sock, config=config, log=log, proc=proc, base=base)
    finally:
        stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process this test started, SIGKILL it if it does not exit within 20 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def wait_for_log(
    path: Path, pattern: str, proc: subprocess.Popen[bytes], what: str, timeout: float
) -> str:
    """Wait until ``pattern`` appears in the log at ``path``; fail with the log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match.group(0)
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode} before it was ready; its log {path}:\n{text}"
            )
        time.sleep(0.05)
    raise RuntimeError(
        f"{what} not ready within {timeout}s (no {pattern!r} in {path}); the machine may "
        f"be overloaded, or the log says why:\n"
        f"{path.read_text(errors='replace') if path.exists() else ''}"
    )


def processes_with(marker: str) -> list[int]:
    """PIDs whose command line starts with *marker*, zombies included (to prove a tree is gone)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(marker):
            found.append(int(entry))
    return found


#: Shell code that sets $supervisor to the pid of a command's supervisor as the host sees it (a
#: resident is PID 1 of its commands' PID namespace; /proc/self/status gives the host's pid).
SUPERVISOR = (
    'while read key value; do [ "$key" = PPid: ] && supervisor=$value; done < /proc/self/status; '
)


def run_and_kill_its_supervisor(script: str, **streams: object) -> int:
    """Run *script* with the ``sh`` command and *streams*; kill its supervisor once the script has
    started (as an administrator or the OOM killer would); return the call's return code."""
    from chroot_helper import client

    shared = Path(tempfile.mkdtemp(prefix="chroot-helper-supervisor-"))
    try:
        shared.chmod(0o777)  # the command runs as nobody
        marker = shared / "supervisor"
        announce = f"echo $supervisor > {marker}.new; mv {marker}.new {marker}; "
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.run, ["sh", SUPERVISOR + announce + script], **streams)
            wait_until(marker.exists, what="the command to start")
            os.kill(int(marker.read_text()), signal.SIGKILL)
            return call.result(timeout=30).returncode
    finally:
        shutil.rmtree(shared)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)

"""Replay fuzz inputs against a real ``chroot-helper serve`` while a canary keeps using it.

:class:`LiveHelper` starts the real daemon (exec ``echo``, mail on a loopback port, DNS on a
loopback port forwarding to :class:`~fuzz.dns_packets.LocalUpstream` in a thread of this
process) from a temporary directory, and stops it by PID.  :func:`replay` sends every input of
one target from a few concurrent connections (helper socket frames, SMTP byte streams, DNS
datagrams and TCP messages) while a :mod:`fuzz.canary` process does real requests; it reports
how many inputs were sent, how many connections the server left hanging, and the canary's
counts.  Nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chroot_helper.services.mail.spool import Spool

from .dns_packets import LocalUpstream

__all__ = ["LiveHelper", "ReplayResult", "live_helper", "replay"]

READY_TIMEOUT = 20.0
REPLY_TIMEOUT = 5.0
"""Seconds the server gets to answer and close after the input ended; longer is a hang."""
CONCURRENCY = 4


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveHelper:
    """A running helper and where it answers."""

    base: Path
    socket: str
    smtp: tuple[str, int]
    dns: tuple[str, int]
    proc: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.base / "helper.log"

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class ReplayResult:
    """What one target's replay saw."""

    inputs: int = 0
    hangs: int = 0
    canary_ok: int = 0
    canary_failed: int = 0
    canary_errors: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


def _start_upstream() -> tuple[int, asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    transport, _ = loop.run_until_complete(
        loop.create_datagram_endpoint(LocalUpstream, local_addr=("127.0.0.1", 0))
    )
    port = int(transport.get_extra_info("sockname")[1])

    def run() -> None:
        loop.run_forever()
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    thread = threading.Thread(target=run, name="fuzz-dns-upstream", daemon=True)
    thread.start()
    return port, loop, thread


def _wait_ready(helper: LiveHelper) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not helper.alive():
            raise RuntimeError(
                f"chroot-helper exited with {helper.proc.returncode}; its log:\n"
                + helper.log.read_text(errors="replace")
            )
        try:
            with socket.socket(socket.AF_UNIX) as unix:
                unix.connect(helper.socket)
            socket.create_connection(helper.smtp, timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"chroot-helper not ready within {READY_TIMEOUT} s (machine overloaded?); its log "
        f"{helper.log}:\n{helper.log.read_text(errors='replace')}"
    )


@contextlib.contextmanager
def live_helper() -> Iterator[LiveHelper]:
    """Start ``chroot-helper serve`` with exec, mail and DNS; stop it and clean up on exit."""
    base = Path(tempfile.mkdtemp(prefix="chrootwsgi-fuzz-live-"))
    upstream_port, upstream_loop, upstream_thread = _start_upstream()
    smtp = ("127.0.0.1", _free_port(socket.SOCK_STREAM))
    resolver = ("127.0.0.1", _free_port(socket.SOCK_DGRAM))
    sock = str(base / "helper.sock")
    config = base / "helper.toml"
    config.write_text(
        f'[helper]\nsocket = "{sock}"\nallow_uids = [{os.getuid()}]\n\n'
        '[exec.echo]\nargv = ["/bin/echo"]\nargs = "any"\n'
        + ('user = "nobody"\n' if os.getuid() == 0 else "")
        + f'\n[mail]\nlisten = ["{smtp[0]}:{smtp[1]}"]\nspool = "{base / "spool"}"\n'
        'domain = "example.org"\n'
        f'\n[dns]\nlisten = "{resolver[0]}:{resolver[1]}"\n'
        f'upstreams = ["127.0.0.1:{upstream_port}"]\nhosts_file = ""\n'
    )
    with open(base / "helper.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chroot_helper.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    helper = LiveHelper(base, sock, smtp, resolver, proc)
    try:
        _wait_ready(helper)
        yield helper
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        upstream_loop.call_soon_threadsafe(upstream_loop.stop)
        upstream_thread.join(5)
        shutil.rmtree(base, ignore_errors=True)


def _drain(sock: socket.socket) -> bool:
    """Read until the server closes; ``False`` if it neither answered nor closed in time."""
    sock.settimeout(REPLY_TIMEOUT)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # reset: the server dropped us, which is an answer
    return True


def _send_stream(sock: socket.socket, address: str | tuple[str, int], data: bytes) -> bool:
    with sock:
        sock.settimeout(REPLY_TIMEOUT)
        try:
            sock.connect(address)
            if data:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return True  # the server refused the rest: an answer
        except TimeoutError:
            return False
        return _drain(sock)


def _send_frames(helper: LiveHelper, data: bytes) -> bool:
    # The frames target's first byte steers the in-process parser; the peer gets the rest.
    return _send_stream(socket.socket(socket.AF_UNIX), helper.socket, data[1:])


def _send_smtp(helper: LiveHelper, data: bytes) -> bool:
    return _send_stream(socket.socket(socket.AF_INET), helper.smtp, data)


def _send_dns(helper: LiveHelper, data: bytes) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.2)
        udp.sendto(data, helper.dns)
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):
            udp.recv(65536)  # no answer is allowed: malformed packets are dropped
    message = struct.pack("!H", len(data[:65535])) + data[:65535]
    return _send_stream(socket.socket(socket.AF_INET), helper.dns, message)


_SENDERS = {"frames": _send_frames, "smtp": _send_smtp, "dns": _send_dns}


def _start_canary(helper: LiveHelper) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fuzz.canary",
            "--socket",
            helper.socket,
            "--smtp",
            f"{helper.smtp[0]}:{helper.smtp[1]}",
            "--dns",
            f"{helper.dns[0]}:{helper.dns[1]}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _missing_from_spool(helper: LiveHelper, queued: Sequence[str]) -> list[str]:
    spool = Spool(helper.base / "spool")
    present = set(spool.ids())
    return [queue_id for queue_id in queued if queue_id not in present]


def replay(helper: LiveHelper, target: str, inputs: Sequence[Path]) -> ReplayResult:
    """Send *inputs* of *target* from :data:`CONCURRENCY` connections with the canary running."""
    result = ReplayResult(inputs=len(inputs))
    send = _SENDERS[target]
    canary = _start_canary(helper)
    try:
        assert canary.stdout is not None
        canary.stdout.readline()  # its first round is done: the replay runs beside the others
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            answered = pool.map(lambda path: send(helper, path.read_bytes()), inputs)
            result.hangs = sum(1 for ok in answered if not ok)
    finally:
        out, _ = canary.communicate(b"", timeout=120)
    counts = json.loads(out.decode().strip().splitlines()[-1])
    result.canary_ok = counts["ok"]
    result.canary_failed = counts["failed"]
    result.canary_errors = counts["errors"]
    result.lost = _missing_from_spool(helper, counts["queued"])
    return result

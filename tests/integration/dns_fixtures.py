"""Helpers for the DNS integration tests: real processes for the stub and its test upstream.

Import explicitly (``from tests.integration.dns_fixtures import ...`` or relative); nothing here
is a pytest plugin.  Every process is started with its own log under ``tmp_path``, waited for
with a timeout and an actionable message, and stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
from helper_daemon import stop, wait_for_log

HERE = Path(__file__).resolve().parent
UPSTREAM_SCRIPT = HERE / "dns_upstream.py"
READY_TIMEOUT = 15.0


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host``."""
    for _ in range(50):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError(f"no free UDP+TCP port on {host}")


@dataclasses.dataclass
class Upstream:
    """A running test upstream (:mod:`dns_upstream`)."""

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    query_log: Path

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def queries(self, name: str | None = None) -> list[dict[str, str]]:
        """Queries the upstream received (optionally only for ``name``, with trailing dot)."""
        rows = []
        text = self.query_log.read_text() if self.query_log.exists() else ""
        for line in text.splitlines():
            fields = dict(item.split("=", 1) for item in line.split()[1:])
            if name is None or fields["name"].lower() == name.lower():
                rows.append(fields)
        return rows


@contextlib.contextmanager
def run_upstream(
    tmp_path: Path, *, host: str = "127.0.0.2", mode: str = "normal", label: str = "upstream"
) -> Iterator[Upstream]:
    """Start a test upstream on a free port of ``host``; stop it on exit."""
    port = free_port(host)
    out = tmp_path / f"{label}.out"
    query_log = tmp_path / f"{label}.queries"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(UPSTREAM_SCRIPT),
                "--listen",
                f"{host}:{port}",
                "--log",
                str(query_log),
                "--mode",
                mode,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_log(out, r"ready", proc, f"test upstream on {host}:{port}", READY_TIMEOUT)
        yield Upstream(host, port, proc, query_log)
    finally:
        stop(proc)


@dataclasses.dataclass
class Stub:
    """A running DNS stub process."""

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def query(
        self,
        name: str,
        rdtype: str = "A",
        *,
        tcp: bool = False,
        timeout: float = 8.0,
        **kwargs: object,
    ) -> dns.message.Message:
        """Ask the stub with dnspython."""
        message = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
        if tcp:
            return dns.query.tcp(message, self.host, port=self.port, timeout=timeout)
        return dns.query.udp(message, self.host, port=self.port, timeout=timeout)

    def dig(self, *args: str, check: bool = True) -> str:
        """Run ``dig`` against the stub; return its stdout."""
        done = subprocess.run(
            [DIG, f"@{self.host}", "-p", str(self.port), "+time=8", "+tries=1", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"dig {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def alive(self) -> bool:
        return self.proc.poll() is None


PORT53_CANDIDATES = ["127.53.0.1", "127.0.0.53", "127.53.0.2", "127.53.0.3", "127.54.0.1"]


class Hello(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a fixed body."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b"hello through the stub"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def spare_port53_addresses(count: int) -> list[str]:
    """*count* loopback addresses whose port 53 is free (glibc's resolver always asks port 53)."""
    found = []
    for host in PORT53_CANDIDATES:
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            ):
                udp.bind((host, 53))
                tcp.bind((host, 53))
        except OSError:
            continue
        found.append(host)
        if len(found) == count:
            return found
    raise AssertionError(
        f"port 53 is free on {found or 'none'} of the candidate loopback addresses "
        f"{PORT53_CANDIDATES}, {count} needed; free some of them"
    )


def spare_port53_address() -> str:
    """A loopback address whose port 53 is free."""
    return spare_port53_addresses(1)[0]


DIG = shutil.which("dig") or "/usr/bin/dig"


def write_config(path: Path, *, listen: str, upstreams: list[str], **extra: object) -> Path:
    lines = [
        "[dns]",
        f'listen = "{listen}"',
        "upstreams = [" + ", ".join(f'"{u}"' for u in upstreams) + "]",
    ]
    for key, value in extra.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def run_stub(
    tmp_path: Path,
    upstreams: list[str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    label: str = "stub",
    **extra: object,
) -> Iterator[Stub]:
    """Start ``python -m chroot_helper.services.dns`` on a free port; stop it on exit."""
    port = port if port is not None else free_port(host)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    extra.setdefault("hosts_file", "")  # no host names unless a test gives a file
    config = write_config(tmp_path / f"{label}.toml", listen=listen, upstreams=upstreams, **extra)
    log = tmp_path / f"{label}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chroot_helper.services.dns", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_log(log, r"dns stub ready on", proc, f"DNS stub on {listen}", READY_TIMEOUT)
        yield Stub(host, port, proc, log)
    finally:
        stop(proc)

"""Helpers for the mail integration tests: the mail service and an SMTP sink as real processes.

Import explicitly (``from mail_fixtures import ...``); nothing here is a pytest plugin.  Every
process is started with its own log under ``tmp_path``, waited for with a timeout and an
actionable message, and stopped by its own PID.

Run as a script, this module *is* the sink: an aiosmtpd server on a loopback port that stores
every message it accepts as one file (a JSON envelope line, then the message) in a directory::

    python mail_fixtures.py --listen 127.0.0.1:2526 --dir /tmp/sink [--reject-prefix bad]

Recipients whose local part starts with ``--reject-prefix`` get ``550 5.1.1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from helper_daemon import stop, wait_for_log

HERE = Path(__file__).resolve()
READY_TIMEOUT = 30.0
DOMAIN = "example.org"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate, what: str, timeout: float = 60.0):
    """Poll ``predicate`` until it returns something true; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.1)


@dataclasses.dataclass
class Received:
    """A message as the sink got it."""

    sender: str
    recipients: list[str]
    data: bytes
    auth: str | None = None
    tls: bool = False

    def header(self, name: str) -> str | None:
        import email

        message = email.message_from_bytes(self.data)
        value = message.get(name)
        return None if value is None else str(value)


@dataclasses.dataclass
class Sink:
    """A running SMTP sink (this module run as a script)."""

    host: str
    port: int
    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def messages(self) -> list[Received]:
        out = []
        for path in sorted(self.directory.glob("*.eml")):
            raw = path.read_bytes()
            head, _, data = raw.partition(b"\n")
            envelope = json.loads(head)
            out.append(
                Received(
                    envelope["from"],
                    envelope["to"],
                    data,
                    envelope.get("auth"),
                    envelope.get("tls", False),
                )
            )
        return out

    def with_token(self, token: str) -> list[Received]:
        """Messages whose ``X-Token`` header is ``token``."""
        marker = f"X-Token: {token}\r\n".encode()
        return [m for m in self.messages() if marker in m.data.split(b"\r\n\r\n", 1)[0] + b"\r\n"]

    def wait_token(self, token: str, timeout: float = 60.0) -> list[Received]:
        """Wait for the message with ``X-Token: token``; return every copy received."""
        return wait_until(
            lambda: self.with_token(token),
            f"the sink on {self.address} did not receive the message {token!r}",
            timeout,
        )

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        return wait_until(
            lambda: (m := self.messages()) and len(m) >= count and m,
            f"the sink on {self.address} did not receive {count} message(s)",
            timeout,
        )


@contextlib.contextmanager
def run_sink(
    tmp_path: Path,
    *,
    port: int | None = None,
    label: str = "sink",
    reject_prefix: str = "",
    auth: str = "",
    tls: tuple[Path, Path] | None = None,
) -> Iterator[Sink]:
    """Start the sink on a free loopback port (or ``port``); stop it on exit.  With *tls*
    (certificate and key files) it offers STARTTLS and requires it before MAIL."""
    port = port if port is not None else free_port()
    directory = tmp_path / f"{label}-messages"
    directory.mkdir(exist_ok=True)
    log = tmp_path / f"{label}.log"
    argv = [sys.executable, str(HERE), "--listen", f"127.0.0.1:{port}", "--dir", str(directory)]
    if reject_prefix:
        argv += ["--reject-prefix", reject_prefix]
    if auth:
        argv += ["--auth", auth]
    if tls:
        argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    with open(log, "ab") as sink_log:
        proc = subprocess.Popen(argv, stdout=sink_log, stderr=subprocess.STDOUT)
    try:
        wait_for_log(
            log, rf"sink ready on 127.0.0.1:{port}\b", proc, f"SMTP sink on {port}", READY_TIMEOUT
        )
        yield Sink("127.0.0.1", port, directory, proc)
    finally:
        stop(proc)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, **keys: object) -> Path:
    lines = ["[mail]"] + [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclasses.dataclass
class MailService:
    """A running ``python -m chroot_helper.services.mail`` process."""

    host: str
    port: int
    spool: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None):
        """Run ``python -m chroot_helper.services.mail ARGS`` against this service."""
        environ = dict(os.environ, CHROOT_HELPER_SMTP=self.address)
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "chroot_helper.services.mail", *args],
            input=stdin,
            capture_output=True,
            env=environ,
            timeout=120,
            check=False,
        )

    def mailq(self) -> list[dict]:
        done = self.cli("mailq", "--spool", str(self.spool), "--json")
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.decode().splitlines()]


def start_service(
    tmp_path: Path,
    *,
    label: str = "mail",
    port: int | None = None,
    spool: Path | None = None,
    **keys: object,
) -> MailService:
    """Start the mail service (not as a context manager: crash tests kill and restart it)."""
    port = port if port is not None else free_port()
    spool = spool if spool is not None else tmp_path / f"{label}-spool"
    keys.setdefault("listen", [f"127.0.0.1:{port}"])
    keys.setdefault("domain", DOMAIN)
    keys.setdefault("retry_initial", 0.5)
    keys.setdefault("retry_max", 2)
    keys.setdefault("flush_check", 0.2)
    keys.setdefault("relay_timeout", 20)
    config = write_config(tmp_path / f"{label}.toml", spool=str(spool), **keys)
    log = tmp_path / f"{label}.log"
    before = log.read_text(errors="replace").count("mail service ready on") if log.exists() else 0
    with open(log, "ab") as service_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chroot_helper.services.mail", "--config", str(config)],
            stdout=service_log,
            stderr=subprocess.STDOUT,
        )
    # The log is appended to across restarts: wait for one more readiness line than before.
    wait_for_log(
        log,
        r"(?s)" + r"mail service ready on.*" * (before + 1),
        proc,
        f"mail service on 127.0.0.1:{port}",
        READY_TIMEOUT,
    )
    return MailService("127.0.0.1", port, spool, config, log, proc)


@contextlib.contextmanager
def run_service(tmp_path: Path, **kwargs: object) -> Iterator[MailService]:
    """:func:`start_service`, stopped on exit."""
    service = start_service(tmp_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield service
    finally:
        stop(service.proc)


class Raw:
    """A hand-driven SMTP client, for bytes smtplib refuses to send."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.buffer = b""
        self.read_reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed by the server after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(text[4:] for text in lines)

    def command(self, line: bytes) -> tuple[int, str]:
        self.send(line + b"\r\n")
        return self.read_reply()

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def greeted(cls, service: MailService, helo: bytes = b"test.local") -> Raw:
        """A client connected to ``service`` that has sent EHLO."""
        client = cls(service.host, service.port)
        assert client.command(b"EHLO " + helo)[0] == 250
        return client


def simple_message(
    token: str, *, sender: str = f"app@{DOMAIN}", to: str = "user@example.net"
) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: test {token}\r\n"
        f"Message-ID: <{token}@{DOMAIN}>\r\nX-Token: {token}\r\n\r\nbody of {token}\r\n"
    ).encode()


def _sink_main(argv: list[str]) -> int:
    import argparse
    import asyncio
    import itertools

    from aiosmtpd.smtp import SMTP, AuthResult

    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--reject-prefix", default="")
    parser.add_argument("--auth", default="", help="require AUTH with user:password")
    parser.add_argument("--tls-cert", default="", help="offer and require STARTTLS")
    parser.add_argument("--tls-key", default="")
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    directory = Path(args.dir)
    counter = itertools.count(len(list(directory.glob("*.eml"))))

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, options):
            if args.reject_prefix and address.startswith(args.reject_prefix):
                return "550 5.1.1 Recipient address rejected: no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            name = f"{os.getpid()}-{next(counter):06d}.eml"
            sender = "" if envelope.mail_from == "<>" else envelope.mail_from  # null sender
            user = session.auth_data.login.decode() if session.auth_data else None
            tls = session.ssl is not None
            head = {"from": sender, "to": envelope.rcpt_tos, "auth": user, "tls": tls}
            head = json.dumps(head).encode()
            tmp = directory / f"{name}.tmp"
            tmp.write_bytes(head + b"\n" + envelope.original_content)
            tmp.rename(directory / name)
            return "250 OK stored"

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def authenticator(server, session, envelope, mechanism, auth_data):
            given = f"{auth_data.login.decode()}:{auth_data.password.decode()}"
            return AuthResult(success=given == args.auth, auth_data=auth_data)

        options = {}
        if args.auth:
            options = {
                "auth_required": True,
                "auth_require_tls": False,
                "authenticator": authenticator,
            }
        if args.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(args.tls_cert, args.tls_key)
            options.update(tls_context=context, require_starttls=True)
        server = await loop.create_server(
            lambda: SMTP(Handler(), enable_SMTPUTF8=True, loop=loop, **options), host, int(port)
        )
        print(f"sink ready on {host}:{port}", flush=True)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
        server.close()
        await server.wait_closed()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(_sink_main(sys.argv[1:]))

"""Start a real Apache httpd with mod_wsgi in daemon mode on a free loopback port.

Used by the integration tests and by ``bench/jail_overhead.py``. Everything the server needs lives
in one world-readable temporary directory (the daemon runs as www-data); the server runs in the
foreground as a child of the caller and is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
MODULES = Path("/usr/lib/apache2/modules")
APPS = Path(__file__).parent / "apps"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mod_wsgi_module() -> str:
    """The mod_wsgi Apache module built by pip into this virtualenv."""
    result = subprocess.run(
        [os.path.join(sys.prefix, "bin", "mod_wsgi-express"), "module-location"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def world_readable_dir(prefix: str) -> Path:
    """A fresh directory under /tmp that www-data can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class Site:
    """What to serve: a WSGI script body and the daemon options."""

    script: str
    import_script: bool = True
    processes: int = 2
    threads: int = 15
    maximum_requests: int = 0
    script_reloading: bool = False
    user: str = "www-data"
    extra_config: str = ""
    files: dict[str, str] = field(default_factory=dict)
    launcher: list[str] = field(default_factory=list)
    python_path: tuple[str, ...] = (str(APPS),)


class Apache:
    """One Apache instance: ``start()``, ``url()``, ``error_log()``, ``stop()``."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.dir = world_readable_dir("chrootwsgi-apache-")
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.script = self.dir / "app.wsgi"
        self.docroot = self.dir / "htdocs"
        self.docroot.mkdir(mode=0o755)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def config(self) -> str:
        site = self.site
        venv = sys.prefix
        python_path = ":".join(site.python_path)
        daemon = (
            f"WSGIDaemonProcess app user={site.user} group={site.user} "
            f"processes={site.processes} threads={site.threads} "
            f"python-home={venv} python-path={python_path} display-name=chrootwsgi-test"
        )
        if site.maximum_requests:
            daemon += f" maximum-requests={site.maximum_requests}"
        import_line = (
            f"WSGIImportScript {self.script} process-group=app application-group=%{{GLOBAL}}"
            if site.import_script
            else ""
        )
        modules = "\n".join(
            f"LoadModule {name}_module {MODULES}/mod_{name}.so"
            for name in ("mpm_event", "authz_core", "alias", "mime", "env")
        )
        return textwrap.dedent(
            f"""\
            ServerRoot {self.dir}
            {modules}
            LoadModule wsgi_module {mod_wsgi_module()}
            Listen 127.0.0.1:{self.port}
            ServerName 127.0.0.1
            PidFile {self.dir}/httpd.pid
            ErrorLog {self.dir}/error.log
            LogLevel info
            User www-data
            Group www-data
            TypesConfig /etc/mime.types
            DocumentRoot {self.docroot}
            Mutex file:{self.dir}
            WSGISocketPrefix {self.dir}/wsgi
            {daemon}
            WSGIScriptReloading {"On" if site.script_reloading else "Off"}
            {import_line}
            WSGIScriptAlias / {self.script} process-group=app application-group=%{{GLOBAL}}
            <Directory {self.dir}>
                Require all granted
            </Directory>
            {site.extra_config}
            """
        )

    def start(self, timeout: float = 30.0) -> Apache:
        for path in (*self.site.python_path, sys.prefix):
            reachable = subprocess.run(
                [
                    "setpriv",
                    f"--reuid={self.site.user}",
                    f"--regid={self.site.user}",
                    "--clear-groups",
                    "test",
                    "-r",
                    path,
                    "-a",
                    "-x",
                    path,
                ],
                check=False,
            )
            if reachable.returncode != 0:
                raise RuntimeError(
                    f"{self.site.user} cannot read {path}: the mod_wsgi daemon runs as that user; "
                    "put the checkout under world-readable directories (or chmod o+rx them)"
                )
        self.script.write_text(self.site.script)
        for name, text in self.site.files.items():
            (self.dir / name).write_text(text)
        conf = self.dir / "httpd.conf"
        conf.write_text(self.config())
        check = subprocess.run(
            [APACHE, "-t", "-f", str(conf)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"apache2 -t rejected the test config:\n{check.stderr}")
        self.process = subprocess.Popen(
            [*self.site.launcher, APACHE, "-DFOREGROUND", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"apache2 exited with {self.process.returncode}:\n{self.error_log()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(
            f"apache2 did not listen on 127.0.0.1:{self.port} within {timeout} s; "
            f"see {self.dir}/error.log:\n{self.error_log()}"
        )

    def get(self, path: str = "/", **kwargs: object) -> requests.Response:
        return requests.get(self.url(path), timeout=30, **kwargs)  # type: ignore[arg-type]

    def error_log(self) -> str:
        try:
            return (self.dir / "error.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def graceful(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Apache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def jailed_script(app: str = "facts:app", **options: object) -> str:
    """A WSGI script that wraps *app* in ChrootMiddleware with *options*."""
    module, _, attr = app.partition(":")
    args = ", ".join(f"{key}={value!r}" for key, value in options.items())
    return textwrap.dedent(
        f"""\
        from chrootwsgi import ChrootMiddleware
        from {module} import {attr} as wrapped
        application = ChrootMiddleware(wrapped, {args})
        """
    )

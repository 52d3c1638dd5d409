"""Start a real gunicorn as root whose workers enter the jail in ``post_fork`` (privileged mode).

The app module is preloaded in the master (``preload_app``), wrapped in
``ChrootMiddleware(enter=False)``; each worker calls ``enter_jail`` after the fork and drops to
www-data. The master stays root and unjailed. Stopped by its PID.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from apache_server import APPS, free_port


class Gunicorn:
    """One gunicorn master with two sync workers on a free loopback port."""

    def __init__(
        self,
        directory: Path,
        root: str,
        *,
        app: str = "facts:app",
        enter_in_post_fork: bool = True,
        **options: object,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        module, _, attr = app.partition(":")
        settings = ", ".join(f"{key}={value!r}" for key, value in options.items())
        jail = f"{root!r}, user='www-data'" + (f", {settings}" if settings else "")
        (directory / "wsgi.py").write_text(
            "from chrootwsgi import ChrootMiddleware\n"
            f"from {module} import {attr} as wrapped\n"
            f"application = ChrootMiddleware(wrapped, root={root!r}, user='www-data', "
            "enter=False)\n"
        )
        hook = f"enter_jail({jail})" if enter_in_post_fork else "pass"
        (directory / "gunicorn.conf.py").write_text(
            f'bind = "127.0.0.1:{self.port}"\n'
            "workers = 2\n"
            'user = "www-data"\n'  # gunicorn hands its worker heartbeat file to this user
            'group = "www-data"\n'
            "preload_app = True\n"
            "graceful_timeout = 5\n"  # a worker stopped while still entering its jail is killed
            f'pythonpath = "{directory},{APPS}"\n'
            f'errorlog = "{directory}/error.log"\n'
            "from chrootwsgi import enter_jail\n"
            "def post_fork(server, worker):\n"
            f"    {hook}\n"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str = "/") -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def stderr(self) -> str:
        return (self.directory / "stderr.log").read_text(errors="replace")

    def start(self, timeout: float = 30.0) -> Gunicorn:
        config = self.directory / "gunicorn.conf.py"
        with (self.directory / "stderr.log").open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(config), "wsgi:application"],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.process.returncode}:\n{self.stderr()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            f"gunicorn did not listen on 127.0.0.1:{self.port} within {timeout} s; "
            f"see {self.directory}/error.log and stderr.log"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

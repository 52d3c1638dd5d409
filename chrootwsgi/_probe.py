"""The doctor's probe: ``python -m chrootwsgi._probe CONFIG OUTPUT PATH...`` (internal).

Imports the app named in CONFIG, installs an audit hook, sends one GET request per PATH and
writes what the app did while serving to OUTPUT as JSON::

    {"events": [[event, [args...]], ...], "responses": ["GET / -> 200 OK", ...],
     "sys_path": [...]}

Run in a child process of its own: an audit hook cannot be removed.
"""

from __future__ import annotations

import io
import json
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING
from wsgiref.util import setup_testing_defaults

from .config import load_config
from .wrapper import import_app

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

_EXEC_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn")
_WRITE_FLAGS = 0o3 | 0o100 | 0o1000 | 0o2000  # O_WRONLY|O_RDWR, O_CREAT, O_TRUNC, O_APPEND


class Recorder:
    """The audit hook: keeps the events the doctor classifies, only while :attr:`on`."""

    def __init__(self) -> None:
        self.on = False
        self.events: list[tuple[str, list[object]]] = []

    def __call__(self, event: str, args: tuple[object, ...]) -> None:
        if not self.on:
            return
        self.on = False  # what the hook itself does is not the app's
        try:
            self._record(event, args)
        finally:
            self.on = True

    def _record(self, event: str, args: tuple[object, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)) and path:
                writing = any(c in str(mode or "") for c in "wax+") or bool(
                    isinstance(flags, int) and flags & _WRITE_FLAGS
                )
                self.events.append((event, [_text(path), writing]))
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args else "."
            if isinstance(path, (str, bytes)):
                self.events.append((event, [_text(path), False]))
        elif event in _EXEC_EVENTS:
            argv = args[1] if len(args) > 1 else args[0]
            command = argv if isinstance(argv, (list, tuple)) else [args[0]]
            self.events.append((event, [" ".join(str(a) for a in command)]))
        elif event == "socket.connect":
            sock, address = args
            family = getattr(sock, "family", None)
            if family == socket.AF_UNIX:
                name = address if isinstance(address, (str, bytes)) else repr(address)
                self.events.append((event, ["AF_UNIX", _text(name)]))
            elif isinstance(address, tuple):
                self.events.append((event, ["AF_INET", [str(address[0]), int(address[1])]]))
        elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
            if args and isinstance(args[0], (str, bytes)):
                self.events.append(("dns", [_text(args[0])]))
        elif event == "ctypes.dlopen":
            if args and isinstance(args[0], (str, bytes)):
                self.events.append((event, [_text(args[0])]))


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def request(app: WSGIApplication, path: str) -> str:
    """One GET of *path*; the status line as ``"GET /path -> 200 OK"``."""
    environ: dict[str, object] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    environ["wsgi.errors"] = io.StringIO()
    status: list[str] = []

    def start_response(
        line: str, headers: object, exc_info: object = None
    ) -> Callable[[bytes], object]:
        status.append(line)
        return lambda data: None

    body = app(environ, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return f"GET {path} -> {status[-1] if status else 'no response'}"


def main(argv: list[str]) -> int:
    config_path, output, *paths = argv
    config = load_config(config_path)
    assert config.app is not None
    app = import_app(config.app)
    recorder = Recorder()
    sys.addaudithook(recorder)
    responses = []
    for path in paths or ["/"]:
        recorder.on = True
        try:
            responses.append(request(app, path))
        except Exception as exc:  # the app's own failure is part of the report
            responses.append(f"GET {path} -> raised {exc!r}")
        finally:
            recorder.on = False
    with open(output, "w") as file:
        json.dump({"events": recorder.events, "responses": responses, "sys_path": sys.path}, file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The demo app: a page that shows, from inside the jailed worker, what the worker can see."""

from __future__ import annotations

import html
import os
import socket
import sys
import zoneinfo
from datetime import datetime


def _check(label: str, action) -> tuple[str, str]:
    try:
        return label, str(action())
    except Exception as exc:  # noqa: BLE001 - shown on the page
        return label, f"{type(exc).__name__}: {exc}"


def _helper_status() -> str:
    socket_path = os.environ.get("CHROOT_HELPER_SOCKET", "/run/chroot-helper.sock")
    if not os.path.exists(socket_path):
        return "not configured (no helper socket in the jail)"
    return f"socket present at {socket_path}"


def application(environ, start_response):
    rows = [
        _check("pid / uid / gid", lambda: f"{os.getpid()} / {os.getuid()} / {os.getgid()}"),
        _check("ls /", lambda: " ".join(sorted(os.listdir("/")))),
        _check("/proc visible", lambda: os.path.exists("/proc")),
        _check("getaddrinfo('localhost')", lambda: socket.getaddrinfo("localhost", 80)[0][4][0]),
        _check("Europe/Berlin now", lambda: datetime.now(zoneinfo.ZoneInfo("Europe/Berlin"))),
        _check("import fractions (first time)", lambda: __import__("fractions").Fraction(1, 3)),
        _check("DOCUMENT_ROOT", lambda: environ.get("DOCUMENT_ROOT")),
        _check("chroot-helper (exec, mail, DNS)", _helper_status),
        _check("Python", lambda: sys.version.split()[0]),
    ]
    body = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
        for label, value in rows
    )
    page = (
        "<!doctype html><title>chrootwsgi demo</title>"
        "<h1>Served from an empty jail</h1>"
        f"<table>{body}</table>"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [page]

"""The ``make demo`` app: a page showing, live from inside the jailed worker, what it can do.

Every row is computed per request inside the jail. Services of the helper that are not
installed or not running are shown as "not configured"; nothing is faked.
"""

from __future__ import annotations

import ctypes
import html
import importlib.util
import os
import socket
import subprocess
from collections.abc import Callable, Iterable

#: Answered by the helper's DNS stub from its hosts file only: not in the jail's /etc/hosts.
DEMO_NAME = "demo.chrootwsgi.test"
HELPER_SOCKET = os.environ.get("CHROOT_HELPER_SOCKET", "/run/chroot-helper.sock")
SMTP_SOCKET = "/run/smtp.sock"


class NotConfigured(Exception):
    """A helper service that is not installed or not running: shown as such, never faked."""


def _attempt(action: Callable[[], object]) -> tuple[bool, str]:
    try:
        return True, str(action())
    except NotConfigured as exc:
        return False, f"not configured: {exc}"
    except Exception as exc:  # shown on the page: that is the point
        return False, f"{type(exc).__name__}: {exc}"


def _capabilities() -> str:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capget(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        return f"capget failed: errno {ctypes.get_errno()}"
    effective = data[0] | data[3] << 32
    permitted = data[1] | data[4] << 32
    return f"effective {effective:#x}, permitted {permitted:#x}"


def _listing() -> str:
    entries = []
    for name in sorted(os.listdir("/")):
        path = "/" + name
        kind = "/" if os.path.isdir(path) else ""
        entries.append(name + kind)
    return "  ".join(entries)


def _resolve() -> str:
    addresses = sorted({info[4][0] for info in socket.getaddrinfo(DEMO_NAME, 80)})
    with open("/etc/resolv.conf") as file:
        servers = [line.split()[1] for line in file if line.startswith("nameserver")]
    return f"{DEMO_NAME} -> {', '.join(addresses)} (asked of {', '.join(servers)})"


def _helper_client() -> object:
    if importlib.util.find_spec("chroot_helper.client") is None:
        raise NotConfigured("chroot_helper.client is not installed")
    if not os.path.exists(HELPER_SOCKET):
        raise NotConfigured(f"no helper socket at {HELPER_SOCKET} in the jail")
    import chroot_helper.client as client  # type: ignore[import-not-found]

    return client


def _helper_exec() -> str:
    client = _helper_client()
    result = client.run(["uname", "-sr"], capture_output=True, text=True)  # type: ignore[attr-defined]
    return f"uname -sr -> {result.stdout.strip()} (exit {result.returncode})"


def _helper_mail() -> str:
    client = _helper_client()
    if not os.path.exists(SMTP_SOCKET):
        raise NotConfigured(f"no SMTP socket at {SMTP_SOCKET} in the jail")
    queue_id = client.sendmail(  # type: ignore[attr-defined]
        b"From: demo@localhost\r\nTo: root@localhost\r\nSubject: chrootwsgi demo\r\n\r\n"
        b"sent from the jail\r\n",
        address=f"unix:{SMTP_SOCKET}",
    )
    return f"queued as {queue_id} for root@localhost (held: see chroot-helper mailq)"


def _read(path: str) -> str:
    with open(path) as file:
        return file.read().strip()


def rows() -> list[tuple[str, bool, str]]:
    """(label, worked, result) for every line of the page, computed now."""
    checks: list[tuple[str, Callable[[], object]]] = [
        ("ls / (the jail's root)", _listing),
        ("uid / gid / pid", lambda: f"{os.getuid()} / {os.getgid()} / {os.getpid()}"),
        ("capabilities", _capabilities),
        ("DNS through the helper's stub", _resolve),
        ("command through the helper (exec)", _helper_exec),
        ("mail through the helper", _helper_mail),
        ("open('/etc/passwd')", lambda: _read("/etc/passwd")),
        ("open('/etc/shadow')", lambda: _read("/etc/shadow")),
        ("subprocess.run(['id']) without the helper", lambda: subprocess.run(["id"]).returncode),
        ("/proc", lambda: os.listdir("/proc")),
    ]
    return [(label, *_attempt(action)) for label, action in checks]


def application(
    environ: dict[str, object], start_response: Callable[..., object]
) -> Iterable[bytes]:
    body = "".join(
        f"<tr class={'ok' if worked else 'failed'}><th>{html.escape(label)}</th>"
        f"<td><pre>{html.escape(result)}</pre></td></tr>\n"
        for label, worked, result in rows()
    )
    page = (
        "<!doctype html>\n<meta charset=utf-8>\n<title>chrootwsgi demo</title>\n"
        "<style>th{text-align:left;vertical-align:top;padding-right:1em}"
        "pre{margin:0;white-space:pre-wrap}.failed pre{color:#a33}</style>\n"
        "<h1>Served from an empty jail</h1>\n"
        f"<p>jail: {html.escape(str(environ.get('chrootwsgi.root')))}; "
        f"jailed: {html.escape(str(environ.get('chrootwsgi.jailed')))}</p>\n"
        f"<table>\n{body}</table>\n"
    ).encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page)))],
    )
    return [page]

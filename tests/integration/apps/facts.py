"""A test app that reports, from inside the worker, what the jailed process can see and do.

Each path answers JSON; nothing here is special to chrootwsgi except that it runs jailed.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import socket
import sys

#: Standard-library modules nothing imports on its own; each /facts request imports the next.
FRESH_MODULES = (
    "colorsys",
    "wave",
    "chunk",
    "netrc",
    "sched",
    "shelve",
    "tabnanny",
    "graphlib",
    "plistlib",
    "mailbox",
    "fractions",
    "statistics",
    "filecmp",
    "fileinput",
    "ftplib",
    "poplib",
    "imaplib",
    "nntplib",
    "smtplib",
    "telnetlib",
    "xdrlib",
    "aifc",
    "sunau",
    "sndhdr",
    "imghdr",
    "pipes",
    "cgi",
    "cgitb",
    "mailcap",
    "optparse",
    "getopt",
    "pstats",
    "cProfile",
    "timeit",
    "trace",
    "pdb",
    "difflib",
    "gettext",
    "calendar",
    "zipapp",
    "pyclbr",
    "modulefinder",
    "runpy",
)


def _capabilities() -> int:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.capget(ctypes.byref(Header(0x20080522, 0)), data)
    return data[0] | data[3] << 32  # effective, low and high words


def _attempt(action):
    try:
        result = action()
    except OSError as exc:
        return {"ok": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "result": result}


def facts(environ):
    import ssl
    import zoneinfo

    fresh = next(name for name in FRESH_MODULES if name not in sys.modules)
    module = importlib.import_module(fresh)

    return {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "root_listing": sorted(os.listdir("/")),
        "etc_passwd": _attempt(lambda: open("/etc/passwd").read()),
        "proc_exists": os.path.exists("/proc"),
        "cap_effective": _capabilities(),
        "localhost": _attempt(
            lambda: sorted({a[4][0] for a in socket.getaddrinfo("localhost", 80)})
        ),
        "berlin": _attempt(lambda: str(zoneinfo.ZoneInfo("Europe/Berlin"))),
        "first_import": {"name": fresh, "file": module.__file__},
        "ca_certs": ssl.create_default_context().cert_store_stats()["x509_ca"],
        "environ": {
            k: environ.get(k)
            for k in (
                "DOCUMENT_ROOT",
                "CONTEXT_DOCUMENT_ROOT",
                "SCRIPT_FILENAME",
                "PATH_TRANSLATED",
                "chrootwsgi.jailed",
            )
        },
    }


def exposure(environ):
    return {
        "read": _attempt(lambda: open("/exposed/hello.txt").read()),
        "write": _attempt(lambda: open("/exposed/new.txt", "w").close()),
    }


def lazy(environ):
    """What the issue lists as failing after a plain late chroot unless preloaded."""
    import importlib.metadata
    import importlib.resources
    import pwd
    import ssl
    import tempfile
    import traceback

    import certifi

    def temp_file():
        with tempfile.NamedTemporaryFile() as file:
            file.write(b"x")
            return os.path.dirname(file.name)

    def source_line():
        try:
            int("not a number")
        except ValueError as exc:
            return traceback.format_exception(exc)[-2].splitlines()[-1].strip()

    return {
        "getpwuid": _attempt(lambda: pwd.getpwuid(33).pw_name),
        "tempfile": _attempt(temp_file),
        "cp1252": _attempt(lambda: b"\x80".decode("cp1252")),
        "idna": _attempt(lambda: "bücher.example".encode("idna").decode()),
        "certifi": _attempt(
            lambda: ssl.create_default_context(cafile=certifi.where()).cert_store_stats()["x509_ca"]
        ),
        "metadata": _attempt(lambda: importlib.metadata.version("requests")),
        "resources": _attempt(
            lambda: len(importlib.resources.files("certifi").joinpath("cacert.pem").read_bytes())
        ),
        "traceback": _attempt(source_line),
        "decimal": _attempt(lambda: str(__import__("decimal").Decimal("1.10") * 3)),
    }


def resolve(environ):
    """Name resolution inside the jail: glibc through /etc/resolv.conf, and requests."""
    import urllib.parse

    import requests

    port = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("port", ["80"])[0]
    return {
        "getaddrinfo": _attempt(
            lambda: sorted({ai[4][0] for ai in socket.getaddrinfo("name.test", 80)})
        ),
        "gethostbyname": _attempt(lambda: socket.gethostbyname("www.chain.test")),
        "missing": _attempt(lambda: socket.getaddrinfo("missing.test", 80)),
        "http": _attempt(lambda: requests.get(f"http://web.test:{port}/", timeout=10).text),
    }


def helper(environ):
    """The jailed app runs an allowlisted command through chroot-helper (no /bin in the jail)."""
    from chroot_helper import client

    return {
        "bin_echo_exists": os.path.exists("/bin/echo"),
        "echo": _attempt(
            lambda: (
                client.run(["echo", "from", "the helper"], capture_output=True, text=True).stdout
            )
        ),
        "not_allowed": _attempt(lambda: client.run(["rm", "-rf", "/"])),
    }


def shim(environ):
    """Unchanged code calling subprocess, with ChrootMiddleware(exec_shim=True)."""
    import subprocess

    message = b"From: app@example.org\nTo: someone@example.org\nSubject: shim\n\nhello\n"

    def pipe_to_sendmail():
        with subprocess.Popen(["/usr/lib/sendmail", "-oi", "-t"], stdin=subprocess.PIPE) as proc:
            proc.stdin.write(message)
            proc.stdin.close()
            return proc.wait()

    def refused_sender():
        argv = ["/usr/sbin/sendmail", "-f", "evil@elsewhere.test", "-t"]
        return subprocess.run(argv, input=message, capture_output=True).returncode

    os.environ["CHROOT_HELPER_SMTP"] = "unix:/run/smtp.sock"
    echo = ["/bin/echo", "via", "shim"]
    return {
        "run": _attempt(lambda: subprocess.run(echo, capture_output=True).stdout.decode()),
        "sendmail_run": _attempt(
            lambda: subprocess.run(["/usr/sbin/sendmail", "-t"], input=message).returncode
        ),
        "sendmail_pipe": _attempt(pipe_to_sendmail),
        "sendmail_refused": _attempt(refused_sender),
    }


def sleep(environ):
    import time

    time.sleep(30)
    return {"slept": 30}


ROUTES = {
    "/helper": helper,
    "/shim": shim,
    "/sleep": sleep,
    "/resolve": resolve,
    "/facts": facts,
    "/exposure": exposure,
    "/lazy": lazy,
}


def app(environ, start_response):
    route = ROUTES.get(environ.get("PATH_INFO", "/"))
    if route is None:
        body = f"hello from pid {os.getpid()}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "called")])
        return [body]
    body = json.dumps(route(environ)).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("X-App", "called")])
    return [body]

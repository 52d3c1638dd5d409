"""``make demo`` / ``make demo-stop``: Apache + mod_wsgi serving a demo app from an empty jail.

``start`` (as root) prepares everything under one state directory (``$DEMO_DIR``, default
``/tmp/chrootwsgi-demo``) with the project's own tools, then leaves the servers running in the
background:

1. ``chrootwsgi jail init`` creates the EMPTY jail directory;
2. the site's jail config (``chrootwsgi-demo.toml``) names the demo app and the jail;
3. the helper, ``chroot-helper serve``, with its sockets in the jail: exec (``uname``), mail (held
   in the spool, shown by ``chroot-helper mailq``) and its DNS stub;
4. ``chrootwsgi apache-config`` writes the site snippet; Apache (``apache2 -k start``) serves
   it on 127.0.0.1:PORT with a mod_wsgi daemon running as www-data;
5. the page is fetched once and summarised; the URL and how to stop are printed.

``stop`` stops what ``start`` started, by the PIDs it recorded (checked against their command
lines), and removes the state directory.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
BIN = Path(sys.prefix) / "bin"
APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
MODULES = Path("/usr/lib/apache2/modules")
GROUP = "chrootwsgi-demo"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_ROOT = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8080))
    parser.add_argument("--dir", default=os.environ.get("DEMO_DIR") or "/tmp/chrootwsgi-demo")
    parser.add_argument(
        "--dns",
        default=os.environ.get("DEMO_DNS") or "127.0.0.1",
        help="loopback address of the DNS stub (port 53; the jail's resolv.conf names it)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "make demo needs root: Apache binds, then runs its daemon as www-data", file=sys.stderr
        )
        return EXIT_NOT_ROOT
    state = Path(args.dir)
    if args.action == "start":
        unreachable = [path for path in (HERE, Path(sys.prefix)) if not readable_by_www_data(path)]
        if unreachable:
            print(
                f"www-data cannot read {unreachable[0]}: the mod_wsgi daemon runs as www-data; "
                "make the checkout readable (chmod o+rX on it and every directory above it)",
                file=sys.stderr,
            )
            return EXIT_FAILED
    if args.action == "stop":
        return stop(state)
    return start(state, args.port, args.dns)


def start(state: Path, port: int, dns: str) -> int:
    if running(state / "httpd.pid", str(state)):
        print(f"demo already running from {state}: make demo-stop first", file=sys.stderr)
        return EXIT_FAILED
    if state.exists():
        stop(state, quiet=True)
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / "etc").mkdir(mode=0o755)
    jail = state / "jail"
    run([BIN / "chrootwsgi", "jail", "init", str(jail)])
    config = state / "etc" / f"{GROUP}.toml"
    config.write_text(
        f"# the demo site: {GROUP} is the mod_wsgi daemon group, so the wrapper reads this file\n"
        f'app = "demo_app:application"\nroot = "{jail}"\nnameservers = ["{dns}"]\n'
    )
    config.chmod(0o644)
    run([BIN / "chrootwsgi", "check-config", str(config)])
    helper = start_helper(state, dns)
    snippet = run(
        [
            BIN / "chrootwsgi",
            "apache-config",
            "--app",
            "demo_app:application",
            "--root",
            str(jail),
            "--name",
            GROUP,
            "--processes",
            "1",
            "--threads",
            "4",
            "--python-path",
            str(HERE),
        ],
        env=dict(os.environ, CHROOTWSGI_CONFIG_DIR=str(state / "etc")),
        echo=False,
    )
    (state / "site.conf").write_text(snippet)
    (state / "httpd.conf").write_text(httpd_conf(state, port))
    env = dict(os.environ, CHROOTWSGI_CONFIG_DIR=str(state / "etc"))
    env.pop("CHROOTWSGI_CONFIG", None)
    run([APACHE, "-t", "-f", str(state / "httpd.conf")], echo=False)
    run([APACHE, "-f", str(state / "httpd.conf"), "-k", "start"], env=env, echo=False)
    url = f"http://127.0.0.1:{port}/"
    page = wait_for_page(url, state)
    print()
    print(summarise(page))
    print()
    print(f"chrootwsgi demo: {url}")
    print(f"  jail {jail} (on disk: {sorted(os.listdir(jail)) or 'empty'})")
    print(f"  helper: {helper}")
    print(f"  Apache error log: {state / 'error.log'}")
    print(
        "  stop it with: make demo-stop"
        + (f" DEMO_DIR={state}" if "DEMO_DIR" in os.environ else "")
    )
    return EXIT_OK


def start_helper(state: Path, dns: str) -> str:
    """Start ``chroot-helper serve`` with its socket in the jail; say what it serves."""
    config = state / "helper.toml"
    socket = state / "jail" / "run" / "chroot-helper.sock"
    socket.parent.mkdir(mode=0o755, exist_ok=True)  # the helper's sockets, seen as /run in the jail
    config.write_text(
        "[helper]\n"
        f'socket = "{socket}"\n'  # the jailed app reaches it at /run/chroot-helper.sock
        'socket_mode = "0666"\n'
        "allow_uids = [33]\n\n"
        "[exec.uname]\n"
        'argv = ["/bin/uname"]\n'
        'args = ["-[a-z]+"]\n'
        'user = "nobody"\n\n'
        "[dns]\n"
        f'listen = "{dns}:53"\nhosts_file = "{HERE / "dns-hosts"}"\n'
        "upstream_timeout = 0.5\ntimeout = 1.0\n\n"
        "[mail]\n"  # no relay: messages are held in the spool, visible in mailq
        f'listen = ["unix:{state / "jail" / "run" / "smtp.sock"}"]\n'
        f'spool = "{state / "spool"}"\n'
        'domain = "localhost"\n'
    )
    command = [str(BIN / "chroot-helper"), "serve", "--config", str(config)]
    what = (
        f"exec (uname), mail (held; chroot-helper mailq --config {config}) and DNS on "
        f"{dns}:53; socket {socket}"
    )
    log = open(state / "helper.log", "wb")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    (state / "helper.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if socket.exists() and "serving" in (state / "helper.log").read_text(errors="replace"):
            return what
        if process.poll() is not None:
            text = (state / "helper.log").read_text(errors="replace")
            return f"not running: chroot-helper exited with {process.returncode}: {text.strip()}"
        time.sleep(0.1)
    return f"not ready within {READY_TIMEOUT} s: see {state / 'helper.log'}"


def httpd_conf(state: Path, port: int) -> str:
    modules = "\n".join(
        f"LoadModule {name}_module {MODULES}/mod_{name}.so"
        for name in ("mpm_event", "authz_core", "alias", "mime", "env")
    )
    return f"""\
# chrootwsgi demo server; the site, generated by chrootwsgi apache-config, is in site.conf
ServerRoot {state}
{modules}
Listen 127.0.0.1:{port}
ServerName 127.0.0.1
PidFile {state}/httpd.pid
ErrorLog {state}/error.log
LogLevel info
User www-data
Group www-data
TypesConfig /etc/mime.types
DocumentRoot {state}/jail
Mutex file:{state}
Include {state}/site.conf
WSGISocketPrefix {state}/wsgi
"""


def wait_for_page(url: str, state: Path) -> requests.Response:
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return requests.get(url, timeout=15)
        except requests.RequestException as exc:
            last = exc
            time.sleep(0.2)
    log = (
        (state / "error.log").read_text(errors="replace") if (state / "error.log").exists() else ""
    )
    raise SystemExit(f"Apache did not answer {url} within {READY_TIMEOUT} s ({last}):\n{log}")


def summarise(page: requests.Response) -> str:
    text = re.sub(r"<(style|title)>.*?</\1>", "", page.text, flags=re.S)
    text = text.replace("</tr>", "\n").replace("</h1>", "\n").replace("</p>", "\n")
    lines = (
        " ".join(html.unescape(re.sub(r"<[^>]+>", " ", line)).split()) for line in text.splitlines()
    )
    return f"HTTP {page.status_code}\n" + "\n".join(line for line in lines if line)


def run(command: list[object], *, env: dict[str, str] | None = None, echo: bool = True) -> str:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stderr}"
        )
    if echo and result.stdout:
        print(result.stdout, end="")
    return result.stdout


def readable_by_www_data(path: Path) -> bool:
    check = ["setpriv", "--reuid=www-data", "--regid=www-data", "--clear-groups"]
    result = subprocess.run([*check, "test", "-r", str(path), "-a", "-x", str(path)], check=False)
    return result.returncode == 0


def running(pid_file: Path, marker: str) -> int | None:
    """The PID in *pid_file* if that process is alive and its command line names *marker*."""
    try:
        pid = int(pid_file.read_text().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            cmdline = file.read()
    except (OSError, ValueError, IndexError):
        return None
    return pid if marker.encode() in cmdline else None


def stop(state: Path, *, quiet: bool = False) -> int:
    if not state.exists():
        if not quiet:
            print(f"demo not running (no {state})")
        return EXIT_OK
    failed = False
    for name, marker in (("httpd.pid", str(state)), ("helper.pid", str(state / "helper.toml"))):
        pid = running(state / name, marker)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and running(state / name, marker):
            time.sleep(0.1)
        if running(state / name, marker):
            print(f"pid {pid} ({name}) did not stop within {STOP_TIMEOUT} s", file=sys.stderr)
            failed = True
        elif not quiet:
            print(f"stopped {'Apache' if name == 'httpd.pid' else 'the helper'} (pid {pid})")
    deadline = time.monotonic() + STOP_TIMEOUT
    while (leftovers := processes_of(state)) and time.monotonic() < deadline:
        time.sleep(0.1)  # daemon processes may finish after their parent
    if leftovers:
        print(f"still running, started from {state}: pids {leftovers}", file=sys.stderr)
        return EXIT_FAILED
    if failed:
        return EXIT_FAILED
    jail = state / "jail"
    helper_run = jail / "run"  # the helper's socket directory, left after it stopped
    if helper_run.is_dir() and not helper_run.is_symlink():
        for entry in helper_run.iterdir():
            if entry.name in ("chroot-helper.sock", "smtp.sock") and entry.is_socket():
                entry.unlink()
        if not any(helper_run.iterdir()):
            helper_run.rmdir()
    if jail.exists() and os.listdir(jail):
        print(f"{jail} is not empty: {os.listdir(jail)}; left in place", file=sys.stderr)
        return EXIT_FAILED
    shutil.rmtree(state)
    if not quiet:
        print(f"removed {state}")
    return EXIT_OK


def processes_of(state: Path) -> list[int]:
    """PIDs whose command line names the state directory or the demo's daemon group."""
    markers = (str(state).encode(), f"(wsgi:{GROUP})".encode())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                cmdline = file.read()
        except OSError:
            continue
        if any(marker in cmdline for marker in markers):
            found.append(int(pid))
    return found


if __name__ == "__main__":
    sys.exit(main())

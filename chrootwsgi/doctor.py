"""Find what an app will miss in its jail (``chrootwsgi doctor``), before it is jailed.

The doctor imports the app named in the config file in a child process (as the worker user when
run as root), installs a Python audit hook (:func:`sys.addaudithook`) and sends it test requests,
unjailed. Everything the app does *while serving* is recorded: files opened and directories
listed, programs started, sockets connected, names resolved, libraries loaded. Each is then
compared with what the jail will show, and reported with its fix:

- a host file the jail does not show: expose it read-only (``expose``) or ``[preload] files``;
- a program started: run it through the helper's exec service;
- mail sent over SMTP: the helper's mail service;
- a name resolved: the jail's resolver asks ``nameservers`` (the helper's DNS stub);
- a library loaded: ``[preload] libraries``;
- ``/proc`` and ``/sys``: not mounted in the jail; read what is needed at import time.

What the app does while it is imported is not reported: that happens before entry.

Plus system checks: user namespaces (rootless mode), the jail directory's permissions, the DNS
stub and the helper. The audit hook sees Python-level calls only; a C extension that opens files
on its own is not seen.

Example::

    report = diagnose("/etc/chrootwsgi/myapp.toml", paths=("/", "/login"))
    print(format_report(report))
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from . import preload
from .config import JailConfig, load_config
from .errors import ConfigError
from .jail_init import check_jail

OK = "ok"
BREAKS = "breaks"
NOTE = "note"

HELPER_SOCKET_ENV = "CHROOT_HELPER_SOCKET"
HELPER_SOCKET = "/run/chroot-helper.sock"
HELPER_EXEC = (
    "run it through the helper's exec service (chroot_helper.client.run) and allow it in "
    "/etc/chroot-helper.toml"
)
SMTP_PORTS = frozenset({25, 465, 587})
PROBE_TIMEOUT = 120.0
#: Never suggested for exposure as a whole directory.
SYSTEM_PREFIXES = ("/etc", "/usr", "/var/lib", "/root", "/home", "/boot")


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One line of the report.

    :param status: ``"ok"``, ``"breaks"`` (will fail in the jail) or ``"note"``.
    :param what: the kind of access or check, e.g. ``open``, ``exec``, ``user namespaces``.
    :param detail: the path, command, address or result.
    :param fix: what to change; empty when nothing needs to.
    """

    status: str
    what: str
    detail: str
    fix: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """Findings for the app and the system; :attr:`breaks` when anything will fail."""

    app: str
    responses: tuple[str, ...]
    app_findings: tuple[Finding, ...]
    system_findings: tuple[Finding, ...]
    imports_served: int

    @property
    def breaks(self) -> bool:
        return any(f.status == BREAKS for f in self.app_findings + self.system_findings)


def diagnose(
    config_path: str,
    *,
    paths: Sequence[str] = ("/",),
    python_path: Sequence[str] = (),
    user: str | None = None,
) -> Report:
    """Probe the app named in *config_path* and check the system.

    :param paths: URL paths requested (GET) once each.
    :param python_path: directories added to ``sys.path`` (as ``WSGIDaemonProcess python-path``).
    :param user: run the probe as this user when root; default ``config.user`` or ``www-data``.
    :raises ConfigError: the config is invalid, names no app, or the probe itself failed.
    """
    config = load_config(config_path)
    if config.app is None:
        raise ConfigError(f'{config_path}: no app = "module:callable" to probe; add one')
    worker = user or config.user or "www-data"
    probe = _run_probe(config_path, paths, python_path, worker)
    sys_path = [p for p in probe["sys_path"] if isinstance(p, str) and p]
    system = _system_findings(config, worker)
    stub_ok = not any(f.what == "DNS stub" and f.status != OK for f in system)
    findings: dict[tuple[str, str], Finding] = {}
    imports = 0
    written: set[str] = set()  # files the requests wrote may be read back
    for item in probe["events"]:
        assert isinstance(item, list)
        event, args = item
        if event == "open" and isinstance(args, list) and args[0] in written:
            continue
        finding = _classify(event, args, config, sys_path, stub_ok, worker)
        if finding is not None and finding.status == OK and finding.what == "open (write)":
            written.add(finding.detail)
        if finding is None:
            imports += 1
        else:
            findings.setdefault((finding.what, finding.detail), finding)
    if any(f.what == "helper" and f.status != OK for f in system):
        for key, finding in findings.items():
            if finding.what == "exec":
                fix = finding.fix + " (the helper does not run here yet: see below)"
                findings[key] = dataclasses.replace(finding, fix=fix)
    return Report(
        app=config.app,
        responses=tuple(str(line) for line in probe["responses"]),
        app_findings=tuple(findings.values()),
        system_findings=tuple(system),
        imports_served=imports,
    )


def format_report(report: Report) -> str:
    """The report as the text table ``chrootwsgi doctor`` prints."""
    lines = [f"app {report.app}: " + ", ".join(report.responses)]
    rows = [("STATUS", "WHAT", "DETAIL", "FIX")]
    rows += [(f.status, f.what, f.detail, f.fix) for f in report.app_findings]
    if not report.app_findings:
        rows.append((OK, "requests", "touched nothing the jail lacks", ""))
    rows.append(
        (
            OK,
            "imports",
            f"{report.imports_served} file(s) read by imports",
            "served by the import snapshot",
        )
    )
    rows += [(f.status, f.what, f.detail, f.fix) for f in report.system_findings]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(3)] + [row[3]]
        lines.append("  ".join(cells).rstrip())
    verdict = (
        "something will break in the jail: apply the fixes above"
        if report.breaks
        else "nothing found that the jail breaks"
    )
    return "\n".join(lines + ["", verdict]) + "\n"


def _run_probe(
    config_path: str, paths: Sequence[str], python_path: Sequence[str], user: str
) -> dict[str, list[object]]:
    with tempfile.TemporaryDirectory(prefix="chrootwsgi-doctor-") as tmp:
        output = os.path.join(tmp, "events.json")
        command = [sys.executable, "-m", "chrootwsgi._probe", config_path, output, *paths]
        if os.geteuid() == 0:
            entry = pwd.getpwnam(user)
            os.chown(tmp, entry.pw_uid, entry.pw_gid)
            command = [
                "setpriv",
                f"--reuid={entry.pw_uid}",
                f"--regid={entry.pw_gid}",
                "--init-groups",
                *command,
            ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*python_path, env.get("PYTHONPATH", "")]).strip(
            os.pathsep
        )
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=env,
                timeout=PROBE_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"probing the app took more than {PROBE_TIMEOUT:.0f} s: does it wait for a "
                "service at import or in the request?"
            ) from None
        if result.returncode != 0 or not os.path.exists(output):
            raise ConfigError(
                f"probing the app as {user} failed (exit {result.returncode}); its output:\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        with open(output) as file:
            data: dict[str, list[object]] = json.load(file)
        return data


def _classify(
    event: object,
    args: object,
    config: JailConfig,
    sys_path: list[str],
    stub_ok: bool,
    user: str,
) -> Finding | None:
    """The finding for one recorded event; ``None`` for a read the import snapshot serves."""
    assert isinstance(event, str) and isinstance(args, list)
    if event in ("open", "os.listdir", "os.scandir"):
        what = "open" if event == "open" else "list"
        return _path_finding(what, str(args[0]), bool(args[1]), config, sys_path, user)
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn"):
        # The jail holds no programs (nor the libraries and files they would need).
        return Finding(status=BREAKS, what="exec", detail=str(args[0]), fix=HELPER_EXEC)
    if event == "socket.connect":
        family, address = args
        if family == "AF_UNIX":
            name = str(address)
            if name.startswith("\0") or name.startswith("@"):
                return Finding(
                    status=NOTE,
                    what="connect",
                    detail=f"abstract socket {name!r}",
                    fix="reaches outside the jail: a chroot does not confine abstract sockets",
                )
            if _visible(name, config):
                return Finding(status=OK, what="connect", detail=name, fix="exposed")
            return Finding(
                status=BREAKS,
                what="connect",
                detail=f"Unix socket {name}",
                fix=f'expose its directory: expose = ["{os.path.dirname(name)}:'
                f'{os.path.dirname(name)}:rw"]',
            )
        host, port = address[0], address[1]
        if port in SMTP_PORTS:
            return Finding(
                status=NOTE,
                what="connect",
                detail=f"SMTP {host}:{port}",
                fix="works from the jail (the network is not confined); or send through the "
                "helper's mail service (chroot_helper.client.sendmail)",
            )
        return Finding(
            status=NOTE,
            what="connect",
            detail=f"{host}:{port}",
            fix="works from the jail: a chroot does not confine the network",
        )
    if event == "dns":
        host = str(args[0])
        if host in ("localhost", "ip6-localhost") or host in config.hosts or _is_address(host):
            return Finding(status=OK, what="resolve", detail=host, fix="the jail's /etc/hosts")
        return Finding(
            status=OK if stub_ok else BREAKS,
            what="resolve",
            detail=host,
            fix=f"asked of nameservers {', '.join(config.nameservers)} (the helper's DNS stub)"
            + ("" if stub_ok else ": start chroot-helper's DNS stub, or set nameservers"),
        )
    if event == "ctypes.dlopen":
        name = str(args[0])
        if name in config.preload_libraries or os.path.basename(name) in config.preload_libraries:
            return Finding(status=OK, what="dlopen", detail=name, fix="preloaded")
        return Finding(
            status=BREAKS,
            what="dlopen",
            detail=name,
            fix=f'preload it: [preload] libraries = ["{os.path.basename(name)}"]',
        )
    return Finding(status=NOTE, what=event, detail=repr(args))


def _path_finding(
    what: str, path: str, writing: bool, config: JailConfig, sys_path: list[str], user: str
) -> Finding | None:
    real = os.path.realpath(path)
    under_sys_path = any(_under(real, p) for p in sys_path)
    if under_sys_path and (
        real.endswith((".py", ".pyc", ".so", ".pth")) or ".dist-info/" in real or what == "list"
    ):
        return None  # imports and importlib.metadata: served by the snapshot
    if writing:
        what += " (write)"
    if _visible(path, config, writing=writing):
        return Finding(status=OK, what=what, detail=path, fix="shown in the jail")
    if real.startswith(("/proc/", "/sys/")) or real in ("/proc", "/sys"):
        return Finding(
            status=BREAKS,
            what=what,
            detail=path,
            fix="/proc and /sys are not mounted in the jail: read it at import time",
        )
    if not os.path.exists(path):
        return Finding(status=NOTE, what=what, detail=path, fix="ignore: missing on the host too")
    if not _accessible(path, user, writing=writing):
        return Finding(
            status=NOTE,
            what=what,
            detail=path,
            fix=f"ignore: {user} cannot use it on the host either",
        )
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if writing:
        return Finding(
            status=BREAKS,
            what=what,
            detail=path,
            fix=f'write to /tmp, or expose it writable: expose = ["{directory}:{directory}:rw"]',
        )
    if under_sys_path and os.path.exists(os.path.join(directory, "__init__.py")):
        fix = (
            "package data: read it with importlib.resources (served by the snapshot), or "
            f'expose it: expose = ["{directory}"]'
        )
    elif os.path.isfile(path) and directory.startswith(SYSTEM_PREFIXES):
        fix = f'show it read-only: [preload] files = ["{path}"]'
    elif os.path.isfile(path):
        fix = f'show it read-only: [preload] files = ["{path}"], or expose = ["{directory}"]'
    else:
        fix = f'expose it read-only: expose = ["{directory}"]'
    return Finding(status=BREAKS, what=what, detail=path, fix=fix)


def _accessible(path: str, user: str, *, writing: bool) -> bool:
    """Whether *user* may read (or write) *path* by its mode bits, as the worker would."""
    entry = pwd.getpwnam(user)
    st = os.stat(path)
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {entry.pw_gid}
    if st.st_uid == entry.pw_uid:
        bit = stat.S_IWUSR if writing else stat.S_IRUSR
    elif st.st_gid in groups:
        bit = stat.S_IWGRP if writing else stat.S_IRGRP
    else:
        bit = stat.S_IWOTH if writing else stat.S_IROTH
    return bool(st.st_mode & bit)


def _visible(path: str, config: JailConfig, *, writing: bool = False) -> bool:
    """Whether the jail shows *path* at the same place (and writable, if *writing*)."""
    path = os.path.normpath(path)
    if not writing and path in ("/", "/etc", "/dev") or (config.tmp and path == "/tmp"):
        return True  # the jail's own root and the directories its view always has
    if path != "/" and os.path.lexists(config.root + path):
        return True  # on disk in the jail directory: the same path inside
    generated = {
        "/etc/hosts",
        "/etc/passwd",
        "/etc/group",
        "/etc/resolv.conf",
        "/etc/nsswitch.conf",
        "/etc/services",
        "/etc/protocols",
    }
    if not writing and path in generated:
        return True
    if path in {f"/dev/{name}" for name in config.devices}:
        return True
    if config.tmp and writing and _under(path, "/tmp"):
        return True  # the private /tmp: empty at entry, writable
    read_only = [*preload.data_files(), *config.preload_files]
    if not writing and any(_under(path, item) for item in read_only):
        return True
    return any(
        _under(path, e.host) and e.jail == e.host and (e.writable or not writing)
        for e in config.expose
    )


def _under(path: str, prefix: str) -> bool:
    prefix = os.path.normpath(prefix)
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _is_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _system_findings(config: JailConfig, user: str) -> list[Finding]:
    findings = [_userns_finding(user)]
    problems = check_jail(config.root)
    findings += [
        Finding(status=BREAKS, what="jail directory", detail=f"{path}: {what}", fix=fix)
        for path, what, fix in problems
    ] or [Finding(status=OK, what="jail directory", detail=f"{config.root}: root:root 0755")]
    findings += [_dns_finding(server) for server in config.nameservers]
    findings.append(_helper_finding())
    return findings


def _userns_finding(user: str) -> Finding:
    for path, fix in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "sysctl kernel.unprivileged_userns_clone=1"),
        ("/proc/sys/user/max_user_namespaces", "sysctl user.max_user_namespaces=10000"),
    ):
        try:
            with open(path) as file:
                value = file.read().strip()
        except OSError:
            continue
        if value == "0":
            return Finding(status=BREAKS, what="user namespaces", detail=f"{path} is 0", fix=fix)
    command = ["unshare", "--user", "true"]
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        command = [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            *command,
        ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return Finding(
            status=BREAKS,
            what="user namespaces",
            detail=f"{user} cannot create one: {result.stderr.strip()}",
            fix="allow unprivileged user namespaces (sysctl, AppArmor or seccomp), or use "
            "privileged mode (gunicorn)",
        )
    return Finding(status=OK, what="user namespaces", detail=f"{user} can create one (rootless)")


def _dns_finding(server: str) -> Finding:
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode

    query = dns.message.make_query("localhost.", "A")
    try:
        # TCP, which the stub serves as well: a closed port is refused at once, where a UDP
        # query would wait out its timeout.
        answer = dns.query.tcp(query, server, timeout=2.0)
    except (OSError, dns.exception.DNSException) as exc:
        return Finding(
            status=NOTE,
            what="DNS stub",
            detail=f"{server}:53 does not answer ({type(exc).__name__})",
            fix="not configured: start chroot-helper (DNS); names other than localhost and "
            "[hosts] will not resolve in the jail",
        )
    rcode = dns.rcode.to_text(answer.rcode())
    return Finding(status=OK, what="DNS stub", detail=f"{server}:53 answers ({rcode})")


def _helper_finding() -> Finding:
    path = os.environ.get(HELPER_SOCKET_ENV) or HELPER_SOCKET
    if not os.path.exists(path):
        return Finding(
            status=NOTE,
            what="helper",
            detail=f"not configured (no socket at {path})",
            fix="exec and mail through the helper are unavailable until chroot-helper runs",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
        except OSError as exc:
            return Finding(
                status=BREAKS,
                what="helper",
                detail=f"{path}: {exc.strerror}",
                fix="start it: systemctl start chroot-helper",
            )
    return Finding(status=OK, what="helper", detail=f"{path} accepts connections")

"""The escape battery, run from inside a jailed worker: every way out we know of.

``GET /battery?pids=A,B`` runs each attempt once and answers JSON ``{name: outcome}``, where an
outcome is ``{"ok": true, "result": ...}`` when the attempt got through and
``{"ok": false, "errno": "EPERM"}`` (or ``"error"``) when it was stopped. *pids* are the daemon
processes the test saw: the one that is not this worker is its sibling. ``GET /pid`` answers
this worker's pid.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import urllib.parse

libc = ctypes.CDLL(None, use_errno=True)

PTRACE_ATTACH, PTRACE_DETACH = 16, 17
MNT_DETACH = 2


def _syscall(number: int, *args: int) -> int:
    result = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(arg) for arg in args])
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _libc(name: str, *args: object) -> int:
    result = getattr(libc, name)(*args)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def second_chroot():
    os.makedirs("/tmp/inner", exist_ok=True)
    os.chroot("/tmp/inner")
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    return sorted(os.listdir("/"))


def fchdir_inherited_fds():
    for fd in range(3, 4096):
        try:
            os.fchdir(fd)
        except OSError:
            continue
        for _ in range(64):
            os.chdir("..")
        return {"fd": fd, "listing": sorted(os.listdir("."))}
    raise OSError(errno.ENOTDIR, "no inherited directory descriptor")


def openat_inherited_fds():
    for fd in range(3, 4096):
        try:
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        except OSError:
            continue
        os.close(parent)
        return {"fd": fd}
    raise OSError(errno.ENOTDIR, "no inherited directory descriptor")


def proc_pid1_root():
    return os.listdir("/proc/1/root")


def proc_pid1_cwd():
    return os.listdir("/proc/1/cwd")


def proc_self_root():
    return os.listdir("/proc/self/root/..")


def proc_parent_fds(parent):
    return os.listdir(f"/proc/{parent}/fd")


def mount_tmpfs():
    return _libc("mount", b"none", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None)


def umount_root():
    return _libc("umount2", b"/", MNT_DETACH)


def pivot_root():
    new_root, put_old = ctypes.c_char_p(b"."), ctypes.c_char_p(b".")
    address = ctypes.cast(new_root, ctypes.c_void_p).value or 0
    return _syscall(155, address, ctypes.cast(put_old, ctypes.c_void_p).value or 0)


def setuid_root():
    os.setuid(0)
    return os.getuid()


def setgid_root():
    os.setgid(0)
    return os.getgid()


def setgroups_root():
    os.setgroups([0])
    return os.getgroups()


def capset_sys_admin():
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(1 << 21, 1 << 21, 0, 0, 0, 0)  # CAP_SYS_ADMIN
    return _libc("capset", header, data)


def nested_user_namespace():
    return _syscall(272, 0x10000000)  # unshare(CLONE_NEWUSER)


def ptrace_parent(parent):
    _syscall(101, PTRACE_ATTACH, parent, 0, 0)
    _syscall(101, PTRACE_DETACH, parent, 0, 0)
    return "attached"


def ptrace_sibling(sibling):
    _syscall(101, PTRACE_ATTACH, sibling, 0, 0)
    _syscall(101, PTRACE_DETACH, sibling, 0, 0)
    return "attached"


def signal_parent(parent):
    os.kill(parent, 0)
    return "signalled"


def signal_sibling(sibling):
    os.kill(sibling, signal.SIGCONT)  # harmless if it gets through
    return "signalled"


def signal_process_group():
    os.kill(0, signal.SIGCONT)
    return "signalled"


def symlink_to_host_file():
    link = "/tmp/to-host-shadow"
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("/../../../../etc/shadow", link)
    with open(link) as file:
        return file.read()


def hardlink_across_mounts():
    target = "/tmp/passwd-link"
    if os.path.lexists(target):
        os.unlink(target)
    os.link("/etc/passwd", target)
    return "linked"


def host_unix_sockets():
    found = []
    for path in (
        "/run/systemd/private",
        "/var/run/docker.sock",
        "/run/dbus/system_bus_socket",
        "/tmp/.X11-unix/X0",
        "/run/mysqld/mysqld.sock",
    ):
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(path)
                found.append(path)
            except OSError:
                continue
    if found:
        return found
    raise OSError(errno.ENOENT, "no host socket reachable")


def write_jail_root():
    with open("/planted", "w") as file:
        file.write("x")
    return "written"


ATTEMPTS = {
    "second_chroot": second_chroot,
    "fchdir_inherited_fds": fchdir_inherited_fds,
    "openat_inherited_fds": openat_inherited_fds,
    "proc_pid1_root": proc_pid1_root,
    "proc_pid1_cwd": proc_pid1_cwd,
    "proc_self_root": proc_self_root,
    "proc_parent_fds": proc_parent_fds,
    "mount_tmpfs": mount_tmpfs,
    "umount_root": umount_root,
    "pivot_root": pivot_root,
    "setuid_root": setuid_root,
    "setgid_root": setgid_root,
    "setgroups_root": setgroups_root,
    "capset_sys_admin": capset_sys_admin,
    "nested_user_namespace": nested_user_namespace,
    "ptrace_parent": ptrace_parent,
    "ptrace_sibling": ptrace_sibling,
    "signal_parent": signal_parent,
    "signal_sibling": signal_sibling,
    "signal_process_group": signal_process_group,
    "symlink_to_host_file": symlink_to_host_file,
    "hardlink_across_mounts": hardlink_across_mounts,
    "host_unix_sockets": host_unix_sockets,
    "write_jail_root": write_jail_root,
}


def run_battery(pids):
    me = os.getpid()
    sibling = next((pid for pid in pids if pid != me), None)
    arguments = {"parent": os.getppid(), "sibling": sibling}
    results = {}
    for name, attempt in ATTEMPTS.items():
        wanted = attempt.__code__.co_varnames[: attempt.__code__.co_argcount]
        try:
            if any(arguments[arg] is None for arg in wanted):
                results[name] = {"ok": False, "error": "no sibling worker known"}
                continue
            result = attempt(*(arguments[arg] for arg in wanted))
        except OSError as exc:
            results[name] = {"ok": False, "errno": errno.errorcode.get(exc.errno or 0, "?")}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            results[name] = {"ok": True, "result": result}
    return {"pid": me, "sibling": sibling, "results": results}


def app(environ, start_response):
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    if environ.get("PATH_INFO") == "/battery":
        pids = [int(pid) for pid in query.get("pids", [""])[0].split(",") if pid]
        body = run_battery(pids)
    else:
        body = {"pid": os.getpid()}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]

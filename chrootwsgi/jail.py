"""Enter the jail: the one low-level call everything else uses.

:func:`enter_jail` runs these steps in this order, once per process:

1. check: the process is single-threaded (``/proc/self/task``), the mode can work;
2. preload libraries, modules and lazily read data (:mod:`chrootwsgi.preload`); install the
   exec shim (``exec_shim``) that routes ``subprocess`` to chroot-helper;
3. snapshot the importable modules and dlopen extension modules (:mod:`chrootwsgi.importer`);
4. close every directory and namespace descriptor (:mod:`chrootwsgi.fds`);
5. new namespaces: *rootless* = user + mount namespace mapping only the worker's own uid/gid;
   *privileged* = mount namespace (the process is root);
6. build the private mount view on the jail root (:mod:`chrootwsgi.view`);
7. ``chroot(root)`` and ``chdir("/")``;
8. drop privileges: *privileged* sets groups, gid and uid to the configured user; both modes drop
   the capability bounding set, ambient, effective, permitted and inheritable capabilities, and
   set ``PR_SET_NO_NEW_PRIVS``;
9. load the syscall filter (:mod:`chrootwsgi.seccomp`), unless ``seccomp = false``;
10. install the snapshot importer;
11. verify: uid/gid as expected, no capabilities, ``/..`` is ``/``, ``setuid(0)`` fails, the
    filter is in force, and (``require_helper``) chroot-helper answers on its socket.

A failure at any step raises :class:`~chrootwsgi.errors.EntryError` and leaves the process marked
as failed: it must not serve (:class:`~chrootwsgi.ChrootMiddleware` answers 503). A process that
has entered returns the same :class:`JailState` on later calls; a forked child inherits the jail.

Example, in a plain process or a gunicorn ``post_fork`` hook::

    from chrootwsgi import enter_jail
    state = enter_jail("/srv/jail", user="www-data")
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import logging
import os
import pwd
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

from . import fds, importer, linux, preload, seccomp, view
from .config import JailConfig, load_config
from .errors import ChrootWSGIError, EntryError, VerifyError
from .snapshot import Snapshot, default_cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class JailState:
    """The outcome of :func:`enter_jail` in this process.

    :param entered: true once every step, including the checks, succeeded.
    :param error: why entry failed, when it did.
    """

    config: JailConfig | None
    pid: int
    entered: bool
    mode: Literal["rootless", "privileged"] | None = None
    uid: int = -1
    gid: int = -1
    seconds: float = 0.0
    shown: tuple[str, ...] = ()
    same_paths: tuple[str, ...] = ()
    closed_fds: tuple[str, ...] = ()
    modules_kept: int = 0
    snapshot_bytes: int = 0
    snapshot_origin: str = ""
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


_state: JailState | None = None


def current_state() -> JailState | None:
    """This process's jail state, or ``None`` when entry was never attempted here."""
    return _state


def enter_jail(
    root: str | None = None,
    *,
    config: JailConfig | None = None,
    script: str | None = None,
    **options: object,
) -> JailState:
    """Enter the jail at *root* (or as *config* says) and return the resulting state.

    :param root: the jail directory; may come from the config file instead.
    :param config: a ready :class:`JailConfig`; otherwise one is loaded from
        ``$CHROOTWSGI_CONFIG`` and *options*.
    :param script: a file to keep visible read-only (the mod_wsgi script).
    :raises EntryError: the process is not jailed; do not let it serve.
    """
    global _state
    if _state is not None and _state.pid == os.getpid():
        if _state.entered and (root is None or _state.config is None or root == _state.config.root):
            return _state
        if _state.entered:
            raise EntryError(
                f"this process is already jailed in {_state.config.root if _state.config else '?'}"
                f"; it cannot enter {root!r} as well"
            )
        raise EntryError(f"entering the jail failed earlier in this process: {_state.error}")
    if _state is not None and _state.entered:
        _state = dataclasses.replace(_state, pid=os.getpid())
        return _state  # a forked child of a jailed process is jailed as well
    try:
        if config is None:
            config = load_config(root=root, **options)
        _state = _enter(config, script)
    except ChrootWSGIError as exc:
        _state = JailState(config=config, pid=os.getpid(), entered=False, error=str(exc))
        raise
    except Exception as exc:
        _state = JailState(config=config, pid=os.getpid(), entered=False, error=repr(exc))
        raise EntryError(f"entering the jail failed: {exc!r}") from exc
    return _state


def _enter(config: JailConfig, script: str | None) -> JailState:
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def mark(step: str) -> None:
        timings[step] = time.perf_counter() - started - sum(timings.values())

    mode = config.resolved_mode()
    _check_threads()
    identity = _identity(config, mode)
    preload.preload(
        libraries=config.preload_libraries,
        modules=config.preload_modules,
        user_uid=identity.uid,
    )
    if config.exec_shim:
        from chroot_helper import shim

        shim.install(config.exec_shim if isinstance(config.exec_shim, tuple) else None)
    mark("preload")
    snapshot = Snapshot.build(cache_dir=_cache_dir(config))
    snapshot.load_extensions(config.preload_modules)
    mark("snapshot")
    read_only = preload.data_files() + list(config.preload_files)
    if script and config.expose_script:
        read_only.append(script)
    elif script:
        log.warning(
            "pid %d: %s will not exist in the jail (expose_script is off): with "
            "WSGIScriptReloading On (mod_wsgi's default) every request then fails; set "
            "WSGIScriptReloading Off, or leave expose_script on",
            os.getpid(),
            script,
        )
    closed = fds.close_escape_fds()
    if mode == "rootless":
        _enter_user_namespace(identity.uid, identity.gid)
    else:
        _unshare(linux.CLONE_NEWNS, "a mount namespace")
    shown = view.build_view(config, identity, read_only_files=read_only)
    mark("view")
    os.chroot(config.root)
    os.chdir("/")
    _drop_privileges(mode, identity)
    if config.seccomp:
        seccomp.install_filter()
    importer.install(snapshot)
    tempfile.tempdir = "/tmp" if config.tmp else None
    mark("enter")
    _verify(identity, filtered=config.seccomp)
    if config.require_helper:
        _check_helper()
    seconds = time.perf_counter() - started
    log.info(
        "pid %d: entered jail %s (%s) as uid %d in %.1f ms; %d modules kept (%d KiB, %s)",
        os.getpid(),
        config.root,
        mode,
        identity.uid,
        seconds * 1000,
        len(snapshot.modules),
        snapshot.compressed_bytes // 1024,
        snapshot.origin,
    )
    return JailState(
        config=config,
        pid=os.getpid(),
        entered=True,
        mode=mode,
        uid=identity.uid,
        gid=identity.gid,
        seconds=seconds,
        shown=tuple(shown),
        same_paths=tuple(read_only),
        closed_fds=tuple(closed),
        modules_kept=len(snapshot.modules),
        snapshot_bytes=snapshot.compressed_bytes,
        snapshot_origin=snapshot.origin,
        timings=timings,
    )


def _cache_dir(config: JailConfig) -> str | None:
    if config.snapshot_cache == "auto":
        return default_cache_dir()
    return config.snapshot_cache or None


def _check_threads() -> None:
    count = linux.thread_count()
    if count != 1:
        raise EntryError(
            f"the process has {count} threads; entering a jail needs exactly one. Enter at "
            "start-up: under mod_wsgi load the script with WSGIImportScript (and "
            "WSGIApplicationGroup %{GLOBAL}), under gunicorn use --preload with a post_fork hook"
        )


def _identity(config: JailConfig, mode: str) -> view.Identity:
    if mode == "privileged":
        if os.geteuid() != 0:
            raise EntryError(
                f"mode 'privileged' needs root, but the worker runs as uid {os.geteuid()}: "
                'use mode = "rootless" (or "auto")'
            )
        if config.user is None:
            raise EntryError(
                'the worker runs as root: set user = "www-data" (or another unprivileged user) '
                "so that the jailed worker does not stay root"
            )
        entry = pwd.getpwnam(config.user)
        gid = grp.getgrnam(config.group).gr_gid if config.group else entry.pw_gid
    else:
        uid = os.getuid()
        if uid == 0:
            raise EntryError(
                "mode 'rootless' as root would leave the jailed worker uid 0, owner of every "
                'root-owned file it can see: use mode = "privileged" with user = "www-data"'
            )
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = pwd.struct_passwd((f"uid{uid}", "x", uid, os.getgid(), "", "/", ""))
        gid = os.getgid()
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = f"gid{gid}"
    return view.Identity(
        uid=entry.pw_uid, gid=gid, user=entry.pw_name, group=group, home=entry.pw_dir or "/"
    )


def _unshare(flags: int, what: str) -> None:
    try:
        linux.unshare(flags)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise EntryError(
                f"unshare of {what} failed (EINVAL): the process has more than one thread; "
                "enter the jail before threads start"
            ) from None
        if exc.errno == errno.ENOSYS:
            raise EntryError(
                f"unshare of {what} was refused (ENOSYS): a seccomp filter blocks it, as container "
                "runtimes' default profiles do; run the container with docker/seccomp.json "
                "(podman's default profile allows it)"
            ) from None
        if exc.errno in (errno.EPERM, errno.ENOSPC, errno.EACCES):
            raise EntryError(
                f"unshare of {what} was refused ({errno.errorcode[exc.errno]}): unprivileged "
                "user namespaces are disabled here. Enable them (sysctl "
                "kernel.unprivileged_userns_clone=1 on Debian, user.max_user_namespaces > 0, "
                "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu; in a container, a "
                "seccomp profile that allows unshare, such as docker/seccomp.json), or run the "
                'worker as root with mode = "privileged" and user = "www-data"'
            ) from None
        raise EntryError(f"unshare of {what} failed: {exc}") from None


def _enter_user_namespace(uid: int, gid: int) -> None:
    """New user and mount namespace in which only the worker's own uid and gid exist.

    mod_wsgi's daemon is not dumpable after its setuid, which makes /proc/self/uid_map
    unwritable; dumpable is set for the few writes (and cleared for good when privileges drop).
    """
    linux.prctl(linux.PR_SET_DUMPABLE, 1)
    try:
        _unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS, "a user and mount namespace")
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
    finally:
        linux.prctl(linux.PR_SET_DUMPABLE, 0)


def _drop_privileges(mode: str, identity: view.Identity) -> None:
    """Leave no way back: capabilities, bounding set, ambient set, no new privileges."""
    for cap in range(linux.last_capability() + 1):
        linux.prctl(linux.PR_CAPBSET_DROP, cap)
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    if mode == "privileged":
        os.setgroups([identity.gid])
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    linux.capset_empty()
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    # Not dumpable: other processes of the same uid (sibling workers, other sites) cannot
    # ptrace the jailed worker or read its memory.
    linux.prctl(linux.PR_SET_DUMPABLE, 0)


def _check_helper() -> None:
    """Connect to chroot-helper's socket as the jailed app will; EntryError if nobody answers."""
    from chroot_helper.client import helper_address

    address, _ = helper_address()
    try:
        if address.startswith("/"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(address)
        else:
            host, _, port = address.rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise EntryError(
            f"require_helper is set but chroot-helper does not answer at {address!r} inside "
            f"the jail ({reason}): start chroot-helper with its socket in the jail directory "
            '(socket = "<root>/run/chroot-helper.sock"), or set $CHROOT_HELPER_SOCKET'
        ) from None


def _verify(identity: view.Identity, *, filtered: bool) -> None:
    problems = []
    if filtered and not seccomp.filter_active():
        problems.append("the syscall filter is not in force")
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3:
        problems.append(f"uid/gid are {os.getresuid()}/{os.getresgid()}")
    if any(linux.capget()):
        problems.append("capabilities remain")
    if linux.prctl(linux.PR_GET_NO_NEW_PRIVS) != 1:
        problems.append("no_new_privs is not set")
    if linux.prctl(linux.PR_GET_DUMPABLE) != 0:
        problems.append("the process is dumpable")
    root, parent = os.stat("/"), os.stat("/..")
    if (root.st_dev, root.st_ino) != (parent.st_dev, parent.st_ino):
        problems.append("'/..' leads above the jail root")
    if os.getcwd() != "/":
        problems.append(f"the working directory is {os.getcwd()!r}")
    if identity.uid != 0:
        try:
            os.setuid(0)
            problems.append("setuid(0) succeeded")
        except OSError:
            pass  # EPERM, or EINVAL where uid 0 is not mapped into the user namespace
    if problems:
        raise VerifyError("the jail does not hold: " + "; ".join(problems))


def is_jailed() -> bool:
    """True in a process that has entered its jail (or was forked from one that did)."""
    return _state is not None and _state.entered


__all__ = ["JailState", "current_state", "enter_jail", "is_jailed"]

if sys.platform != "linux":  # pragma: no cover
    raise ImportError("chrootwsgi needs Linux (namespaces, chroot, prctl)")

"""Build the jail's private mount view: what the jailed process sees, with nothing written to disk.

Runs inside a new mount namespace, after ``unshare`` and before ``chroot``. The jail directory gets
a small tmpfs on top of it, in this process's namespace only, holding:

- ``etc/``: generated ``hosts``, ``passwd`` and ``group`` (the worker's user only),
  ``nsswitch.conf``, ``resolv.conf`` (the helper's DNS stub), and the host's ``services`` and
  ``protocols`` tables;
- ``dev/``: the configured device nodes, bind-mounted from the host;
- ``tmp/``: a private, size-limited tmpfs (unless disabled);
- read-only bind mounts of data files (CA bundle, time zone database, preload files, the WSGI
  script) and of the configured exposures, at their jail paths;
- whatever the jail directory itself holds on disk, bind-mounted back in place.

The tmpfs is then remounted read-only, so the jail root cannot be written. The jail directory on
disk is never written to, and nothing of this view is visible to other processes.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import linux
from .config import JailConfig

log = logging.getLogger(__name__)

_TMPFS_OPTIONS = "mode=755,size=2m,nr_inodes=4096"
_NSSWITCH = (
    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    "networks: files\nprotocols: files\nservices: files\n"
)
_COPIED_TABLES = ("/etc/services", "/etc/protocols")
_STATVFS_TO_MOUNT = {
    os.ST_RDONLY: linux.MS_RDONLY,
    os.ST_NOSUID: linux.MS_NOSUID,
    os.ST_NODEV: linux.MS_NODEV,
    os.ST_NOEXEC: linux.MS_NOEXEC,
    os.ST_NOATIME: linux.MS_NOATIME,
    os.ST_NODIRATIME: linux.MS_NODIRATIME,
    os.ST_RELATIME: linux.MS_RELATIME,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    """The user the jailed worker runs as, for the generated passwd and group files."""

    uid: int
    gid: int
    user: str
    group: str
    home: str


def build_view(
    config: JailConfig,
    identity: Identity,
    *,
    read_only_files: Sequence[str],
) -> list[str]:
    """Mount the private view on ``config.root``; return the jail paths mounted or created.

    :param read_only_files: host paths shown read-only at the same path (data files, script).
    """
    root = config.root
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    on_disk = os.listdir(root)
    disk_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        linux.mount("chrootwsgi", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, _TMPFS_OPTIONS)
        for name in on_disk:
            _restore(f"/proc/self/fd/{disk_fd}/{name}", _jail_path(root, "/" + name))
    finally:
        os.close(disk_fd)
    shown = ["/" + name for name in on_disk]
    _write_etc(root, config, identity, skip=set(on_disk))
    shown.append("/etc")
    if "dev" not in on_disk and config.devices:
        for device in config.devices:
            _bind(f"/dev/{device}", _jail_path(root, f"/dev/{device}"), writable=True)
        shown.append("/dev")
    if config.tmp and "tmp" not in on_disk:
        target = _jail_path(root, "/tmp")
        os.makedirs(target, exist_ok=True)
        linux.mount(
            "chrootwsgi-tmp",
            target,
            "tmpfs",
            linux.MS_NOSUID | linux.MS_NODEV,
            f"mode=1777,size={config.tmp}",
        )
        shown.append("/tmp")
    mounts = [(path, path, False) for path in read_only_files]
    mounts += [(e.host, e.jail, e.writable) for e in config.expose]
    host_mounts = ["/" + name for name in on_disk]
    for host, jail, writable in sorted(mounts, key=lambda mount: mount[1].count("/")):
        target = _jail_path(root, jail)
        if _below(jail, host_mounts) and not os.path.lexists(target):
            # Its mount point would have to be created in a host directory (the jail on disk,
            # or another exposure): never write to the host.
            log.warning("%s not shown in the jail: create %s on the host to mount it", host, jail)
            continue
        _bind(os.path.realpath(host), target, writable=writable)
        host_mounts.append(jail)
        shown.append(jail)
    linux.mount(
        None, root, None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
    )
    return shown


def _below(path: str, mounts: Sequence[str]) -> bool:
    return any(path == mount or path.startswith(mount.rstrip("/") + "/") for mount in mounts)


def _jail_path(root: str, path: str) -> str:
    return os.path.join(root, os.path.normpath(path).lstrip("/"))


def _restore(source: str, target: str) -> None:
    """Show an entry of the on-disk jail directory again, above the tmpfs.

    A symlink is recreated, not followed, so that it resolves inside the jail as in a plain
    chroot; anything else is bind-mounted with its own permissions.
    """
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
    else:
        _bind(source, target, writable=True)


def _bind(source: str, target: str, *, writable: bool) -> None:
    """Bind-mount *source* on *target*, creating the mount point; read-only unless *writable*."""
    is_dir = os.path.isdir(source)
    os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
    if not is_dir and not os.path.lexists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
    flags = _locked_flags(target) | linux.MS_NOSUID
    if not stat.S_ISCHR(os.stat(target).st_mode):
        flags |= linux.MS_NODEV
    if not writable:
        flags |= linux.MS_RDONLY
    linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | flags)


def _locked_flags(path: str) -> int:
    """Mount flags a remount must keep (a user namespace may not clear them)."""
    current = os.statvfs(path).f_flag
    return sum(flag for st_flag, flag in _STATVFS_TO_MOUNT.items() if current & st_flag)


def _write_etc(root: str, config: JailConfig, identity: Identity, *, skip: set[str]) -> None:
    if "etc" in skip:
        return
    etc = _jail_path(root, "/etc")
    os.makedirs(etc, exist_ok=True)
    files = {
        "hosts": _hosts(config),
        "passwd": (
            f"{identity.user}:x:{identity.uid}:{identity.gid}::{identity.home}:/usr/sbin/nologin\n"
        ),
        "group": f"{identity.group}:x:{identity.gid}:\n",
        "nsswitch.conf": _NSSWITCH,
        "resolv.conf": "".join(f"nameserver {address}\n" for address in config.nameservers),
    }
    for table in _COPIED_TABLES:
        try:
            with open(table, encoding="utf-8", errors="replace") as file:
                files[os.path.basename(table)] = file.read()
        except OSError:
            continue
    for name, text in files.items():
        _write(os.path.join(etc, name), text)


def _hosts(config: JailConfig) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if config.hosts_file:
        try:
            with open(config.hosts_file, encoding="utf-8", errors="replace") as file:
                lines.extend(_host_lines(file))
        except OSError:
            pass
    hostname = socket.gethostname()
    if not any(hostname in line.split()[1:] for line in lines):
        lines.append(f"127.0.1.1\t{hostname}")
    lines.extend(f"{address}\t{name}" for name, address in config.hosts.items())
    return "\n".join(lines) + "\n"


def _host_lines(lines: Iterable[str]) -> list[str]:
    return [
        line.rstrip("\n") for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with open(fd, "w", encoding="utf-8") as file:
        file.write(text)

"""Create or check a jail directory (``chrootwsgi jail init DIR``).

A jail directory must be owned by root, mode 755, with no symlink on the way and nothing above it
writable by others; the worker's user must not be able to write to it or to anything in it. It
normally stays empty: the jail's ``/etc``, ``/dev`` and ``/tmp`` are built in each worker's
private mount view. Two things may be wanted on disk:

- ``tmp/`` (mode 1777), a ``/tmp`` that every worker of the site shares and that survives
  restarts, *instead of* the private tmpfs per worker;
- mount points for the config's exposures, needed where their first path component exists in
  the jail on disk (the private view cannot create them there).

Example::

    actions = init_jail("/srv/jail/myapp", user="www-data", tmp=False)

:func:`init_jail` raises :class:`~chrootwsgi.errors.UnsafeJailError` listing every problem with
the command that fixes it, and changes nothing that already exists.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from collections.abc import Sequence

from .config import Exposure
from .errors import ConfigError, UnsafeJailError

#: Directories that are never a jail: chrooting there shows the whole host or a system tree.
SYSTEM_DIRS = frozenset(
    "/ /bin /boot /dev /etc /home /lib /lib32 /lib64 /opt /proc /root /run /sbin /srv /sys /tmp "
    "/usr /usr/bin /usr/lib /usr/local /usr/sbin /var /var/lib /var/www".split()
)
MAX_ENTRIES = 10_000

Problem = tuple[str, str, str]


def init_jail(
    root: str,
    *,
    user: str = "www-data",
    tmp: bool = False,
    exposures: Sequence[Exposure] = (),
) -> list[str]:
    """Create *root* if needed, check it, and return what was done, one line per action.

    :param user: the worker's user: it must not be able to write anywhere in the jail.
    :param tmp: create ``tmp/`` with mode 1777 (a shared, persistent ``/tmp``).
    :param exposures: create a mount point for each exposure's jail path.
    :raises UnsafeJailError: every problem found, each with its fix; nothing is changed then.
    :raises ConfigError: *root* is not absolute or *user* does not exist.
    """
    if not os.path.isabs(root):
        raise ConfigError(f"jail directory {root!r}: give an absolute path, e.g. /srv/jail/myapp")
    root = os.path.normpath(root)
    try:
        worker = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--user {user!r}: no such user; name the site's worker user") from None
    if root in SYSTEM_DIRS:
        raise UnsafeJailError(
            [
                (
                    root,
                    "is a system directory",
                    "give a directory of its own, e.g. /srv/jail/myapp",
                )
            ]
        )
    actions: list[str] = []
    if not os.path.lexists(root):
        _refuse(_ancestor_problems(os.path.dirname(root)))
        os.makedirs(root, mode=0o755)
        os.chown(root, 0, 0)
        os.chmod(root, 0o755)
        actions.append(f"created {root} (root:root, 0755)")
    else:
        _refuse(check_jail(root))
        actions.append(f"checked {root}: owned by root, mode 0755, nothing in it is unsafe")
    wanted: list[tuple[str, int, bool]] = []  # (path, mode, is_dir)
    if tmp:
        wanted.append((os.path.join(root, "tmp"), 0o1777, True))
    for exposure in exposures:
        wanted.append((root + exposure.jail, 0o755, os.path.isdir(exposure.host)))
    problems: list[Problem] = []
    for path, mode, is_dir in wanted:
        if os.path.lexists(path):
            problems += _existing_problems(path, mode, is_dir)
    _refuse(problems)
    for path, mode, is_dir in wanted:
        if os.path.lexists(path):
            actions.append(f"checked {path} ({mode:04o})")
            continue
        _make_parents(root, os.path.dirname(path), actions)
        if is_dir:
            os.mkdir(path, mode)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        os.chown(path, 0, 0)
        os.chmod(path, mode)
        kind = "directory" if is_dir else "file"
        actions.append(f"created {path} (root:root, {mode:04o}, mount point {kind})")
    _refuse(_worker_problems(root, worker))
    actions.append(f"checked that {user} (uid {worker.pw_uid}) cannot write to {root}")
    return actions


def check_jail(root: str) -> list[Problem]:
    """Every problem of an existing jail directory, each with its fix; empty when it is safe."""
    if not os.path.lexists(root):
        return [(root, "does not exist", f"chrootwsgi jail init {root}")]
    return _root_problems(root) or _content_problems(root)


def _refuse(problems: list[Problem]) -> None:
    if problems:
        raise UnsafeJailError(problems)


def _root_problems(root: str) -> list[Problem]:
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(root)
        return [(root, f"is a symlink to {real}", f"chrootwsgi jail init {real}")]
    if not stat.S_ISDIR(st.st_mode):
        return [(root, "is not a directory", f"remove it, or choose another path than {root}")]
    problems: list[Problem] = []
    if st.st_uid != 0 or st.st_gid != 0:
        problems.append(
            (root, f"is owned by uid {st.st_uid} gid {st.st_gid}", f"chown root:root {root}")
        )
    if stat.S_IMODE(st.st_mode) != 0o755:
        problems.append(
            (root, f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0755", f"chmod 0755 {root}")
        )
    real = os.path.realpath(root)
    if real != root:
        problems.append((root, f"has a symlink above it (it is {real})", f"use {real}"))
    return problems or _ancestor_problems(os.path.dirname(root))


def _ancestor_problems(path: str) -> list[Problem]:
    """The existing directories at and above *path*: root's, writable by no one else.

    A world-writable directory with the sticky bit (``/tmp``) is allowed above the jail, as in
    :func:`~chrootwsgi.config.check_root`: others cannot rename or replace what root made there.
    """
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    while True:
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != 0:
            return [(path, f"is owned by uid {st.st_uid}", f"chown root:root {path}")]
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            return [(path, f"is writable by others (mode {mode:04o})", f"chmod go-w {path}")]
        if path == "/":
            return []
        path = os.path.dirname(path)


def _content_problems(root: str) -> list[Problem]:
    problems: list[Problem] = []
    seen = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            seen += 1
            if seen > MAX_ENTRIES:
                return problems + [
                    (root, f"holds more than {MAX_ENTRIES} entries", "use an empty directory")
                ]
            path = os.path.join(directory, name)
            problems += _entry_problems(path, os.lstat(path))
    return problems


def _entry_problems(path: str, st: os.stat_result) -> list[Problem]:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return []  # resolved inside the jail; the target is checked where it lies
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return [(path, "is a device node", f"rm {path}  (the jail gets /dev/null etc. by config)")]
    problems: list[Problem] = []
    if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(st.st_mode):
        problems.append((path, f"is set-user/group-ID (mode {mode:04o})", f"chmod ug-s {path}"))
    if st.st_uid != 0:
        problems.append((path, f"is owned by uid {st.st_uid}", f"chown root:root {path}"))
    sticky_dir = stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
        problems.append((path, f"is writable by others (mode {mode:04o})", f"chmod go-w {path}"))
    return problems


def _existing_problems(path: str, mode: int, is_dir: bool) -> list[Problem]:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) != is_dir:
        kind = "a directory" if is_dir else "a file"
        return [(path, f"should be {kind} (a mount point)", f"rm -r {path}, then run this again")]
    if mode != 0o1777:
        return _entry_problems(path, st)
    problems: list[Problem] = []  # the shared tmp/: root's, writable by all, sticky
    if st.st_uid != 0:
        problems.append((path, f"is owned by uid {st.st_uid}", f"chown root:root {path}"))
    if stat.S_IMODE(st.st_mode) != 0o1777:
        problems.append((path, f"has mode {stat.S_IMODE(st.st_mode):04o}", f"chmod 1777 {path}"))
    return problems


def _make_parents(root: str, directory: str, actions: list[str]) -> None:
    missing = []
    while directory != root and not os.path.lexists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        os.mkdir(path, 0o755)
        os.chown(path, 0, 0)
        os.chmod(path, 0o755)
        actions.append(f"created {path} (root:root, 0755)")


def _worker_problems(root: str, worker: pwd.struct_passwd) -> list[Problem]:
    """Ask the kernel, as the worker, whether it can write to a directory (ACLs included).

    Sticky directories (a shared ``tmp/``) are writable on purpose and skipped.
    """
    if os.geteuid() != 0:
        return []  # only root can switch to the worker; the mode checks above still hold
    paths = [root] + [os.path.join(d, n) for d, dirs, _ in os.walk(root) for n in dirs]
    paths = [p for p in paths if not os.path.islink(p) and not os.stat(p).st_mode & stat.S_ISVTX]
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={worker.pw_uid}",
            f"--regid={worker.pw_gid}",
            "--init-groups",
            "sh",
            "-c",
            'for p do [ -w "$p" ] && echo "$p"; done; exit 0',
            "sh",
            *paths,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    return [
        (path, f"is writable by {worker.pw_name} (an ACL or group?)", f"setfacl -b {path}")
        for path in result.stdout.splitlines()
    ]

"""Jail configuration: keyword arguments and/or a TOML file, validated before anything happens.

Every check runs when the configuration is built, so a mistake is reported at worker start with the
key, the bad value and the fix, never in the middle of a request.

A file (its path given to :func:`load_config` or in ``$CHROOTWSGI_CONFIG``) uses the same names as
the keyword arguments::

    root = "/srv/jail"             # an empty directory owned by root, mode 755
    mode = "auto"                  # "rootless", "privileged" or "auto" (by the worker's uid)
    user = "www-data"              # privileged mode only: the user to become
    tmp = "64M"                    # size of a private /tmp in the jail; "" for none
    nameservers = ["127.0.0.1"]    # written to the jail's private /etc/resolv.conf

    [hosts]                        # extra /etc/hosts entries in the jail
    "db.internal" = "127.0.0.1"

    [[expose]]                     # host paths bind-mounted into the jail's private view
    host = "/srv/app/static"
    jail = "/static"               # default: the same path
    writable = false

    [preload]
    libraries = ["libmagic.so.1"]  # dlopen'ed before entry (mod_chroot's LoadFile)
    modules = ["decimal"]          # imported before entry
    files = ["/etc/myapp.json"]    # visible read-only at the same path in the jail

    [paths]                        # extra host → jail prefixes for DOCUMENT_ROOT and friends
    "/var/www/html" = "/html"

Keyword arguments override the file, key by key.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

from .errors import ConfigError

CONFIG_ENV = "CHROOTWSGI_CONFIG"

Mode = Literal["auto", "rootless", "privileged"]
MODES: tuple[str, ...] = ("auto", "rootless", "privileged")

DEFAULT_DEVICES = ("null", "zero", "full", "random", "urandom")
_SIZE = re.compile(r"(?P<number>\d+)(?P<unit>[KMG]?)", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True, slots=True)
class Exposure:
    """A host path made visible inside the jail's private mount view.

    :param host: absolute host path (file or directory) to bind-mount.
    :param jail: where it appears inside the jail; defaults to the same path.
    :param writable: read-only unless set; a writable exposure lets the jailed app change host
        files, so expose the narrowest directory that works.
    """

    host: str
    jail: str
    writable: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class JailConfig:
    """Everything :func:`chrootwsgi.enter_jail` needs, validated.

    :param root: the jail directory. It must be owned by root and writable by nobody else;
        it normally stays empty: what the jail shows is built in a private mount view.
    :param mode: ``"rootless"`` (user namespace; the worker is not root), ``"privileged"``
        (the worker is root and becomes *user*) or ``"auto"`` (chosen by the effective uid).
    :param user: privileged mode: the user to drop to; never root.
    :param group: privileged mode: the group; defaults to the user's primary group.
    :param tmp: size of a private, writable ``/tmp`` (tmpfs) inside the jail; ``""`` for none.
    :param nameservers: written to the jail's ``/etc/resolv.conf`` (the helper's DNS stub).
    :param hosts_file: host file whose entries are copied into the jail's ``/etc/hosts``.
    :param hosts: extra name → address entries for the jail's ``/etc/hosts``.
    :param devices: device nodes under ``/dev`` made available (bind-mounted) in the jail.
    :param expose: host paths bind-mounted into the jail (read-only unless writable).
    :param preload_libraries: shared libraries to dlopen before entry.
    :param preload_modules: Python modules to import before entry.
    :param preload_files: host files visible read-only at the same path in the jail.
    :param path_map: extra host prefix → jail prefix mappings for request paths.
    :param expose_script: under mod_wsgi, keep the WSGI script file visible (read-only) at its
        host path so that mod_wsgi's per-request stat and script reloading keep working.
    :param snapshot_cache: directory where the import snapshot is stored once and mapped by every
        worker; ``"auto"`` is ``/var/cache/chrootwsgi`` when writable, else a private
        ``/tmp/chrootwsgi-UID``; ``""`` keeps a private copy in each worker's memory.
    :param seccomp: after entry, deny with EPERM the syscalls a web worker never needs
        (mounts, namespaces, ptrace, bpf, io_uring, netlink, ...; see :mod:`chrootwsgi.seccomp`).
    :param exec_shim: route ``subprocess`` calls of the jailed app to chroot-helper's exec
        service (:mod:`chroot_helper.shim`): ``true`` for every command (the helper refuses what it
        does not allow), or a list of command names to route.
    :param require_helper: the app cannot work without chroot-helper: entry fails (and the
        worker answers 503) unless the helper answers on its socket inside the jail
        (``$CHROOT_HELPER_SOCKET`` or ``/run/chroot-helper.sock``).
    :param app: ``"module:callable"`` for the packaged wrapper script; unused by the jail itself.
    """

    root: str
    mode: Mode = "auto"
    user: str | None = None
    group: str | None = None
    tmp: str = "64M"
    nameservers: tuple[str, ...] = ("127.0.0.1",)
    hosts_file: str = "/etc/hosts"
    hosts: Mapping[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = DEFAULT_DEVICES
    expose: tuple[Exposure, ...] = ()
    preload_libraries: tuple[str, ...] = ()
    preload_modules: tuple[str, ...] = ()
    preload_files: tuple[str, ...] = ()
    path_map: Mapping[str, str] = field(default_factory=dict)
    expose_script: bool = True
    snapshot_cache: str = "auto"
    seccomp: bool = True
    exec_shim: bool | tuple[str, ...] = False
    require_helper: bool = False
    app: str | None = None

    def resolved_mode(self) -> Literal["rootless", "privileged"]:
        """The mode to use in this process: ``auto`` picks by the effective uid."""
        if self.mode == "auto":
            return "privileged" if os.geteuid() == 0 else "rootless"
        return self.mode


def load_config(path: str | None = None, /, **overrides: object) -> JailConfig:
    """Build a validated :class:`JailConfig` from a TOML file and/or keyword arguments.

    :param path: TOML file; defaults to ``$CHROOTWSGI_CONFIG`` when that is set.
    :param overrides: keyword arguments, named as the :class:`JailConfig` fields.
    :raises ConfigError: naming the key, the value and the fix.
    """
    path = path if path is not None else os.environ.get(CONFIG_ENV) or None
    values: dict[str, object] = _read_file(path) if path else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in fields(JailConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]!r}{_where(path)}; "
            f"known settings: {', '.join(sorted(known))}"
        )
    if "root" not in values:
        raise ConfigError(f'no jail root given{_where(path)}: set root = "/srv/jail"')
    config = JailConfig(
        root=_absolute("root", values["root"]),
        mode=_mode(values.get("mode", "auto")),
        user=_optional_str("user", values.get("user")),
        group=_optional_str("group", values.get("group")),
        tmp=_size("tmp", values.get("tmp", "64M")),
        nameservers=_str_tuple("nameservers", values.get("nameservers", ("127.0.0.1",))),
        hosts_file=_str("hosts_file", values.get("hosts_file", "/etc/hosts")),
        hosts=_str_mapping("hosts", values.get("hosts", {})),
        devices=_devices(values.get("devices", DEFAULT_DEVICES)),
        expose=_exposures(values.get("expose", ())),
        preload_libraries=_str_tuple("preload_libraries", values.get("preload_libraries", ())),
        preload_modules=_str_tuple("preload_modules", values.get("preload_modules", ())),
        preload_files=tuple(
            _absolute("preload_files", item)
            for item in _str_tuple("preload_files", values.get("preload_files", ()))
        ),
        path_map=_path_map(values.get("path_map", {})),
        expose_script=_bool("expose_script", values.get("expose_script", True)),
        snapshot_cache=_snapshot_cache(values.get("snapshot_cache", "auto")),
        seccomp=_bool("seccomp", values.get("seccomp", True)),
        exec_shim=_exec_shim(values.get("exec_shim", False)),
        require_helper=_bool("require_helper", values.get("require_helper", False)),
        app=_optional_str("app", values.get("app")),
    )
    check_root(config.root)
    _check_user(config)
    return config


def check_root(root: str) -> None:
    """Refuse a jail root that another user could change under the jailed worker.

    The root and every directory above it must be owned by root and writable by no one else;
    otherwise a process outside could swap or plant files the jail relies on.
    """
    unreachable = ConfigError(
        f"root {root!r} cannot be reached by uid {os.getuid()}: give it and every "
        "directory above it mode 755 (a+rx)"
    )
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise ConfigError(
            f"root {root!r} does not exist: create it with "
            f"'install -d -o root -g root -m 755 {root}'"
        ) from None
    except PermissionError:
        raise unreachable from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(
            f"root {root!r} is a symlink: give the real path {os.path.realpath(root)!r}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"root {root!r} is not a directory: give an empty directory")
    if os.path.realpath(root) != os.path.normpath(root):
        raise ConfigError(
            f"root {root!r} has a symlink above it: give the real path {os.path.realpath(root)!r}"
        )
    if not os.access(root, os.R_OK | os.X_OK):
        raise unreachable
    path = os.path.normpath(root)
    while True:
        st = os.stat(path)
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = st.st_mode & stat.S_ISVTX
        if st.st_uid != 0 or (writable_by_others and not (path != root and sticky)):
            what = f"owned by uid {st.st_uid}" if st.st_uid != 0 else "writable by others"
            raise ConfigError(
                f"root {root!r} is unsafe: {path!r} is {what} (mode {stat.S_IMODE(st.st_mode):04o})"
                f": a jailed process could plant files; chown root:root {path!r} and chmod 755"
            )
        if path == "/":
            return
        path = os.path.dirname(path)


def _check_user(config: JailConfig) -> None:
    if config.user is not None:
        try:
            entry = pwd.getpwnam(config.user)
        except KeyError:
            raise ConfigError(f"user {config.user!r}: no such user; give an existing one") from None
        if entry.pw_uid == 0:
            raise ConfigError(
                "user 'root' would keep the jailed worker root, and root can leave a chroot: "
                "give an unprivileged user such as 'www-data'"
            )
    if config.group is not None:
        try:
            grp.getgrnam(config.group)
        except KeyError:
            raise ConfigError(
                f"group {config.group!r}: no such group; give an existing one"
            ) from None
    if config.mode == "privileged" and config.user is None:
        raise ConfigError(
            "mode 'privileged' needs user = \"NAME\": the worker drops from root to that user"
        )


def _read_file(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path!r} does not exist: fix ${CONFIG_ENV} or the path"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    values: dict[str, object] = {}
    for key, value in data.items():
        if key == "preload":
            if not isinstance(value, dict):
                raise ConfigError(f"[preload] in {path!r} must be a table")
            for sub, item in value.items():
                if sub not in ("libraries", "modules", "files"):
                    raise ConfigError(
                        f"unknown setting preload.{sub} in {path!r}; "
                        "known: libraries, modules, files"
                    )
                values["preload_" + sub] = item
        elif key == "paths":
            values["path_map"] = value
        else:
            values[key] = value
    return values


def _where(path: str | None) -> str:
    return f" in {path!r}" if path else ""


def _str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: expected a string")
    return value


def _optional_str(key: str, value: object) -> str | None:
    return None if value is None else _str(key, value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    return value


def _absolute(key: str, value: object) -> str:
    text = _str(key, value)
    if not os.path.isabs(text):
        raise ConfigError(f"{key} = {text!r}: give an absolute path, e.g. '/srv/jail'")
    return os.path.normpath(text)


def _mode(value: object) -> Mode:
    if value not in MODES:
        raise ConfigError(f"mode = {value!r}: expected one of {', '.join(map(repr, MODES))}")
    return value  # type: ignore[return-value]  # narrowed by the membership test above


def _size(key: str, value: object) -> str:
    if value is False or value == "":
        return ""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _SIZE.fullmatch(text):
        raise ConfigError(f'{key} = {value!r}: expected a size such as "64M", or "" for none')
    return text.upper()


def _str_tuple(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"{key} = {value!r}: expected a list of strings")
    items = tuple(value)
    for item in items:
        _str(key, item)
    return items  # type: ignore[return-value,unused-ignore]  # items checked by _str above


def _str_mapping(key: str, value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} = {value!r}: expected a table of strings")
    return {_str(key, k): _str(f"{key}.{k}", v) for k, v in value.items()}


def _devices(value: object) -> tuple[str, ...]:
    devices = _str_tuple("devices", value)
    for name in devices:
        if name not in DEFAULT_DEVICES + ("tty",):
            raise ConfigError(
                f"devices: {name!r} is not offered; choose from "
                f"{', '.join(DEFAULT_DEVICES + ('tty',))}"
            )
    return devices


def _exec_shim(value: object) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    return _str_tuple("exec_shim", value)


def _snapshot_cache(value: object) -> str:
    text = _str("snapshot_cache", value)
    if text not in ("auto", "") and not os.path.isabs(text):
        raise ConfigError(
            f'snapshot_cache = {text!r}: give an absolute directory, "auto" or "" (none)'
        )
    return text


def _path_map(value: object) -> dict[str, str]:
    mapping = _str_mapping("paths", value)
    return {
        _absolute("paths", host): _absolute(f"paths.{host}", jail) for host, jail in mapping.items()
    }


def _exposures(value: object) -> tuple[Exposure, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"expose = {value!r}: expected a list of tables or strings")
    result = []
    for item in value:
        if isinstance(item, Exposure):
            result.append(item)
            continue
        if isinstance(item, str):
            host, _, rest = item.partition(":")
            jail, _, flag = rest.partition(":")
            item = {"host": host, "jail": jail or host, "writable": flag == "rw"}
            if flag not in ("", "ro", "rw"):
                raise ConfigError(f"expose {value!r}: the flag after the second ':' is ro or rw")
        if not isinstance(item, Mapping):
            raise ConfigError(f"expose entry {item!r}: expected a table with host, jail, writable")
        extra = set(item) - {"host", "jail", "writable"}
        if extra:
            raise ConfigError(f"expose entry {dict(item)!r}: unknown key {sorted(extra)[0]!r}")
        host = _absolute("expose.host", item.get("host"))
        jail = _absolute("expose.jail", item.get("jail", host))
        if jail == "/":
            raise ConfigError(f"expose {host!r} on the jail root '/': choose a sub-directory")
        if not os.path.exists(host):
            raise ConfigError(f"expose.host {host!r} does not exist: create it or remove the entry")
        result.append(
            Exposure(
                host=host, jail=jail, writable=_bool("expose.writable", item.get("writable", False))
            )
        )
    return tuple(result)

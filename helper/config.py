"""Load and validate the chroot-helper TOML configuration.

The whole file is checked once, at start (:func:`load_config`); every error names the table, the
key, the value and the fix.  Nothing is re-read later.  The ``[dns]`` and ``[mail]`` tables belong
to their own services: they are kept raw in :attr:`HelperConfig.service_tables` and validated by
those services.

Example::

    [helper]
    socket = "/srv/jail/run/chroot-helper.sock"   # or: jail = "/srv/jail"
    socket_mode = "0660"
    socket_group = "www-data"
    allow_uids = [33]

    [exec.echo]
    argv = ["/bin/echo"]          # fixed prefix; the caller's extra args are appended
    args = "any"                  # or "none", or a list of regexes each extra arg must fully match
    user = "nobody"               # never root unless written here
    timeout = 10                  # seconds, then the whole process tree is killed
    max_output = "10M"            # stdout + stderr streamed back, then killed

Security-relevant defaults: commands run as ``nobody`` with an environment holding only ``PATH``
(plus ``env``), in ``/``, with ``no_new_privs``, no supplementary groups, and rlimits (``cpu`` =
timeout, ``max_memory = "1G"``, ``max_processes = 256``, ``max_open_files = 256``,
``max_file_size = "64M"``).  Set ``network = false`` to give a command an empty network namespace.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from .errors import ConfigError

__all__ = [
    "SERVICE_TABLES",
    "DEFAULT_SOCKET",
    "CommandConfig",
    "HelperConfig",
    "load_config",
    "parse_config",
    "parse_size",
]

#: Top-level tables owned by other services; kept raw, validated by those services.
SERVICE_TABLES: Final = ("dns", "mail")
#: Where jailed code looks for the socket when ``$CHROOT_HELPER_SOCKET`` is not set.
DEFAULT_SOCKET: Final = "/run/chroot-helper.sock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)i?B?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEFAULT_PATH: Final = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, kw_only=True)
class CommandConfig:
    """One ``[exec.NAME]`` table.

    :param name: the table name; callers ask for the command by it.
    :param argv: the fixed argv prefix; ``argv[0]`` is an absolute path.
    :param args: ``"any"``, ``"none"``, or compiled patterns each extra argument must fully match
        (any one of them).
    :param uid: user the command runs as (``user``; default ``nobody``, never root unless written).
    :param gid: its group (``group``; default the user's primary group).
    :param groups: supplementary groups (``groups``; default none).
    :param env: the complete environment (``PATH`` defaults to :data:`DEFAULT_PATH`).
    :param cwd: working directory (default ``/``).
    :param timeout: seconds before the whole tree is killed.
    :param max_output: bytes of stdout + stderr streamed back before the tree is killed.
    :param max_args: most extra arguments a caller may pass.
    :param cpu: RLIMIT_CPU seconds (default: ``timeout`` rounded up).
    :param max_memory: RLIMIT_AS bytes, or None for no limit.
    :param max_processes: RLIMIT_NPROC, or None.  The kernel counts every process of the uid,
        supervisors included (one per running command, and up to 32 idle ones kept ready per
        uid/limits combination), so allow about 2 x max_concurrent + 32 plus what the commands
        fork.
    :param max_open_files: RLIMIT_NOFILE.
    :param max_file_size: RLIMIT_FSIZE bytes, or None.
    :param network: False runs the command in a new, empty network namespace (needs root).
    :param pid_namespace: True runs it as PID 1 of a new PID namespace (needs root), so the kernel
        kills every descendant when it exits.  Off by default: as PID 1 the command ignores
        forwarded signals it has no handler for (``Popen.terminate()``); timeouts, ``kill()`` and
        disconnects still end it.  Without it the supervisor (a child subreaper) kills the tree;
        when the helper runs as root, that supervisor is itself PID 1 of a namespace it shares with
        the commands it runs one after another (see :mod:`chroot_helper.services.exec_resident`).
    """

    name: str
    argv: tuple[str, ...]
    args: Literal["any", "none"] | tuple[re.Pattern[str], ...]
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    timeout: float = 10.0
    max_output: int = 10 << 20
    max_args: int = 256
    cpu: int | None = None
    max_memory: int | None = 1 << 30
    max_processes: int | None = 256
    max_open_files: int = 256
    max_file_size: int | None = 64 << 20
    network: bool = True
    pid_namespace: bool = False


@dataclass(frozen=True, kw_only=True)
class HelperConfig:
    """The whole validated configuration.

    :param socket: path of the Unix socket (``socket``, or ``<jail>/run/chroot-helper.sock``).
    :param socket_mode: its permission bits (``socket_mode``, default ``0o660``).
    :param socket_uid: its owner, or None to keep the helper's (``socket_owner``).
    :param socket_gid: its group, or None (``socket_group``).
    :param allow_uids: peer uids allowed on the Unix socket (SO_PEERCRED).
    :param allow_gids: peer gids allowed on the Unix socket.
    :param tcp: optional ``(host, port)`` on loopback; every request must carry the token.
    :param token: the TCP token, read from ``token_file`` at load.
    :param max_concurrent: requests running at once, all peers together.
    :param max_per_peer: requests running at once for one peer process (or TCP client address).
    :param max_per_uid: requests running at once for one peer uid, all its processes together,
        so that one app cannot take every ``max_concurrent`` slot (default three quarters of it).
    :param max_connections: open connections at once; later ones are refused.
    :param max_idle_per_uid: connections of one peer uid (all its processes together) that have
        not sent their request yet; a slow or stalled client of one uid cannot fill
        ``max_connections`` for the others (default 64, at most half of ``max_connections``).
    :param request_timeout: seconds a new connection has to send its request.
    :param commands: the ``[exec.*]`` tables by name.
    :param service_tables: raw tables of other services (``dns``, ``mail``), unvalidated.
    """

    socket: str
    socket_mode: int = 0o660
    socket_uid: int | None = None
    socket_gid: int | None = None
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    tcp: tuple[str, int] | None = None
    token: str | None = None
    max_concurrent: int = 64
    max_per_peer: int = 16
    max_per_uid: int = 48
    max_connections: int = 256
    max_idle_per_uid: int = 64
    request_timeout: float = 10.0
    commands: Mapping[str, CommandConfig] = field(default_factory=dict)
    service_tables: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


def parse_size(value: object, where: str) -> int:
    """Parse ``10485760``, ``"10M"``, ``"512K"``, ``"1GiB"`` into bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match[1]) * _UNITS[match[2].upper()]
    raise ConfigError(f'{where} = {value!r}: expected a size in bytes such as 1048576 or "10M"')


class _Table:
    """Reads typed values from one TOML table and remembers which keys were used."""

    def __init__(self, name: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"[{name}] must be a table, not {type(raw).__name__}")
        self.name = name
        self.raw: dict[str, object] = raw
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"[{self.name}] {key}"

    def get(self, key: str) -> object:
        self.used.add(key)
        return self.raw.get(key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def str_(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.where(key)} = {value!r}: expected a non-empty string")
        return value

    def bool_(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where(key)} = {value!r}: expected true or false")
        return value

    def int_(self, key: str, default: int, *, minimum: int = 1) -> int:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{self.where(key)} = {value!r}: expected an integer >= {minimum}")
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 86400:
            raise ConfigError(
                f"{self.where(key)} = {value!r}: expected seconds, a number in (0, 86400], e.g. 10"
            )
        return float(value)

    def size(self, key: str, default: int | None, *, allow_none: bool = True) -> int | None:
        value = self.get(key)
        if value is None:
            return default
        if allow_none and value == "unlimited":
            return None
        return parse_size(value, self.where(key))

    def str_list(self, key: str) -> list[str]:
        value = self.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where(key)} = {value!r}: expected a list of strings")
        return list(value)

    def check_unknown(self, allowed: frozenset[str]) -> None:
        unknown = sorted(set(self.raw) - allowed)
        if unknown:
            raise ConfigError(
                f"[{self.name}] has unknown key {unknown[0]!r}; "
                f"the keys understood there are: {', '.join(sorted(allowed))}"
            )


def _resolve_user(value: str | int, where: str) -> pwd.struct_passwd:
    try:
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return pwd.getpwuid(int(value))
        return pwd.getpwnam(value)
    except KeyError:
        raise ConfigError(f"{where} = {value!r}: no such user on this host") from None


def _resolve_group(value: str | int, where: str) -> int:
    try:
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return grp.getgrgid(int(value)).gr_gid
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(f"{where} = {value!r}: no such group on this host") from None


def _id_list(table: _Table, key: str, kind: Literal["user", "group"]) -> frozenset[int]:
    value = table.get(key)
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise ConfigError(f"{table.where(key)} = {value!r}: expected a list of {kind} names or ids")
    ids: set[int] = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ConfigError(f"{table.where(key)} item {item!r}: expected a {kind} name or id")
        if isinstance(item, int):
            ids.add(item)
        elif kind == "user":
            ids.add(_resolve_user(item, table.where(key)).pw_uid)
        else:
            ids.add(_resolve_group(item, table.where(key)))
    return frozenset(ids)


_HELPER_KEYS = frozenset(
    {
        "socket",
        "jail",
        "socket_mode",
        "socket_owner",
        "socket_group",
        "allow_uids",
        "allow_gids",
        "tcp",
        "token_file",
        "max_concurrent",
        "max_per_peer",
        "max_per_uid",
        "max_connections",
        "max_idle_per_uid",
        "request_timeout",
    }
)
_COMMAND_KEYS = frozenset(
    {
        "argv",
        "args",
        "user",
        "group",
        "groups",
        "env",
        "cwd",
        "timeout",
        "max_output",
        "max_args",
        "cpu",
        "max_memory",
        "max_processes",
        "max_open_files",
        "max_file_size",
        "network",
        "pid_namespace",
    }
)


def _parse_tcp(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not ipaddress.ip_address(host).is_loopback:
            raise ValueError(host)
        port_number = int(port)
        if not 0 < port_number < 65536:
            raise ValueError(port)
    except ValueError:
        raise ConfigError(
            f'{where} = {value!r}: expected a loopback address and port such as "127.0.0.1:7070" '
            "(the TCP listener is for local clients only)"
        ) from None
    return host, port_number


def _parse_helper(table: _Table) -> dict[str, object]:
    out: dict[str, object] = {}
    socket = table.str_("socket")
    jail = table.str_("jail")
    if socket is None:
        if jail is None:
            raise ConfigError(
                '[helper] needs socket = "/srv/jail/run/chroot-helper.sock" '
                '(or jail = "/srv/jail", which puts the socket at <jail>/run/chroot-helper.sock)'
            )
        socket = os.path.join(jail, DEFAULT_SOCKET.lstrip("/"))
    if not os.path.isabs(socket):
        raise ConfigError(f"[helper] socket = {socket!r}: expected an absolute path")
    if len(os.fsencode(socket)) > 107:
        raise ConfigError(
            f"[helper] socket = {socket!r}: longer than the 107 bytes a Unix socket allows"
        )
    out["socket"] = socket
    mode = table.get("socket_mode")
    if mode is not None:
        try:
            # A string is octal text ("0660"); an integer is a TOML octal literal (0o660).
            number = int(mode, 8) if isinstance(mode, str) else mode
            if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 0o777:
                raise ValueError(mode)
        except ValueError:
            raise ConfigError(
                f'[helper] socket_mode = {mode!r}: expected octal such as "0660"'
            ) from None
        out["socket_mode"] = number
    owner = table.get("socket_owner")
    if owner is not None:
        if isinstance(owner, bool) or not isinstance(owner, str | int):
            raise ConfigError(f"[helper] socket_owner = {owner!r}: expected a user name or uid")
        out["socket_uid"] = _resolve_user(owner, "[helper] socket_owner").pw_uid
    group = table.get("socket_group")
    if group is not None:
        if isinstance(group, bool) or not isinstance(group, str | int):
            raise ConfigError(f"[helper] socket_group = {group!r}: expected a group name or gid")
        out["socket_gid"] = _resolve_group(group, "[helper] socket_group")
    out["allow_uids"] = _id_list(table, "allow_uids", "user")
    out["allow_gids"] = _id_list(table, "allow_gids", "group")
    if not out["allow_uids"] and not out["allow_gids"]:
        raise ConfigError(
            "[helper] allows no peer: set allow_uids = [33] (the web server's uid) "
            "and/or allow_gids"
        )
    tcp = table.str_("tcp")
    token_file = table.str_("token_file")
    if tcp is not None:
        out["tcp"] = _parse_tcp(tcp, "[helper] tcp")
        if token_file is None:
            raise ConfigError(
                '[helper] tcp is set but token_file is not: add token_file = "/etc/…/token"'
            )
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"[helper] token_file = {token_file!r}: cannot read it ({exc.strerror})"
            ) from None
        if len(token) < 16:
            raise ConfigError(
                f"[helper] token_file = {token_file!r}: the token must be at least 16 characters"
            )
        out["token"] = token
    elif token_file is not None:
        raise ConfigError('[helper] token_file is set but tcp is not: add tcp = "127.0.0.1:7070"')
    max_concurrent = out["max_concurrent"] = table.int_("max_concurrent", 64)
    out["max_per_peer"] = table.int_("max_per_peer", 16)
    max_per_uid = table.int_("max_per_uid", max(1, max_concurrent * 3 // 4))
    if max_per_uid > max_concurrent:
        raise ConfigError(
            f"[helper] max_per_uid = {max_per_uid} is above max_concurrent = {max_concurrent}, "
            "where it would never apply; lower it"
        )
    out["max_per_uid"] = max_per_uid
    max_connections = table.int_("max_connections", 256)
    max_idle_per_uid = table.int_("max_idle_per_uid", min(64, max(1, max_connections // 2)))
    if max_idle_per_uid >= max_connections and max_connections > 1:
        raise ConfigError(
            f"[helper] max_idle_per_uid = {max_idle_per_uid} must be below max_connections = "
            f"{max_connections}, or one uid's idle connections can lock every other peer out; "
            "lower it"
        )
    out["max_connections"] = max_connections
    out["max_idle_per_uid"] = max_idle_per_uid
    out["request_timeout"] = table.seconds("request_timeout", 10.0)
    table.check_unknown(_HELPER_KEYS)
    return out


def _parse_command(name: str, raw: object) -> CommandConfig:
    table = _Table(f"exec.{name}", raw)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"[exec.{name}]: command names may use letters, digits and _.+- only")
    argv = table.str_list("argv")
    if not argv or not os.path.isabs(argv[0]):
        raise ConfigError(
            f"[exec.{name}] argv = {argv!r}: expected a list whose first item is an absolute path, "
            f'e.g. argv = ["/usr/bin/{name}"]'
        )
    if any("\0" in a for a in argv):
        raise ConfigError(f"[exec.{name}] argv: arguments cannot contain NUL bytes")
    if not os.access(argv[0], os.X_OK):
        raise ConfigError(
            f"[exec.{name}] argv[0] = {argv[0]!r}: not an executable file on this host"
        )
    raw_args = table.get("args")
    args: Literal["any", "none"] | tuple[re.Pattern[str], ...]
    if raw_args is None or raw_args == "none":
        args = "none"
    elif raw_args == "any":
        args = "any"
    elif isinstance(raw_args, list) and all(isinstance(a, str) for a in raw_args) and raw_args:
        patterns = []
        for pattern in raw_args:
            try:
                patterns.append(re.compile(pattern))
            except re.error as exc:
                raise ConfigError(f"[exec.{name}] args pattern {pattern!r}: {exc}") from None
        args = tuple(patterns)
    else:
        raise ConfigError(
            f'[exec.{name}] args = {raw_args!r}: expected "any", "none", or a non-empty list of '
            'regexes such as ["[0-9]+x[0-9]+", "-resize"]'
        )
    user_value = table.get("user")
    if user_value is None:
        user_value = "nobody"
    if isinstance(user_value, bool) or not isinstance(user_value, str | int):
        raise ConfigError(f"[exec.{name}] user = {user_value!r}: expected a user name or uid")
    user = _resolve_user(user_value, f"[exec.{name}] user")
    group_value = table.get("group")
    if group_value is not None and (
        isinstance(group_value, bool) or not isinstance(group_value, str | int)
    ):
        raise ConfigError(f"[exec.{name}] group = {group_value!r}: expected a group name or gid")
    gid = (
        user.pw_gid if group_value is None else _resolve_group(group_value, f"[exec.{name}] group")
    )
    groups = tuple(sorted(_id_list(table, "groups", "group")))
    euid = os.geteuid()
    if euid != 0 and (user.pw_uid != euid or gid != os.getegid() or groups):
        raise ConfigError(
            f"[exec.{name}] user = {user.pw_name!r}: running commands as another user needs the "
            f"helper to start as root (it runs as uid {euid}); start it as root or set "
            f"user = {pwd.getpwuid(euid).pw_name!r}"
        )
    env_raw = table.get("env")
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    if env_raw is not None:
        if not isinstance(env_raw, dict):
            raise ConfigError(
                f'[exec.{name}] env = {env_raw!r}: expected a table like {{ LANG = "C.UTF-8" }}'
            )
        for key, value in env_raw.items():
            if not _ENV_NAME.fullmatch(key) or not isinstance(value, str) or "\0" in value:
                raise ConfigError(f'[exec.{name}] env.{key} = {value!r}: expected NAME = "string"')
            env[key] = value
    cwd = table.str_("cwd", "/")
    assert cwd is not None
    if not os.path.isabs(cwd) or not os.path.isdir(cwd):
        raise ConfigError(f"[exec.{name}] cwd = {cwd!r}: expected an existing absolute directory")
    timeout = table.seconds("timeout", 10.0)
    network = table.bool_("network", True)
    pid_namespace = table.bool_("pid_namespace", False)
    if euid != 0 and (not network or pid_namespace):
        raise ConfigError(
            f"[exec.{name}] network = false and pid_namespace = true need the helper "
            "to start as root"
        )
    max_output = table.size("max_output", 10 << 20, allow_none=False)
    assert max_output is not None
    cpu_value = table.get("cpu")
    cpu: int | None
    if cpu_value is None:
        cpu = int(timeout) + 1
    elif cpu_value == "unlimited":
        cpu = None
    else:
        cpu = table.int_("cpu", 1)
    processes = table.get("max_processes")
    config = CommandConfig(
        name=name,
        argv=tuple(argv),
        args=args,
        user=user.pw_name,
        uid=user.pw_uid,
        gid=gid,
        groups=groups,
        env=env,
        cwd=cwd,
        timeout=timeout,
        max_output=max_output,
        max_args=table.int_("max_args", 256, minimum=0),
        cpu=cpu,
        max_memory=table.size("max_memory", 1 << 30),
        max_processes=None if processes == "unlimited" else table.int_("max_processes", 256),
        max_open_files=table.int_("max_open_files", 256, minimum=4),
        max_file_size=table.size("max_file_size", 64 << 20),
        network=network,
        pid_namespace=pid_namespace,
    )
    table.check_unknown(_COMMAND_KEYS)
    return config


def parse_config(data: Mapping[str, object], *, source: str = "<config>") -> HelperConfig:
    """Validate an already-parsed TOML document; see :func:`load_config`."""
    allowed = {"helper", "exec", *SERVICE_TABLES}
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"{source}: unknown top-level key or table [{key}]; "
                f"expected [helper], [exec.NAME], {', '.join(f'[{t}]' for t in SERVICE_TABLES)}"
            )
    if "helper" not in data:
        raise ConfigError(f'{source}: missing [helper] table (with socket = "..." and allow_uids)')
    helper = _parse_helper(_Table("helper", data["helper"]))
    exec_raw = data.get("exec", {})
    if not isinstance(exec_raw, dict):
        raise ConfigError(f"{source}: exec must be tables like [exec.echo], not {exec_raw!r}")
    commands = {name: _parse_command(name, raw) for name, raw in exec_raw.items()}
    service_tables: dict[str, Mapping[str, object]] = {}
    for name in SERVICE_TABLES:
        if name in data:
            raw = data[name]
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: {name} must be a table [{name}], not {raw!r}")
            service_tables[name] = raw
    return HelperConfig(
        commands=commands,
        service_tables=service_tables,
        **helper,  # type: ignore[arg-type]  # keys and types checked by _parse_helper
    )


def load_config(path: str) -> HelperConfig:
    """Read and validate the TOML file at *path*.

    :raises ConfigError: the file cannot be read or parsed, or a key is invalid; the message names
        the key, the value and the fix.
    """
    return parse_config(read_toml(path), source=path)


def read_toml(path: str) -> dict[str, object]:
    """The TOML document at *path*.

    :raises ConfigError: the file cannot be read or is not TOML; the message names the file.
    """
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None

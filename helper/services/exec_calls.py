"""Exec requests checked against the ``[exec.NAME]`` tables: what a caller may run, and how.

Shared by the daemon and the resident supervisors that serve a kept connection's later requests
themselves (:mod:`~chroot_helper.services.exec_resident`); both reject the same requests with the
same messages.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..config import CommandConfig
from ..errors import CommandError
from .exec_spawn import SpawnSpec

__all__ = ["Call", "CommandTable", "MODES", "identity_of", "runs_in_resident"]

_PARAMS: Final = frozenset({"command", "args", "stdin", "stdout", "stderr", "timeout", "started"})
_STR_TYPE: Final = frozenset({str})
MODES: Final = {
    "stdin": ("pipe", "fd", "null"),
    "stdout": ("pipe", "fd", "null"),
    "stderr": ("pipe", "fd", "null", "stdout"),
}


def identity_of(
    *, uid: int, gid: int, groups: Sequence[int], rlimits: Sequence[tuple[int, int]]
) -> bytes:
    """The key of the residents that can run a command: who it runs as, under which limits."""
    return json.dumps(
        {
            "uid": uid,
            "gid": gid,
            "groups": list(groups),
            "rlimits": [list(pair) for pair in rlimits],
        },
        sort_keys=True,
    ).encode()


@dataclass(frozen=True, kw_only=True)
class Call:
    """A checked exec request."""

    command: CommandConfig
    args: tuple[str, ...]
    modes: Mapping[str, str]
    timeout: float
    started: bool = True

    @property
    def argv(self) -> tuple[str, ...]:
        return (*self.command.argv, *self.args)

    @property
    def piped(self) -> bool:
        """Some stream goes through DATA frames (the daemon relays them)."""
        return "pipe" in self.modes.values()


class CommandTable:
    """The configured commands, found by name or path, with their limits and identities.

    :param commands: the validated command tables by name.
    """

    def __init__(self, commands: Mapping[str, CommandConfig]) -> None:
        self.commands = dict(commands)
        self._by_path: dict[str, list[str]] = {}
        for cmd in commands.values():
            for key in {cmd.argv[0], os.path.basename(cmd.argv[0])}:
                self._by_path.setdefault(key, []).append(cmd.name)
        self.rlimits = {name: _rlimits(cmd) for name, cmd in self.commands.items()}
        #: The key of the resident supervisors that may run each command (see :func:`identity_of`).
        self.identities = {
            name: identity_of(
                uid=cmd.uid, gid=cmd.gid, groups=cmd.groups, rlimits=self.rlimits[name]
            )
            for name, cmd in self.commands.items()
        }

    def resolve(self, name: str) -> CommandConfig:
        """Find the command a caller means by *name*: table name, argv[0], or its basename."""
        if name in self.commands:
            return self.commands[name]
        matches = self._by_path.get(name, [])
        if len(matches) == 1:
            return self.commands[matches[0]]
        if matches:
            raise CommandError(
                f"{name!r} is configured as several commands ({', '.join(sorted(matches))}); "
                "call one of them by name"
            )
        configured = ", ".join(sorted(self.commands)) or "none"
        raise CommandError(
            f"command {name!r} is not allowed: no [exec.{os.path.basename(name) or name}] table "
            f"in the helper's config (configured: {configured})"
        )

    def spec(self, call: Call, streams: Sequence[int]) -> SpawnSpec:
        """What a supervisor needs to start *call* with *streams* as its stdin, stdout, stderr."""
        cmd = call.command
        return SpawnSpec(
            argv=call.argv,
            env=dict(cmd.env),
            cwd=cmd.cwd,
            uid=cmd.uid,
            gid=cmd.gid,
            groups=cmd.groups,
            rlimits=self.rlimits[cmd.name],
            stdin=streams[0],
            stdout=streams[1],
            stderr=streams[2],
            network=cmd.network,
            pid_namespace=cmd.pid_namespace,
        )

    def parse(self, params: Mapping[str, object], fds: int) -> Call:
        """Check an exec request's *params*, which came with *fds* descriptors.

        :raises CommandError: what is not allowed, and what to change.
        """
        if not _PARAMS.issuperset(params):
            raise CommandError(f"unknown exec parameter {sorted(set(params) - _PARAMS)[0]!r}")
        name = params.get("command")
        if not isinstance(name, str) or not name:
            raise CommandError("exec parameter 'command' must be a non-empty string")
        command = self.resolve(name)
        args = params.get("args", [])
        if type(args) is not list or not set(map(type, args)) <= _STR_TYPE:
            raise CommandError("exec parameter 'args' must be a list of strings")
        _check_args(command, args)
        modes = {}
        for stream, allowed in MODES.items():
            mode = params.get(stream, "null")
            if mode not in allowed:
                raise CommandError(
                    f"exec parameter {stream!r} = {mode!r}; expected one of {allowed}"
                )
            modes[stream] = str(mode)
        wanted = list(modes.values()).count("fd")
        if wanted != fds:
            raise CommandError(f"{wanted} streams use mode 'fd' but {fds} fds were passed")
        timeout = command.timeout
        asked = params.get("timeout")
        if asked is not None:
            if isinstance(asked, bool) or not isinstance(asked, int | float) or not asked > 0:
                raise CommandError(f"exec parameter 'timeout' = {asked!r}; expected seconds > 0")
            timeout = min(timeout, float(asked))
        started = params.get("started", True)
        if not isinstance(started, bool):
            raise CommandError(f"exec parameter 'started' = {started!r}; expected true or false")
        return Call(
            command=command,
            args=tuple(args),
            modes=modes,
            timeout=timeout,
            started=started,
        )


def runs_in_resident(cmd: CommandConfig) -> bool:
    """Whether resident supervisors run *cmd*: it needs no namespace of its own (see
    :mod:`~chroot_helper.services.exec_resident`)."""
    return cmd.network and not cmd.pid_namespace


def _check_args(command: CommandConfig, args: Sequence[str]) -> None:
    if not args:
        return
    table = f"[exec.{command.name}]"
    if command.args == "none":
        raise CommandError(f'{table} takes no arguments (args = "none"); got {len(args)}')
    if len(args) > command.max_args:
        raise CommandError(f"{table} allows at most max_args = {command.max_args} arguments")
    for index, arg in enumerate(args, 1):
        if "\0" in arg:
            raise CommandError(f"{table} argument {index} contains a NUL byte")
        try:
            os.fsencode(arg)
        except UnicodeEncodeError:
            raise CommandError(f"{table} argument {index} is not valid text") from None
        if isinstance(command.args, tuple) and not any(p.fullmatch(arg) for p in command.args):
            raise CommandError(
                f"{table} argument {index} {arg!r} matches none of the allowed patterns "
                f"{[p.pattern for p in command.args]}"
            )


def _rlimits(cmd: CommandConfig) -> list[tuple[int, int]]:
    limits = [(resource.RLIMIT_NOFILE, cmd.max_open_files), (resource.RLIMIT_CORE, 0)]
    for res, value in (
        (resource.RLIMIT_CPU, cmd.cpu),
        (resource.RLIMIT_AS, cmd.max_memory),
        (resource.RLIMIT_NPROC, cmd.max_processes),
        (resource.RLIMIT_FSIZE, cmd.max_file_size),
    ):
        if value is not None:
            limits.append((res, value))
    return limits

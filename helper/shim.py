"""Opt-in: route existing ``subprocess`` calls in a jailed app to chroot-helper.

Code written for a normal host calls ``subprocess.run(["/usr/bin/convert", ...])`` or
``subprocess.check_output(["convert", ...])``; inside an empty jail there is no such binary (and no
``/bin/sh``).  After :func:`install`, :class:`subprocess.Popen` (and so ``run``, ``call``,
``check_call``, ``check_output``) starts the command through the helper instead, where the
administrator allowlisted it as ``[exec.NAME]``; other commands get a clear
:class:`~chroot_helper.errors.CommandError`.

Call it once, before entering the jail (ChrootMiddleware has an option for it)::

    from chroot_helper import shim
    shim.install()                           # route every command; the helper decides
    shim.install(commands=["convert"])       # route only these; refuse others locally

When not to use it: in new code call :func:`chroot_helper.client.run` directly.  ``os.system`` and
``os.popen`` are not routed (they need a shell).  ``shell=True``, ``cwd``, ``preexec_fn``,
``pass_fds``, ``user``/``group`` are refused with a :class:`CommandError`; ``env`` is ignored,
because the helper's configuration sets the environment.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
from collections.abc import Iterable, Sequence
from typing import Final

from . import client
from .errors import CommandError

__all__ = ["install", "uninstall", "installed"]

log = logging.getLogger(__name__)

_ORIGINAL: Final = subprocess.Popen
_routed: frozenset[str] | None = None


def installed() -> bool:
    """True while :func:`install` is in effect."""
    return subprocess.Popen is not _ORIGINAL


def install(commands: Iterable[str] | None = None) -> None:
    """Route :class:`subprocess.Popen` to the helper.

    :param commands: names or paths to route (matched against ``argv[0]`` and its basename); None
        routes every command and lets the helper refuse what it does not allow.
    """
    global _routed
    _routed = None if commands is None else frozenset(commands)
    subprocess.Popen = _RoutedPopen  # type: ignore[misc, assignment]


def uninstall() -> None:
    """Restore the original :class:`subprocess.Popen`."""
    subprocess.Popen = _ORIGINAL  # type: ignore[misc]


def _refuse(what: str) -> CommandError:
    return CommandError(f"{what} is not available to commands run through chroot-helper")


#: Where apps look for sendmail(1); the shim submits their messages in-process, without a fork.
SENDMAIL_PATHS: Final = frozenset({"/usr/sbin/sendmail", "/usr/lib/sendmail"})


class _SendmailProcess:
    """``sendmail ARGS`` run in this process: the message goes to the helper's SMTP listener.

    Behaves like a finished :class:`subprocess.Popen` for ``run``/``call``/``communicate``,
    ``stdin.write`` then ``wait``, and the context manager; ``pid`` is None.
    """

    def __init__(
        self,
        argv: list[str],
        stdin: client.Stream,
        stdout: client.Stream,
        stderr: client.Stream,
        *,
        text: bool,
    ) -> None:
        self.args = argv
        self.pid = None
        self.returncode: int | None = None
        self._text = text
        self._source = stdin
        self._capture = (stdout == subprocess.PIPE, stderr == subprocess.PIPE)
        self.stdin: io.BytesIO | None = _KeepOpen() if stdin == subprocess.PIPE else None
        self.stdout = None
        self.stderr = None
        self._output: tuple[str, str] = ("", "")

    def _message(self, given: bytes | str | None) -> bytes:
        if given is not None:
            return given.encode() if isinstance(given, str) else given
        if self.stdin is not None:
            return self.stdin.getvalue()
        if isinstance(self._source, int) and self._source >= 0:
            with os.fdopen(os.dup(self._source), "rb") as source:
                return source.read()
        if hasattr(self._source, "read"):
            data = self._source.read()  # type: ignore[union-attr]
            return data.encode() if isinstance(data, str) else bytes(data)
        return b""  # inherited stdin: a web worker has no message there

    def _run(self, given: bytes | str | None = None) -> int:
        if self.returncode is None:
            from .services.mail import sendmail_main

            errors = io.StringIO()
            self.returncode = sendmail_main(
                self.args[1:], stdin=io.BytesIO(self._message(given)), stderr=errors
            )
            self._output = ("", errors.getvalue())
        return self.returncode

    def communicate(
        self, input: bytes | str | None = None, timeout: float | None = None
    ) -> tuple[object, object]:
        self._run(input)
        out, err = (value if self._text else value.encode() for value in self._output)
        return (out if self._capture[0] else None, err if self._capture[1] else None)

    def wait(self, timeout: float | None = None) -> int:
        return self._run()

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Nothing to signal: the submission runs, and ends, in this process."""

    def terminate(self) -> None:
        """Nothing to stop (see :meth:`send_signal`)."""

    def kill(self) -> None:
        """Nothing to stop (see :meth:`send_signal`)."""

    def __enter__(self) -> _SendmailProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self._run()


class _KeepOpen(io.BytesIO):
    """A stdin pipe stand-in whose content survives ``close()`` (read when the message is sent)."""

    def close(self) -> None:
        self.flush()


class _RoutedPopen:
    """Stands in for :class:`subprocess.Popen`; makes :class:`chroot_helper.client.Popen`\\ s."""

    def __class_getitem__(cls, item: object) -> type[_RoutedPopen]:
        return cls

    def __new__(  # type: ignore[misc]  # returns a client.Popen, deliberately
        cls,
        args: str | bytes | Sequence[str | bytes],
        bufsize: int = -1,
        executable: str | None = None,
        stdin: client.Stream = None,
        stdout: client.Stream = None,
        stderr: client.Stream = None,
        preexec_fn: object = None,
        close_fds: bool = True,
        shell: bool = False,
        cwd: object = None,
        env: object = None,
        universal_newlines: bool | None = None,
        startupinfo: object = None,
        creationflags: int = 0,
        restore_signals: bool = True,
        start_new_session: bool = False,
        pass_fds: Sequence[int] = (),
        *,
        user: object = None,
        group: object = None,
        extra_groups: object = None,
        encoding: str | None = None,
        errors: str | None = None,
        text: bool | None = None,
        umask: int = -1,
        pipesize: int = -1,
        process_group: int | None = None,
    ) -> client.Popen:
        if shell:
            raise _refuse("shell=True (the jail has no /bin/sh; pass an argv list)")
        for name, value in (
            ("cwd", cwd),
            ("preexec_fn", preexec_fn),
            ("user", user),
            ("group", group),
            ("extra_groups", extra_groups),
        ):
            if value is not None:
                raise _refuse(f"{name}=")
        if pass_fds:
            raise _refuse("pass_fds=")
        if isinstance(args, str | bytes):
            argv = [os.fsdecode(args)]
        else:
            argv = [os.fsdecode(a) for a in args]
        if executable is not None:
            argv[0] = os.fsdecode(executable)
        if not argv:
            raise CommandError("an empty argv cannot be run")
        if _routed is not None and not ({argv[0], os.path.basename(argv[0])} & _routed):
            raise CommandError(
                f"{argv[0]!r} is not routed to chroot-helper "
                f"(routed: {', '.join(sorted(_routed))}) "
                "and cannot run inside the jail; configure it as [exec.NAME] in the helper and add "
                "it to shim.install(commands=...)"
            )
        if argv[0] in SENDMAIL_PATHS or argv[0] == "sendmail":
            return _SendmailProcess(  # type: ignore[return-value]  # a Popen look-alike
                argv, stdin, stdout, stderr, text=bool(text or universal_newlines or encoding)
            )
        if env is not None:
            log.debug("ignoring env= for %s: the helper's config sets the environment", argv[0])
        return client.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=bool(text or universal_newlines),
            encoding=encoding,
            errors=errors,
        )

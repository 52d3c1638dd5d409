"""Errors raised by chrootwsgi.

::

    ChrootWSGIError
    ├── ConfigError      a setting is invalid (raised when the config is loaded, never mid-request)
    │   └── UnsafeJailError  `jail init` refuses a jail directory; each problem with its fix
    ├── PreloadError     something the jail needs could not be loaded before entry
    └── EntryError       entering the jail failed; the process must not serve (fail closed)
        └── VerifyError  the jail was entered but a post-entry check failed

Every message says what failed, the value involved and what to change.
"""

from __future__ import annotations


class ChrootWSGIError(Exception):
    """Base class of every error chrootwsgi raises on purpose."""


class ConfigError(ChrootWSGIError):
    """A configuration value is invalid; the message names the key, the value and the fix."""


class PreloadError(ChrootWSGIError):
    """A library, module or file that must be loaded before entry could not be loaded."""


class EntryError(ChrootWSGIError):
    """Entering the jail failed. The worker is not jailed and must not serve requests."""


class VerifyError(EntryError):
    """The jail was entered, but a check afterwards showed it does not hold."""


class UnsafeJailError(ConfigError):
    """``chrootwsgi jail init`` found a jail directory it will not use; ``problems`` lists them.

    :param problems: ``(path, what is wrong, the command that fixes it)`` for each problem.
    """

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {what} (fix: {fix})" for path, what, fix in problems))

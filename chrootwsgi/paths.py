"""Rewrite host paths in the WSGI environ to the paths the jailed app sees (``ChrootFixRoot``).

Apache fills ``DOCUMENT_ROOT``, ``SCRIPT_FILENAME`` and friends with host paths. Inside the jail
those either live somewhere else (under an exposure, or under the jail root) or do not exist. A
mapped path is rewritten; a path outside every mapping is removed, never passed through, so the
app neither opens a wrong file nor learns the host layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping

#: How many distinct host paths :meth:`PathMapper.rewrite` remembers.
MEMO_SIZE = 1024
#: The environ keys that carry file-system paths.
PATH_KEYS = ("DOCUMENT_ROOT", "CONTEXT_DOCUMENT_ROOT", "SCRIPT_FILENAME", "PATH_TRANSLATED")


class PathMapper:
    """Host ↔ jail path translation by longest matching prefix.

    :param mappings: ``(host_prefix, jail_prefix)`` pairs; the jail root itself maps to ``/``.
    """

    def __init__(self, mappings: Iterable[tuple[str, str]]) -> None:
        pairs = {os.path.normpath(host): os.path.normpath(jail) for host, jail in mappings}
        self._to_jail = sorted(pairs.items(), key=lambda pair: len(pair[0]), reverse=True)
        self._memo: dict[str, str | None] = {}
        self._to_host = sorted(
            ((jail, host) for host, jail in pairs.items()),
            key=lambda pair: len(pair[0]),
            reverse=True,
        )

    def to_jail(self, path: str) -> str | None:
        """The jail path for host *path*, or ``None`` when the jail cannot see it."""
        return _translate(path, self._to_jail)

    def to_host(self, path: str) -> str | None:
        """The host path for jail *path*, or ``None`` when it is only inside the jail."""
        return _translate(path, self._to_host)

    def rewrite(self, environ: MutableMapping[str, object]) -> None:
        """Rewrite :data:`PATH_KEYS` in *environ* in place; drop those the jail cannot see.

        Runs per request; Apache sends the same few paths again and again, so answers are
        remembered (up to :data:`MEMO_SIZE` of them).
        """
        memo = self._memo
        for key in PATH_KEYS:
            value = environ.get(key)
            if not isinstance(value, str) or not value:
                continue
            try:
                mapped = memo[value]
            except KeyError:
                if len(memo) >= MEMO_SIZE:
                    memo.clear()
                mapped = memo[value] = self.to_jail(value)
            if mapped is None:
                del environ[key]
            else:
                environ[key] = mapped


def _translate(path: str, table: list[tuple[str, str]]) -> str | None:
    if not os.path.isabs(path):
        return None
    path = os.path.normpath(path)
    for prefix, replacement in table:
        if prefix == "/":
            rest = path
        elif path == prefix or path.startswith(prefix + "/"):
            rest = path[len(prefix) :]
        else:
            continue
        return replacement.rstrip("/") + rest or "/"
    return None

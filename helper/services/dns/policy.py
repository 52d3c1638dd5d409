"""Per-name allow/deny lists: which names a jailed app may resolve.

A pattern ``example.org`` matches that name only; ``*.example.org`` matches every name below it
(not ``example.org`` itself).  Deny wins over allow; an empty allow list allows every name that
is not denied.  ``localhost`` is always allowed.  The lists apply to every question, hosts-file
names and reverse (PTR) names included: add ``*.in-addr.arpa`` / ``*.ip6.arpa`` to an allow list
if the app needs reverse lookups.

Example::

    >>> policy = NamePolicy(allow=("api.example.org", "*.cdn.example.org"), deny=())
    >>> policy.permits("img.cdn.example.org."), policy.permits("example.org")
    (True, False)
"""

from __future__ import annotations

__all__ = ["NamePolicy"]


def _split(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    exact = frozenset(p for p in patterns if not p.startswith("*."))
    suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))  # ".example.org"
    return exact, suffixes


class NamePolicy:
    """Decides whether a name may be resolved.

    :param allow: validated lower-case patterns; empty allows all.
    :param deny: validated lower-case patterns; checked first.
    """

    def __init__(self, *, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        self._allow_all = not allow
        self._allow = _split(allow)
        self._deny = _split(deny)

    @staticmethod
    def _matches(name: str, table: tuple[frozenset[str], tuple[str, ...]]) -> bool:
        exact, suffixes = table
        return name in exact or name.endswith(suffixes)

    def permits(self, name: str) -> bool:
        """True if ``name`` (any case, trailing dot optional) may be resolved."""
        name = name.rstrip(".").lower()
        if name == "localhost":
            return True
        if self._matches(name, self._deny):
            return False
        return self._allow_all or self._matches(name, self._allow)

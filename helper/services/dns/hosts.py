"""Names answered locally from a hosts(5) file, so ``localhost`` and the host's names resolve.

Parsing is pure (text in, :class:`HostsTable` out).  ``localhost`` always maps to ``127.0.0.1``
and ``::1`` even when the file does not say so (RFC 6761 section 6.3).  Do not use this for
anything but the handful of names a hosts file holds: lookups are exact, without search domains.

Example::

    >>> table = parse_hosts("10.0.0.5 db.internal db\\n")
    >>> table.addresses("DB.internal.")
    ('10.0.0.5',)
"""

from __future__ import annotations

import ipaddress

__all__ = ["HostsTable", "parse_hosts", "reverse_name"]

_LOCALHOST = ("127.0.0.1", "::1")


def _normal(name: str) -> str:
    return name.rstrip(".").lower()


def reverse_name(address: str) -> str:
    """The ``in-addr.arpa``/``ip6.arpa`` name of ``address``, without the trailing dot."""
    return ipaddress.ip_address(address).reverse_pointer.lower()


class HostsTable:
    """Forward and reverse maps read from a hosts file.

    :param forward: lower-case name (no trailing dot) to addresses, file order.
    :param reverse: reverse name to the first host name given for that address.
    """

    def __init__(self, forward: dict[str, tuple[str, ...]], reverse: dict[str, str]) -> None:
        self._forward = forward
        self._reverse = reverse

    def __len__(self) -> int:
        return len(self._forward)

    def addresses(self, name: str) -> tuple[str, ...] | None:
        """Addresses of ``name``, or ``None`` if the table does not know it."""
        return self._forward.get(_normal(name))

    def pointer(self, name: str) -> str | None:
        """The host name for a reverse name such as ``1.0.0.127.in-addr.arpa``."""
        return self._reverse.get(_normal(name))


def parse_hosts(text: str) -> HostsTable:
    """Parse hosts(5) text; malformed lines are skipped, as glibc does."""
    forward: dict[str, list[str]] = {}
    reverse: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0].split("%", 1)[0]).compressed
        except ValueError:
            continue
        names = [_normal(name) for name in fields[1:] if _normal(name)]
        if not names:
            continue
        for name in names:
            known = forward.setdefault(name, [])
            if address not in known:
                known.append(address)
        reverse.setdefault(reverse_name(address), names[0])
    for address in _LOCALHOST:
        known = forward.setdefault("localhost", [])
        if address not in known:
            known.append(address)
        reverse.setdefault(reverse_name(address), "localhost")
    return HostsTable({name: tuple(addrs) for name, addrs in forward.items()}, reverse)

"""Message bytes for submission: line ends, header lookup, Bcc removal.  Pure, stdlib only.

Used by the front ends (``sendmail``, :func:`client_sendmail`) before anything is sent, so
that what reaches the server has CRLF line ends and no ``Bcc:`` header, and so that the
envelope can be taken from ``To:``/``Cc:``/``Bcc:`` (``sendmail -t``)::

    >>> data = normalize_eols(b"To: a@example.org\\nBcc: b@example.org\\n\\nhi\\n")
    >>> header_addresses(data, ("to", "cc", "bcc"))
    ['a@example.org', 'b@example.org']
    >>> strip_headers(data, ("bcc",))
    b'To: a@example.org\\r\\n\\r\\nhi\\r\\n'
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable

__all__ = [
    "bad_envelope_address",
    "header_addresses",
    "header_value",
    "normalize_eols",
    "split_header",
    "strip_headers",
]

_EOL = re.compile(rb"\r\n|\r|\n")


def normalize_eols(data: bytes) -> bytes:
    """Every line end (LF, CR or CRLF) becomes CRLF, as SMTP requires."""
    return _EOL.sub(b"\r\n", data)


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """``(header, rest)`` of a CRLF message; ``header`` keeps its final CRLF, ``rest`` starts
    with the blank line (or is empty when there is no body)."""
    if data.startswith(b"\r\n"):
        return b"", data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 2], data[end + 2 :]


def _fields(header: bytes) -> list[tuple[str, bytes]]:
    """``(lowercase name, raw lines)`` per field, continuation lines included."""
    fields: list[tuple[str, bytes]] = []
    for line in header.split(b"\r\n")[:-1] if header.endswith(b"\r\n") else header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
        else:
            name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            fields.append((name, line))
    return fields


def header_value(data: bytes, name: str) -> str | None:
    """The unfolded value of the first ``name`` field, or ``None``."""
    header, _rest = split_header(data)
    for field, raw in _fields(header):
        if field == name.lower() and b":" in raw:
            value = raw.split(b":", 1)[1].decode("utf-8", "replace")
            return " ".join(value.split())
    return None


def header_addresses(data: bytes, names: Iterable[str]) -> list[str]:
    """Addresses in every field named in ``names`` (``To``, ``Cc``, ``Bcc``), in order.

    :raises ValueError: a field has a value but no address can be parsed from it (rather than
        silently leaving its recipients out).
    """
    wanted = {n.lower() for n in names}
    header, _rest = split_header(data)
    addresses = []
    for field, raw in _fields(header):
        if field in wanted and b":" in raw:
            value = " ".join(raw.split(b":", 1)[1].decode("utf-8", "replace").split())
            found = [addr for _name, addr in email.utils.getaddresses([value]) if addr]
            if value.strip(" ,;") and not found:
                raise ValueError(f"cannot parse the addresses in {field.title()}: {value!r}")
            addresses.extend(found)
    return addresses


def strip_headers(data: bytes, names: Iterable[str]) -> bytes:
    """``data`` without the fields named in ``names`` (and their continuation lines)."""
    unwanted = {n.lower() for n in names}
    header, rest = split_header(data)
    kept = [raw + b"\r\n" for field, raw in _fields(header) if field not in unwanted]
    return b"".join(kept) + rest


def bad_envelope_address(address: str) -> str | None:
    """Why ``address`` cannot be an envelope address (CR, LF, NUL, spaces, no ``@``), or
    ``None``.  CR or LF here is a header-injection attempt: refuse, never repair."""
    if any(c in address for c in "\r\n\0"):
        return f"{address!r} contains CR, LF or NUL (header injection?)"
    if not address or any(c.isspace() for c in address) or any(c in address for c in "<>,"):
        return f"{address!r} is not a plain address like user@example.org"
    if "@" not in address.strip("@"):
        return f"{address!r} has no domain; write user@example.org"
    return None

"""Property tests for what the mail service decides about untrusted bytes (no sockets).

Whatever a client sends, the checks answer with one of their SMTP replies or accept, never raise,
and what they accept holds the promises the service relies on.
"""

from __future__ import annotations

import re

from chroot_helper.services.mail.message import (
    bad_envelope_address,
    header_value,
    normalize_eols,
    strip_headers,
)
from chroot_helper.services.mail.policy import (
    REPLY_BAD_ADDRESS,
    REPLY_BAD_HEADER,
    REPLY_BARE_EOL,
    REPLY_NEEDS_SMTPUTF8,
    REPLY_NUL,
    check_address,
    check_headers,
    header_end,
)
from hypothesis import given, settings
from hypothesis import strategies as st

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BARE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")
FAST = settings(max_examples=300, deadline=None, database=None)

field_names = st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z", fullmatch=True)
field_values = st.binary(max_size=60).filter(lambda v: b"\r" not in v and b"\n" not in v)


@FAST
@given(st.text(max_size=80), st.booleans())
def test_check_address_accepts_only_plain_addresses(address, smtputf8):
    reply = check_address(address, smtputf8=smtputf8)
    assert reply in (None, REPLY_BAD_ADDRESS, REPLY_NEEDS_SMTPUTF8)
    if reply is None:
        assert "@" in address and not CONTROL.search(address)
        assert smtputf8 or address.isascii()


@FAST
@given(st.binary(max_size=400))
def test_check_headers_never_passes_nul_or_bare_line_ends(data):
    reply = check_headers(data)
    assert reply in (None, REPLY_NUL, REPLY_BARE_EOL, REPLY_BAD_HEADER)
    if reply is None:
        header = data[: header_end(data)]
        assert b"\0" not in header and not BARE_EOL.search(header)


@FAST
@given(field_names, field_values, field_values, st.sampled_from([b"\n", b"\r", b"\0"]))
def test_a_header_smuggled_into_a_value_is_refused(name, value, smuggled, separator):
    message = b"From: a@example.org\r\n" + name + b": " + value + separator + b"Bcc: " + smuggled
    message += b"\r\n\r\nbody\r\n"
    assert check_headers(message) in (REPLY_BARE_EOL, REPLY_NUL)


@FAST
@given(st.binary(max_size=300))
def test_normalized_line_ends_are_all_crlf_and_stable(data):
    normalized = normalize_eols(data)
    assert not BARE_EOL.search(normalized)
    assert normalize_eols(normalized) == normalized


@FAST
@given(st.lists(st.tuples(field_names, field_values), max_size=6), field_values)
def test_stripped_bcc_is_gone(fields, bcc):
    header = b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    message = header + b"Bcc: " + bcc + b"\r\n\r\nbody\r\n"
    stripped = strip_headers(message, ["Bcc"])
    assert header_value(stripped, "Bcc") is None
    kept = b"".join(
        name + b": " + value + b"\r\n" for name, value in fields if name.lower() != b"bcc"
    )
    assert stripped == kept + b"\r\nbody\r\n"  # every other field, the blank line, the body


@FAST
@given(st.text(max_size=40), st.sampled_from(["\r", "\n", "\0"]), st.text(max_size=40))
def test_envelope_addresses_with_line_ends_are_refused(before, bad, after):
    assert bad_envelope_address(before + bad + after) is not None

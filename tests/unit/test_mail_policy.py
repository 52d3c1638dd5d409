"""Acceptance rules as pure functions: addresses, header checks, the rate limiter."""

from __future__ import annotations

import pytest
from chroot_helper.services.mail.policy import (
    REPLY_BAD_ADDRESS,
    REPLY_BAD_HEADER,
    REPLY_BARE_EOL,
    REPLY_NEEDS_SMTPUTF8,
    REPLY_NUL,
    RateLimiter,
    check_address,
    check_headers,
)


@pytest.mark.parametrize(
    "address",
    [
        "a@example.org",
        "first.last+tag@sub.example.org",
        '"quoted string"@example.org',
        "x@[127.0.0.1]",
        "o'brien@example.org",
    ],
)
def test_good_addresses(address):
    assert check_address(address, smtputf8=False) is None


@pytest.mark.parametrize(
    "address",
    [
        "",
        "no-at-sign",
        "@example.org",
        "a@",
        "a..b@example.org",
        ".a@example.org",
        "a@-example.org",
        "a@exa_mple.org",
        "a@example..org",
        "a\r\nBcc: x@example.org",
        "a\x00@example.org",
        "a b@example.org",
        "x" * 65 + "@example.org",
        "a@" + "b" * 250 + ".org",
        "a@[not-an-ip]",
        # bytes that are not UTF-8, as aiosmtpd hands them over (surrogateescape)
        "\udcc3\udcb6@example.org",
        "a@e\udcd3\udcd3xample.net",
    ],
)
def test_bad_addresses(address):
    assert check_address(address, smtputf8=True) == REPLY_BAD_ADDRESS


def test_non_ascii_needs_smtputf8():
    assert check_address("jörg@exämple.org", smtputf8=False) == REPLY_NEEDS_SMTPUTF8
    assert check_address("jörg@exämple.org", smtputf8=True) is None


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"Subject: ok\r\nTo: a@example.org\r\n\r\nbody\nwith bare LF\r\n", None),
        (b"Subject: folded\r\n\tcontinued\r\n\r\n", None),
        (b"\r\nno headers at all\r\n", None),
        (b"Subject: x\nBcc: victim@example.org\r\n\r\n", REPLY_BARE_EOL),
        (b"Subject: x\rBcc: victim@example.org\r\n\r\n", REPLY_BARE_EOL),
        (b"Subject: x\x00\r\n\r\n", REPLY_NUL),
        (b"Subject: x\r\nnot a header\r\n\r\n", REPLY_BAD_HEADER),
        (b" leading fold\r\n\r\n", REPLY_BAD_HEADER),
        (b"Bad Name: x\r\n\r\n", REPLY_BAD_HEADER),
        (b"Subject: only headers, no body\r\n", None),
    ],
)
def test_check_headers(data, reply):
    assert check_headers(data) == reply


def test_rate_limiter_sliding_window():
    now = [100.0]
    limiter = RateLimiter(2, window=60.0, clock=lambda: now[0])
    assert limiter.allow("a") and limiter.allow("a")
    assert not limiter.allow("a")
    assert limiter.allow("b")
    now[0] += 60.0
    assert limiter.allow("a")
    assert RateLimiter(0, clock=lambda: 0.0).allow("x")

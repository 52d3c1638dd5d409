"""sendmail(1) flags, message building, line ends and Bcc removal, exit-code mapping."""

from __future__ import annotations

import io

import pytest
from chroot_helper.services.mail.client import exit_code_for
from chroot_helper.services.mail.delivery import sendmail_exit_status
from chroot_helper.services.mail.message import (
    bad_envelope_address,
    header_addresses,
    normalize_eols,
    strip_headers,
)
from chroot_helper.services.mail.sendmail_cli import (
    DataError,
    SendmailArgs,
    UsageError,
    build_submission,
    parse_args,
    read_message,
)


def test_parse_args_variants():
    assert parse_args(["-t", "-i"]) == SendmailArgs(extract=True, ignore_dots=True)
    assert parse_args(["-oi", "-fme@example.org", "-F", "Me", "a@x.org"]) == SendmailArgs(
        ignore_dots=True, sender="me@example.org", full_name="Me", recipients=("a@x.org",)
    )
    assert parse_args(["-r", "me@example.org", "-bm", "-v", "-oem", "-odb", "--", "-a@x.org"]) == (
        SendmailArgs(sender="me@example.org", verbose=True, recipients=("-a@x.org",))
    )
    assert parse_args(["a@x.org, B <b@x.org>"]).recipients == ("a@x.org", "b@x.org")
    assert parse_args(["-B", "8BITMIME", "-N", "never", "a@x.org"]).recipients == ("a@x.org",)


@pytest.mark.parametrize("argv", [["-bp"], ["-bs"], ["-f"], ["-Q"], ["-x", "a@x.org"]])
def test_parse_args_usage_errors(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


def test_read_message_dot_handling():
    data = b"a\n.\nb\n"
    assert read_message(io.BytesIO(data), ignore_dots=True) == data
    assert read_message(io.BytesIO(data), ignore_dots=False) == b"a\n"


def test_build_submission_t_strips_bcc_and_adds_from():
    raw = b"To: a@x.org\nBcc: hidden@x.org,\n\tmore@x.org\nSubject: s\n\nbody\n"
    built = build_submission(parse_args(["-t", "-f", "me@example.org", "-F", "Me"]), raw)
    assert built.sender == "me@example.org"
    assert built.recipients == ("a@x.org", "hidden@x.org", "more@x.org")
    assert built.data == (b"From: Me <me@example.org>\r\nTo: a@x.org\r\nSubject: s\r\n\r\nbody\r\n")


@pytest.mark.parametrize(
    ("argv", "raw", "error"),
    [
        (["a@x.org"], b"Subject: no from\n\n", DataError),
        (["-t"], b"From: me@example.org\n\n", DataError),
        ([], b"From: me@example.org\n\n", UsageError),
        (["-f", "me@example.org\nBcc: v@x.org", "a@x.org"], b"\n", DataError),
        (["-F", "Me\nBcc: v@x.org", "a@x.org"], b"From: me@example.org\n\n", DataError),
        (["a@x.org\r\nBcc: v@x.org"], b"From: me@example.org\n\n", DataError),
        (["-t"], b"From: me@example.org\nTo: a@x.org\nCc: b@x.org c@x.org\n\n", DataError),
    ],
)
def test_build_submission_errors(argv, raw, error):
    with pytest.raises(error):
        build_submission(parse_args(argv), raw)


def test_message_helpers():
    assert normalize_eols(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"
    data = b"To: A <a@x.org>,\r\n b@x.org\r\nCC: c@x.org\r\nBCC: d@x.org\r\n\r\nTo: e@x.org\r\n"
    assert header_addresses(data, ("to", "cc", "bcc")) == [
        "a@x.org",
        "b@x.org",
        "c@x.org",
        "d@x.org",
    ]
    assert strip_headers(data, ("bcc",)) == (
        b"To: A <a@x.org>,\r\n b@x.org\r\nCC: c@x.org\r\n\r\nTo: e@x.org\r\n"
    )
    assert bad_envelope_address("a@x.org") is None
    assert "CR, LF or NUL" in bad_envelope_address("a@x.org\nBcc: b@x.org")
    assert "no domain" in bad_envelope_address("root")


def test_exit_code_mappings():
    assert sendmail_exit_status(0)[:2] == (True, False)
    assert sendmail_exit_status(75)[:3] == (False, False, "4.3.0")
    assert sendmail_exit_status(71)[:2] == (False, False)  # EX_OSERR: temporary
    assert sendmail_exit_status(67)[:3] == (False, True, "5.1.1")
    assert sendmail_exit_status(-9) == (False, False, "4.3.0", "killed by signal 9")
    assert sendmail_exit_status(3)[1] is False  # unknown codes are retried
    assert exit_code_for(451, "4.3.0 try later") == 75
    assert exit_code_for(553, "5.7.1 Sender address not allowed") == 77
    assert exit_code_for(553, "5.1.3 Bad address syntax") == 65
    assert exit_code_for(550, "5.6.0 Message header contains a bare CR or LF") == 65
    assert exit_code_for(550, "5.1.1 no such user") == 67
    assert exit_code_for(554, "5.5.1 No valid recipients") == 69

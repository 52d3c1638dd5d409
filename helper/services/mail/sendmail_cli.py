"""``chroot-helper sendmail``: the sendmail(1) command line, submitting to the mail service.

Reads a message on stdin and submits it over SMTP to ``$CHROOT_HELPER_SMTP`` (``host:port`` or
``unix:PATH``; default ``127.0.0.1:25``), like mini_sendmail or msmtp.  Flags::

    -t          take recipients from To:, Cc:, Bcc: (plus any given); Bcc: is removed
    -i, -oi     a line with a single "." does not end the message
    -f ADDR     envelope sender (also -fADDR, -r ADDR); default: the From: address
    -F NAME     full name for the From: header added when the message has none
    -bm         deliver mail (the default and only mode)
    -v          show the SMTP conversation on stderr
    --          end of options; the rest are recipients
    -oX..., -B TYPE, -N DSN, -U, -odb, -odi, -oem: accepted and ignored

Exit codes follow sysexits(3): 0 queued, 64 EX_USAGE (bad flags), 65 EX_DATAERR (bad
address or message), 67 EX_NOUSER (recipient refused), 69 EX_UNAVAILABLE, 75 EX_TEMPFAIL
(service unreachable or busy: try again), 77 EX_NOPERM (sender not allowed).

:func:`parse_args` and :func:`build_submission` are pure, so the exec shim can map a jailed
``/usr/sbin/sendmail`` call onto :meth:`MailService.submit` in-process, without a fork.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.header
import email.utils
import os
import sys
from collections.abc import Mapping, Sequence
from typing import BinaryIO, TextIO

from ...errors import SubmitError
from .client import connect, submit
from .message import (
    bad_envelope_address,
    header_addresses,
    header_value,
    normalize_eols,
    split_header,
    strip_headers,
)

__all__ = [
    "DataError",
    "SendmailArgs",
    "Submission",
    "UsageError",
    "build_submission",
    "main",
    "parse_args",
    "read_message",
]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_TEMPFAIL = 75

USAGE = "usage: sendmail [-t] [-i] [-f sender] [-F name] [-v] [--] [recipient ...]"


class UsageError(ValueError):
    """The command line is not one sendmail(1) understands (exit EX_USAGE)."""


class DataError(ValueError):
    """The message or an address is unusable (exit EX_DATAERR)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SendmailArgs:
    """A parsed sendmail command line.

    :param extract: ``-t``.
    :param ignore_dots: ``-i`` / ``-oi``.
    :param sender: ``-f``, or ``None``.
    :param full_name: ``-F``, or ``None``.
    :param verbose: ``-v``.
    :param recipients: the operands, comma-separated lists split.
    """

    extract: bool = False
    ignore_dots: bool = False
    sender: str | None = None
    full_name: str | None = None
    verbose: bool = False
    recipients: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Submission:
    """What to send: envelope and CRLF message bytes."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


_IGNORED_WITH_ARG = {"-B", "-N", "-R", "-V", "-X", "-O", "-h", "-L", "-p", "-q"}


def parse_args(argv: Sequence[str]) -> SendmailArgs:
    """Parse sendmail flags.

    :raises UsageError: an unknown flag, a missing argument, or a mode other than ``-bm``.
    """
    values: dict[str, object] = {}
    recipients: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            recipients.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            recipients.append(arg)
            continue
        flag, attached = arg[:2], arg[2:]
        if flag in ("-f", "-r", "-F") or flag in _IGNORED_WITH_ARG:
            if not attached:
                if i >= len(args):
                    raise UsageError(f"sendmail: option {flag} needs an argument\n{USAGE}")
                attached = args[i]
                i += 1
            if flag in ("-f", "-r"):
                values["sender"] = attached
            elif flag == "-F":
                values["full_name"] = attached
        elif arg == "-t":
            values["extract"] = True
        elif arg in ("-i", "-oi"):
            values["ignore_dots"] = True
        elif arg == "-v":
            values["verbose"] = True
        elif flag == "-b":
            if attached != "m":
                raise UsageError(
                    f"sendmail: mode {arg} is not supported; only -bm (send mail). "
                    "Use 'chroot-helper mailq' to list the queue."
                )
        elif flag == "-o" or arg in ("-U", "-n", "-m", "-s"):
            continue  # sendmail options that make no difference here (-oem, -odb, -oQ...)
        else:
            raise UsageError(f"sendmail: unknown option {arg}\n{USAGE}")
    split: list[str] = []
    for item in recipients:
        split.extend(_split_recipients(item))
    return SendmailArgs(recipients=tuple(split), **values)  # type: ignore[arg-type]


def _split_recipients(text: str) -> list[str]:
    if any(c in text for c in "\r\n\0"):
        return [text]  # refused later, as an injection attempt
    if "," not in text and "<" not in text:
        return [text.strip()] if text.strip() else []
    return [addr for _name, addr in email.utils.getaddresses([text]) if addr]


def read_message(stream: BinaryIO, *, ignore_dots: bool) -> bytes:
    """The message from ``stream``; without ``ignore_dots`` a line ``.`` ends it."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def _from_header(name: str | None, sender: str) -> bytes:
    if not name:
        return f"From: <{sender}>\r\n".encode()
    if name.isascii():
        display = email.utils.formataddr((name, sender))
    else:
        display = email.utils.formataddr((str(email.header.Header(name, "utf-8")), sender))
    return f"From: {display}\r\n".encode()


def build_submission(args: SendmailArgs, raw: bytes) -> Submission:
    """Envelope and final bytes for ``raw`` (as read from stdin) under ``args``.

    :raises DataError: an address carries CR/LF/NUL or is not an address, the ``-F`` name
        carries CR/LF, or no sender/recipient can be found.
    :raises UsageError: no recipients (neither operands nor ``-t``).
    """
    data = normalize_eols(raw)
    if args.full_name is not None and any(c in args.full_name for c in "\r\n\0"):
        raise DataError("sendmail: -F name contains CR, LF or NUL (header injection?)")
    recipients = list(args.recipients)
    if args.extract:
        try:
            recipients.extend(header_addresses(data, ("to", "cc", "bcc")))
        except ValueError as exc:
            raise DataError(f"sendmail: -t: {exc}") from None
        data = strip_headers(data, ("bcc",))
    elif not recipients:
        raise UsageError(f"sendmail: no recipients given (pass them, or -t)\n{USAGE}")
    if not recipients:
        raise DataError("sendmail: -t found no addresses in To:, Cc: or Bcc:")
    for address in recipients:
        problem = bad_envelope_address(address)
        if problem is not None:
            raise DataError(f"sendmail: {problem}")
    sender = args.sender
    if sender is None:
        try:
            found = header_addresses(data, ("from",))
        except ValueError as exc:
            raise DataError(f"sendmail: {exc}; pass -f ADDR") from None
        if not found:
            raise DataError("sendmail: no sender; pass -f ADDR or give the message a From: header")
        sender = found[0]
    if sender in ("", "<>"):  # the null sender of auto-replies: -f '<>'
        sender = ""
        if header_value(data, "from") is None:
            raise DataError("sendmail: a message with the null sender (-f '<>') needs a From:")
    problem = bad_envelope_address(sender) if sender else None
    if problem is not None:
        raise DataError(f"sendmail: {problem}")
    if header_value(data, "from") is None:
        header, rest = split_header(data)
        data = _from_header(args.full_name, sender) + header + (rest or b"\r\n")
    unique = tuple(dict.fromkeys(recipients))
    return Submission(sender=sender, recipients=unique, data=data)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run ``sendmail ARGV``; returns the sysexits code.

    :param stdin: the message source (default: ``sys.stdin.buffer``).
    :param environ: for ``CHROOT_HELPER_SMTP`` (default: ``os.environ``).
    """
    err = stderr if stderr is not None else sys.stderr
    env = environ if environ is not None else os.environ
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        raw = read_message(
            stdin if stdin is not None else sys.stdin.buffer, ignore_dots=args.ignore_dots
        )
        submission = build_submission(args, raw)
    except UsageError as exc:
        print(exc, file=err)
        return EX_USAGE
    except DataError as exc:
        print(exc, file=err)
        return EX_DATAERR
    except OSError as exc:
        print(f"sendmail: cannot read the message: {exc}", file=err)
        return EX_NOINPUT
    try:
        with contextlib.redirect_stderr(err):
            smtp = connect(env.get("CHROOT_HELPER_SMTP"))
            if args.verbose:
                smtp.set_debuglevel(1)
            try:
                queue_id = submit(
                    smtp,
                    sender=submission.sender,
                    recipients=submission.recipients,
                    data=submission.data,
                )
            finally:
                with contextlib.suppress(Exception):
                    smtp.quit()
                smtp.close()
    except SubmitError as exc:
        print(f"sendmail: {exc}", file=err)
        return exc.exit_code
    if args.verbose:
        print(f"sendmail: queued as {queue_id}", file=err)
    return EX_OK

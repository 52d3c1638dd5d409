"""Submit a message to the mail service from Python code in the jail.  Standard library only.

The service address comes from ``address=`` or ``$CHROOT_HELPER_SMTP``: ``host:port``,
``[::1]:port`` or ``unix:/run/smtp.sock``; the default is ``127.0.0.1:25``.  Plain
``smtplib.SMTP("127.0.0.1")`` works as well; this function adds the envelope defaults of
``sendmail -t`` and all-or-nothing recipients (if one is refused, nothing is sent).

Example::

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.org", "you@example.org", "Hi"
    msg.set_content("hello")
    queue_id = client_sendmail(msg)

Do not use it where the message must not wait: it returns once the message is queued, not
delivered.
"""

from __future__ import annotations

import email.message
import email.policy
import os
import smtplib
import socket
from collections.abc import Sequence

from ...errors import SubmitError
from .message import bad_envelope_address, header_addresses, normalize_eols, strip_headers

__all__ = ["DEFAULT_ADDRESS", "ENV_ADDRESS", "client_sendmail", "connect", "exit_code_for"]

DEFAULT_ADDRESS = "127.0.0.1:25"
ENV_ADDRESS = "CHROOT_HELPER_SMTP"

EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77


class _UnixSMTP(smtplib.SMTP):
    """smtplib over a Unix stream socket."""

    def __init__(self, path: str, *, timeout: float, local_hostname: str) -> None:
        self._path = path
        super().__init__(timeout=timeout, local_hostname=local_hostname)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        return sock


def connect(address: str | None = None, *, timeout: float = 60.0) -> smtplib.SMTP:
    """An :class:`smtplib.SMTP` connected to the service (greeting read).

    :raises SubmitError: the service is unreachable (``exit_code`` EX_TEMPFAIL).
    """
    where = address or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS
    local = socket.gethostname() or "localhost"  # never a DNS lookup: the jail may have none
    try:
        if where.startswith("unix:"):
            smtp: smtplib.SMTP = _UnixSMTP(where[5:], timeout=timeout, local_hostname=local)
            smtp.connect("localhost")
            return smtp
        host, _, port = where.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise SubmitError(
                f"{ENV_ADDRESS} = {where!r}: expected host:port, [::1]:port or unix:/path",
                exit_code=78,
            )
        return smtplib.SMTP(host, int(port), timeout=timeout, local_hostname=local)
    except (OSError, smtplib.SMTPException) as exc:
        raise SubmitError(
            f"cannot reach the mail service at {where} ({exc}); is chroot-helper running, "
            f"and does {ENV_ADDRESS} point at its mail.listen?",
            exit_code=EX_TEMPFAIL,
        ) from None


def exit_code_for(code: int, text: str) -> int:
    """sysexits(3) code for an SMTP refusal ``code`` with reply ``text``."""
    if code < 500:
        return EX_TEMPFAIL
    enhanced = text.split(" ", 1)[0]
    if enhanced.startswith("5.7"):
        return EX_NOPERM
    if enhanced.startswith(("5.6", "5.3.4", "5.1.3")) or code == 552:
        return EX_DATAERR
    if enhanced.startswith("5.1"):
        return EX_NOUSER
    return EX_UNAVAILABLE


def _refused(what: str, code: int, message: bytes | str) -> SubmitError:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return SubmitError(f"{what}: {code} {text}", code=code, exit_code=exit_code_for(code, text))


def _as_bytes(message: email.message.Message | bytes) -> bytes:
    if isinstance(message, bytes | bytearray):
        return normalize_eols(bytes(message))
    policy = message.policy.clone(linesep="\r\n")
    return message.as_bytes(policy=policy)


def submit(smtp: smtplib.SMTP, *, sender: str, recipients: Sequence[str], data: bytes) -> str:
    """One transaction on an open connection; all recipients or none.

    :returns: the queue ID from the ``250`` reply.
    :raises SubmitError: a refusal, with its SMTP code and the matching sysexits code.
    """
    try:
        smtp.ehlo_or_helo_if_needed()
        options = []
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            options.append("SMTPUTF8")
        if not data.isascii() and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.has_extn("size"):
            options.append(f"SIZE={len(data)}")
        code, message = smtp.mail(sender, options)
        if code != 250:
            raise _refused(f"sender <{sender}> refused", code, message)
        for rcpt in recipients:
            code, message = smtp.rcpt(rcpt)
            if code not in (250, 251):
                smtp.rset()
                raise _refused(f"recipient <{rcpt}> refused; nothing was sent", code, message)
        code, message = smtp.data(data)
        if code != 250:
            raise _refused("message refused", code, message)
    except smtplib.SMTPResponseException as exc:
        raise _refused("message refused", exc.smtp_code, exc.smtp_error) from None
    except (OSError, smtplib.SMTPException) as exc:
        raise SubmitError(
            f"connection to the mail service failed ({exc}); the message may not be queued",
            exit_code=EX_TEMPFAIL,
        ) from None
    text = message.decode("utf-8", "replace")
    return text.rsplit(" ", 1)[-1] if "queued as" in text else ""


def client_sendmail(
    message: email.message.Message | bytes,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    address: str | None = None,
    timeout: float = 60.0,
) -> str:
    """Queue ``message`` with the mail service.

    :param message: an :class:`email.message.EmailMessage` (or legacy ``Message``), or bytes;
        line ends are made CRLF and any ``Bcc:`` header is removed before sending.
    :param sender: envelope sender; default: the address in ``From:``; ``""`` or ``"<>"`` for the
        null sender (auto-replies).
    :param recipients: envelope recipients; default: the addresses in ``To:``, ``Cc:``, ``Bcc:``.
    :param address: the service (``host:port`` or ``unix:PATH``); default ``$CHROOT_HELPER_SMTP``
        or ``127.0.0.1:25``.
    :returns: the queue ID.
    :raises ValueError: no sender or recipients could be found, or one contains CR/LF
        (refused, never repaired: that is how headers get injected).
    :raises SubmitError: the service refused the message or could not be reached.
    """
    data = _as_bytes(message)
    if sender is None:
        found = header_addresses(data, ("from",))
        if not found:
            raise ValueError("no sender: pass sender= or give the message a From: header")
        sender = found[0]
    if recipients is None:
        recipients = header_addresses(data, ("to", "cc", "bcc"))
    elif isinstance(recipients, str):
        recipients = [recipients]
    if not recipients:
        raise ValueError("no recipients: pass recipients= or give the message To:/Cc:/Bcc:")
    if sender == "<>":
        sender = ""  # the null sender of auto-replies and delivery reports
    for address_text in (sender, *recipients) if sender else recipients:
        problem = bad_envelope_address(address_text)
        if problem is not None:
            raise ValueError(f"envelope address {problem}")
    data = strip_headers(data, ("bcc",))
    smtp = connect(address, timeout=timeout)
    try:
        return submit(smtp, sender=sender, recipients=list(recipients), data=data)
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()

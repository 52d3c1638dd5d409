"""Transports that hand a queued message on: an SMTP smarthost or the host's sendmail binary.

Both run with the helper's own privileges, outside the jail, and report one
:class:`RecipientResult` per recipient so the queue runner can finish some recipients and
retry others.  Nothing here touches the spool.

Temporary versus permanent follows the usual rules: SMTP 4xx and connection problems are
temporary, 5xx permanent; sendmail exit codes follow sysexits(3) as Postfix maps them
(``EX_TEMPFAIL``, ``EX_OSERR`` and death by signal are temporary, the other ``EX_*`` codes
permanent).

Example::

    transport = make_transport(config)
    results = await transport.deliver(envelope, ["a@example.org"], data)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import smtplib
import ssl
from collections.abc import Sequence
from typing import Protocol

from .config import MailConfig, SendmailRelay, SmtpRelay
from .spool import Envelope

__all__ = [
    "RecipientResult",
    "SendmailTransport",
    "SmtpTransport",
    "Transport",
    "make_transport",
    "sendmail_exit_status",
]

log = logging.getLogger(__name__)

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_OSFILE = 72
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78

# (dsn, permanent, text) per exit code, as Postfix's sys_exits table.
_SYSEXITS: dict[int, tuple[str, bool, str]] = {
    EX_USAGE: ("5.3.0", True, "command line usage error"),
    EX_DATAERR: ("5.6.0", True, "data format error"),
    EX_NOINPUT: ("5.3.0", True, "cannot open input"),
    EX_NOUSER: ("5.1.1", True, "user unknown"),
    EX_NOHOST: ("5.1.2", True, "host name unknown"),
    EX_UNAVAILABLE: ("5.3.0", True, "service unavailable"),
    EX_SOFTWARE: ("5.3.0", True, "internal software error"),
    EX_OSERR: ("4.3.0", False, "system resource problem"),
    EX_OSFILE: ("5.3.0", True, "critical OS file missing"),
    EX_CANTCREAT: ("5.2.0", True, "can't create user output file"),
    EX_IOERR: ("5.3.0", True, "input/output error"),
    EX_TEMPFAIL: ("4.3.0", False, "temporary failure"),
    EX_PROTOCOL: ("5.5.0", True, "remote error in protocol"),
    EX_NOPERM: ("5.7.0", True, "permission denied"),
    EX_CONFIG: ("5.3.5", True, "local configuration error"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecipientResult:
    """The outcome of one delivery attempt for one recipient.

    :param recipient: the envelope recipient.
    :param ok: delivered (handed to the relay, which acknowledged it).
    :param permanent: for a failure: do not retry (bounce now).
    :param reply: the relay's reply or the error, for logs, ``mailq`` and bounces.
    :param dsn: an RFC 3463 status such as ``2.0.0`` or ``4.4.1``.
    """

    recipient: str
    ok: bool
    permanent: bool = False
    reply: str
    dsn: str


class Transport(Protocol):
    """Something that delivers a message to some of its recipients."""

    description: str

    async def deliver(
        self, envelope: Envelope, recipients: Sequence[str], data: bytes
    ) -> list[RecipientResult]:
        """Try once; return one result per recipient in ``recipients``."""
        ...


def _dsn_for(code: int) -> str:
    return f"{code // 100}.0.0" if code // 100 in (2, 4, 5) else "4.0.0"


def _reply(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return f"{code} {' '.join(text.split())}"[:500]


class SmtpTransport:
    """Deliver to a smarthost with :mod:`smtplib` in a worker thread.

    :param relay: host, port, STARTTLS requirement and credentials file.
    :param timeout: seconds for each network operation.
    :param local_hostname: the name sent in EHLO.
    """

    def __init__(self, relay: SmtpRelay, *, timeout: float, local_hostname: str) -> None:
        self.relay = relay
        self.timeout = timeout
        self.local_hostname = local_hostname
        self.description = f"{relay.host}[{relay.host}]:{relay.port}"

    async def deliver(
        self, envelope: Envelope, recipients: Sequence[str], data: bytes
    ) -> list[RecipientResult]:
        return await asyncio.to_thread(self._deliver, envelope, list(recipients), data)

    def _credentials(self) -> tuple[str, str] | None:
        if self.relay.auth_file is None:
            return None
        user, _, password = self.relay.auth_file.read_text(encoding="utf-8").strip().partition(":")
        return user, password

    def _deliver(
        self, envelope: Envelope, recipients: list[str], data: bytes
    ) -> list[RecipientResult]:
        results: dict[str, RecipientResult] = {}

        def fail_rest(reply: str, *, permanent: bool, dsn: str) -> list[RecipientResult]:
            for rcpt in recipients:
                results.setdefault(
                    rcpt,
                    RecipientResult(
                        recipient=rcpt, ok=False, permanent=permanent, reply=reply, dsn=dsn
                    ),
                )
            return [results[r] for r in recipients]

        try:
            smtp = smtplib.SMTP(
                self.relay.host,
                self.relay.port,
                timeout=self.timeout,
                local_hostname=self.local_hostname,
            )
        except (OSError, smtplib.SMTPException) as exc:
            return fail_rest(f"connect to {self.description}: {exc}", permanent=False, dsn="4.4.1")
        try:
            smtp.ehlo_or_helo_if_needed()
            if self.relay.starttls:
                if not smtp.has_extn("starttls"):
                    return fail_rest(
                        f"{self.description} does not offer STARTTLS (mail.relay_starttls)",
                        permanent=False,
                        dsn="4.7.0",
                    )
                ca_file = self.relay.ca_file
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                smtp.starttls(context=context)
                smtp.ehlo()
            credentials = self._credentials()
            if credentials is not None:
                smtp.login(*credentials)
            options = []
            if envelope.eightbit and smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if envelope.smtputf8:
                if not smtp.has_extn("smtputf8"):
                    return fail_rest(
                        f"{self.description} does not support SMTPUTF8",
                        permanent=True,
                        dsn="5.6.7",
                    )
                options.append("SMTPUTF8")
            code, message = smtp.mail(envelope.sender, options)
            if code != 250:
                smtp.rset()
                return fail_rest(_reply(code, message), permanent=code >= 500, dsn=_dsn_for(code))
            accepted = []
            for rcpt in recipients:
                code, message = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    results[rcpt] = RecipientResult(
                        recipient=rcpt,
                        ok=False,
                        permanent=code >= 500,
                        reply=_reply(code, message),
                        dsn=_dsn_for(code),
                    )
            if not accepted:
                smtp.rset()
                return [results[r] for r in recipients]
            code, message = smtp.data(data)
            for rcpt in accepted:
                results[rcpt] = RecipientResult(
                    recipient=rcpt,
                    ok=code == 250,
                    permanent=code >= 500,
                    reply=_reply(code, message),
                    dsn=_dsn_for(code),
                )
            return [results[r] for r in recipients]
        except smtplib.SMTPResponseException as exc:
            code = exc.smtp_code
            return fail_rest(
                _reply(code, exc.smtp_error), permanent=code >= 500, dsn=_dsn_for(code)
            )
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            return fail_rest(
                f"conversation with {self.description}: {exc}", permanent=False, dsn="4.4.2"
            )
        finally:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
            smtp.close()


def sendmail_exit_status(returncode: int) -> tuple[bool, bool, str, str]:
    """Map a sendmail exit status to ``(ok, permanent, dsn, text)`` per sysexits(3)."""
    if returncode == EX_OK:
        return True, False, "2.0.0", "delivered"
    if returncode < 0:
        return False, False, "4.3.0", f"killed by signal {-returncode}"
    dsn, permanent, text = _SYSEXITS.get(returncode, ("4.3.0", False, "unknown exit status"))
    return False, permanent, dsn, f"{text} (exit status {returncode})"


class SendmailTransport:
    """Pipe the message into ``PATH -i -f SENDER -- RCPTS`` (LF line ends, as sendmail expects).

    :param relay: the binary.
    :param timeout: seconds before the child is killed (a temporary failure).
    """

    def __init__(self, relay: SendmailRelay, *, timeout: float) -> None:
        self.relay = relay
        self.timeout = timeout
        self.description = f"sendmail:{relay.path}"

    async def deliver(
        self, envelope: Envelope, recipients: Sequence[str], data: bytes
    ) -> list[RecipientResult]:
        argv = [str(self.relay.path), "-i", "-f", envelope.sender or "<>", "--", *recipients]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        except OSError as exc:
            return self._all(recipients, False, False, "4.3.0", f"cannot run {argv[0]}: {exc}")
        try:
            _out, err = await asyncio.wait_for(
                proc.communicate(data.replace(b"\r\n", b"\n")), self.timeout
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return self._all(
                recipients, False, False, "4.4.7", f"{argv[0]} timed out after {self.timeout:g}s"
            )
        except (BrokenPipeError, ConnectionResetError):
            await proc.wait()
            err = b""
        assert proc.returncode is not None
        ok, permanent, dsn, text = sendmail_exit_status(proc.returncode)
        detail = " ".join(err.decode("utf-8", "replace").split())[:300]
        return self._all(recipients, ok, permanent, dsn, f"{text}: {detail}" if detail else text)

    @staticmethod
    def _all(
        recipients: Sequence[str], ok: bool, permanent: bool, dsn: str, reply: str
    ) -> list[RecipientResult]:
        return [
            RecipientResult(recipient=r, ok=ok, permanent=permanent, reply=reply, dsn=dsn)
            for r in recipients
        ]


def make_transport(config: MailConfig) -> Transport | None:
    """The transport ``mail.relay`` names, or ``None`` when nothing should be delivered."""
    relay = config.relay
    if isinstance(relay, SmtpRelay):
        return SmtpTransport(relay, timeout=config.relay_timeout, local_hostname=config.hostname)
    if isinstance(relay, SendmailRelay):
        return SendmailTransport(relay, timeout=config.relay_timeout)
    return None

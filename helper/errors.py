"""Errors raised by chroot-helper.

::

    HelperError
    ├── ConfigError          the TOML configuration is invalid (raised at start, never mid-request)
    ├── DnsError             the DNS service failed
    │   ├── ListenError          dns.listen could not be bound (raised at start)
    │   └── UpstreamError        no upstream gave a usable answer (the client gets SERVFAIL)
    ├── MailError            the mail service failed
    │   ├── MailListenError      a mail.listen address could not be bound (raised at start)
    │   ├── SpoolError           the spool directory is unusable or a queue file is corrupt
    │   └── SubmitError          a submission was refused or could not reach the service
    ├── ProtocolError        a frame broke the wire protocol
    │   ├── LocalProtocolError   we were about to send something invalid
    │   └── RemoteProtocolError  the peer sent something invalid
    └── RequestError         a well-formed request was refused or failed; travels as an Error frame
        ├── PeerRefusedError     the peer's uid/gid or token is not allowed
        ├── BusyError            a concurrency limit is reached; retry later
        └── CommandError         the command or its arguments are not allowed, or exec failed

A :class:`RequestError` carries a short machine-readable :attr:`~RequestError.code` so the client
can rebuild the same class from an Error frame (see :func:`error_from_code`).
"""

from __future__ import annotations


class HelperError(Exception):
    """Base class of every error chroot-helper raises on purpose."""


class ConfigError(HelperError):
    """The configuration is invalid; the message names the key, the value and the fix."""


class DnsError(HelperError):
    """The DNS service failed."""


class ListenError(DnsError):
    """The DNS service could not bind its listen address; the message says what to change."""


class UpstreamError(DnsError):
    """An upstream timed out, refused, or sent an answer that does not match the question."""


class MailError(HelperError):
    """The mail service failed."""


class MailListenError(MailError):
    """A ``mail.listen`` address could not be bound; the message says what to change."""


class SpoolError(MailError):
    """The spool directory cannot be used, or a queue file in it is unreadable or corrupt."""


class SubmitError(MailError):
    """A message could not be submitted (refused by the service, or the service is unreachable).

    :param code: the SMTP reply code (0 when the service was not reached).
    :param text: the reply text or the connection error.
    :param exit_code: the sysexits(3) code a sendmail(1) front end exits with.
    """

    def __init__(self, message: str, *, code: int = 0, exit_code: int = 75) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


class ProtocolError(HelperError):
    """A frame violated the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class RequestError(HelperError):
    """The helper refused or could not carry out a request.

    Raised in the daemon by services; sent to the client as an Error frame and raised there again.
    """

    code = "request"


class PeerRefusedError(RequestError):
    """The connecting peer is not allowed: uid/gid not in the allowlist, or a wrong TCP token."""

    code = "refused"


class BusyError(RequestError):
    """A per-peer or global concurrency limit is reached; the message names the limit's key."""

    code = "busy"


class CommandError(RequestError):
    """The command is not configured, its arguments are not allowed, or it could not be started."""

    code = "command"


_BY_CODE: dict[str, type[HelperError]] = {
    "protocol": RemoteProtocolError,
    RequestError.code: RequestError,
    PeerRefusedError.code: PeerRefusedError,
    BusyError.code: BusyError,
    CommandError.code: CommandError,
}


def error_code(exc: HelperError) -> str:
    """Return the wire code for *exc* (``"protocol"`` for protocol errors)."""
    if isinstance(exc, RequestError):
        return exc.code
    if isinstance(exc, ProtocolError):
        return "protocol"
    return RequestError.code


def error_from_code(code: str, message: str) -> HelperError:
    """Rebuild the error an Error frame describes; unknown codes give a plain :class:`RequestError`.

    A ``"protocol"`` error reported by the other side means *we* broke the protocol, so it becomes a
    :class:`LocalProtocolError` here.
    """
    if code == "protocol":
        return LocalProtocolError(message)
    return _BY_CODE.get(code, RequestError)(message)

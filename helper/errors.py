"""Errors raised by chroot-helper.

::

    HelperError
    ├── ConfigError          the TOML configuration is invalid (raised at start, never mid-request)
    ├── DnsError             the DNS service failed
    │   ├── ListenError          dns.listen could not be bound (raised at start)
    │   └── UpstreamError        no upstream gave a usable answer (the client gets SERVFAIL)
    └── ProtocolError        a frame broke the wire protocol
        ├── LocalProtocolError   we were about to send something invalid
        └── RemoteProtocolError  the peer sent something invalid
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


class ProtocolError(HelperError):
    """A frame violated the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""

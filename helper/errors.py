"""Errors raised by chroot-helper.

::

    HelperError
    ├── ConfigError          the TOML configuration is invalid (raised at start, never mid-request)
    └── ProtocolError        a frame broke the wire protocol
        ├── LocalProtocolError   we were about to send something invalid
        └── RemoteProtocolError  the peer sent something invalid
"""

from __future__ import annotations


class HelperError(Exception):
    """Base class of every error chroot-helper raises on purpose."""


class ConfigError(HelperError):
    """The configuration is invalid; the message names the key, the value and the fix."""


class ProtocolError(HelperError):
    """A frame violated the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""

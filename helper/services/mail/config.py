"""The ``[mail]`` table of the helper's TOML configuration, validated into a :class:`MailConfig`.

Validation happens once, at start; a bad value raises :class:`~chroot_helper.errors.ConfigError`
naming the key, the value and what to change.  Nothing here opens sockets.

Example::

    >>> cfg = parse_config({"listen": ["127.0.0.1:2525"], "domain": "example.org",
    ...                     "relay": "smtp://127.0.0.1:2526"})
    >>> cfg.allowed_senders
    ('*@example.org',)

Every key and its default::

    [mail]
    listen = ["127.0.0.1:25"]          # "host:port" (loopback only) or "unix:/path/smtp.sock"
    spool = "/var/spool/chroot-helper" # queue directory, created 0700
    relay = ""                         # "smtp://host:port" or "sendmail:/usr/sbin/sendmail";
                                       # "" keeps every message queued (nothing is delivered)
    relay_starttls = false             # smtp relay: require STARTTLS before MAIL
    relay_ca_file = ""                 # smtp relay: PEM CA for its certificate (default: system)
    relay_auth_file = ""               # smtp relay: "user:password" file, mode 0600/0400
    relay_timeout = 60                 # seconds for one relay conversation step
    domain = ""                        # the site's mail domain; "" = this host's FQDN
    hostname = ""                      # name in the greeting and Received:; "" = FQDN
    allowed_senders = []               # fnmatch patterns; [] = ["*@" + domain]
    max_size = "10M"                   # message size limit (bytes, or K/M/G suffix)
    max_recipients = 100               # per message; more get 452
    max_connections = 100              # simultaneous SMTP clients over all listeners
    max_per_client = 20                # simultaneous SMTP clients of one uid (or address)
    rate_limit = 0                     # messages per minute per peer (IP or uid); 0 = off
    unix_mode = "0666"                 # permission bits of the Unix sockets
    smtp_timeout = 60                  # seconds a client may stay silent
    retry_initial = 60                 # first retry after a temporary failure, seconds
    retry_max = 3600                   # backoff cap, seconds
    max_age = "5d"                     # give up after this long (s, m, h, d suffix)
    bounce = true                      # tell the sender when a message is given up
    concurrency = 4                    # deliveries in parallel
    flush_check = 1.0                  # seconds between checks for a `flush` request
    workers = 1                        # processes accepting submissions (standalone run only)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ...errors import ConfigError

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_SPOOL",
    "MailConfig",
    "SendmailRelay",
    "SmtpRelay",
    "TcpAddress",
    "UnixAddress",
    "parse_address",
    "parse_config",
    "parse_duration",
    "parse_size",
]

DEFAULT_LISTEN = "127.0.0.1:25"
DEFAULT_SPOOL = "/var/spool/chroot-helper"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TcpAddress:
    """A loopback IP address and port to listen on (port 0 picks a free one).

    :param host: a literal IPv4 or IPv6 address.
    :param port: 0-65535.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnixAddress:
    """A Unix stream socket path, typically inside the jail (``/srv/jail/run/smtp.sock``).

    :param path: absolute path; its directory must exist.
    """

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


ListenAddress = TcpAddress | UnixAddress


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmtpRelay:
    """Deliver to an SMTP smarthost.

    :param host: host name or address.
    :param port: TCP port.
    :param starttls: refuse to send unless the relay accepts STARTTLS.
    :param auth_file: a file holding ``user:password``; it must not be readable by group or
        others, since it holds a credential.
    :param ca_file: PEM certificates that the relay's STARTTLS certificate must chain to
        (a private CA); ``None`` uses the system's CA store.
    """

    host: str
    port: int
    starttls: bool = False
    auth_file: Path | None = None
    ca_file: Path | None = None

    def __str__(self) -> str:
        return f"smtp://{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SendmailRelay:
    """Deliver by running the host's sendmail binary: ``PATH -i -f SENDER -- RCPTS``.

    :param path: absolute path of an executable.
    """

    path: Path

    def __str__(self) -> str:
        return f"sendmail:{self.path}"


Relay = SmtpRelay | SendmailRelay


@dataclasses.dataclass(frozen=True, kw_only=True)
class MailConfig:
    """Validated settings of the mail service; see the module docstring for keys and defaults.

    :param listen: where submissions are accepted.  TCP addresses must be loopback: the service
        accepts mail from anyone who reaches it.
    :param spool: the queue directory; only the helper may read it (messages are private).
    :param relay: the transport, or ``None`` to keep everything queued.
    :param allowed_senders: envelope senders accepted, as case-insensitive fnmatch patterns.
        The default allows only the site domain, so a compromised app cannot forge other
        domains through this host.
    :param max_size: bytes; announced with SIZE and enforced during DATA.
    :param max_per_client: connections at once from one client: a uid (Unix sockets, and
        loopback TCP, whose socket owner the kernel names) or else an address.  Keeps one app
        that holds idle connections from using up ``max_connections`` for every other one.
    :param rate_limit: messages per minute per peer; 0 disables.
    :param max_age: seconds after which an undeliverable message is given up (and bounced).
    :param workers: processes sharing the listening sockets (``python -m
        chroot_helper.services.mail`` forks them); all but the first only accept and spool, and
        hand queue IDs to the first, which runs the queue.  The helper core runs one.
    """

    listen: tuple[ListenAddress, ...] = (TcpAddress(host="127.0.0.1", port=25),)
    spool: Path = Path(DEFAULT_SPOOL)
    relay: Relay | None = None
    relay_timeout: float = 60.0
    domain: str
    hostname: str
    allowed_senders: tuple[str, ...]
    max_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 100
    max_per_client: int = 20
    rate_limit: int = 0
    unix_mode: int = 0o666
    smtp_timeout: float = 60.0
    retry_initial: float = 60.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    bounce: bool = True
    concurrency: int = 4
    flush_check: float = 1.0
    workers: int = 1

    def sender_allowed(self, address: str) -> bool:
        """True when ``address`` matches one of :attr:`allowed_senders`."""
        lowered = address.lower()
        return any(fnmatch.fnmatchcase(lowered, p) for p in self.allowed_senders)


def _key(name: str) -> str:
    return f"mail.{name}"


def parse_address(text: str, *, key: str) -> ListenAddress:
    """Parse ``"127.0.0.1:25"``, ``"[::1]:25"`` or ``"unix:/path"``.

    :raises ConfigError: naming ``key`` when ``text`` is neither.
    """
    if text.startswith("unix:"):
        path = Path(text[5:])
        if not path.is_absolute():
            raise ConfigError(f"{key} = {text!r}: write an absolute path, 'unix:/srv/jail/...'")
        if not path.parent.is_dir():
            raise ConfigError(
                f"{key} = {text!r}: directory {str(path.parent)!r} does not exist; create it"
            )
        return UnixAddress(path=path)
    host, port_text = _split_host_port(text, key=key, example="'127.0.0.1:25'")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{key} = {text!r}: {host!r} is not an IP address; write '127.0.0.1:25', "
            "'[::1]:25' or 'unix:/path/smtp.sock'"
        ) from None
    if not address.is_loopback:
        raise ConfigError(
            f"{key} = {text!r}: the submission service accepts mail from anyone who reaches "
            "it; use a loopback address (127.0.0.0/8 or ::1) or a Unix socket"
        )
    return TcpAddress(host=address.compressed, port=_port(port_text, text, key, allow_zero=True))


def _split_host_port(text: str, *, key: str, example: str) -> tuple[str, str]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ConfigError(f"{key} = {text!r}: write an IPv6 address as '[::1]:25'")
        return text[1:end], text[end + 2 :]
    if text.count(":") != 1:
        raise ConfigError(f"{key} = {text!r}: expected host:port, e.g. {example}")
    host, port = text.split(":")
    return host, port


def _port(port_text: str, text: str, key: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not port_text.isdigit() or not low <= int(port_text) < 65536:
        raise ConfigError(f"{key} = {text!r}: the port must be a number from {low} to 65535")
    return int(port_text)


def parse_relay(text: str, *, key: str = "mail.relay") -> Relay | None:
    """Parse ``"smtp://host:port"``, ``"sendmail:/usr/sbin/sendmail"`` or ``""`` (no relay)."""
    if not text:
        return None
    if text.startswith("sendmail:"):
        path = Path(text[len("sendmail:") :])
        if not path.is_absolute():
            raise ConfigError(f"{key} = {text!r}: write 'sendmail:/usr/sbin/sendmail'")
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(
                f"{key} = {text!r}: {str(path)!r} is not an executable file; install a "
                "sendmail-compatible MTA or relay through 'smtp://host:port'"
            )
        return SendmailRelay(path=path)
    if text.startswith("smtp://"):
        rest = text[len("smtp://") :].rstrip("/")
        if (rest.startswith("[") and rest.endswith("]")) or ":" not in rest:
            rest += ":25"
        host, port_text = _split_host_port(rest, key=key, example="'smtp://127.0.0.1:2525'")
        if not host or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
            raise ConfigError(f"{key} = {text!r}: {host!r} is not a host name or address")
        return SmtpRelay(host=host, port=_port(port_text, text, key))
    raise ConfigError(
        f"{key} = {text!r}: expected 'smtp://host:port', 'sendmail:/usr/sbin/sendmail' or ''"
    )


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(value: object, *, key: str = "mail.max_size") -> int:
    """Parse ``10485760``, ``"512K"``, ``"10M"`` or ``"1G"`` into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)[Bb]?\s*", value)
        if not match:
            raise ConfigError(f"{key} = {value!r}: expected bytes such as 10485760, '512K', '10M'")
        number = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    else:
        raise ConfigError(f"{key} = {value!r}: expected bytes such as 10485760, '512K', '10M'")
    if not 1024 <= number <= 1024**3:
        raise ConfigError(f"{key} = {value!r}: expected a size from 1K to 1G")
    return number


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, *, key: str) -> float:
    """Parse ``30``, ``2.5``, ``"90s"``, ``"15m"``, ``"4h"`` or ``"5d"`` into seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
        if not match:
            raise ConfigError(f"{key} = {value!r}: expected seconds or '90s', '15m', '4h', '5d'")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ConfigError(f"{key} = {value!r}: expected seconds or '90s', '15m', '4h', '5d'")
    if seconds < 0:
        raise ConfigError(f"{key} = {value!r}: must not be negative")
    return seconds


def _strings(table: Mapping[str, object], name: str) -> list[str] | None:
    if name not in table:
        return None
    value = table[name]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise ConfigError(f'{_key(name)} = {value!r}: expected a list of strings, e.g. ["x"]')
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{_key(name)} = {value!r}: every entry must be a string")
        out.append(item)
    return out


def _typed(table: Mapping[str, object], name: str, kind: type, hint: str) -> object:
    value = table[name]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConfigError(f"{_key(name)} = {value!r}: expected {hint}")
    return value


def _domain(name: str, text: str) -> str:
    domain = text.strip().rstrip(".").lower()
    labels = domain.split(".")
    if not domain or any(
        not label or len(label) > 63 or not re.fullmatch(r"[a-z0-9_-]+", label) for label in labels
    ):
        raise ConfigError(f"{_key(name)} = {text!r}: expected a domain name such as 'example.org'")
    return domain


def _sender_pattern(text: str) -> str:
    pattern = text.strip().lower()
    if "@" not in pattern or any(c in pattern for c in " \t\r\n\0<>"):
        raise ConfigError(
            f"mail.allowed_senders entry {text!r}: expected an address pattern such as "
            "'*@example.org', 'noreply@example.org' or '*@*.example.org'"
        )
    return pattern


def _file_key(
    table: Mapping[str, object], key: str, expected: str, check: Callable[[Path], None]
) -> Path | None:
    """The path in ``mail.KEY``, passed through *check*; ``None`` when unset or empty."""
    if not table.get(key):
        return None
    text = _typed(table, key, str, expected)
    assert isinstance(text, str)
    path = Path(text)
    check(path)
    return path


def _check_ca_file(path: Path) -> None:
    """Load *path* as PEM CA certificates now, so a bad file fails at start, not per message."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"mail.relay_ca_file = {str(path)!r}: cannot load it as PEM certificates ({exc}); "
            "point it at the CA certificate that signed the relay's certificate"
        ) from None


def _check_auth_file(path: Path) -> None:
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"mail.relay_auth_file = {str(path)!r}: cannot read it ({exc.strerror})"
        ) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"mail.relay_auth_file = {str(path)!r}: mode {stat.filemode(info.st_mode)} lets "
            f"others read the relay password; chmod 600 {path}"
        )
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"mail.relay_auth_file = {str(path)!r}: owned by uid {info.st_uid}, not by the "
            f"helper (uid {os.geteuid()}); chown it to the helper's user"
        )
    text = path.read_text(encoding="utf-8").strip()
    if ":" not in text or not text.split(":", 1)[0]:
        raise ConfigError(
            f"mail.relay_auth_file = {str(path)!r}: expected one line 'user:password'"
        )


_KNOWN = frozenset(
    {
        "listen",
        "spool",
        "relay",
        "relay_starttls",
        "relay_ca_file",
        "relay_auth_file",
        "relay_timeout",
        "domain",
        "hostname",
        "allowed_senders",
        "max_size",
        "max_recipients",
        "max_connections",
        "max_per_client",
        "rate_limit",
        "unix_mode",
        "smtp_timeout",
        "retry_initial",
        "retry_max",
        "max_age",
        "bounce",
        "concurrency",
        "flush_check",
        "workers",
    }
)


def parse_config(table: Mapping[str, object]) -> MailConfig:
    """Validate the ``[mail]`` table of the helper's TOML into a :class:`MailConfig`.

    :raises ConfigError: naming the key (``mail.listen``, ...), the bad value and the fix.
    """
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise ConfigError(
            f"mail.{unknown[0]}: unknown key; the [mail] table takes {', '.join(sorted(_KNOWN))}"
        )
    kwargs: dict[str, object] = {}

    listen_texts = _strings(table, "listen")
    if listen_texts is not None:
        if not listen_texts:
            raise ConfigError('mail.listen = []: give at least one address, e.g. ["127.0.0.1:25"]')
        addresses = tuple(parse_address(t, key="mail.listen") for t in listen_texts)
        if len(set(addresses)) != len(addresses):
            raise ConfigError(f"mail.listen = {listen_texts!r}: an address is listed twice")
        kwargs["listen"] = addresses

    if "spool" in table:
        spool = _typed(table, "spool", str, "an absolute directory path")
        assert isinstance(spool, str)
        if not Path(spool).is_absolute():
            raise ConfigError(f"mail.spool = {spool!r}: expected an absolute directory path")
        kwargs["spool"] = Path(spool)

    relay: Relay | None = None
    if "relay" in table:
        text = _typed(table, "relay", str, "'smtp://host:port' or 'sendmail:/path'")
        assert isinstance(text, str)
        relay = parse_relay(text)
    starttls = False
    if "relay_starttls" in table:
        starttls = bool(_typed(table, "relay_starttls", bool, "true or false"))
    auth_file = _file_key(table, "relay_auth_file", "a file path", _check_auth_file)
    ca_file = _file_key(table, "relay_ca_file", "a PEM file path", _check_ca_file)
    if ca_file is not None and not starttls:
        raise ConfigError(
            f"mail.relay_ca_file = {str(ca_file)!r} has no effect without mail.relay_starttls = "
            "true; set it (the relay's certificate is then checked against this CA)"
        )
    if (starttls or auth_file) and not isinstance(relay, SmtpRelay):
        raise ConfigError(
            "mail.relay_starttls / mail.relay_auth_file apply to an SMTP relay only; set "
            "mail.relay = 'smtp://host:port' or remove them"
        )
    if isinstance(relay, SmtpRelay):
        relay = dataclasses.replace(relay, starttls=starttls, auth_file=auth_file, ca_file=ca_file)
    kwargs["relay"] = relay

    domain = socket.getfqdn().lower()
    if table.get("domain"):
        text = _typed(table, "domain", str, "a domain name such as 'example.org'")
        assert isinstance(text, str)
        domain = _domain("domain", text)
    kwargs["domain"] = domain
    hostname = domain if table.get("domain") else socket.getfqdn()
    if table.get("hostname"):
        text = _typed(table, "hostname", str, "a host name")
        assert isinstance(text, str)
        hostname = _domain("hostname", text)
    kwargs["hostname"] = hostname

    patterns = _strings(table, "allowed_senders")
    kwargs["allowed_senders"] = (
        tuple(_sender_pattern(p) for p in patterns) if patterns else (f"*@{domain}",)
    )

    if "max_size" in table:
        kwargs["max_size"] = parse_size(table["max_size"])
    ints = {
        "max_recipients": (1, 10000),
        "max_connections": (1, 100000),
        "max_per_client": (1, 100000),
        "rate_limit": (0, 1000000),
        "concurrency": (1, 256),
        "workers": (1, 64),
    }
    for name, (low, high) in ints.items():
        if name in table:
            number = _typed(table, name, int, f"an integer from {low} to {high}")
            assert isinstance(number, int)
            if not low <= number <= high:
                raise ConfigError(f"{_key(name)} = {number}: expected an integer {low}-{high}")
            kwargs[name] = number
    if "unix_mode" in table:
        mode_text = _typed(table, "unix_mode", str, "an octal mode string such as '0660'")
        assert isinstance(mode_text, str)
        if not re.fullmatch(r"0?[0-7]{3}", mode_text):
            raise ConfigError(f"mail.unix_mode = {mode_text!r}: expected an octal mode, '0660'")
        kwargs["unix_mode"] = int(mode_text, 8)
    durations = {
        "relay_timeout": (1.0, 3600.0),
        "smtp_timeout": (1.0, 3600.0),
        "retry_initial": (0.1, 86400.0),
        "retry_max": (0.1, 7 * 86400.0),
        "max_age": (0.0, 365 * 86400.0),
        "flush_check": (0.05, 60.0),
    }
    for name, (flow, fhigh) in durations.items():
        if name in table:
            seconds = parse_duration(table[name], key=_key(name))
            if not flow <= seconds <= fhigh:
                raise ConfigError(
                    f"{_key(name)} = {table[name]!r}: expected {flow:g} to {fhigh:g} seconds"
                )
            kwargs[name] = seconds
    if "bounce" in table:
        kwargs["bounce"] = _typed(table, "bounce", bool, "true or false")

    config = MailConfig(**kwargs)  # type: ignore[arg-type]
    if config.max_per_client > config.max_connections:
        if "max_per_client" in table:
            raise ConfigError(
                f"mail.max_per_client = {config.max_per_client} is above mail.max_connections = "
                f"{config.max_connections}; lower mail.max_per_client"
            )
        config = dataclasses.replace(config, max_per_client=config.max_connections)
    if config.retry_initial > config.retry_max:
        raise ConfigError(
            f"mail.retry_initial = {config.retry_initial:g} is above mail.retry_max = "
            f"{config.retry_max:g}; lower mail.retry_initial or raise mail.retry_max"
        )
    return config

"""Counters of the mail service, their frozen snapshot, and the line operators read::

received=120 rejected=3 delivered=118 deferred=4 bounced=1 attempts=125 queued=2 ...
"""

from __future__ import annotations

import dataclasses

__all__ = ["Counters", "MailStats", "format_stats"]


@dataclasses.dataclass(slots=True)
class Counters:
    """Mutable counters, owned by one service instance and updated on the loop thread."""

    received: int = 0
    rejected: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    attempts: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MailStats:
    """A snapshot of the service's counters.

    :param received: messages acknowledged with 250 (durably queued).
    :param rejected: SMTP commands or messages refused by policy (4xx/5xx replies).
    :param delivered: recipients handed to the relay.
    :param deferred: recipient attempts that failed temporarily (will be retried).
    :param bounced: recipients given up (permanent failure or too old).
    :param attempts: delivery attempts (one per message and try).
    :param queued: messages in the queue now.
    :param connections: SMTP clients connected now.
    :param uptime: seconds since the service started.
    """

    received: int
    rejected: int
    delivered: int
    deferred: int
    bounced: int
    attempts: int
    queued: int
    connections: int
    uptime: float

    @classmethod
    def snapshot(
        cls, counters: Counters, *, queued: int, connections: int, uptime: float
    ) -> MailStats:
        """Freeze ``counters``."""
        return cls(
            **dataclasses.asdict(counters),
            queued=queued,
            connections=connections,
            uptime=uptime,
        )


def format_stats(stats: MailStats) -> str:
    """One ``key=value`` line, stable order, for logs and ``chroot-helper`` status output."""
    fields = [
        ("received", stats.received),
        ("rejected", stats.rejected),
        ("delivered", stats.delivered),
        ("deferred", stats.deferred),
        ("bounced", stats.bounced),
        ("attempts", stats.attempts),
        ("queued", stats.queued),
        ("connections", stats.connections),
        ("uptime", f"{stats.uptime:.0f}s"),
    ]
    return " ".join(f"{name}={value}" for name, value in fields)

"""Operator tools: ``chroot-helper mailq`` (list the queue) and ``chroot-helper flush``.

Both read the spool directory directly, so they need the helper's privileges (the spool is
0700), not a connection to it.  The spool is ``--spool DIR``, else ``mail.spool`` of
``--config FILE``, else ``/var/spool/chroot-helper``.

``mailq`` prints, Postfix-style, one block per message (add ``--json`` for one object per
line)::

    -Queue ID-             --Size-- ---Age--- -----Arrival Time----- -Sender/Recipient-------
    0005F2A1C3D4E5A1B2C3       1234     3m12s  Mon Nov 23 18:00:00 2026  app@example.org
    (connect to 127.0.0.1[127.0.0.1]:2525: [Errno 111] Connection refused)
                                                                     you@example.org

    -- 1 Kbytes in 1 Request.

``flush`` asks the running service to retry every deferred message now (it checks every
``mail.flush_check`` seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ...config import read_toml
from ...errors import ConfigError, SpoolError
from .config import DEFAULT_SPOOL
from .spool import Spool

__all__ = ["flush_main", "mailq_main"]

EX_OK = 0
EX_USAGE = 64
EX_SOFTWARE = 70
EX_NOPERM = 77
EX_CONFIG = 78


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--spool", help=f"queue directory (default: {DEFAULT_SPOOL})")
    parser.add_argument("--config", help="helper TOML file; its mail.spool is used")
    return parser


def spool_path(spool: str | None, config: str | None) -> Path:
    """Resolve ``--spool`` / ``--config`` to the queue directory."""
    if spool:
        return Path(spool)
    if config:
        table = read_toml(config).get("mail", {})
        value = table.get("spool", DEFAULT_SPOOL) if isinstance(table, dict) else DEFAULT_SPOOL
        if not isinstance(value, str):
            raise ConfigError(f"mail.spool = {value!r}: expected a directory path")
        return Path(value)
    return Path(DEFAULT_SPOOL)


def _age(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def queue_listing(spool: Spool, now: float) -> list[dict[str, object]]:
    """One dict per queued message: id, size, age, arrival, sender, recipients (pending and
    done), attempts, next attempt and last error."""
    rows: list[dict[str, object]] = []
    for queue_id in spool.ids():
        try:
            envelope = spool.read_envelope(queue_id)
        except FileNotFoundError:
            continue  # delivered while we listed
        except (SpoolError, ValueError, KeyError) as exc:
            rows.append({"id": queue_id, "error": f"unreadable queue file: {exc}"})
            continue
        state = spool.load_state(queue_id)
        rows.append(
            {
                "id": queue_id,
                "size": envelope.size,
                "age": round(now - envelope.arrival, 1),
                "arrival": envelope.arrival,
                "sender": envelope.sender,
                "recipients": [r for r in envelope.recipients if r not in state.done],
                "done": state.done,
                "attempts": state.attempts,
                "next_attempt": state.next_attempt,
                "last_error": state.last_error,
            }
        )
    return rows


def print_listing(rows: list[dict[str, object]], out: TextIO) -> None:
    """The Postfix-like text form of :func:`queue_listing`."""
    if not rows:
        print("Mail queue is empty", file=out)
        return
    print(
        f"{'-Queue ID-':<22} {'--Size--':>8} {'---Age---':>9} {'-----Arrival Time-----':<24}"
        f"  -Sender/Recipient-------",
        file=out,
    )
    total = 0
    indent = " " * 67
    for row in rows:
        if "error" in row:
            print(f"{row['id']:<22} ({row['error']})", file=out)
            continue
        size = int(str(row["size"]))
        total += size
        arrival = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(float(str(row["arrival"]))))
        print(
            f"{row['id']:<22} {size:>8} {_age(float(str(row['age']))):>9} {arrival:<24}"
            f"  {row['sender'] or 'MAILER-DAEMON'}",
            file=out,
        )
        if row["last_error"]:
            print(f"({row['last_error']})", file=out)
        recipients = row["recipients"]
        assert isinstance(recipients, list)
        for rcpt in recipients:
            print(f"{indent}{rcpt}", file=out)
        print(file=out)
    requests = "Request" if len(rows) == 1 else "Requests"
    print(f"-- {(total + 1023) // 1024} Kbytes in {len(rows)} {requests}.", file=out)


def mailq_main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """``chroot-helper mailq [--spool DIR | --config FILE] [--json]``; returns the exit code."""
    stream = out if out is not None else sys.stdout
    parser = _parser("chroot-helper mailq", "List the mail queue.")
    parser.add_argument("--json", action="store_true", help="one JSON object per message")
    args = parser.parse_args(argv)
    try:
        spool = Spool(spool_path(args.spool, args.config))
        rows = queue_listing(spool, time.time())
    except ConfigError as exc:
        print(f"mailq: {exc}", file=sys.stderr)
        return EX_CONFIG
    except FileNotFoundError:
        rows = []
    except PermissionError as exc:
        print(
            f"mailq: {exc.filename}: permission denied; run as the helper's user", file=sys.stderr
        )
        return EX_NOPERM
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True), file=stream)
    else:
        print_listing(rows, stream)
    return EX_OK


def flush_main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """``chroot-helper flush [--spool DIR | --config FILE]``: retry deferred mail now."""
    stream = out if out is not None else sys.stdout
    parser = _parser("chroot-helper flush", "Retry every deferred message now.")
    args = parser.parse_args(argv)
    try:
        spool = Spool(spool_path(args.spool, args.config))
        if not spool.queue.is_dir():
            print(f"flush: {spool.root} is not a mail spool (no queue/ directory)", file=sys.stderr)
            return EX_CONFIG
        count = sum(1 for _ in spool.ids())
        spool.request_flush()
    except ConfigError as exc:
        print(f"flush: {exc}", file=sys.stderr)
        return EX_CONFIG
    except PermissionError as exc:
        print(
            f"flush: {exc.filename}: permission denied; run as the helper's user", file=sys.stderr
        )
        return EX_NOPERM
    print(f"flush requested for {count} queued message(s)", file=stream)
    return EX_OK

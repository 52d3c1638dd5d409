"""The canary: a separate client process doing real requests until its standard input closes.

Each round is one exec (``echo``), one SMTP transaction and one DNS query answered by the
local upstream; any failure is counted, never raised.  It prints ``first round done`` after the
first round and, at EOF on stdin (after one more round), one JSON line::

    {"ok": 42, "failed": 0, "errors": ["dns: ..."], "queued": ["<queue id>", ...]}

``queued`` lists the IDs of messages the server acknowledged with 250, for the caller to find
in the spool.  A process of its own because the helper limits connections per peer process:
the replay's connections must not be what slows the canary down.

    python -m fuzz.canary --socket S --smtp 127.0.0.1:2525 --dns 127.0.0.1:5353
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import smtplib
import sys
import time
from collections.abc import Callable

import dns.message
import dns.query
from chroot_helper import client

__all__ = ["main"]

TIMEOUT = 10.0
_QUEUED = re.compile(r"queued as ([0-9A-F]{20})")


def _host_port(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def _exec(number: int) -> None:
    done = client.run(["echo", f"canary {number}"], capture_output=True, timeout=TIMEOUT)
    if done.returncode != 0 or done.stdout != f"canary {number}\n".encode():
        raise AssertionError(f"echo gave {done.returncode}, {done.stdout!r}")


def _smtp(address: tuple[str, int], queued: list[str], number: int) -> None:
    message = (
        f"From: canary@example.org\r\nTo: user@example.net\r\nSubject: canary {number}\r\n"
        f"\r\n.leading dot {number}\r\n"
    )
    with smtplib.SMTP(*address, timeout=TIMEOUT) as smtp:
        smtp.ehlo("canary.example")
        smtp.mail("canary@example.org")
        smtp.rcpt("user@example.net")
        code, reply = smtp.data(message.encode())
        match = _QUEUED.search(reply.decode(errors="replace"))
        if code != 250 or match is None:
            raise AssertionError(f"DATA got {code} {reply!r}")
        queued.append(match.group(1))


def _dns(address: tuple[str, int], number: int) -> None:
    query = dns.message.make_query(f"canary{number % 50}.test", "A")
    answer = dns.query.udp(query, address[0], port=address[1], timeout=TIMEOUT)
    if [str(rdata) for rrset in answer.answer for rdata in rrset] != ["192.0.2.1"]:
        raise AssertionError(f"DNS answer {answer.answer!r}")


def _stdin_closed() -> bool:
    readable, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(readable) and not os.read(sys.stdin.fileno(), 4096)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--socket", required=True, help="the helper's Unix socket")
    parser.add_argument("--smtp", required=True, help="HOST:PORT of the mail service")
    parser.add_argument("--dns", required=True, help="HOST:PORT of the DNS stub")
    args = parser.parse_args(argv)
    os.environ["CHROOT_HELPER_SOCKET"] = args.socket
    smtp, resolver = _host_port(args.smtp), _host_port(args.dns)
    ok, errors, queued = 0, [], []  # type: tuple[int, list[str], list[str]]
    checks: list[tuple[str, Callable[..., None], tuple[object, ...]]] = [
        ("exec", _exec, ()),
        ("smtp", _smtp, (smtp, queued)),
        ("dns", _dns, (resolver,)),
    ]
    number, stopping = 0, False
    while True:
        for kind, check, extra in checks:
            try:
                check(*extra, number)
                ok += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal here
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")
        if number == 0:
            print("first round done", flush=True)  # the replay starts now, so they overlap
        number += 1
        if stopping:
            break
        stopping = _stdin_closed()  # then one more round, after the replay
        time.sleep(0.05)
    print(json.dumps({"ok": ok, "failed": len(errors), "errors": errors[:20], "queued": queued}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

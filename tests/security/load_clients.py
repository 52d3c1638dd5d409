"""Misbehaving clients for the load tests, run as separate processes (so as other uids/pids).

Each mode prints one JSON line of what it measured, on stdout, when it ends::

    python load_clients.py smtp HOST PORT --connections 1000 --duration 10
    python load_clients.py exec SOCKET --connections 250 --duration 8
    python load_clients.py dns HOST PORT --rate 3500 --duration 6 --seed 1

``smtp`` and ``exec`` hold connections open and idle, trickle bytes, stall half-way through a
command line, a frame or a DATA body; a connection the server closes is opened again after
``--reopen`` seconds, so the load is held for the whole duration.  ``dns`` sends junk datagrams
(random bytes, truncated headers, responses, oversized packets, queries the test upstream never
answers) at a steady rate from several sockets.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

SMTP_KINDS = ("idle", "trickle", "half_line", "endless_data")
EXEC_KINDS = ("idle", "half_header", "stalled_frame", "trickle")
REFUSALS = {"421", "max_idle_per_uid", "max_per_peer", "max_connections", "peer_refused"}


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Held:
    sock: socket.socket
    kind: str
    opened: float
    script: bytes
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)


def smtp_script(kind: str) -> bytes:
    """What a connection of *kind* sends, one byte per tick for trickle-type kinds."""
    if kind == "trickle":
        return b"NOOP\r\n" * 100
    if kind == "half_line":
        return b"MAIL FROM:<stall@"
    if kind == "endless_data":
        return (
            b"EHLO slow\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n"
            + b"Subject: never ends\r\n\r\n"
            + b"x\r\n" * 10000
        )
    return b""


def exec_script(kind: str) -> bytes:
    header = struct.Struct("!2sBBI")
    if kind == "half_header":
        return b"CH\x01"
    if kind == "stalled_frame":
        return header.pack(b"CH", 1, 1, 200) + b'{"op": "exec", '
    if kind == "trickle":
        payload = b'{"op": "exec", "params": {"argv": ["echo", "slow"]}, "fds": 0}'
        return header.pack(b"CH", 1, 1, len(payload)) + payload
    return b""


def hold(args: argparse.Namespace) -> dict[str, object]:
    """Keep ``--connections`` connections open for ``--duration`` seconds; count what happened."""
    raise_fd_limit()
    kinds = SMTP_KINDS if args.mode == "smtp" else EXEC_KINDS
    script_of = smtp_script if args.mode == "smtp" else exec_script
    sel = selectors.DefaultSelector()
    counts: dict[str, int] = {
        "opened": 0,
        "connect_failed": 0,
        "refused": 0,  # closed by the server with a refusal (a connection limit)
        "closed_idle": 0,  # served, then closed by the server (idle or request timeout)
        "open_at_end": 0,
        "max_open": 0,
    }
    lifetimes: list[float] = []
    replies: dict[str, int] = {}
    conns: dict[int, Held] = {}
    reopen_at: list[tuple[float, str]] = []
    start = time.monotonic()
    end = start + args.duration

    def _failed(sock: socket.socket, kind: str) -> None:
        counts["connect_failed"] += 1
        sock.close()
        reopen_at.append((time.monotonic() + args.reopen, kind))

    def open_one(kind: str) -> None:
        family = socket.AF_UNIX if args.mode == "exec" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(args.target)
        except (BlockingIOError, InterruptedError):
            if family == socket.AF_UNIX:  # EAGAIN on a Unix socket: the listen backlog is full
                _failed(sock, kind)
                return
        except OSError:
            _failed(sock, kind)
            return
        held = Held(sock, kind, time.monotonic(), script_of(kind))
        conns[sock.fileno()] = held
        sel.register(sock, selectors.EVENT_READ, held)
        counts["opened"] += 1

    def closed(held: Held) -> None:
        sel.unregister(held.sock)
        del conns[held.sock.fileno()]
        held.sock.close()
        age = time.monotonic() - held.opened
        text = bytes(held.received)
        first = _reply_kind(args.mode, text)
        replies[first] = replies.get(first, 0) + 1
        if first in REFUSALS:
            counts["refused"] += 1
        else:
            counts["closed_idle"] += 1
            lifetimes.append(age)
        reopen_at.append((time.monotonic() + args.reopen, held.kind))

    for index in range(args.connections):
        open_one(kinds[index % len(kinds)])
    next_tick = time.monotonic()
    while time.monotonic() < end:
        counts["max_open"] = max(counts["max_open"], len(conns))
        for key, _ in sel.select(timeout=0.05):
            held = key.data
            try:
                data = held.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                held.received += data[:512]
            else:
                closed(held)
        now = time.monotonic()
        if now >= next_tick:  # every tick, each connection sends its next byte (or all at once)
            next_tick = now + args.tick
            for held in list(conns.values()):
                if held.sent >= len(held.script):
                    continue
                step = 1 if held.kind == "trickle" else len(held.script) - held.sent
                if held.kind == "endless_data":
                    step = 80 if held.sent else 120  # the commands, then a line per tick
                try:
                    held.sent += held.sock.send(held.script[held.sent : held.sent + step])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    pass
        due = [item for item in reopen_at if item[0] <= now]
        reopen_at[:] = [item for item in reopen_at if item[0] > now]
        for _, kind in due:
            open_one(kind)
    counts["open_at_end"] = len(conns)
    for held in list(conns.values()):
        held.sock.close()
    return {
        **counts,
        "replies": replies,
        "longest_held": round(max(lifetimes, default=0.0), 2),
        "duration": round(time.monotonic() - start, 2),
    }


def _reply_kind(mode: str, text: bytes) -> str:
    if mode == "smtp":
        lines = [line for line in text.split(b"\r\n") if line]
        if not lines:
            return "nothing"
        if lines[0].startswith(b"421"):
            return "421"
        codes = {line[:3] for line in lines}
        if b"421" in codes:
            return "greeting_then_421"
        return "served_then_closed"
    for marker in ("max_idle_per_uid", "max_per_peer", "max_connections", "request_timeout"):
        if marker.encode() in text:
            return marker
    if b"not allowed" in text:
        return "peer_refused"
    return "other" if text else "nothing"


def junk_packets(rng: random.Random, count: int) -> list[bytes]:
    """A mix of datagrams no stub should answer with data, nor crash on."""
    packets = []
    for index in range(count):
        kind = index % 6
        qid = rng.randrange(65536)
        if kind == 0:  # random bytes
            packets.append(rng.randbytes(rng.randrange(1, 120)))
        elif kind == 1:  # shorter than a header
            packets.append(rng.randbytes(rng.randrange(0, 12)))
        elif kind == 2:  # a response (QR set): must never be answered
            packets.append(struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + _question("a.test"))
        elif kind == 3:  # oversized
            packets.append(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + rng.randbytes(3000))
        elif kind == 4:  # a question the test upstream never answers
            packets.append(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + _question("slow.test"))
        else:  # a header claiming more sections than follow
            packets.append(struct.pack("!HHHHHH", qid, 0x0100, 5, 3, 0, 0) + b"\x03abc")
    return packets


def _question(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return labels + b"\x00" + struct.pack("!HH", 1, 1)


def flood(args: argparse.Namespace) -> dict[str, object]:
    """Send junk at ``--rate`` datagrams per second for ``--duration`` seconds."""
    rng = random.Random(args.seed)
    packets = junk_packets(rng, 4096)
    socks = []
    for _ in range(4):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        socks.append(sock)
    sent = errors = 0
    start = time.monotonic()
    end = start + args.duration
    batch = 50
    while True:
        now = time.monotonic()
        if now >= end:
            break
        behind = int((now - start) * args.rate) - sent
        if behind < batch:
            time.sleep(batch / args.rate / 2)
            continue
        for _ in range(batch):
            packet = packets[sent % len(packets)]
            try:
                socks[sent % len(socks)].sendto(packet, args.target)
            except OSError:
                errors += 1
            sent += 1
    elapsed = time.monotonic() - start
    for sock in socks:
        sock.close()
    return {"sent": sent, "errors": errors, "seconds": round(elapsed, 3)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("smtp", "dns"):
        p = sub.add_parser(mode)
        p.add_argument("host")
        p.add_argument("port", type=int)
    p_exec = sub.add_parser("exec")
    p_exec.add_argument("socket")
    for p in sub.choices.values():
        p.add_argument("--connections", type=int, default=1000)
        p.add_argument("--duration", type=float, default=10.0)
        p.add_argument("--tick", type=float, default=1.0)
        p.add_argument("--reopen", type=float, default=2.0)
        p.add_argument("--rate", type=float, default=3500.0)
        p.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.target = args.socket if args.mode == "exec" else (args.host, args.port)
    result = flood(args) if args.mode == "dns" else hold(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

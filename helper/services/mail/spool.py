"""The durable queue: one file per message (envelope + content), crash-safe by rename.

Layout of ``mail.spool`` (mode 0700, files 0600)::

    tmp/        files being written; whatever is here at start was never acknowledged
    queue/ID    committed messages, see the format below
    state/ID    delivery state (attempts, next try, per-recipient status), rewritten by rename
    corrupt/ID  queue files that cannot be parsed: kept for the operator, never delivered
    flush       present when ``chroot-helper flush`` asked for an immediate retry

A queue file is::

    CHQ1 <length of the JSON envelope in bytes>\\n
    {"id": ..., "sender": ..., "recipients": [...], "arrival": ..., ...}\\n
    <the message exactly as received, CRLF line ends>

Committing a message: write ``tmp/ID``, fsync it, rename it to ``queue/ID``, fsync ``queue/``.
Only then does the SMTP client get ``250``; a crash at any earlier point leaves at most a file
in ``tmp/``, which the next start removes (the client saw no 250 and will retry).  Many
concurrent commits share one directory fsync (:class:`DirectorySync`).

Queue IDs sort by arrival time: 14 hex digits of microseconds since the epoch, then 6 random.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from ...errors import SpoolError

__all__ = [
    "DeliveryState",
    "DirectorySync",
    "Envelope",
    "Spool",
    "new_queue_id",
]

log = logging.getLogger(__name__)

MAGIC = b"CHQ1 "
_ID_LENGTH = 20


_random = random.Random(secrets.randbits(64))
os.register_at_fork(after_in_child=lambda: _random.seed(secrets.randbits(64)))


def new_queue_id() -> str:
    """A fresh queue ID, sortable by arrival time (not a secret: no system call per ID)."""
    return f"{time.time_ns() // 1000:014X}{_random.getrandbits(24):06X}"


def _valid_id(name: str) -> bool:
    return len(name) == _ID_LENGTH and all(c in "0123456789ABCDEF" for c in name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Envelope:
    """Who a queued message is from and for.

    :param id: the queue ID.
    :param sender: envelope sender; ``""`` for a bounce (null reverse path).
    :param recipients: envelope recipients, in the order given.
    :param arrival: UNIX time of acceptance.
    :param client: the peer that submitted it (``127.0.0.1:40000``, ``unix:uid=33``, ...).
    :param smtputf8: the message needs SMTPUTF8 on the way out.
    :param eightbit: the message was sent with ``BODY=8BITMIME``.
    :param size: bytes of the message.
    """

    id: str
    sender: str
    recipients: tuple[str, ...]
    arrival: float
    client: str = ""
    smtputf8: bool = False
    eightbit: bool = False
    size: int = 0

    def to_json(self) -> bytes:
        data = {field.name: getattr(self, field.name) for field in _ENVELOPE_FIELDS}
        data["recipients"] = list(self.recipients)
        return json.dumps(data, ensure_ascii=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("envelope is not an object")
        recipients = data.get("recipients")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ValueError("envelope recipients are not a list of strings")
        return cls(
            id=str(data["id"]),
            sender=str(data["sender"]),
            recipients=tuple(recipients),
            arrival=float(data["arrival"]),
            client=str(data.get("client", "")),
            smtputf8=bool(data.get("smtputf8", False)),
            eightbit=bool(data.get("eightbit", False)),
            size=int(data.get("size", 0)),
        )


_ENVELOPE_FIELDS = dataclasses.fields(Envelope)  # to_json without asdict's deep copies


@dataclasses.dataclass(kw_only=True)
class DeliveryState:
    """Progress of one queued message; lives in ``state/ID``.

    :param attempts: delivery attempts made.
    :param next_attempt: UNIX time of the next attempt (0: as soon as possible).
    :param last_error: the reply or error of the last failed attempt.
    :param done: recipients finished, each mapped to ``"sent"`` or ``"bounced"``.
    """

    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    done: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeliveryState:
        data = json.loads(raw)
        done = data.get("done", {})
        return cls(
            attempts=int(data.get("attempts", 0)),
            next_attempt=float(data.get("next_attempt", 0.0)),
            last_error=str(data.get("last_error", "")),
            done={str(k): str(v) for k, v in done.items()},
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> int:
    """Create ``path`` (it must not exist), write ``data``; returns the open descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_synced(path: Path, data: bytes) -> None:
    fd = _write_new(path, data)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The queue directory.  Blocking file operations; call them from a worker thread.

    :param root: ``mail.spool``; created (0700) with its subdirectories by :meth:`open`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.queue = root / "queue"
        self.state = root / "state"
        self.corrupt = root / "corrupt"
        self.flush_marker = root / "flush"

    def open(self) -> int:
        """Create the directories, remove unacknowledged leftovers from ``tmp/``.

        :returns: the number of messages in the queue.
        :raises SpoolError: the directory cannot be created or written.
        """
        try:
            for path in (self.root, self.tmp, self.queue, self.state, self.corrupt):
                path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            for leftover in self.tmp.iterdir():
                log.info("spool: removing %s, never acknowledged (crash while writing)", leftover)
                leftover.unlink()
            for state in self.state.iterdir():
                if not (self.queue / state.name).exists():
                    state.unlink()
            _fsync_dir(self.root)
        except OSError as exc:
            raise SpoolError(
                f"mail.spool = {str(self.root)!r}: cannot prepare the queue directory "
                f"({exc.strerror}); the helper needs a writable local directory there"
            ) from exc
        return sum(1 for _ in self.ids())

    def ids(self) -> Iterator[str]:
        """Queue IDs of committed messages, oldest first."""
        return iter(sorted(name for name in os.listdir(self.queue) if _valid_id(name)))

    def write(self, envelope: Envelope, data: bytes) -> None:
        """Write and fsync ``tmp/ID`` and rename it into ``queue/``.

        The caller must then fsync ``queue/`` (:class:`DirectorySync`) before acknowledging.
        """
        fd = self.begin(envelope, data)
        try:
            os.fsync(fd)
        except BaseException:
            self.abandon(envelope.id, fd)
            raise
        self.finish(envelope.id, fd)

    def begin(self, envelope: Envelope, data: bytes) -> int:
        """The first half of :meth:`write`: create ``tmp/ID`` with the queue file's bytes, not
        yet synced; returns its descriptor.  The caller fsyncs it (in a thread) and then calls
        :meth:`finish`, or :meth:`abandon` on any error.

        Split so that the event loop can write a small message to the page cache itself and
        hand only the fsync to a thread: each extra system call in a thread is another hand-over
        of the GIL, and those, not the bytes, dominated the cost and the latency of a commit.
        """
        head = envelope.to_json()
        tmp = self.tmp / envelope.id
        try:
            return _write_new(tmp, b"".join((MAGIC, b"%d\n" % len(head), head, b"\n", data)))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def finish(self, queue_id: str, fd: int) -> None:
        """Close the fsynced ``tmp/ID`` from :meth:`begin` and rename it into ``queue/``."""
        tmp = self.tmp / queue_id
        try:
            os.close(fd)
            os.rename(tmp, self.queue / queue_id)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def abandon(self, queue_id: str, fd: int) -> None:
        """Close and remove ``tmp/ID`` from :meth:`begin` (its commit failed)."""
        try:
            os.close(fd)
        finally:
            (self.tmp / queue_id).unlink(missing_ok=True)

    def sync_queue(self) -> None:
        """fsync ``queue/`` so that renames into it survive a crash."""
        _fsync_dir(self.queue)

    def read(self, queue_id: str) -> tuple[Envelope, bytes]:
        """The envelope and message of ``queue_id``.

        :raises SpoolError: the file is not a queue file (it is moved to ``corrupt/``).
        :raises FileNotFoundError: the message is no longer queued.
        """
        raw = (self.queue / queue_id).read_bytes()
        try:
            envelope = self._parse(raw)
            if envelope[0].id != queue_id:
                raise ValueError(f"envelope names id {envelope[0].id!r}")
        except (ValueError, KeyError, TypeError) as exc:
            os.rename(self.queue / queue_id, self.corrupt / queue_id)
            raise SpoolError(
                f"queue file {queue_id} is corrupt ({exc}); moved to {self.corrupt}"
            ) from None
        return envelope

    def read_envelope(self, queue_id: str) -> Envelope:
        """Only the envelope of ``queue_id`` (for ``mailq``); reads just the file's head."""
        with open(self.queue / queue_id, "rb") as handle:
            first = handle.readline(32)
            if not first.startswith(MAGIC):
                raise SpoolError(f"queue file {queue_id} is not a CHQ1 file")
            return Envelope.from_json(handle.read(int(first[len(MAGIC) :])))

    @staticmethod
    def _parse(raw: bytes) -> tuple[Envelope, bytes]:
        if not raw.startswith(MAGIC):
            raise ValueError("missing CHQ1 magic")
        newline = raw.index(b"\n")
        length = int(raw[len(MAGIC) : newline])
        start = newline + 1
        envelope = Envelope.from_json(raw[start : start + length])
        if raw[start + length : start + length + 1] != b"\n":
            raise ValueError("envelope length does not match")
        return envelope, raw[start + length + 1 :]

    def load_state(self, queue_id: str) -> DeliveryState:
        """The delivery state of ``queue_id``; a fresh one if none was saved or it is unreadable."""
        try:
            return DeliveryState.from_json((self.state / queue_id).read_bytes())
        except FileNotFoundError:
            return DeliveryState()
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("spool: state of %s unreadable (%s); starting over", queue_id, exc)
            return DeliveryState()

    def save_state(self, queue_id: str, state: DeliveryState) -> None:
        """Replace ``state/ID`` atomically and durably."""
        tmp = self.tmp / f"{queue_id}.state"
        tmp.unlink(missing_ok=True)
        _write_synced(tmp, state.to_json())
        os.rename(tmp, self.state / queue_id)
        _fsync_dir(self.state)

    def remove(self, queue_id: str) -> None:
        """Forget a finished message, durably (so it is not delivered again after a crash)."""
        (self.queue / queue_id).unlink(missing_ok=True)
        _fsync_dir(self.queue)
        (self.state / queue_id).unlink(missing_ok=True)

    def request_flush(self) -> None:
        """Ask a running service to retry every deferred message now."""
        self.flush_marker.touch(mode=0o600)

    def take_flush_request(self) -> bool:
        """True (once) when a flush was requested since the last call."""
        try:
            self.flush_marker.unlink()
        except FileNotFoundError:
            return False
        return True


class DirectorySync:
    """Group commit: concurrent callers of :meth:`sync` share directory fsyncs.

    A caller that renamed a file into ``queue/`` calls :meth:`renamed` and then awaits
    :meth:`sync`; it returns once an fsync that *started after* the rename has finished.

    :param spool: the spool whose ``queue/`` is synced.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._renamed = 0
        self._synced = 0
        self._running: asyncio.Future[None] | None = None

    def renamed(self) -> int:
        """Count one rename; returns the ticket to pass to :meth:`sync`."""
        self._renamed += 1
        return self._renamed

    async def sync(self, ticket: int) -> None:
        """Return once ``queue/`` was fsynced after rename number ``ticket``."""
        while self._synced < ticket:
            if self._running is not None:
                await asyncio.shield(self._running)
                continue
            loop = asyncio.get_running_loop()
            running: asyncio.Future[None] = loop.create_future()
            self._running = running
            target = self._renamed
            try:
                await asyncio.to_thread(self.spool.sync_queue)
                self._synced = max(self._synced, target)
            finally:
                self._running = None
                running.set_result(None)

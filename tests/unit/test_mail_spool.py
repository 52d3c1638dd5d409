"""The spool on a real directory: commit, read, state, crash leftovers, corrupt files, backoff,
group commit."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
from chroot_helper.errors import SpoolError
from chroot_helper.services.mail import parse_config
from chroot_helper.services.mail.delivery import RecipientResult
from chroot_helper.services.mail.runner import QueueRunner, make_bounce
from chroot_helper.services.mail.spool import (
    DeliveryState,
    DirectorySync,
    Envelope,
    Spool,
    new_queue_id,
)
from chroot_helper.services.mail.stats import Counters


def envelope(queue_id: str | None = None, **kwargs) -> Envelope:
    return Envelope(
        id=queue_id or new_queue_id(),
        sender=kwargs.pop("sender", "a@example.org"),
        recipients=("b@example.net", "c@example.net"),
        arrival=1000.0,
        **kwargs,
    )


def test_commit_read_remove(tmp_path):
    spool = Spool(tmp_path / "spool")
    assert spool.open() == 0
    assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
    first = envelope(smtputf8=True)
    spool.write(first, b"Subject: x\r\n\r\n\x00binary\xff\r\n")
    spool.sync_queue()
    assert stat.S_IMODE(os.stat(spool.queue / first.id).st_mode) == 0o600
    assert spool.read(first.id) == (first, b"Subject: x\r\n\r\n\x00binary\xff\r\n")
    assert spool.read_envelope(first.id) == first
    second = envelope()
    spool.write(second, b"")
    assert list(spool.ids()) == sorted([first.id, second.id])
    spool.remove(first.id)
    assert list(spool.ids()) == [second.id]
    with pytest.raises(FileNotFoundError):
        spool.read(first.id)


def test_split_commit_and_abandon(tmp_path):
    """begin/finish (the loop writes, a thread fsyncs) gives the same file as write();
    abandon leaves nothing behind."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    kept, dropped = envelope(), envelope()
    fd = spool.begin(kept, b"Subject: k\r\n\r\nbody\r\n")
    assert not list(spool.ids())  # not committed before finish
    os.fsync(fd)
    spool.finish(kept.id, fd)
    assert spool.read(kept.id) == (kept, b"Subject: k\r\n\r\nbody\r\n")
    spool.abandon(dropped.id, spool.begin(dropped, b"x"))
    assert list(spool.ids()) == [kept.id] and not list(spool.tmp.iterdir())


def test_queue_ids_sort_by_arrival():
    ids = [new_queue_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all(len(i) == 20 for i in ids)
    assert [i[:14] for i in ids] == sorted(i[:14] for i in ids)


def test_open_removes_unacknowledged_leftovers(tmp_path):
    spool = Spool(tmp_path)
    spool.open()
    (spool.tmp / "0000000000000000AAAA").write_bytes(b"half a message")
    (spool.state / "0000000000000000BBBB").write_bytes(b"{}")  # state of a removed message
    kept = envelope()
    spool.write(kept, b"x")
    assert spool.open() == 1
    assert list(spool.tmp.iterdir()) == [] and list(spool.state.iterdir()) == []
    assert list(spool.ids()) == [kept.id]


def test_corrupt_file_is_moved_aside_not_deleted(tmp_path):
    spool = Spool(tmp_path)
    spool.open()
    bad_id = new_queue_id()
    (spool.queue / bad_id).write_bytes(b"CHQ1 999\n{}")
    with pytest.raises(SpoolError, match=f"queue file {bad_id} is corrupt"):
        spool.read(bad_id)
    assert (spool.corrupt / bad_id).read_bytes() == b"CHQ1 999\n{}"
    (spool.queue / "not-a-queue-id").write_bytes(b"ignored")
    assert list(spool.ids()) == []


def test_state_round_trip_and_flush_marker(tmp_path):
    spool = Spool(tmp_path)
    spool.open()
    queue_id = new_queue_id()
    assert spool.load_state(queue_id) == DeliveryState()
    state = DeliveryState(attempts=2, next_attempt=5.0, last_error="451 later", done={"b": "sent"})
    spool.save_state(queue_id, state)
    assert spool.load_state(queue_id) == state
    (spool.state / queue_id).write_bytes(b"garbage")
    assert spool.load_state(queue_id) == DeliveryState()
    assert not spool.take_flush_request()
    spool.request_flush()
    assert spool.take_flush_request() and not spool.take_flush_request()


def test_group_commit_shares_directory_fsyncs(tmp_path):
    class CountingSpool(Spool):
        syncs = 0

        def sync_queue(self) -> None:
            CountingSpool.syncs += 1
            super().sync_queue()

    spool = CountingSpool(tmp_path)
    spool.open()
    sync = DirectorySync(spool)

    async def commit_many() -> None:
        async def one() -> None:
            await asyncio.to_thread(spool.write, envelope(), b"x" * 1000)
            await sync.sync(sync.renamed())

        await asyncio.gather(*(one() for _ in range(60)))

    asyncio.run(commit_many())
    assert len(list(spool.ids())) == 60
    assert 1 <= CountingSpool.syncs < 60


def test_backoff_doubles_up_to_the_cap(tmp_path):
    config = parse_config({"domain": "example.org", "retry_initial": 10, "retry_max": 100})
    spool = Spool(tmp_path)
    runner = QueueRunner(config, spool, DirectorySync(spool), None, Counters())
    assert [runner.backoff(n) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]


def test_bounce_quotes_headers_not_body():
    original = b"Subject: hello\r\nX-Secret-Body-Follows: yes\r\n\r\nprivate body\r\n"
    failure = RecipientResult(
        recipient="b@example.net", ok=False, permanent=True, reply="550 no", dsn="5.0.0"
    )
    text = make_bounce(
        envelope=envelope("0000000000000000CCCC"),
        failures=[failure],
        hostname="mail.example.org",
        original=original,
        now=0.0,
    ).decode()
    assert text.startswith("From: Mail Delivery System <MAILER-DAEMON@mail.example.org>\r\n")
    assert "To: <a@example.org>\r\n" in text
    assert "<b@example.net>: 5.0.0 550 no" in text
    assert "Subject: hello" in text and "private body" not in text

"""Crash safety: kill -9 the mail service in the middle of 500 submissions over 10 connections,
restart it on the same spool, and check that every message that got 250 reaches the sink."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import threading

import pytest
from mail_fixtures import (
    DOMAIN,
    free_port,
    run_sink,
    simple_message,
    start_service,
    stop,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONNECTIONS = 10
PER_CONNECTION = 50
KILL_AFTER = 200


def submitter(service, number: int, acked: list[str], errors: list[str]) -> None:
    try:
        with smtplib.SMTP(service.host, service.port, timeout=60) as smtp:
            for index in range(PER_CONNECTION):
                token = f"crash-{number}-{index}"
                smtp.sendmail(f"app@{DOMAIN}", [f"rcpt{number}@example.net"], simple_message(token))
                acked.append(token)  # only after the 250 to DATA
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(f"{number}: {exc!r}")


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    ("relay_during_crash", "workers"),
    [("up", 1), ("down", 1), ("down", 2)],
)
def test_kill_9_mid_submission_loses_nothing_acknowledged(
    tmp_path, relay_during_crash, workers, record_property
):
    with run_sink(tmp_path) as sink:
        # With the relay down every acknowledged message is still only in the spool at the kill.
        relay = sink.address if relay_during_crash == "up" else f"127.0.0.1:{free_port()}"
        service = start_service(tmp_path, relay=f"smtp://{relay}", workers=workers)
        acked: list[str] = []
        errors: list[str] = []
        try:
            threads = [
                threading.Thread(target=submitter, args=(service, n, acked, errors))
                for n in range(CONNECTIONS)
            ]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(acked) >= KILL_AFTER, "submissions did not get going", 120)
            os.kill(service.proc.pid, signal.SIGKILL)
            service.proc.wait(timeout=30)
            # Workers get SIGTERM when their parent dies: the port is free again.
            wait_until(lambda: port_closed(service.port), "worker processes outlived the kill")
            for thread in threads:
                thread.join(timeout=120)
            assert not any(thread.is_alive() for thread in threads)
        finally:
            stop(service.proc)
        killed_at = len(acked)
        record_property("acknowledged", killed_at)  # for make security-report
        assert killed_at < CONNECTIONS * PER_CONNECTION, "the kill came after the last message"
        assert errors, "no client noticed the kill"

        restarted = start_service(
            tmp_path, port=service.port, relay=f"smtp://{sink.address}", workers=workers
        )
        try:
            wanted = set(acked)

            def all_arrived() -> bool:
                tokens = {m.header("X-Token") for m in sink.messages()}
                return wanted <= tokens

            wait_until(all_arrived, "not every acknowledged message reached the sink", 180)
            wait_until(lambda: restarted.mailq() == [], "the queue did not drain", 60)
            tokens = [m.header("X-Token") for m in sink.messages()]
        finally:
            stop(restarted.proc)
    duplicates = len(tokens) - len(set(tokens))
    record_property("found_after_restart", len(wanted & set(tokens)))
    record_property("lost", len(wanted - set(tokens)))
    print(
        f"acknowledged before the kill: {killed_at}; delivered: {len(set(tokens))}; "
        f"duplicates: {duplicates}"
    )
    assert wanted <= set(tokens)
    if relay_during_crash == "down":
        found = re.findall(
            r"queue runner: (\d+) message\(s\) in the queue at start", restarted.log_text()
        )
        assert found and int(found[-1]) >= killed_at

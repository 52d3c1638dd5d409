"""Every saved fuzz input (seed corpus and fixed crashes) through the same entry points as
``make fuzz``: fast, no fuzzer needed.  A crash saved in ``fuzz/crashes/<target>/`` fails here
until its bug is fixed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import TARGETS  # noqa: E402
from fuzz.dns_packets import DnsTarget  # noqa: E402
from fuzz.frames import test_one_input as frames_input  # noqa: E402
from fuzz.run import inputs_of  # noqa: E402
from fuzz.smtp_session import SmtpTarget  # noqa: E402


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpTarget]:
    target = SmtpTarget(spool_parent=str(tmp_path_factory.mktemp("smtp")))
    yield target
    target.close()


@pytest.fixture(scope="module")
def dns_target() -> Iterator[DnsTarget]:
    target = DnsTarget()
    yield target
    target.close()


def cases(target: str) -> list[object]:
    return [pytest.param(path, id=path.relative_to(ROOT).as_posix()) for path in inputs_of(target)]


def test_every_target_has_seeds() -> None:
    for target in TARGETS:
        assert len(inputs_of(target)) >= 3, f"fuzz/corpus/{target}/ needs seed inputs"


@pytest.mark.parametrize("path", cases("frames"))
def test_frames_replay(path: Path) -> None:
    frames_input(path.read_bytes())


@pytest.mark.parametrize("path", cases("smtp"))
def test_smtp_replay(path: Path, smtp: SmtpTarget) -> None:
    smtp.run(path.read_bytes())


def test_smtp_seed_session_is_queued(smtp: SmtpTarget) -> None:
    before = smtp.queued
    smtp.run((ROOT / "fuzz/corpus/smtp/two-messages-pipelined").read_bytes())
    assert smtp.queued == before + 2  # both acknowledged messages were found in the spool


@pytest.mark.parametrize("path", cases("dns"))
def test_dns_replay(path: Path, dns_target: DnsTarget) -> None:
    dns_target.run(path.read_bytes())


def test_dns_seed_is_answered_by_the_local_upstream_then_the_cache(dns_target: DnsTarget) -> None:
    hits = dns_target.resolver.counters.cache_hits
    dns_target.run((ROOT / "fuzz/corpus/dns/a").read_bytes())
    assert dns_target.resolver.counters.cache_hits > hits

"""Fuzz targets for the helper's parsers, and the runner behind ``make fuzz``.

Each target module (:mod:`.frames`, :mod:`.smtp_session`, :mod:`.dns_packets`) exposes
``test_one_input(data: bytes) -> None``: it feeds *data* to the real code and raises only when
the code broke a promise (an exception escaped where an error reply or a drop was due, or an
invariant failed).  The targets import no fuzzer, so the normal test suite replays the corpus
and every saved crash through the same entry points (``tests/unit/test_fuzz_replay.py``);
:mod:`.run` drives them with atheris and then replays the corpus against a real running
``chroot-helper serve`` while a canary client checks that it keeps answering.
"""

from __future__ import annotations

import os

TARGETS: dict[str, str] = {
    "frames": "fuzz.frames",
    "smtp": "fuzz.smtp_session",
    "dns": "fuzz.dns_packets",
}
"""Target name -> module with ``test_one_input``; corpus in ``fuzz/corpus/<name>/``."""

SCRATCH_ENV = "CHROOTWSGI_FUZZ_SCRATCH"
"""Where a target may keep files (the runner removes the directory after each fuzzing run)."""
SCRATCH_PARENT = "/dev/shm" if os.path.isdir("/dev/shm") else None
"""Parent of scratch directories: tmpfs keeps the spool's fsyncs cheap."""

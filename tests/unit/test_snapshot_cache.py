"""The import snapshot is stored once per site and mapped by every worker."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading

import pytest

from chrootwsgi.snapshot import Snapshot


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (site / "top.py").write_text("X = 42\n")
    return site


@pytest.fixture
def cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    return cache


def test_second_build_maps_the_cache_file(site, cache):
    first = Snapshot.build([str(site)], cache_dir=str(cache))
    assert first.origin == "built"
    (cache_file,) = cache.glob("snapshot-*.bin")
    assert oct(cache_file.stat().st_mode & 0o777) == "0o644"
    second = Snapshot.build([str(site)], cache_dir=str(cache))
    assert second.origin == "cached"
    assert second.read(str(site / "top.py")) == b"X = 42\n"
    assert second.modules == first.modules


def test_workers_map_a_current_cache_without_the_build_lock(site, cache):
    Snapshot.build([str(site)], cache_dir=str(cache))
    with _lock_held(cache):  # another worker is building something
        assert _build_in_thread(site, cache, timeout=10).origin == "cached"


def test_a_worker_that_waited_for_the_build_maps_its_result(site, cache):
    Snapshot.build([str(site)], cache_dir=str(cache))
    (cache_file,) = cache.glob("snapshot-*.bin")
    aside = cache / "built-elsewhere"
    cache_file.rename(aside)
    results: list[Snapshot] = []
    with _lock_held(cache):  # another worker is building it
        worker = threading.Thread(target=lambda: results.append(_build(site, cache)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "built without waiting for the lock"
        aside.rename(cache_file)  # the other worker is done
        inode = cache_file.stat().st_ino
    worker.join(10)
    assert results[0].origin == "waited"
    assert cache_file.stat().st_ino == inode  # mapped, not built once more


def _build(site, cache) -> Snapshot:
    return Snapshot.build([str(site)], cache_dir=str(cache))


def _build_in_thread(site, cache, *, timeout: float) -> Snapshot:
    results: list[Snapshot] = []
    worker = threading.Thread(target=lambda: results.append(_build(site, cache)), daemon=True)
    worker.start()
    worker.join(timeout)
    assert results, f"no snapshot within {timeout} s"
    return results[0]


@contextlib.contextmanager
def _lock_held(cache):
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_changed_file_builds_a_new_snapshot(site, cache):
    Snapshot.build([str(site)], cache_dir=str(cache))
    (site / "top.py").write_text("X = 43  # edited in place\n")
    again = Snapshot.build([str(site)], cache_dir=str(cache))
    assert again.origin == "built"
    assert again.read(str(site / "top.py")) == b"X = 43  # edited in place\n"


def test_a_new_module_builds_a_new_snapshot(site, cache):
    Snapshot.build([str(site)], cache_dir=str(cache))
    (site / "pkg" / "added.py").write_text("Y = 1\n")
    again = Snapshot.build([str(site)], cache_dir=str(cache))
    assert again.origin == "built"
    assert again.modules["pkg.added"].path == str(site / "pkg" / "added.py")
    assert Snapshot.build([str(site)], cache_dir=str(cache)).origin == "cached"


def test_a_cache_file_with_a_damaged_index_is_rebuilt(site, cache):
    Snapshot.build([str(site)], cache_dir=str(cache))
    (cache_file,) = cache.glob("snapshot-*.bin")
    data = bytearray(cache_file.read_bytes())
    data[-40:-16] = b"\xff" * 24  # the end of the marshalled index
    cache_file.write_bytes(bytes(data))
    snapshot = Snapshot.build([str(site)], cache_dir=str(cache))
    assert snapshot.origin == "built"
    assert snapshot.read(str(site / "top.py")) == b"X = 42\n"


def test_a_cache_directory_others_can_write_is_not_used(site, cache):
    cache.chmod(0o777)
    snapshot = Snapshot.build([str(site)], cache_dir=str(cache))
    assert snapshot.origin == "memory"
    assert list(cache.iterdir()) == []
    assert snapshot.read(str(site / "top.py")) == b"X = 42\n"


def test_a_damaged_cache_file_is_rebuilt(site, cache):
    Snapshot.build([str(site)], cache_dir=str(cache))
    (cache_file,) = cache.glob("snapshot-*.bin")
    cache_file.write_bytes(b"garbage" * 10)
    snapshot = Snapshot.build([str(site)], cache_dir=str(cache))
    assert snapshot.origin == "built"
    assert snapshot.read(str(site / "top.py")) == b"X = 42\n"


def test_a_cache_file_others_can_write_is_not_trusted(site, cache):
    Snapshot.build([str(site)], cache_dir=str(cache))
    (cache_file,) = cache.glob("snapshot-*.bin")
    os.chmod(cache_file, 0o666)
    assert Snapshot.build([str(site)], cache_dir=str(cache)).origin == "built"


def test_the_worker_that_builds_the_snapshot_gives_the_heap_back(tmp_path, cache):
    """Walking and compressing sys.path leaves tens of MB free in the heap; none stays resident."""
    script = f"""
import sys
from chrootwsgi.snapshot import Snapshot

def anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

before = anon_kib()
snapshot = Snapshot.build(cache_dir={str(cache)!r})
assert snapshot.origin == "built", snapshot.origin
print(anon_kib() - before, snapshot.compressed_bytes // 1024)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    grown_kib, snapshot_kib = map(int, result.stdout.split())
    assert snapshot_kib > 4096  # the walk was big enough to matter
    assert grown_kib < 8 * 1024, f"the builder kept {grown_kib} KiB more anonymous memory"

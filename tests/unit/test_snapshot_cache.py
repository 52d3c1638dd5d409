"""The import snapshot is stored once per site and mapped by every worker."""

from __future__ import annotations

import os

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

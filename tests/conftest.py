"""Suite-wide fixtures. The integration and security tests need root, as CI runs them.

``tests/integration`` holds the server harnesses (``apache_server``, ``gunicorn_server``,
``dns_fixtures``); it is put on ``sys.path`` so every test directory can import them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "integration"))

from apache_server import world_readable_dir  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        needs_root = pytest.mark.skip(reason="needs root (CI runs the suite as root)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(needs_root)


@pytest.fixture(scope="session", autouse=True)
def snapshot_caches() -> Iterator[None]:
    """Remove the default snapshot cache directories the jailed workers created, if they did."""
    caches = [f"/tmp/chrootwsgi-{uid}" for uid in (0, 33, 65534)]
    existing = {path for path in caches if os.path.exists(path)}
    yield
    for path in set(caches) - existing:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def jail_root() -> Iterator[str]:
    """A fresh, EMPTY jail directory owned by root, mode 755."""
    path = world_readable_dir("chrootwsgi-jail-")
    os.chown(path, 0, 0)
    yield str(path)
    assert os.listdir(path) == [], "the jail directory on disk must stay empty"
    shutil.rmtree(path)


@pytest.fixture
def exposed_dir() -> Iterator[str]:
    """A host directory with one file, to expose read-only into the jail."""
    path = world_readable_dir("chrootwsgi-exposed-")
    (path / "hello.txt").write_text("hello from the host\n")
    (path / "hello.txt").chmod(0o644)
    yield str(path)
    shutil.rmtree(path)

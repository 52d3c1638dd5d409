"""Fixtures that start real servers: Apache httpd with mod_wsgi in daemon mode, and gunicorn."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from apache_server import world_readable_dir


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

"""Suite-wide checks: the integration tests need root, as CI runs them."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        needs_root = pytest.mark.skip(reason="needs root (CI runs the suite as root)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(needs_root)

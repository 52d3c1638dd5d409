"""The README's configuration reference is generated from the schema, not copied by hand."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from chrootwsgi import JailConfig
from chrootwsgi.reference import config_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_holds_the_generated_reference():
    text = README.read_text()
    start = text.index("<!-- config-reference:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end] == config_reference(), "run: chrootwsgi config-reference"


def test_every_setting_is_documented_with_its_default():
    rows = config_reference().splitlines()[2:]
    assert len(rows) == len(fields(JailConfig))
    for row in rows:
        key, kind, default, meaning = (cell.strip() for cell in row.strip("|").split(" | "))
        assert key and kind and default and meaning, row
    assert '| `tmp` | string | `"64M"` |' in config_reference()
    assert "| `[preload] libraries` | list of strings | `[]` |" in config_reference()
    assert "| `root` | string | required |" in config_reference()

"""The import snapshot serves modules, source lines, resources and metadata with the files gone."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import linecache
import shutil
import traceback

import pytest

from chrootwsgi.importer import SnapshotFinder
from chrootwsgi.snapshot import Snapshot


@pytest.fixture
def tree(tmp_path):
    site = tmp_path / "site"
    (site / "pkg" / "sub").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (site / "pkg" / "mod.py").write_text("def fail():\n    raise ValueError('boom')\n")
    (site / "pkg" / "sub" / "__init__.py").write_text("")
    (site / "pkg" / "data.json").write_text('{"a": 1}')
    (site / "pkg" / "tests").mkdir()
    (site / "pkg" / "tests" / "__init__.py").write_text("")
    (site / "pkg" / "fake.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (site / "nspkg" / "portion").mkdir(parents=True)
    (site / "nspkg" / "portion" / "__init__.py").write_text("NAME = 'portion'\n")
    (site / "top.py").write_text("X = 42\n")
    (site / "static").mkdir()
    (site / "static" / "style.css").write_text("body {}")
    dist = site / "pkg-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pkg\nVersion: 1.2\n")
    (dist / "top_level.txt").write_text("pkg\n")
    snapshot = Snapshot.build([str(site)])
    shutil.rmtree(site)  # from here on, only the snapshot has the files
    return snapshot, str(site)


def load(finder: SnapshotFinder, name: str):
    spec = finder.find_spec(name)
    assert spec is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modules_and_packages_load_from_memory(tree):
    snapshot, site = tree
    finder = SnapshotFinder(snapshot)
    assert load(finder, "top").X == 42
    package = load(finder, "pkg")
    assert package.VALUE == 1
    assert package.__file__ == f"{site}/pkg/__init__.py"
    assert package.__path__ == [f"{site}/pkg"]
    assert load(finder, "nspkg.portion").NAME == "portion"


def test_skipped_and_unknown_names(tree):
    snapshot, _ = tree
    finder = SnapshotFinder(snapshot)
    assert finder.find_spec("pkg.tests") is None
    assert finder.find_spec("static") is None  # a directory of data, not a package
    assert finder.find_spec("no_such_module") is None


def test_tracebacks_keep_their_source_lines(tree):
    snapshot, site = tree
    module = load(SnapshotFinder(snapshot), "pkg.mod")
    linecache.clearcache()
    with pytest.raises(ValueError) as raised:
        module.fail()
    text = "".join(traceback.format_exception(raised.value))
    assert f'File "{site}/pkg/mod.py", line 2, in fail' in text
    assert "raise ValueError('boom')" in text


def test_resources_and_data(tree):
    snapshot, site = tree
    package = load(SnapshotFinder(snapshot), "pkg")
    files = package.__spec__.loader.get_resource_reader("pkg").files()
    assert (files / "data.json").read_text() == '{"a": 1}'
    assert sorted(entry.name for entry in files.iterdir()) == sorted(
        [
            "__init__.py",
            "mod.py",
            "sub",
            "data.json",
            "tests",
            "fake.cpython-311-x86_64-linux-gnu.so",
        ]
    )
    assert package.__loader__.get_data(f"{site}/pkg/data.json") == b'{"a": 1}'
    with pytest.raises(FileNotFoundError):
        package.__loader__.get_data(f"{site}/pkg/fake.cpython-311-x86_64-linux-gnu.so")


def test_metadata(tree):
    snapshot, _ = tree
    finder = SnapshotFinder(snapshot)
    context = importlib.metadata.DistributionFinder.Context(name="pkg")
    (dist,) = finder.find_distributions(context)
    assert dist.version == "1.2"
    assert dist.read_text("top_level.txt") == "pkg\n"
    assert (
        list(finder.find_distributions(importlib.metadata.DistributionFinder.Context(name="x")))
        == []
    )


def test_extension_not_loaded_before_entry_is_explained(tree):
    snapshot, _ = tree
    spec = SnapshotFinder(snapshot).find_spec("pkg.fake")
    with pytest.raises(ImportError, match="add 'pkg' to preload.modules"):
        importlib.util.module_from_spec(spec)


def test_stdlib_extensions_are_loaded_ahead():
    snapshot = Snapshot.build()
    snapshot.load_extensions()
    entry = snapshot.modules["_decimal"]
    assert entry.kind == "extension"
    assert entry.path in snapshot.loaded_extensions
    assert "test" not in snapshot.modules and "idlelib" not in snapshot.modules
    mypyc = [path for path in snapshot.loaded_extensions if "/site-packages/mypy/" in path]
    assert mypyc == [], "extensions of packages never imported must not be loaded"

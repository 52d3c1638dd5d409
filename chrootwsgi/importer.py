"""Keep every module importable after entry, without Python's files in the jail.

After entry, :func:`install` puts a finder for the :class:`~chrootwsgi.snapshot.Snapshot` taken
before entry first on ``sys.meta_path``, and gives the modules already imported a loader that
serves their source from the snapshot, so tracebacks keep their source lines,
``importlib.resources`` and ``importlib.metadata`` keep working, and no directory descriptor to the
host stays open. C extension modules load by path: the dynamic linker already holds them.
Extension modules of packages that were neither imported nor named in ``preload.modules`` are
reported when imported, with the fix.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import logging
import os
import pathlib
import re
import sys
from collections.abc import Iterator
from importlib.resources.abc import Traversable, TraversableResources
from types import CodeType, ModuleType
from typing import IO

from .snapshot import DIST_SUFFIXES, ModuleEntry, Snapshot

log = logging.getLogger(__name__)


class SnapshotLoader(importlib.abc.InspectLoader):
    """Loads a pure-Python module from the snapshot; also its source, data and resources."""

    def __init__(self, snapshot: Snapshot, fullname: str, entry: ModuleEntry) -> None:
        self.snapshot = snapshot
        self.name = fullname
        self.path = entry.path
        self.entry = entry

    def is_package(self, fullname: str) -> bool:
        return self.entry.is_package

    def get_filename(self, fullname: str) -> str:
        return self.path

    def get_data(self, path: str) -> bytes:
        return self.snapshot.read(path)

    def get_source(self, fullname: str) -> str:
        return importlib.util.decode_source(self.snapshot.read(self.path))

    def get_code(self, fullname: str) -> CodeType:
        return compile(self.snapshot.read(self.path), self.path, "exec", dont_inherit=True)

    def exec_module(self, module: ModuleType) -> None:
        exec(self.get_code(module.__name__), module.__dict__)  # noqa: S102 - this is an importer

    def get_resource_reader(self, fullname: str) -> TraversableResources | None:
        if not self.entry.search:
            return None
        return _Resources(_SnapshotPath(self.snapshot, self.entry.search[0]))


class _UnloadedExtensionLoader(importlib.abc.Loader):
    def __init__(self, fullname: str, path: str) -> None:
        self.name = fullname
        self.path = path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        top = self.name.partition(".")[0]
        raise ImportError(
            f"{self.name} is a C extension ({self.path}) that was not loaded before the jail was "
            f"entered; add {top!r} to preload.modules",
            name=self.name,
            path=self.path,
        )

    def exec_module(self, module: ModuleType) -> None:  # pragma: no cover - never reached
        raise ImportError(self.name)


class SnapshotFinder(importlib.abc.MetaPathFinder):
    """Finds modules and distributions in a :class:`Snapshot`; first on ``sys.meta_path``."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        entry = self.snapshot.modules.get(fullname)
        if entry is None:
            return None
        if entry.kind == "namespace":
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = list(entry.search)
            return spec
        loader: importlib.abc.Loader
        if entry.kind == "extension":
            if entry.path in self.snapshot.loaded_extensions:
                loader = importlib.machinery.ExtensionFileLoader(fullname, entry.path)
            else:
                loader = _UnloadedExtensionLoader(fullname, entry.path)
        else:
            loader = SnapshotLoader(self.snapshot, fullname, entry)
        return importlib.util.spec_from_file_location(
            fullname,
            entry.path,
            loader=loader,
            submodule_search_locations=list(entry.search) if entry.search else None,
        )

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context | None = None
    ) -> Iterator[importlib.metadata.Distribution]:
        wanted = getattr(context, "name", None)
        for path in self.snapshot.distributions:
            if wanted is None or _normalize(_dist_name(path)) == _normalize(wanted):
                yield SnapshotDistribution(self.snapshot, path)

    def invalidate_caches(self) -> None:
        """Nothing to refresh: the snapshot is fixed at entry."""


class SnapshotDistribution(importlib.metadata.Distribution):
    """An installed distribution whose ``*.dist-info`` files are kept in the snapshot."""

    def __init__(self, snapshot: Snapshot, path: str) -> None:
        self.snapshot = snapshot
        self.path = path

    def read_text(self, filename: str) -> str | None:
        try:
            return self.snapshot.read(os.path.join(self.path, filename)).decode("utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def locate_file(self, path: str | os.PathLike[str]) -> pathlib.Path:
        return pathlib.Path(os.path.dirname(self.path), path)


class _SnapshotPath(Traversable):
    """A read-only path in the snapshot, for ``importlib.resources`` and ``metadata.files``."""

    def __init__(self, snapshot: Snapshot, path: str) -> None:
        self._snapshot = snapshot
        self._path = os.path.normpath(path)

    def __repr__(self) -> str:
        return f"<snapshot path {self._path!r}>"

    def __str__(self) -> str:
        return self._path

    def __fspath__(self) -> str:
        return self._path

    @property
    def name(self) -> str:
        return os.path.basename(self._path)

    def iterdir(self) -> Iterator[_SnapshotPath]:
        for child in self._snapshot.listings.get(self._path, []):
            yield _SnapshotPath(self._snapshot, os.path.join(self._path, child))

    def is_dir(self) -> bool:
        return self._path in self._snapshot.listings

    def is_file(self) -> bool:
        return self._snapshot.is_file(self._path)

    def exists(self) -> bool:
        return self.is_dir() or self.is_file()

    def joinpath(self, *descendants: str | os.PathLike[str]) -> _SnapshotPath:
        parts = [os.fspath(part) for part in descendants]
        return _SnapshotPath(self._snapshot, os.path.join(self._path, *parts))

    def __truediv__(self, child: str) -> _SnapshotPath:  # type: ignore[override]
        return self.joinpath(child)

    def read_bytes(self) -> bytes:
        return self._snapshot.read(self._path)

    def read_text(self, encoding: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8")

    def open(self, mode: str = "r", *args: object, **kwargs: object) -> IO[str] | IO[bytes]:  # type: ignore[override]
        if mode not in ("r", "rb"):
            raise PermissionError(f"{self._path} is read-only inside the jail")
        data = io.BytesIO(self.read_bytes())
        if mode == "rb":
            return data
        return io.TextIOWrapper(data, *args, **kwargs)  # type: ignore[arg-type]


class _Resources(TraversableResources):
    def __init__(self, root: _SnapshotPath) -> None:
        self._root = root

    def files(self) -> _SnapshotPath:
        return self._root


def install(snapshot: Snapshot) -> SnapshotFinder:
    """Put the snapshot finder first on ``sys.meta_path`` and re-home already imported modules.

    Call right after entry: the path finder's caches point at directories that are gone.
    """
    finder = SnapshotFinder(snapshot)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, SnapshotFinder)]
    position = next(
        (i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder),
        len(sys.meta_path),
    )
    sys.meta_path.insert(position, finder)
    sys.path_importer_cache.clear()
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            continue
        entry = snapshot.modules.get(spec.name)
        if entry is None or entry.kind != "source" or entry.path != spec.origin:
            continue
        loader = SnapshotLoader(snapshot, spec.name, entry)
        spec.loader = loader
        module.__loader__ = loader
    return finder


def _dist_name(path: str) -> str:
    stem = os.path.basename(path)
    for suffix in DIST_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.partition("-")[0]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()

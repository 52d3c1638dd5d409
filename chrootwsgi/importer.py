"""Keep every module importable after entry, without Python's files in the jail.

Before entry, :meth:`Snapshot.build` walks ``sys.path`` once and keeps, zlib-compressed in memory,
the source of every pure-Python module, the data files inside packages and the ``*.dist-info``
metadata. C extension modules cannot be loaded from memory, so the dynamic linker loads them now
(``dlopen``); ``import`` after entry finds them already loaded by path. After entry,
:func:`install` puts a finder for the snapshot first on ``sys.meta_path`` and gives the modules
already imported a loader that serves their source from memory, so tracebacks keep their source
lines, ``importlib.resources`` and ``importlib.metadata`` keep working, and no directory
descriptor to the host stays open.

Not kept: test suites (``test``/``tests`` packages), ``pip``/``setuptools`` and similar tools,
files larger than :data:`MAX_FILE` and, past :data:`MAX_TOTAL` bytes, anything further.
Extension modules of packages that were neither imported nor named in ``preload.modules`` are
reported when imported, with the fix.
"""

from __future__ import annotations

import ctypes
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
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable, TraversableResources
from types import CodeType, ModuleType
from typing import IO, Literal

log = logging.getLogger(__name__)

#: Largest single file kept (sources, package data, metadata).
MAX_FILE = 2 * 1024 * 1024
#: Deepest package nesting walked.
MAX_DEPTH = 24
#: Largest total of raw bytes read into a snapshot.
MAX_TOTAL = 512 * 1024 * 1024

#: Top-level names never kept: test suites and packaging tools a web worker does not import.
SKIP_TOP_LEVEL = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "pip",
        "setuptools",
        "pkg_resources",
        "_distutils_hack",
        "wheel",
    }
)
#: Package data never read at run time: type stubs, C and Cython sources, compiled code.
SKIP_DATA_SUFFIXES = (".pyi", ".pyc", ".pyo", ".pyx", ".pxd", ".c", ".h", ".cpp", ".so", ".a", ".o")
#: Sub-package names never kept below any package.
SKIP_NESTED = frozenset({"test", "tests", "__pycache__"})

_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
_DIST_SUFFIXES = (".dist-info", ".egg-info")
Kind = Literal["source", "extension", "namespace"]


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    """One importable module: where it lived on the host and how to load it."""

    kind: Kind
    path: str
    search: tuple[str, ...] = ()

    @property
    def is_package(self) -> bool:
        return self.kind == "namespace" or bool(self.search)


@dataclass(slots=True)
class Snapshot:
    """Sources, package data and metadata of the importable modules, compressed in memory."""

    modules: dict[str, ModuleEntry] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    listings: dict[str, list[str]] = field(default_factory=dict)
    distributions: list[str] = field(default_factory=list)
    loaded_extensions: set[str] = field(default_factory=set)
    raw_bytes: int = 0
    truncated: bool = False
    _seen_dirs: set[tuple[int, int]] = field(default_factory=set)

    @classmethod
    def build(cls, path: Iterable[str] | None = None) -> Snapshot:
        """Walk *path* (default ``sys.path``) the way the path finder would."""
        snapshot = cls()
        for entry in dict.fromkeys(path if path is not None else sys.path):
            directory = os.path.abspath(entry or os.getcwd())
            if directory == "/":
                log.warning("not walking '/' from sys.path for the import snapshot")
            elif os.path.isdir(directory):
                snapshot._scan_top(directory)
        return snapshot

    @property
    def compressed_bytes(self) -> int:
        return sum(map(len, self.files.values()))

    def read(self, path: str) -> bytes:
        """The content of a kept file, by its host path; :class:`FileNotFoundError` if not kept."""
        try:
            return zlib.decompress(self.files[path])
        except KeyError:
            raise FileNotFoundError(2, "not kept in the import snapshot", path) from None

    def load_extensions(self, modules: Iterable[str] = ()) -> None:
        """dlopen the extension modules an import after entry may need.

        All of the standard library's, and those of packages already imported or named in
        *modules*. Loading is cheap (shared, mostly untouched pages) and runs no module code.
        """
        stdlib = sysconfig.get_path("platstdlib")
        wanted = {name.partition(".")[0] for name in sys.modules} | {
            name.partition(".")[0] for name in modules
        }
        for name, entry in self.modules.items():
            if entry.kind != "extension":
                continue
            if not (entry.path.startswith(stdlib + os.sep) or name.partition(".")[0] in wanted):
                continue
            try:
                ctypes.CDLL(entry.path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
            except OSError as exc:
                log.debug("extension %s not loadable: %s", name, exc)
                continue
            self.loaded_extensions.add(entry.path)

    # -- scanning -------------------------------------------------------------------------

    def _scan_top(self, directory: str) -> None:
        for item in _scandir(directory):
            if item.name.endswith(_DIST_SUFFIXES) and _is_dir(item):
                if item.path not in self.listings:
                    self.distributions.append(item.path)
                    self._keep_tree(item.path, depth=1)
                continue
            name, kind = _module_name(item)
            if name is None or name in SKIP_TOP_LEVEL:
                continue
            if kind == "package":
                self._scan_package(name, item.path, top=True)
            elif name not in self.modules:
                self._add_module(name, kind, item.path)

    def _scan_package(self, name: str, directory: str, *, top: bool = False) -> None:
        try:
            st = os.stat(directory)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in self._seen_dirs or name.count(".") >= MAX_DEPTH:
            return  # a symlink loop, or absurdly deep
        self._seen_dirs.add((st.st_dev, st.st_ino))
        init = os.path.join(directory, "__init__.py")
        existing = self.modules.get(name)
        if os.path.isfile(init):
            if existing is not None and existing.kind != "namespace":
                return  # an earlier sys.path entry wins, as with the path finder
            self.modules[name] = ModuleEntry("source", init, (directory,))
            self._keep(init)
        elif existing is None or existing.kind == "namespace":
            if top and not _has_python(directory):
                return  # a plain directory (static files, node_modules), not a package
            search = (existing.search if existing else ()) + (directory,)
            self.modules[name] = ModuleEntry("namespace", directory, search)
        else:
            return
        listing: list[str] = []
        for item in _scandir(directory):
            listing.append(item.name)
            child, kind = _module_name(item)
            if kind == "package" and child is not None:
                if child not in SKIP_NESTED:
                    self._scan_package(f"{name}.{child}", item.path)
            elif child is not None and child != "__init__":
                self._add_module(f"{name}.{child}", kind, item.path)
            elif not item.name.endswith(SKIP_DATA_SUFFIXES) and item.is_file():
                self._keep(item.path)  # package data
        self.listings[directory] = listing

    def _add_module(self, name: str, kind: str, path: str) -> None:
        if kind == "extension":
            self.modules.setdefault(name, ModuleEntry("extension", path))
        elif name not in self.modules or self.modules[name].kind == "namespace":
            self.modules[name] = ModuleEntry("source", path)
            self._keep(path)

    def _keep_tree(self, directory: str, depth: int) -> None:
        listing = []
        for item in _scandir(directory):
            listing.append(item.name)
            if item.is_file():
                self._keep(item.path)
            elif depth > 0 and _is_dir(item):
                self._keep_tree(item.path, depth - 1)
        self.listings[directory] = listing

    def _keep(self, path: str) -> None:
        if path in self.files or self.truncated:
            return
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_FILE + 1)
        except OSError:
            return
        if len(data) > MAX_FILE:
            log.debug("not kept, larger than %d bytes: %s", MAX_FILE, path)
            return
        self.raw_bytes += len(data)
        if self.raw_bytes > MAX_TOTAL:
            self.truncated = True
            log.warning(
                "import snapshot stopped at %d bytes; %s and later are not kept", MAX_TOTAL, path
            )
            return
        self.files[path] = zlib.compress(data, 1)


def _scandir(directory: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as items:
            return sorted(items, key=lambda item: item.name)
    except OSError:
        return []


def _module_name(item: os.DirEntry[str]) -> tuple[str | None, str]:
    name = item.name
    if _is_dir(item):
        return (name if name.isidentifier() else None), "package"
    if name.endswith(".py"):
        stem = name[:-3]
        return (stem if stem.isidentifier() else None), "source"
    for suffix in _EXTENSION_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return (stem if stem.isidentifier() else None), "extension"
    return None, "data"


def _is_dir(item: os.DirEntry[str]) -> bool:
    try:
        return item.is_dir()
    except OSError:
        return False


def _has_python(directory: str) -> bool:
    """A namespace package portion: Python files in it, or regular packages right below it."""
    return any(
        item.name.endswith(".py")
        or (_is_dir(item) and os.path.isfile(os.path.join(item.path, "__init__.py")))
        for item in _scandir(directory)
    )


# -- after entry ------------------------------------------------------------------------------


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
        return self._path in self._snapshot.files

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
    for suffix in _DIST_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.partition("-")[0]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()

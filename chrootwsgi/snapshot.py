"""The import snapshot: what of ``sys.path`` a jailed process can still import, read before entry.

:meth:`Snapshot.build` walks ``sys.path`` once, the way the path finder would, and keeps the
source of every pure-Python module, the data files inside packages and the ``*.dist-info``
metadata, each zlib-compressed. C extension modules are recorded by path: the dynamic linker
loads them before entry (:meth:`Snapshot.load_extensions`), as it cannot load them from memory.

Not kept: test suites (``test``/``tests`` packages), ``pip``/``setuptools`` and similar tools,
type stubs and C sources, files larger than :data:`MAX_FILE` and, past :data:`MAX_TOTAL` bytes,
anything further.

Workers of one site would each read and compress the same files, so a snapshot is stored once
in a cache directory and mapped read-only (``mmap``) by every worker: the pages are shared, and a
worker only touches those it imports from. A cache file is named after the Python version, the
working directory and ``sys.path``; it carries a manifest (the modification time of every
directory walked, size and modification time of every file kept), and a worker maps it without
walking anything while the manifest holds. Any change builds a new one. Its layout::

    +----------+--------------------------+---------------------+-----------------+----------+
    | MAGIC 8B | zlib blobs, back to back | marshal(metadata)   | meta offset 8B  | MAGIC 8B |
    +----------+--------------------------+---------------------+-----------------+----------+

    metadata = {"index": {host path: (offset, length)}, "modules": ..., "listings": ...,
                "distributions": ..., "dirs": {dir: mtime_ns}, "files": {path: (size, mtime_ns)}}

A cache file is used only when it and its directory are owned by root or the worker and
writable by nobody else. The mapping stays valid after ``chroot``; no descriptor stays open.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.machinery
import logging
import marshal
import mmap
import os
import stat
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from . import linux

log = logging.getLogger(__name__)

#: Largest single file kept (sources, package data, metadata).
MAX_FILE = 2 * 1024 * 1024
#: Largest total of raw bytes read into a snapshot.
MAX_TOTAL = 512 * 1024 * 1024
#: Deepest package nesting walked.
MAX_DEPTH = 24
#: Cache files unused for this long are removed when a new one is written.
CACHE_MAX_AGE = 7 * 24 * 3600

MAGIC = b"CWSNAP1\n"
_TRAILER = struct.Struct("<Q8s")

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

#: The standard library's directory, also inside a virtualenv.
STDLIB = os.path.dirname(os.__file__)
_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
DIST_SUFFIXES = (".dist-info", ".egg-info")
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
    """Modules, directory listings and compressed file contents, as they were before entry.

    :param origin: ``"cached"`` (mapped from a cache file), ``"built"`` (and written to the cache),
        ``"waited"`` (mapped once another worker had built it) or ``"memory"`` (no usable cache
        directory: a private copy).
    """

    modules: dict[str, ModuleEntry] = field(default_factory=dict)
    listings: dict[str, list[str]] = field(default_factory=dict)
    distributions: list[str] = field(default_factory=list)
    index: dict[str, tuple[int, int]] = field(default_factory=dict)
    data: bytes | mmap.mmap = b""
    origin: str = "memory"
    manifest: tuple[dict[str, int], dict[str, tuple[int, int]]] = ({}, {})
    loaded_extensions: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, path: Iterable[str] | None = None, *, cache_dir: str | None = None) -> Snapshot:
        """Snapshot *path* (default ``sys.path``), through a cache file in *cache_dir* if given.

        A cache file whose manifest still matches (every directory walked and every file kept,
        by modification time and size) is mapped without walking anything.
        """
        entries = list(dict.fromkeys(path if path is not None else sys.path))
        if cache_dir is None or not _trusted(cache_dir, directory=True):
            return cls._from_bytes(_pack(_walk(entries)), origin="memory")
        cache_file = os.path.join(cache_dir, f"snapshot-{_key(entries)}.bin")
        snapshot = cls._from_cache(cache_file)  # no lock: cache files are replaced atomically
        if snapshot is not None:
            return snapshot
        with _exclusive(cache_dir):  # workers starting together build it once
            snapshot = cls._from_cache(cache_file, origin="waited")
            if snapshot is not None:
                return snapshot
            data = _pack(_walk(entries))
            written = _write(cache_file, data)
            mapped = _map_trusted(cache_file) if written else None
            if mapped is None:
                return cls._from_bytes(data, origin="memory")
        del data
        # Walking and compressing left tens of MB free in the heap, which glibc keeps: without
        # this the worker that built the snapshot stays about 18 MB bigger than the others.
        linux.release_free_memory()
        return cls._from_bytes(mapped, origin="built")

    @classmethod
    def _from_cache(cls, cache_file: str, *, origin: str = "cached") -> Snapshot | None:
        """The snapshot in *cache_file* if it is trusted, whole and still current."""
        cached = _map_trusted(cache_file)
        if cached is None:
            return None
        try:
            snapshot = cls._from_bytes(cached, origin=origin)
        except (ValueError, EOFError, TypeError, KeyError, struct.error) as exc:
            log.warning("ignoring damaged snapshot cache %s: %r", cache_file, exc)
        else:
            if snapshot._manifest_holds():
                return snapshot
        cached.close()
        return None

    @classmethod
    def _from_bytes(cls, data: bytes | mmap.mmap, *, origin: str) -> Snapshot:
        """Read the metadata that :func:`_pack` wrote behind the file contents."""
        offset, magic = _TRAILER.unpack(data[-_TRAILER.size :])
        if data[: len(MAGIC)] != MAGIC or magic != MAGIC:
            raise ValueError("not a snapshot")
        meta = marshal.loads(data[offset : -_TRAILER.size])
        return cls(
            modules={name: ModuleEntry(*fields) for name, fields in meta["modules"].items()},
            listings=meta["listings"],
            distributions=meta["distributions"],
            index=meta["index"],
            data=data,
            origin=origin,
            manifest=(meta["dirs"], meta["files"]),
        )

    def _manifest_holds(self) -> bool:
        """True when no walked directory and no kept file changed since the snapshot."""
        directories, files = self.manifest
        if any(_mtime(path) != mtime for path, mtime in directories.items()):
            return False
        stat = os.stat  # thousands of files: one stat each, inline
        try:
            for path, (size, mtime) in files.items():
                st = stat(path)
                if st.st_mtime_ns != mtime or st.st_size != size:
                    return False
        except OSError:
            return False
        return True

    @property
    def compressed_bytes(self) -> int:
        return len(self.data)

    def read(self, path: str) -> bytes:
        """The content of a kept file, by its host path; :class:`FileNotFoundError` if not kept."""
        try:
            offset, length = self.index[path]
        except KeyError:
            raise FileNotFoundError(2, "not kept in the import snapshot", path) from None
        return zlib.decompress(self.data[offset : offset + length])

    def is_file(self, path: str) -> bool:
        return path in self.index

    def load_extensions(self, modules: Iterable[str] = ()) -> None:
        """dlopen the extension modules an import after entry may need.

        All of the standard library's, and those of packages already imported or named in
        *modules*. Loading is cheap (shared, mostly untouched pages) and runs no module code.
        """
        wanted = {name.partition(".")[0] for name in sys.modules} | {
            name.partition(".")[0] for name in modules
        }
        for name, entry in self.modules.items():
            if entry.kind != "extension":
                continue
            if not (_in_stdlib(entry.path) or name.partition(".")[0] in wanted):
                continue
            try:
                ctypes.CDLL(entry.path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
            except OSError as exc:
                log.debug("extension %s not loadable: %s", name, exc)
                continue
            self.loaded_extensions.add(entry.path)


class _Walker:
    """Finds modules, packages, package data and metadata below ``sys.path`` directories."""

    def __init__(self) -> None:
        self.modules: dict[str, ModuleEntry] = {}
        self.listings: dict[str, list[str]] = {}
        self.distributions: list[str] = []
        self.keep: dict[str, tuple[int, int]] = {}
        self.dirs: dict[str, int] = {}
        self._seen_dirs: set[tuple[int, int]] = set()

    def _has_python(self, directory: str) -> bool:
        """A namespace package portion: Python files in it, or regular packages right below."""
        return any(
            item.name.endswith(".py")
            or (_is_dir(item) and os.path.isfile(os.path.join(item.path, "__init__.py")))
            for item in self._list(directory)
        )

    def _list(self, directory: str) -> list[os.DirEntry[str]]:
        """The entries of *directory*, noting its modification time for the manifest."""
        self.dirs[directory] = _mtime(directory)
        return _scandir(directory)

    def scan(self, directory: str) -> None:
        for item in self._list(directory):
            if item.name.endswith(DIST_SUFFIXES) and _is_dir(item):
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
            if top and not self._has_python(directory):
                return  # a plain directory (static files, node_modules), not a package
            search = (existing.search if existing else ()) + (directory,)
            self.modules[name] = ModuleEntry("namespace", directory, search)
        else:
            return
        listing: list[str] = []
        for item in self._list(directory):
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
        for item in self._list(directory):
            listing.append(item.name)
            if item.is_file():
                self._keep(item.path)
            elif depth > 0 and _is_dir(item):
                self._keep_tree(item.path, depth - 1)
        self.listings[directory] = listing

    def _keep(self, path: str) -> None:
        if path in self.keep:
            return
        try:
            st = os.stat(path)
        except OSError:
            return
        if st.st_size > MAX_FILE:
            log.debug("not kept, larger than %d bytes: %s", MAX_FILE, path)
            return
        self.keep[path] = (st.st_size, st.st_mtime_ns)


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


def _in_stdlib(path: str) -> bool:
    """In the standard library (``sysconfig`` points into a virtualenv; ``os.py`` does not)."""
    parts = path.split(os.sep)
    return path.startswith(STDLIB + os.sep) and not {"site-packages", "dist-packages"} & set(parts)


def _key(entries: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((sys.version, os.getcwd(), entries)).encode())
    return digest.hexdigest()


def _walk(entries: list[str]) -> _Walker:
    walker = _Walker()
    for entry in entries:
        directory = os.path.abspath(entry or os.getcwd())
        if directory == "/":
            log.warning("not walking '/' from sys.path for the import snapshot")
            continue
        walker.dirs[directory] = _mtime(directory)
        if os.path.isdir(directory):
            walker.scan(directory)
    return walker


def _pack(walker: _Walker) -> bytes:
    """The snapshot as one buffer: compressed files, then marshalled metadata, then the trailer."""
    chunks = [MAGIC]
    index: dict[str, tuple[int, int]] = {}
    offset = len(MAGIC)
    total = 0
    for path in walker.keep:
        try:
            with open(path, "rb") as file:
                raw = file.read(MAX_FILE + 1)
        except OSError:
            continue
        total += len(raw)
        if total > MAX_TOTAL:
            log.warning(
                "import snapshot stopped at %d bytes; %s and later are not kept", MAX_TOTAL, path
            )
            break
        blob = zlib.compress(raw, 1)
        index[path] = (offset, len(blob))
        chunks.append(blob)
        offset += len(blob)
    meta = {
        "index": index,
        "modules": {name: (e.kind, e.path, e.search) for name, e in walker.modules.items()},
        "listings": walker.listings,
        "distributions": walker.distributions,
        "dirs": walker.dirs,
        "files": walker.keep,
    }
    chunks.append(marshal.dumps(meta))
    chunks.append(_TRAILER.pack(offset, MAGIC))
    return b"".join(chunks)


def _map_trusted(cache_file: str) -> mmap.mmap | None:
    """Map a cache file read-only if it exists, is trusted and looks whole."""
    try:
        fd = os.open(cache_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _trusted(cache_file, fd=fd):
            return None
        mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if len(mapped) < len(MAGIC) + _TRAILER.size or mapped[: len(MAGIC)] != MAGIC:
        log.warning("ignoring damaged snapshot cache %s", cache_file)
        mapped.close()
        return None
    return mapped


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


@contextlib.contextmanager
def _exclusive(cache_dir: str) -> Iterator[None]:
    """Hold the cache directory's lock file (``flock``) for the duration."""
    try:
        fd = os.open(
            os.path.join(cache_dir, ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError as exc:
        log.debug("no lock on %s: %s", cache_dir, exc)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(cache_file: str, data: bytes) -> bool:
    """Write *data* to *cache_file* atomically; prune cache files unused for a week."""
    directory = os.path.dirname(cache_file)
    try:
        fd, temporary = tempfile.mkstemp(prefix=".snapshot-", dir=directory)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, cache_file)
    except OSError as exc:
        log.warning("cannot write the import snapshot cache %s: %s", cache_file, exc)
        return False
    cutoff = time.time() - CACHE_MAX_AGE
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if name.startswith("snapshot-") and os.stat(path).st_atime < cutoff:
                os.unlink(path)
        except OSError:
            continue
    return True


def _trusted(path: str, *, directory: bool = False, fd: int | None = None) -> bool:
    """Owned by root or this user, writable by no one else: safe to execute code from."""
    try:
        st = os.fstat(fd) if fd is not None else os.lstat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if kind_ok and st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022:
        return True
    log.warning(
        "not using %s for the import snapshot cache: it must be a %s owned by root or uid %d "
        "and writable by no one else",
        path,
        "directory" if directory else "regular file",
        os.geteuid(),
    )
    return False


def default_cache_dir() -> str | None:
    """``/var/cache/chrootwsgi`` when it is usable, else a private ``/tmp/chrootwsgi-UID``."""
    system = "/var/cache/chrootwsgi"
    if os.path.isdir(system) and os.access(system, os.W_OK):
        return system
    private = f"/tmp/chrootwsgi-{os.geteuid()}"
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    return private if _trusted(private, directory=True) else None

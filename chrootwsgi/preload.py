"""Load, before entry, what the process would otherwise read lazily from the host.

glibc dlopens NSS modules and ``libgcc_s`` (thread exit unwinding) on first use; Python reads time
zone rules, MIME tables, locale data and codec modules on first use. Inside an empty jail those
files are gone, so everything here runs while the host is still visible. Shared libraries are
loaded with ctypes and never closed: a later ``dlopen`` of the same name finds the loaded copy
without touching the file system (the mod_chroot ``LoadFile`` trick).

Files that stay useful after entry (CA bundles, time zone data) are not copied: :func:`data_files`
lists them, and the jail's private mount view shows them read-only at the same paths.

Do not call this after entry: it would fail on every file it needs.
"""

from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import importlib
import locale
import logging
import mimetypes
import os
import platform
import ssl
import time
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import PreloadError

log = logging.getLogger(__name__)

#: Libraries glibc may dlopen after entry: NSS backends, the resolver, and libgcc_s, which
#: pthread_exit and thread cancellation load on first use. Loaded by soname, so the dynamic
#: linker finds them where glibc itself would.
DEFAULT_LIBRARIES = ("libnss_files.so.2", "libnss_dns.so.2", "libresolv.so.2", "libgcc_s.so.1")

#: Codecs looked up by name at run time (``bytes.decode("cp1252")``, IDNA host names).
DEFAULT_CODECS = (
    "idna",
    "punycode",
    "cp1252",
    "latin-1",
    "ascii",
    "utf-16",
    "utf-32",
    "unicode_escape",
    "raw_unicode_escape",
    "cp437",
    "iso8859-15",
)

_loaded_libraries: list[ctypes.CDLL] = []


@dataclass(kw_only=True, slots=True)
class PreloadReport:
    """What :func:`preload` loaded, for the start-up log line."""

    libraries: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    seconds: float = 0.0


def preload(
    *, libraries: Iterable[str] = (), modules: Iterable[str] = (), user_uid: int | None = None
) -> PreloadReport:
    """Load default and configured libraries and modules, and warm lazily read data.

    :param libraries: extra library names (``"magic"``, ``"libmagic.so.1"``) or absolute paths.
    :param modules: extra modules to import.
    :param user_uid: uid whose passwd entry is looked up once (warms NSS).
    :raises PreloadError: when a *configured* library or module cannot be loaded.
    """
    started = time.perf_counter()
    report = PreloadReport()
    for name in DEFAULT_LIBRARIES:
        path = _load_library(name, required=False)
        if path:
            report.libraries.append(path)
    for name in libraries:
        report.libraries.append(_load_library(name, required=True) or name)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise PreloadError(
                f"preload.modules: cannot import {module!r} ({type(exc).__name__}: {exc}); "
                "fix the name or install the module"
            ) from exc
        report.modules.append(module)
    _warm_lazy_state(user_uid)
    report.seconds = time.perf_counter() - started
    return report


def data_files() -> list[str]:
    """Host files and directories the jail should show read-only at the same paths.

    The CA bundle that ``ssl.create_default_context()`` and requests/certifi read when a context
    is built, and the time zone database that :mod:`zoneinfo` reads per zone.
    """
    paths: list[str] = []
    verify = ssl.get_default_verify_paths()
    for cafile in (verify.cafile, verify.openssl_cafile, os.environ.get("SSL_CERT_FILE")):
        if cafile and os.path.isfile(cafile):
            paths.append(cafile)
    try:
        import certifi  # type: ignore[import-not-found,unused-ignore]

        paths.append(certifi.where())
    except ImportError:
        pass
    for directory in zoneinfo.TZPATH:
        if os.path.isdir(directory):
            paths.append(directory)
            break
    return list(dict.fromkeys(paths))


def _load_library(name: str, *, required: bool) -> str | None:
    path = name if "/" in name or ".so" in name else ctypes.util.find_library(name)
    if path is None:
        if required:
            raise PreloadError(
                f"preload.libraries: no library {name!r} found by the dynamic linker; "
                "install it or give its full path"
            )
        return None
    try:
        _loaded_libraries.append(ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL))
    except OSError as exc:
        if required:
            raise PreloadError(f"preload.libraries: cannot load {name!r}: {exc}") from exc
        log.debug("optional library %s not loaded: %s", name, exc)
        return None
    return path


def _warm_lazy_state(user_uid: int | None) -> None:
    """Touch every cache that Python or glibc fills from host files on first use."""
    for name in DEFAULT_CODECS:
        codecs.lookup(name)
    "bücher.example".encode("idna")
    mimetypes.init()
    time.localtime()  # glibc reads /etc/localtime once, keyed by $TZ
    locale.getpreferredencoding(False)
    locale.localeconv()
    platform.uname()
    platform.platform()
    import uuid

    uuid.getnode()
    if user_uid is not None:
        import grp
        import pwd

        try:
            entry = pwd.getpwuid(user_uid)
            grp.getgrgid(entry.pw_gid)
        except KeyError:
            log.debug("uid %d has no passwd entry on the host", user_uid)

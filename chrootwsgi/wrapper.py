"""The drop-in wrapper: serve an unmodified WSGI app from a jail named in one config file.

An existing mod_wsgi site switches to a jail by pointing ``WSGIImportScript`` and
``WSGIScriptAlias`` at the packaged script (``chrootwsgi wrapper-path`` prints its path) and adding
a config file that names the app::

    # /etc/chrootwsgi/myapp.toml
    app = "myapp.wsgi:application"
    root = "/srv/jail/myapp"

The wrapper finds the file, in this order:

1. ``$CHROOTWSGI_CONFIG`` in the daemon's process environment (``/etc/apache2/envvars``, a systemd
   ``Environment=``, or ``chrootwsgi run``);
2. ``/etc/chrootwsgi/GROUP.toml``, where GROUP is the mod_wsgi daemon process group
   (``WSGIDaemonProcess GROUP ...``), so that several sites share one wrapper.
   ``$CHROOTWSGI_CONFIG_DIR`` replaces ``/etc/chrootwsgi``.

Apache's ``SetEnv`` cannot name the file: it reaches the per-request environ only, and the jail
is entered when the script is imported at daemon start, before any request.

Do not use the wrapper where the app needs code around it (middleware of its own, settings set
in the script): write a script with :class:`~chrootwsgi.ChrootMiddleware` instead.

Nothing fails open: a missing or invalid config file, or an app that cannot be imported, gives a
process that answers every request with 503 and logs the reason once.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from .config import CONFIG_ENV, load_config
from .errors import ChrootWSGIError, ConfigError
from .middleware import ChrootMiddleware, respond_unavailable

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

CONFIG_DIR = "/etc/chrootwsgi"
CONFIG_DIR_ENV = "CHROOTWSGI_CONFIG_DIR"
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrapper.wsgi")

_APP = re.compile(r"(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)")
_UNAVAILABLE_BODY = b"Service Unavailable: this site's jail configuration failed to load.\n"


def wrapper_path() -> str:
    """The packaged WSGI script to name in ``WSGIImportScript`` and ``WSGIScriptAlias``."""
    return SCRIPT


def config_path(process_group: str | None) -> str:
    """The config file the wrapper reads in a daemon of *process_group*.

    :raises ConfigError: neither ``$CHROOTWSGI_CONFIG`` nor a process group names one.
    """
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return explicit
    if not process_group:
        raise ConfigError(
            f"no config file: set ${CONFIG_ENV} in the server's environment, or run the wrapper "
            f"in a named mod_wsgi daemon process group (WSGIDaemonProcess NAME) and put the file "
            f"at {config_dir()}/NAME.toml"
        )
    return os.path.join(config_dir(), f"{process_group}.toml")


def config_dir() -> str:
    """``$CHROOTWSGI_CONFIG_DIR`` or ``/etc/chrootwsgi``."""
    return os.environ.get(CONFIG_DIR_ENV) or CONFIG_DIR


def parse_app(spec: str) -> tuple[str, str]:
    """Split ``"package.module:callable"``; :raises ConfigError: on any other shape."""
    match = _APP.fullmatch(spec)
    if match is None:
        raise ConfigError(
            f'app = {spec!r}: expected "module:callable", e.g. "myapp.wsgi:application"'
        )
    return match["module"], match["attr"]


def import_app(spec: str) -> WSGIApplication:
    """Import ``module:callable`` and return the callable.

    :raises ConfigError: the module cannot be imported or has no such callable.
    """
    module_name, attr = parse_app(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"app = {spec!r}: cannot import {module_name!r} ({exc}); add its directory to "
            "WSGIDaemonProcess python-path=, or install it into the python-home"
        ) from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"app = {spec!r}: module {module_name!r} has no attribute {attr!r}; name the WSGI "
                "callable (often 'application' or 'app')"
            ) from None
    if not callable(target):
        raise ConfigError(f"app = {spec!r}: {attr!r} is {type(target).__name__}, not callable")
    return cast("WSGIApplication", target)


def load_application(process_group: str | None = None) -> WSGIApplication:
    """Read the config file, import the app and return it wrapped in its jail.

    Call this at import time of a mod_wsgi script loaded by ``WSGIImportScript``. Never raises:
    on any failure the returned app answers 503 and the reason is logged.

    :param process_group: the mod_wsgi daemon process group; found from :mod:`mod_wsgi` when
        omitted.
    """
    path: str | None = None
    try:
        path = config_path(process_group or _mod_wsgi_process_group())
        config = load_config(path)
        if config.app is None:
            raise ConfigError(
                f'{path}: no app to serve; add app = "module:callable", '
                'e.g. app = "myapp.wsgi:application"'
            )
        app = import_app(config.app)
    except ChrootWSGIError as exc:
        return Unavailable(str(exc))
    except Exception as exc:  # the app's own import failed: serve nothing, say why
        log.exception("pid %d: importing the app named in %s failed", os.getpid(), path)
        return Unavailable(f"importing the app named in {path} failed: {exc!r}")
    return ChrootMiddleware(app, config=config)


class Unavailable:
    """The app of a process whose configuration failed: 503 for every request.

    :param reason: logged once per process, at construction.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        log.error("pid %d: not serving, answering 503 to every request: %s", os.getpid(), reason)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return respond_unavailable(start_response, _UNAVAILABLE_BODY)


def _mod_wsgi_process_group() -> str | None:
    try:
        import mod_wsgi  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    group = getattr(mod_wsgi, "process_group", None)
    return group if isinstance(group, str) and group else None

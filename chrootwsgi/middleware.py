"""WSGI middleware that enters the jail at construction and fails closed.

Use it in the WSGI script that mod_wsgi loads at daemon start (``WSGIImportScript``), so that
entry happens while the daemon process is still single-threaded::

    from chrootwsgi import ChrootMiddleware
    from myapp import app
    application = ChrootMiddleware(app, root="/srv/jail")

Do not use it where the script is first loaded by a request (a plain ``WSGIScriptAlias`` without
``WSGIImportScript``): request threads already run then, entry fails, and every request gets 503.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .config import JailConfig, load_config
from .errors import ChrootWSGIError
from .jail import current_state, enter_jail
from .paths import PathMapper

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

_UNAVAILABLE_BODY = b"Service Unavailable: this worker is not running in its jail.\n"


class ChrootMiddleware:
    """Enter the jail now; then serve *app* from inside it, or answer 503 if entry failed.

    No jail work happens per request: only path rewriting (:class:`~chrootwsgi.paths.PathMapper`)
    and a check that the process is jailed. The wrapped app is never called in a process that is
    not jailed, whatever the reason (entry failed, or a process that never entered).

    :param app: the WSGI application to serve.
    :param root: the jail directory (or from the config file).
    :param config: a ready :class:`~chrootwsgi.config.JailConfig`.
    :param enter: enter the jail now (mod_wsgi ``WSGIImportScript``). Pass ``False`` where each
        worker enters later, e.g. gunicorn ``--preload`` with :func:`~chrootwsgi.enter_jail` in a
        ``post_fork`` hook; the configuration is still validated now.
    :param options: any other :class:`~chrootwsgi.config.JailConfig` setting.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        root: str | None = None,
        config: JailConfig | None = None,
        enter: bool = True,
        **options: object,
    ) -> None:
        self.app = app
        self.config = config
        self.error: str | None = None
        self._paths: PathMapper | None = None
        self._error_logged = False
        try:
            if self.config is None:
                self.config = load_config(root=root, **options)
            if enter:
                enter_jail(config=self.config, script=_calling_script())
        except ChrootWSGIError as exc:
            self.error = str(exc)
            self._log_failure()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        state = current_state()
        if state is None or not state.entered or state.config is None or self.error:
            return self._unavailable(start_response)
        if self._paths is None:
            self._paths = _mapper(state.config, state.same_paths)
        self._paths.rewrite(environ)
        environ["chrootwsgi.jailed"] = True
        environ["chrootwsgi.root"] = state.config.root
        return self.app(environ, start_response)

    def _unavailable(self, start_response: StartResponse) -> Iterable[bytes]:
        if self.error is None:
            self.error = f"pid {os.getpid()} never entered its jail"
        self._log_failure()
        return respond_unavailable(start_response, _UNAVAILABLE_BODY)

    def _log_failure(self) -> None:
        if not self._error_logged:
            self._error_logged = True
            log.error(
                "pid %d: not jailed, answering 503 to every request: %s", os.getpid(), self.error
            )


def respond_unavailable(start_response: StartResponse, body: bytes) -> Iterable[bytes]:
    """Answer ``503 Service Unavailable`` with a short plain-text *body* (fail closed)."""
    start_response(
        "503 Service Unavailable",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Retry-After", "60"),
        ],
    )
    return [body]


def _mapper(config: JailConfig, same_paths: Iterable[str]) -> PathMapper:
    mappings = [(config.root, "/")]
    mappings += [(path, path) for path in same_paths]
    mappings += [(exposure.host, exposure.jail) for exposure in config.expose]
    mappings += list(config.path_map.items())
    return PathMapper(mappings)


def _calling_script() -> str | None:
    """The mod_wsgi script file that is constructing the middleware, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if isinstance(name, str) and name.startswith("_mod_wsgi_"):
            path = frame.f_globals.get("__file__")
            return path if isinstance(path, str) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None

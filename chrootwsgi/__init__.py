"""chrootwsgi: enter an empty chroot jail late in a WSGI worker, then keep serving.

The worker imports the app, preloads what it would otherwise read lazily from the host, and enters
the jail; from then on it serves every request from inside it::

    from chrootwsgi import ChrootMiddleware
    application = ChrootMiddleware(app, root="/srv/jail")

:func:`enter_jail` is the low-level call for other servers (a gunicorn ``post_fork`` hook) and
plain processes.
"""

from __future__ import annotations

from .config import Exposure, JailConfig, load_config
from .errors import ChrootWSGIError, ConfigError, EntryError, PreloadError, VerifyError
from .jail import JailState, current_state, enter_jail, is_jailed
from .middleware import ChrootMiddleware
from .paths import PathMapper

__all__ = [
    "ChrootMiddleware",
    "ChrootWSGIError",
    "ConfigError",
    "EntryError",
    "Exposure",
    "JailConfig",
    "JailState",
    "PathMapper",
    "PreloadError",
    "VerifyError",
    "current_state",
    "enter_jail",
    "is_jailed",
    "load_config",
]

"""``chrootwsgi run``: serve an app from its jail through ``mod_wsgi-express``, for development.

The real thing, small: Apache with mod_wsgi in daemon mode, running the packaged wrapper with the
jail config that :func:`write_config` derives from the command line. The config file is handed to
the daemon in ``$CHROOTWSGI_CONFIG`` (mod_wsgi-express's ``--setenv`` reaches the per-request
environ only, too late for the jail). Code reloading is off: a reloaded app would be imported by a
request thread, which cannot enter a jail; restart the command instead.

Not for production: use ``chrootwsgi apache-config`` there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence

from .config import CONFIG_ENV, load_config
from .errors import ConfigError
from .wrapper import parse_app, wrapper_path


def write_config(path: str, *, app: str, root: str, expose: Sequence[str] = ()) -> None:
    """Write a minimal jail config file for ``chrootwsgi run`` and validate it.

    :raises ConfigError: as :func:`~chrootwsgi.config.load_config` would at daemon start.
    """
    parse_app(app)
    lines = [f"app = {json.dumps(app)}", f"root = {json.dumps(root)}"]
    if expose:
        lines.append(f"expose = [{', '.join(json.dumps(item) for item in expose)}]")
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    load_config(path)


def express_command(
    *,
    server_root: str,
    host: str,
    port: int,
    user: str,
    group: str | None,
    processes: int,
    threads: int,
    python_path: Sequence[str] = (),
) -> list[str]:
    """The ``mod_wsgi-express start-server`` command line serving the wrapper in the foreground."""
    express = os.path.join(os.path.dirname(sys.executable), "mod_wsgi-express")
    if not os.path.exists(express):
        express = shutil.which("mod_wsgi-express") or ""
    if not express:
        raise ConfigError(
            "mod_wsgi-express not found next to this Python or on PATH: pip install mod_wsgi"
        )
    command = [
        express,
        "start-server",
        wrapper_path(),
        "--server-root",
        server_root,
        "--host",
        host,
        "--port",
        str(port),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--disable-reloading",
        "--locale",
        "C.UTF-8",
        "--log-to-terminal",
    ]
    if os.geteuid() == 0:
        command += ["--user", user, "--group", group or user]
    for directory in python_path:
        command += ["--python-path", directory]
    return command


def server_env(config_path: str) -> dict[str, str]:
    """The environment for mod_wsgi-express: this one, with the jail config named."""
    env = dict(os.environ)
    env[CONFIG_ENV] = config_path
    return env

"""Render the Apache configuration of a jailed site (``chrootwsgi apache-config``).

The snippet runs the packaged wrapper (:mod:`chrootwsgi.wrapper`) in a mod_wsgi daemon process
group named after the site, imported at daemon start so that the jail is entered while the process
is single-threaded. It loads mod_wsgi only where no ``wsgi_module`` is loaded yet, so it can go
into ``/etc/apache2/conf-available/`` (``a2enconf``) or inside a ``<VirtualHost>``.

Example::

    chrootwsgi apache-config --app myapp.wsgi:application --root /srv/jail/myapp \\
        --python-path /srv/myapp --static /static=/srv/myapp/static \\
        > /etc/apache2/conf-available/myapp.conf

It renders text only; :func:`render` does not touch the system apart from reading user and
group names.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import subprocess
import sys
import sysconfig
from dataclasses import dataclass

from .errors import ConfigError
from .wrapper import config_dir, parse_app

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True, kw_only=True, slots=True)
class SiteOptions:
    """What ``chrootwsgi apache-config`` was asked for.

    :param app: ``"module:callable"`` of the WSGI app.
    :param root: the jail directory.
    :param name: the daemon process group; the wrapper reads ``/etc/chrootwsgi/NAME.toml``.
    :param config: the config file; defaults to ``/etc/chrootwsgi/NAME.toml``. Any other path
        must be given to the daemon in ``$CHROOTWSGI_CONFIG`` (the snippet says how).
    :param user: the daemon's user; never root (the jail's rootless mode needs an ordinary user).
    :param group: the daemon's group; defaults to *user*.
    :param processes: daemon processes.
    :param threads: request threads per process.
    :param mount: the URL path the app is served at.
    :param static: ``(url, directory)`` pairs that Apache serves itself.
    :param python_path: directories holding the app's code.
    :param python_home: the virtualenv (or prefix) chrootwsgi is installed in.
    :param wrapper: the wrapper script; by default the one in *python_home*'s chrootwsgi.
    :param mod_wsgi_module: the mod_wsgi Apache module to load when none is loaded.
    :param command: the command line that produced the snippet, quoted in its header.
    """

    app: str
    root: str
    name: str
    config: str
    user: str = "www-data"
    group: str | None = None
    processes: int = 2
    threads: int = 15
    mount: str = "/"
    static: tuple[tuple[str, str], ...] = ()
    python_path: tuple[str, ...] = ()
    python_home: str = sys.prefix
    wrapper: str = ""
    mod_wsgi_module: str = ""
    command: str = ""


def site_options(
    *,
    app: str,
    root: str,
    name: str | None = None,
    config: str | None = None,
    user: str = "www-data",
    group: str | None = None,
    processes: int = 2,
    threads: int = 15,
    mount: str = "/",
    static: tuple[str, ...] = (),
    python_path: tuple[str, ...] = (),
    python_home: str | None = None,
    wrapper: str | None = None,
    mod_wsgi_module: str | None = None,
    command: str = "",
) -> SiteOptions:
    """Validate the command-line values and fill in the defaults.

    :param static: ``"URL=DIRECTORY"`` strings.
    :raises ConfigError: naming the option, the value and the fix.
    """
    module, _ = parse_app(app)
    if name is None:
        name = os.path.splitext(os.path.basename(config))[0] if config else module.split(".")[0]
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '.' and '-' only")
    for option, path in [("--root", root), *(("--python-path", p) for p in python_path)]:
        if not os.path.isabs(path):
            raise ConfigError(f"{option} {path!r}: give an absolute path")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--user {user!r}: no such user; create it or name another") from None
    if entry.pw_uid == 0:
        raise ConfigError(
            "--user root: the jailed daemon must run as an ordinary user (root can leave a "
            "chroot); use www-data or a user of its own per site"
        )
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(
                f"--group {group!r}: no such group; create it or name another"
            ) from None
    for option, count in (("--processes", processes), ("--threads", threads)):
        if count < 1:
            raise ConfigError(f"{option} {count}: give at least 1")
    if not mount.startswith("/"):
        raise ConfigError(f"--mount {mount!r}: give a URL path starting with '/'")
    pairs = []
    for item in static:
        url, sep, directory = item.partition("=")
        if not sep or not url.startswith("/") or not os.path.isabs(directory):
            raise ConfigError(
                f"--static {item!r}: expected URL=DIRECTORY, e.g. /static=/srv/myapp/static"
            )
        pairs.append((url, os.path.normpath(directory)))
    home = os.path.normpath(python_home or sys.prefix)
    return SiteOptions(
        app=app,
        root=os.path.normpath(root),
        name=name,
        config=config or os.path.join(config_dir(), f"{name}.toml"),
        user=user,
        group=group,
        processes=processes,
        threads=threads,
        mount=mount,
        static=tuple(pairs),
        python_path=tuple(os.path.normpath(p) for p in python_path),
        python_home=home,
        wrapper=wrapper or _wrapper_in(home),
        mod_wsgi_module=mod_wsgi_module or _mod_wsgi_module(home),
        command=command,
    )


def render(site: SiteOptions) -> str:
    """The Apache configuration for *site*, with a comment on every directive."""
    group = site.group or site.user
    script_dir, script_name = os.path.split(site.wrapper)
    daemon = [
        f"WSGIDaemonProcess {site.name} user={site.user} group={group}",
        f"processes={site.processes} threads={site.threads}",
        f"python-home={site.python_home}",
    ]
    if site.python_path:
        daemon.append(f"python-path={':'.join(site.python_path)}")
    daemon.append("display-name=%{GROUP}")
    in_default_place = site.config == os.path.join(config_dir(), f"{site.name}.toml")
    lines = [
        f"# chrootwsgi: {site.app} served from the jail {site.root}",
        f"# Generated by: {site.command}" if site.command else "# Generated by chrootwsgi.",
        "#",
        f"# The jail is configured in {site.config}; the wrapper reads it in the daemon:",
        f'#     app = "{site.app}"',
        f'#     root = "{site.root}"',
        f"# Check it with: chrootwsgi check-config {site.config}",
        f"# Prepare the jail with: chrootwsgi jail init {site.root}",
    ]
    if not in_default_place:
        lines += [
            f"# The file is not at {config_dir()}/{site.name}.toml, where the wrapper looks for",
            "# the daemon group of this name: add to /etc/apache2/envvars",
            f"#     export CHROOTWSGI_CONFIG={site.config}",
        ]
    lines += [
        "",
        "# mod_wsgi: Debian's libapache2-mod-wsgi-py3 is built for the system Python; this one",
        "# was built by pip for the Python that chrootwsgi is installed in.",
        "<IfModule !wsgi_module>",
        f"    LoadModule wsgi_module {site.mod_wsgi_module}",
        "</IfModule>",
        "",
        "# Daemon mode, as an ordinary user: each process enters the jail (rootless mode: a user",
        "# namespace) right after it imports the app, and serves every request from inside it.",
        " \\\n    ".join(daemon),
        "",
        "# Import the wrapper at daemon start, while the process has a single thread: the jail can",
        "# only be entered then. Without this, the first request imports it with request threads",
        "# running, entry fails, and every request gets 503.",
        f"WSGIImportScript {site.wrapper} \\",
        f"    process-group={site.name} application-group=%{{GLOBAL}}",
        "",
        f"WSGIScriptAlias {site.mount} {site.wrapper} \\",
        f"    process-group={site.name} application-group=%{{GLOBAL}}",
        "",
        f"<Directory {script_dir}>",
        f"    <Files {script_name}>",
        "        Require all granted",
        "    </Files>",
        "    # mod_wsgi stats the script per request; it stays visible (read-only) in the jail,",
        "    # but a reload would import the app again in a request thread, which cannot enter",
        "    # a jail. Reload code with `apache2ctl graceful`: every new daemon enters again.",
        "    WSGIScriptReloading Off",
        "</Directory>",
    ]
    for url, directory in site.static:
        lines += [
            "",
            f"# Static files, served by Apache itself (the jailed app cannot see {directory}",
            "# unless the jail config exposes it).",
            f"Alias {url} {directory}",
            f"<Directory {directory}>",
            "    Require all granted",
            "</Directory>",
        ]
    return "\n".join(lines) + "\n"


def _wrapper_in(python_home: str) -> str:
    if python_home == os.path.normpath(sys.prefix):
        from .wrapper import wrapper_path

        return wrapper_path()
    return os.path.join(_site_packages(python_home), "chrootwsgi", "wrapper.wsgi")


def _mod_wsgi_module(python_home: str) -> str:
    express = os.path.join(python_home, "bin", "mod_wsgi-express")
    if os.path.exists(express):
        result = subprocess.run(
            [express, "module-location"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    # Where pip builds it: mod_wsgi/server/mod_wsgi-py311.cpython-311-x86_64-linux-gnu.so
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return os.path.join(
        _site_packages(python_home), "mod_wsgi", "server", f"mod_wsgi-py{tag}{suffix}"
    )


def _site_packages(python_home: str) -> str:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(python_home, "lib", version, "site-packages")


def quote_command(argv: list[str]) -> str:
    """*argv* as a shell command line, for the snippet's header."""
    return shlex.join(["chrootwsgi", *argv])

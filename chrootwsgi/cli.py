"""The ``chrootwsgi`` command: checks and helpers for administrators.

::

    chrootwsgi check-config FILE        validate a jail config file
    chrootwsgi config-reference         print the config file reference (Markdown)
    chrootwsgi wrapper-path             print the packaged drop-in WSGI script's path
    chrootwsgi apache-config ...        print an Apache snippet serving an app from its jail
    chrootwsgi run APP --root DIR       serve an app jailed through mod_wsgi-express (development)
    chrootwsgi jail init [DIR]          create or check a jail directory
    chrootwsgi doctor [--config FILE]   find what the app will miss in the jail

Exit codes are the ``EXIT_*`` constants below.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile

from . import __name__ as package
from .config import CONFIG_ENV, Exposure, load_config
from .errors import ChrootWSGIError, ConfigError, UnsafeJailError

#: Success; for ``doctor``: nothing found that the jail will break.
EXIT_OK = 0
#: A configuration file or command-line value is invalid; the message says which and the fix.
EXIT_CONFIG = 1
#: The command line itself is wrong (argparse).
EXIT_USAGE = 2
#: ``jail init`` refused the directory: each problem is printed with its fix.
EXIT_UNSAFE_JAIL = 3
#: ``doctor`` found something that will break in the jail.
EXIT_WILL_BREAK = 4
#: ``run``: the server stopped with an error, or could not be started.
EXIT_SERVER = 5


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chrootwsgi`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        code: int = args.handler(args)
    except UnsafeJailError as exc:
        print("chrootwsgi: refused; fix these and run it again:", file=sys.stderr)
        for path, what, fix in exc.problems:
            print(f"  {path}: {what}\n    fix: {fix}", file=sys.stderr)
        return EXIT_UNSAFE_JAIL
    except ChrootWSGIError as exc:
        print(f"chrootwsgi: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chrootwsgi",
        description=f"{package} jail tools",
        epilog="exit codes: 0 ok, 1 invalid configuration, 2 usage, 3 jail init refused, "
        "4 doctor found breakage, 5 server failed",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a jail configuration file")
    check.add_argument("config", help=f"TOML file, as named by {CONFIG_ENV}")
    check.set_defaults(handler=_check_config)

    reference = commands.add_parser(
        "config-reference", help="print the config file reference (Markdown) from the schema"
    )
    reference.set_defaults(handler=_config_reference)

    wrapper = commands.add_parser(
        "wrapper-path", help="print the drop-in WSGI script to name in WSGIScriptAlias"
    )
    wrapper.set_defaults(handler=_wrapper_path)

    apache = commands.add_parser(
        "apache-config",
        help="print an Apache snippet serving an app from its jail",
        description="Print a complete, commented Apache configuration: mod_wsgi daemon mode, "
        "the wrapper imported at daemon start, static files served by Apache.",
    )
    apache.add_argument("--app", required=True, metavar="MODULE:CALLABLE")
    apache.add_argument("--root", required=True, metavar="DIR", help="the jail directory")
    apache.add_argument(
        "--name", help="daemon process group (default: the config file's or the app's name)"
    )
    apache.add_argument(
        "--config",
        metavar="FILE",
        help="the jail config file (default /etc/chrootwsgi/NAME.toml, where the wrapper looks)",
    )
    apache.add_argument("--user", default="www-data", help="daemon user (default www-data)")
    apache.add_argument("--group", help="daemon group (default: the user)")
    apache.add_argument("--processes", type=int, default=2, metavar="N")
    apache.add_argument("--threads", type=int, default=15, metavar="N")
    apache.add_argument("--mount", default="/", metavar="URL", help="URL path (default /)")
    apache.add_argument(
        "--static", action="append", default=[], metavar="URL=DIR", help="served by Apache"
    )
    apache.add_argument(
        "--python-path", action="append", default=[], metavar="DIR", help="the app's code"
    )
    apache.add_argument("--python-home", metavar="DIR", help=f"default: {sys.prefix}")
    apache.add_argument(
        "--write-config",
        action="store_true",
        help="also create the config file with app and root (never overwrites)",
    )
    apache.set_defaults(handler=_apache_config)

    run = commands.add_parser(
        "run",
        help="serve an app jailed through mod_wsgi-express (development)",
        description="Serve APP from the jail DIR with Apache + mod_wsgi (mod_wsgi-express) in "
        "the foreground until Ctrl-C. Code reloading is off: restart to reload.",
    )
    run.add_argument("app", nargs="?", metavar="APP", help="MODULE:CALLABLE")
    run.add_argument("--root", metavar="DIR", help="the jail directory")
    run.add_argument("--config", metavar="FILE", help="a jail config file instead of APP --root")
    run.add_argument(
        "--expose", action="append", default=[], metavar="HOST[:JAIL[:rw]]", help="repeatable"
    )
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--user", default="www-data", help="daemon user when run as root")
    run.add_argument("--group")
    run.add_argument("--processes", type=int, default=1, metavar="N")
    run.add_argument("--threads", type=int, default=5, metavar="N")
    run.add_argument("--python-path", action="append", default=[], metavar="DIR")
    run.set_defaults(handler=_run)

    jail = commands.add_parser("jail", help="jail directory tools")
    jail_commands = jail.add_subparsers(dest="jail_command", required=True)
    init = jail_commands.add_parser(
        "init",
        help="create or check a jail directory",
        description="Create DIR (root:root, 0755) or check an existing one; refuse unsafe "
        "states, each with its fix. Changes nothing that exists.",
    )
    init.add_argument("root", nargs="?", metavar="DIR", help="default: root of --config")
    init.add_argument("--user", default=None, help="the worker user (default www-data)")
    init.add_argument("--tmp", action="store_true", help="create tmp/ (1777), shared by workers")
    init.add_argument(
        "--config", metavar="FILE", help="create mount points for this config's exposures"
    )
    init.set_defaults(handler=_jail_init)

    doctor = commands.add_parser(
        "doctor",
        help="find what the app will miss in the jail",
        description="Run the app once unjailed under an audit hook with test requests; list "
        "what it touched that the jail will not show, with fixes; check the system.",
    )
    doctor.add_argument("--config", metavar="FILE", help=f"default: ${CONFIG_ENV}")
    doctor.add_argument(
        "--path", action="append", default=[], metavar="URL", help="GET it (default /)"
    )
    doctor.add_argument("--python-path", action="append", default=[], metavar="DIR")
    doctor.add_argument("--user", help="run the app as this user (default www-data)")
    doctor.set_defaults(handler=_doctor)
    return parser


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok, jail {config.root} ({config.mode})")
    return EXIT_OK


def _config_reference(args: argparse.Namespace) -> int:
    from .reference import config_reference

    print(config_reference(), end="")
    return EXIT_OK


def _wrapper_path(args: argparse.Namespace) -> int:
    from .wrapper import wrapper_path

    print(wrapper_path())
    return EXIT_OK


def _apache_config(args: argparse.Namespace) -> int:
    from .apache_config import quote_command, render, site_options

    site = site_options(
        app=args.app,
        root=args.root,
        name=args.name,
        config=args.config,
        user=args.user,
        group=args.group,
        processes=args.processes,
        threads=args.threads,
        mount=args.mount,
        static=tuple(args.static),
        python_path=tuple(args.python_path),
        python_home=args.python_home,
        command=quote_command(args.argv),
    )
    if args.write_config:
        if os.path.exists(site.config):
            print(f"chrootwsgi: {site.config} exists; left as it is", file=sys.stderr)
        else:
            os.makedirs(os.path.dirname(site.config), mode=0o755, exist_ok=True)
            with open(site.config, "x") as file:
                file.write(f'app = "{site.app}"\nroot = "{site.root}"\n')
            os.chmod(site.config, 0o644)
            print(f"chrootwsgi: wrote {site.config}", file=sys.stderr)
    print(render(site), end="")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from .devserver import express_command, server_env, write_config

    with tempfile.TemporaryDirectory(prefix="chrootwsgi-run-") as server_root:
        os.chmod(server_root, 0o755)
        if args.config:
            if args.app or args.root or args.expose:
                raise ConfigError("give --config FILE or APP --root DIR [--expose], not both")
            config_path = os.path.abspath(args.config)
            load_config(config_path)
        else:
            if not args.app or not args.root:
                raise ConfigError("give APP (module:callable) and --root DIR, or --config FILE")
            config_path = os.path.join(server_root, "chrootwsgi.toml")
            write_config(config_path, app=args.app, root=args.root, expose=args.expose)
        command = express_command(
            server_root=os.path.join(server_root, "server"),
            host=args.host,
            port=args.port,
            user=args.user,
            group=args.group,
            processes=args.processes,
            threads=args.threads,
            python_path=args.python_path,
        )
        print(f"chrootwsgi: serving http://{args.host}:{args.port}/ jailed; Ctrl-C stops")
        sys.stdout.flush()
        process = subprocess.Popen(command, env=server_env(config_path))

        def forward(signum: int, frame: object) -> None:
            process.send_signal(signum)  # Apache stops its daemons and itself on TERM and INT

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        code = process.wait()
        # httpd exits 0 when stopped by a signal; a negative code means it was killed.
        return EXIT_OK if code == 0 else EXIT_SERVER


def _jail_init(args: argparse.Namespace) -> int:
    from .jail_init import init_jail

    root = args.root
    exposures: tuple[Exposure, ...] = ()
    user = args.user
    if args.config:
        config = load_config(args.config)
        if root and os.path.normpath(root) != config.root:
            raise ConfigError(f"{root} is not the root in {args.config} ({config.root})")
        root = config.root
        exposures = config.expose
        user = user or config.user
    if not root:
        raise ConfigError("give the jail directory: chrootwsgi jail init /srv/jail/myapp")
    for line in init_jail(root, user=user or "www-data", tmp=args.tmp, exposures=exposures):
        print(line)
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, format_report

    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"give --config FILE or set ${CONFIG_ENV}")
    report = diagnose(path, paths=args.path or ["/"], python_path=args.python_path, user=args.user)
    print(format_report(report), end="")
    return EXIT_WILL_BREAK if report.breaks else EXIT_OK

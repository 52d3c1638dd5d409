"""The ``chrootwsgi`` command: checks and helpers for administrators."""

from __future__ import annotations

import argparse
import sys

from . import __name__ as package
from .config import load_config
from .errors import ChrootWSGIError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chrootwsgi`` console script."""
    parser = argparse.ArgumentParser(prog="chrootwsgi", description=f"{package} jail tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a jail configuration file")
    check.add_argument("config", help="TOML file, as named by CHROOTWSGI_CONFIG")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        try:
            config = load_config(args.config)
        except ChrootWSGIError as exc:
            print(f"chrootwsgi: {exc}", file=sys.stderr)
            return 1
        print(f"{args.config}: ok, jail {config.root} ({config.mode})")
    return 0

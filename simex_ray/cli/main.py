"""`simex`: the root command. It only dispatches: every verb group is one module of this package that
adds its parsers (``add_parsers``) and maps its verbs to functions (``COMMANDS``)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import cluster, experiment, fleet, library, pair, select, serve, tune
from .common import run_cli

# Verb groups in the order `simex --help` lists them.
GROUPS = (fleet, pair, select, library, serve, experiment, tune, cluster)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simex", description="SimEx: which known dataset does unknown data resemble? "
                                  "(autoencoder reconstruction error, on Ray)")
    parser.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def commands() -> dict:
    """Every verb -> the function that runs it."""
    return {verb: fn for group in GROUPS for verb, fn in group.COMMANDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: commands()[args.command](args), f"simex {args.command}", debug=args.debug)

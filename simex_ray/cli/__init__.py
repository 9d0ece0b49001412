"""The `simex` command line: the only package that parses arguments."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]

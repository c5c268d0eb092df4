"""The command line (qcompile.cli.main)."""

from qcompile.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

"""The `switch` command. Each command group lives in its own module under switch/commands/ and exposes
`register(subparsers)`; this file only assembles them, so groups can grow without touching each other.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from switch.codec.masking import scrub_text

#: Command-group modules, in help order. Each defines register(subparsers) -> None.
COMMAND_MODULES = (
    "switch.commands.run",
    "switch.commands.demo",
    "switch.commands.terminal",
    "switch.commands.acquirer",
    "switch.commands.ledger",
    "switch.commands.merchant",
    "switch.commands.keys",
)


class CommandLineParser(argparse.ArgumentParser):
    """argparse with its error messages scrubbed of card numbers: "unrecognized arguments" and
    "invalid choice" quote what was typed, and a PAN typed in the wrong place must not come back in
    clear on a screen, in a shell log or in a CI transcript. Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        super().error(scrub_text(message))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="switch", description="ISO 8583 payment switch")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)

"""`switch run --config switch.toml`: run the switch until interrupted (Ctrl-C / SIGTERM)."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys

import trio

from switch.config import ConfigError, load_config

log = logging.getLogger("switch.run")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the switch", description=__doc__)
    p.add_argument("--config", default="switch.toml", help="config file (default: switch.toml)")
    p.add_argument("--check", action="store_true", help="load and validate the config, open nothing, exit")
    p.set_defaults(handler=main)


async def _run(config: object) -> None:
    from switch.server.app import serve

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(functools.partial(serve, config, manage_gc=True))  # owns the process
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"switch run: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(
            f"{args.config}: OK ({len(config.listeners)} listeners, {len(config.acquirers)} acquirers, "
            f"{len(config.terminals)} terminals)"
        )
        return 0
    from switch.server.app import StartupError

    failed: list[BaseException] = []
    try:
        trio.run(_run, config)
    except* (StartupError, OSError) as group:  # raised inside the nursery: unwrap for a clear line
        failed.extend(group.exceptions)
    for exc in failed:
        print(f"switch run: cannot start: {exc}", file=sys.stderr)
    return 2 if failed else 0

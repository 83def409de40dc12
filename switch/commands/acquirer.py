"""`switch acquirer sim`: run the acquirer host simulator until interrupted.

Settings come from a TOML file of switch.sim.acquirer.AcquirerSimConfig fields (``--config``); the flags
override the few things one changes on the command line (port, fault, latency, seed, MAC key).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import msgspec
import trio

from switch.sim.acquirer import AcquirerSim, AcquirerSimConfig, Fault

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("acquirer", help="acquirer-side tools")
    sub = group.add_subparsers(dest="acquirer_command", metavar="SUBCOMMAND")
    sim = sub.add_parser("sim", help="run an ISO 8583 acquirer host simulator")
    sim.add_argument("--config", type=Path, help="TOML file of AcquirerSimConfig settings")
    sim.add_argument("--host", help="listen address (default 127.0.0.1)")
    sim.add_argument("--port", type=int, help="listen port (0: any free port, printed at start)")
    sim.add_argument("--fault", choices=[f.value for f in Fault], help="fault mode for this run")
    sim.add_argument("--fault-rate", type=float, help="fraction of authorisations that get the fault")
    sim.add_argument("--latency-ms", type=float, help="fixed answer delay (or lognormal median)")
    sim.add_argument("--seed", type=int, help="seed of latency and fault draws")
    sim.add_argument("--mac-key", help="hex double-length MAC key shared with the switch")
    sim.set_defaults(handler=run_sim)
    group.set_defaults(handler=lambda args: group.print_help() or 2)


def load_sim_config(args: argparse.Namespace) -> AcquirerSimConfig:
    """The file's settings with the flags applied; errors name the setting."""
    config = AcquirerSimConfig()
    if args.config is not None:
        try:
            config = msgspec.toml.decode(args.config.read_bytes(), type=AcquirerSimConfig)
        except OSError as exc:
            raise SystemExit(f"cannot read {args.config}: {exc.strerror}") from None
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise SystemExit(f"{args.config}: {exc}") from None
    overrides = {
        "host": args.host,
        "port": args.port,
        "fault": Fault(args.fault) if args.fault else None,
        "fault_rate": args.fault_rate,
        "latency_ms": args.latency_ms,
        "seed": args.seed,
        "mac_key_hex": args.mac_key,
    }
    return msgspec.structs.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def run_sim(args: argparse.Namespace) -> int:
    config = load_sim_config(args)
    sim = AcquirerSim(config)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sim.serve)
            print(f"acquirer simulator {config.name} listening on {config.host}:{port}", flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        r = sim.records
        print(
            f"stopped: {len(r.approved)} approved, {len(r.reversals)} reversed, faults {r.faults}",
            file=sys.stderr,
        )
    return 0

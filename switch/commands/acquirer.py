"""`switch acquirer sim`: run the acquirer host simulator until interrupted.

Settings come from a TOML file of switch.sim.acquirer.AcquirerSimConfig fields (``--config``); the flags
override the few things one changes on the command line (port, fault, latency, seed).

The link MAC key (the clear twin of the switch's ``[[acquirers]] mac_key_sealed_hex``) never comes from
the command line, where `ps` and shell history would see it. In order of precedence it comes from
``--mac-key-file PATH`` (hex; refused when group or others may read it, as ssh refuses a private key),
the environment variable ``SWITCH_SIM_MAC_KEY`` (hex), or ``mac_key_hex`` in the ``--config`` file
(which is then a key file: refused on the same terms). None of them: the links are not MACed. The
start-up line names where the key came from and its check value, never the key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import msgspec
import trio

from switch.codec.keys import SecretKey
from switch.private_files import MAX_KEY_FILE_BYTES, read_private_file
from switch.sim.acquirer import AcquirerSim, AcquirerSimConfig, Fault

log = logging.getLogger(__name__)

#: Environment variable holding the simulator's link MAC key (32 hex digits).
MAC_KEY_ENV = "SWITCH_SIM_MAC_KEY"


class SimKeyError(ValueError):
    """A simulator key that cannot be used; the message names where it came from, never its value."""


def parse_hex_key(text: str, where: str, length: int = 16) -> bytes:
    """`length` key bytes from hex text (whitespace ignored). Errors name `where`, never the text."""
    try:
        key = bytes.fromhex("".join(text.split()))
    except ValueError:
        key = None
    if key is None:  # raised outside the handler: no exception chain leads back to the text
        raise SimKeyError(f"the key from {where} is not hex text")
    if len(key) != length:
        raise SimKeyError(f"the key from {where} must be {length} bytes ({2 * length} hex digits)")
    return key


def read_sim_key_file(path: str | Path, what: str, limit: int = MAX_KEY_FILE_BYTES) -> str:
    """A simulator's private file (switch.private_files), refused with SimKeyError."""
    return read_private_file(
        path, what, SimKeyError, content=f"ASCII text of at most {limit} bytes", limit=limit
    )


def sim_mac_key(
    args: argparse.Namespace, config: AcquirerSimConfig, environ: Mapping[str, str]
) -> tuple[bytes | None, str]:
    """The link MAC key and where it came from: --mac-key-file, then $SWITCH_SIM_MAC_KEY, then the
    config file's mac_key_hex (that file must then be private too); (None, "") when none is given."""
    if args.mac_key_file is not None:
        where = f"--mac-key-file {args.mac_key_file}"
        return parse_hex_key(read_sim_key_file(args.mac_key_file, "MAC key file"), where), where
    if environ.get(MAC_KEY_ENV):
        where = f"${MAC_KEY_ENV}"
        return parse_hex_key(environ[MAC_KEY_ENV], where), where
    if config.mac_key_hex:
        where = f"mac_key_hex of {args.config}"
        if args.config is not None:
            read_sim_key_file(args.config, "config file holding mac_key_hex", limit=1 << 20)
        return parse_hex_key(config.mac_key_hex, where), where
    return None, ""


def refuse_clear_key(instead: str) -> type[argparse.Action]:
    """An argparse action for a removed `--...-key HEX` flag: a key on the command line is seen by `ps`
    and kept in shell history. It fails naming `instead`, never echoing the value. (The flag stays
    declared so that argparse does not take it as an abbreviation of the matching --...-key-file.)"""

    class RefuseClearKey(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
            parser.error(
                f"{self.option_strings[0]} is refused: a key on the command line shows in `ps` and "
                f"shell history; use {instead}"
            )

    return RefuseClearKey


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
    sim.add_argument(
        "--mac-key-file",
        type=Path,
        help="file (mode 0600) holding the hex double-length link MAC key shared with the switch "
        f"(default: ${MAC_KEY_ENV}, else the config's mac_key_hex, else no MACs)",
    )
    sim.add_argument(
        "--mac-key",
        action=refuse_clear_key(f"--mac-key-file FILE (mode 0600) or ${MAC_KEY_ENV}"),
        help=argparse.SUPPRESS,
    )
    sim.set_defaults(handler=run_sim)
    group.set_defaults(handler=lambda args: group.print_help() or 2)


def load_sim_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[AcquirerSimConfig, str]:
    """The file's settings with the flags and the MAC key applied, and a line saying where the key came
    from (check value only). Errors name the setting or the key's source (SystemExit with the message)."""
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
    }
    config = msgspec.structs.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    try:
        key, where = sim_mac_key(args, config, os.environ if environ is None else environ)
    except SimKeyError as exc:
        raise SystemExit(f"switch acquirer sim: {exc}") from None
    if key is None:
        return msgspec.structs.replace(config, mac_key_hex=""), "links not MACed"
    note = f"link MAC key check value {SecretKey(key).check_value()} from {where}"
    return msgspec.structs.replace(config, mac_key_hex=key.hex().upper()), note


def run_sim(args: argparse.Namespace) -> int:
    config, note = load_sim_config(args)
    sim = AcquirerSim(config)
    print(f"acquirer simulator {config.name}: {note}", file=sys.stderr, flush=True)

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

"""`switch terminal ...`: one transaction (or a random mix) from a simulated POS terminal.

Each call connects, signs on (installing the working keys when a terminal master key is given), sends
the transaction and prints the answer as one JSON line with card data masked. STANs continue across
calls through --stan-file (default var/terminal-<tid>.stan).

The terminal master key (hex) never comes from the command line, where `ps` and shell history see it:
``--master-key-file PATH`` (refused when group or others may read it) or the environment variable
``SWITCH_SIM_MASTER_KEY``, in that order. Without either the terminal signs on but installs no keys.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from switch.commands.acquirer import parse_hex_key, read_sim_key_file, refuse_clear_key
from switch.sim.terminal import (
    TerminalError,
    TerminalSim,
    TerminalSimConfig,
    TxnResult,
    parse_amount,
    run_mix,
)

#: Environment variable holding the simulated terminal's master key (32 hex digits).
MASTER_KEY_ENV = "SWITCH_SIM_MASTER_KEY"

TXN_KINDS = (
    "signon",
    "echo",
    "purchase",
    "preauth",
    "completion",
    "void",
    "refund",
    "reversal",
    "balance",
    "settle",
    "mix",
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tid", default="TERM0001", help="terminal id (field 41, 8 characters)")
    p.add_argument("--mid", default="MERCHANT0000001", help="merchant id (field 42, 15 characters)")
    p.add_argument("--profile", default="terminal_ascii", choices=["terminal_ascii", "terminal_packed"])
    p.add_argument("--framing", default="binary2", choices=["binary2", "ascii4"])
    p.add_argument("--tpdu", default="", help="10 hex digits, e.g. 6000030000 (packed terminals)")
    p.add_argument("--currency", default="978")
    p.add_argument(
        "--master-key-file",
        type=Path,
        help=f"0600 file holding the terminal master key in hex (unwraps the sign-on's working keys; "
        f"default: ${MASTER_KEY_ENV}, else no keys)",
    )
    p.add_argument(
        "--master-key",
        action=refuse_clear_key(f"--master-key-file FILE (mode 0600) or ${MASTER_KEY_ENV}"),
        help=argparse.SUPPRESS,
    )
    p.add_argument("--no-signon", action="store_true", help="do not sign on first")
    p.add_argument("--stan-file", default=None, help="file keeping the last STAN (default per tid)")
    p.add_argument("--timeout-ms", type=int, default=30_000)


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("terminal", help="simulated POS terminal")
    sub = group.add_subparsers(dest="terminal_command", metavar="TRANSACTION")
    for kind in TXN_KINDS:
        p = sub.add_parser(kind, help=f"send a {kind}")
        _common(p)
        if kind in ("purchase", "preauth", "balance", "mix"):
            p.add_argument("--pan", required=kind != "mix", action="append" if kind == "mix" else "store")
            p.add_argument("--pin-block", default=None, help="hex PIN block (field 52)")
            p.add_argument("--expiry", default=None, help="YYMM (field 14)")
        if kind in ("purchase", "preauth", "completion", "refund"):
            p.add_argument("--amount", required=kind in ("purchase", "preauth"), help="e.g. 12.34")
        if kind in ("completion", "void", "refund", "reversal"):
            p.add_argument("--pan", required=True)
            p.add_argument("--rrn", default="", help="retrieval reference number of the original")
            p.add_argument("--original-amount", required=True, help="amount of the original, e.g. 12.34")
            p.add_argument("--original-stan", default="000000", help="STAN of the original (reversal)")
            p.add_argument("--original-datetime", default="0000000000", help="MMDDhhmmss of the original")
        if kind == "mix":
            p.add_argument("--count", type=int, default=100)
            p.add_argument("--concurrency", type=int, default=8)
            p.add_argument("--seed", type=int, default=1)
        p.set_defaults(handler=run_terminal, kind=kind)
    group.set_defaults(handler=lambda args: group.print_help() or 2)


def master_key_hex(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The terminal master key from --master-key-file, else $SWITCH_SIM_MASTER_KEY; "" when neither.
    Errors (SimKeyError, a ValueError) name the source, never the key."""
    if args.master_key_file is not None:
        text = read_sim_key_file(args.master_key_file, "master key file")
        return parse_hex_key(text, f"--master-key-file {args.master_key_file}").hex().upper()
    if environ.get(MASTER_KEY_ENV):
        return parse_hex_key(environ[MASTER_KEY_ENV], f"${MASTER_KEY_ENV}").hex().upper()
    return ""


def _config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TerminalSimConfig:
    stan_file = args.stan_file if args.stan_file is not None else f"var/terminal-{args.tid.strip()}.stan"
    return TerminalSimConfig(
        host=args.host,
        port=args.port,
        profile=args.profile,
        framing=args.framing,
        tpdu_hex=args.tpdu,
        terminal_id=args.tid,
        merchant_id=args.mid,
        currency=args.currency,
        stan_path=stan_file,
        master_key_hex=master_key_hex(args, os.environ if environ is None else environ),
        request_timeout_ms=args.timeout_ms,
    )


def _original(args: argparse.Namespace) -> TxnResult:
    """The original a completion/void/refund/reversal names, rebuilt from the flags."""
    kind = "pre_auth" if args.kind == "completion" else "purchase"
    return TxnResult(
        kind=kind,
        mti="0110" if kind == "pre_auth" else "0210",
        stan=args.original_stan,
        local_datetime=args.original_datetime,
        response_code="00",
        amount_minor=parse_amount(args.original_amount),
        pan=args.pan,
        processing_code="000000",
        rrn=args.rrn,
    )


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    async with TerminalSim.connect(_config(args)) as term:
        if not args.no_signon and args.kind != "signon":
            on = await term.sign_on()
            if not on.approved:
                return {"kind": "sign_on", "response_code": on.response_code, "approved": False}
        k = args.kind
        if k == "signon":
            r = await term.sign_on()
        elif k == "echo":
            r = await term.echo()
        elif k == "purchase":
            r = await term.purchase(
                args.pan, parse_amount(args.amount), expiry=args.expiry, pin_block_hex=args.pin_block
            )
        elif k == "preauth":
            r = await term.pre_auth(
                args.pan, parse_amount(args.amount), expiry=args.expiry, pin_block_hex=args.pin_block
            )
        elif k == "balance":
            r = await term.balance_inquiry(args.pan, pin_block_hex=args.pin_block)
        elif k == "completion":
            r = await term.completion(_original(args), parse_amount(args.amount) if args.amount else None)
        elif k == "void":
            r = await term.void(_original(args))
        elif k == "refund":
            r = await term.refund(_original(args), parse_amount(args.amount) if args.amount else None)
        elif k == "reversal":
            r = await term.reversal(_original(args))
        elif k == "settle":
            r = await term.settlement()
        else:
            stats = await run_mix(
                term,
                args.pan or ["4111111111111111"],
                count=args.count,
                rng=random.Random(args.seed),
                concurrency=args.concurrency,
            )
            return {
                "kind": "mix",
                "by_kind_code": stats.by_kind_code,
                "errors": stats.errors,
                "p50_ms": round(stats.percentile_ms(0.5), 3),
                "p99_ms": round(stats.percentile_ms(0.99), 3),
            }
        return r.summary()


def run_terminal(args: argparse.Namespace) -> int:
    try:
        out = trio.run(_run, args)
    except (TerminalError, ValueError) as exc:
        print(f"switch terminal {args.kind}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, sort_keys=True))
    return 0 if out.get("approved", True) else 3

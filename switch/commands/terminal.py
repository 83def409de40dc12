"""`switch terminal ...`: one transaction (or a random mix) from a simulated POS terminal.

Each call connects, signs on (installing the working keys when a terminal master key is given), sends
the transaction and prints the answer as one JSON line with card data masked. STANs continue across
calls through --stan-file (default var/terminal-<tid>.stan).

The terminal master key (hex) never comes from the command line, where `ps` and shell history see it:
``--master-key-file PATH`` (refused when group or others may read it) or the environment variable
``SWITCH_SIM_MASTER_KEY``, in that order. Without either the terminal signs on but installs no keys.

The card (PAN, expiry, PIN block) keeps off the command line for the same reason (CARD_HELP below):
``--card-file FILE`` (TOML, refused when group or others may read it), ``--card-file -`` (the same
from standard input) or ``--pan -`` (the PAN from standard input). ``--pan`` with a number takes only
the public test cards of TEST_PANS; ``--pin-block`` is refused. Errors name the source, never the PAN
(at most masked) nor the PIN block.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import random
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import msgspec
import trio

from switch.codec.masking import mask_pan
from switch.commands.acquirer import parse_hex_key, read_sim_key_file, refuse_clear_key
from switch.private_files import read_private_file
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


#: Kinds that carry a card, and those that take --expiry (and refuse --pin-block: its former flag).
CARD_KINDS = ("purchase", "preauth", "balance", "mix", "completion", "void", "refund", "reversal")
PIN_KINDS = ("purchase", "preauth", "balance", "mix")

#: Public test card numbers (published by the card schemes' and processors' test documentation; the
#: tests and demos use them). No real card has them, so they alone may go on the command line.
TEST_PANS = (
    "4111111111111111",
    "4000000000000002",
    "4000000000000010",
    "4012888888881881",
    "5555555555554444",
    "5500000000000004",
    "378282246310005",
    "6011111111111117",
)

#: Largest card file or card input from standard input (a PAN, an expiry and a PIN block are ~80 bytes;
#: room for a mix's list of PANs).
MAX_CARD_BYTES = 4096

#: The keys of a card file. A CVV, track data or anything else is refused, unnamed.
CARD_FILE_KEYS = ("pan", "expiry", "pin_block")

CARD_HELP = f"""\
card input: the PAN and PIN block never go on the command line, where `ps` and shell history see them.
  --card-file FILE   a file of mode 0600 holding TOML:
                       pan = "4111111111111111"        (mix: pan = ["4111...", "5555..."])
                       expiry = "2812"                  (YYMM, optional)
                       pin_block = "0412AC89ABCDEF67"   (16 hex digits, optional)
  --card-file -      the same TOML from standard input
  --pan -            the PAN from standard input (asked for without echo on a terminal; mix: one per line)
  --pan TEST_PAN     only a public test card: {", ".join(TEST_PANS[:3])},
                     {", ".join(TEST_PANS[3:6])},
                     {", ".join(TEST_PANS[6:])}
--pin-block is refused: put pin_block in the card file. purchase and preauth send the expiry and PIN
block, balance the PIN block; the other transactions send the PAN only.
"""


class CardInputError(ValueError):
    """The card cannot be read; the message names its source, never the PAN (at most masked) nor the
    PIN block."""


class CardFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A card file: TOML with these keys (CARD_HELP)."""

    pan: str | list[str]
    expiry: str | None = None
    pin_block: str | None = None

    def __repr__(self) -> str:
        return "CardFile(...)"  # transient; holds the clear PAN and PIN block

    __str__ = __repr__


class Card(msgspec.Struct, frozen=True):
    """The card a transaction uses: one PAN (several for mix), optional expiry and PIN block."""

    pans: tuple[str, ...]
    expiry: str | None = None
    pin_block: str | None = None

    def __repr__(self) -> str:
        pin = "yes" if self.pin_block else "no"
        return f"Card(pans=[{', '.join(mask_pan(p) for p in self.pans)}] expiry={self.expiry} pin={pin})"

    __str__ = __repr__


def _pan_argument(value: str) -> str:
    """argparse type of --pan: "-" (standard input) or a public test card; anything else is refused
    without echoing it (ArgumentTypeError's message is printed as is)."""
    if value == "-" or value in TEST_PANS:
        return value
    raise argparse.ArgumentTypeError(
        "a card number on the command line shows in `ps` and shell history, so only public test cards "
        "are taken there (see --help); use --card-file FILE (mode 0600), --card-file - or --pan - "
        "(standard input)"
    )


def _card_file_argument(value: str) -> str:
    """argparse type of --card-file: a card number typed there would be echoed as a missing file's
    name, so it is refused unechoed."""
    if value.isascii() and value.isdigit() and 12 <= len(value) <= 19:
        raise argparse.ArgumentTypeError(
            "takes a file name or -, not a card number (which now shows in `ps` and shell history)"
        )
    return value


class _RefusePinBlock(argparse.Action):
    """--pin-block HEX: refused, never echoing the value. (Declared so that it is not taken as an
    abbreviation of another flag.)"""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.error(
            f"{self.option_strings[0]} is refused: a PIN block on the command line shows in `ps` and "
            "shell history; put pin_block in --card-file FILE (mode 0600) or --card-file - (standard input)"
        )


def _check_pan(pan: str, where: str) -> str:
    if not (pan.isascii() and pan.isdigit() and 12 <= len(pan) <= 19):
        raise CardInputError(f"the PAN from {where} must be 12-19 digits")
    return pan


def _check_expiry(expiry: str | None, where: str) -> str | None:
    if expiry is not None and not (
        len(expiry) == 4 and expiry.isascii() and expiry.isdigit() and 1 <= int(expiry[2:]) <= 12
    ):
        raise CardInputError(f"the expiry from {where} must be YYMM")
    return expiry


def _check_pin_block(pin_block: str | None, where: str) -> str | None:
    if pin_block is None:
        return None
    if len(pin_block) != 16 or not all(c in "0123456789abcdefABCDEF" for c in pin_block):
        raise CardInputError(f"the PIN block from {where} must be 16 hex digits")
    return pin_block.upper()


def _read_stdin(stdin: TextIO, where: str) -> str:
    """At most MAX_CARD_BYTES of ASCII text from standard input; the bytes are checked, not decoded
    in an exception chain."""
    buffer = getattr(stdin, "buffer", None)
    raw = buffer.read(MAX_CARD_BYTES + 1) if buffer else stdin.read(MAX_CARD_BYTES + 1).encode()
    if len(raw) > MAX_CARD_BYTES or not raw.isascii():
        raise CardInputError(f"{where} is not ASCII text of at most {MAX_CARD_BYTES} bytes")
    return raw.decode("ascii")


def parse_card_file(text: str, where: str, *, several: bool) -> Card:
    """A Card from card-file TOML (CARD_HELP). `several`: a list of PANs is allowed (mix)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at [^)]*\)$", str(exc))  # the position only: the parser may quote a character
        raise CardInputError(f"{where} is not TOML {at.group(0) if at else ''}".rstrip()) from None
    if any(key not in CARD_FILE_KEYS for key in data):  # a key is not named: it might be a PAN
        raise CardInputError(f"{where} holds a key other than {', '.join(CARD_FILE_KEYS)}")
    try:
        card = msgspec.convert(data, CardFile)
    except msgspec.ValidationError as exc:  # names the type and key, never the value
        raise CardInputError(f"{where}: {exc}") from None
    pans = [card.pan] if isinstance(card.pan, str) else card.pan
    if isinstance(card.pan, list) and not several:
        raise CardInputError(f"{where}: pan must be one PAN (a list only for mix)")
    if not pans:
        raise CardInputError(f"{where}: pan is an empty list")
    return Card(
        tuple(_check_pan(p, where) for p in pans),
        _check_expiry(card.expiry, where),
        _check_pin_block(card.pin_block, where),
    )


def card_from_args(
    args: argparse.Namespace, stdin: TextIO, ask: Callable[[str], str] = getpass.getpass
) -> Card:
    """The card of a card-carrying transaction, from --card-file, --pan (- : standard input; `ask`
    prompts without echo when that is a terminal) and --expiry."""
    several = args.kind == "mix"
    if args.card_file is not None:
        if args.card_file == "-":
            where = "--card-file - (standard input)"
            text = _read_stdin(stdin, where)
        else:
            where = f"card file {args.card_file}"
            text = read_private_file(
                args.card_file,
                "card file",
                CardInputError,
                content=f"TOML text of at most {MAX_CARD_BYTES} bytes",
                limit=MAX_CARD_BYTES,
            )
        card = parse_card_file(text, where, several=several)
    else:
        given = args.pan if isinstance(args.pan, list) else [args.pan] if args.pan else []
        if not given:
            if not several:
                raise CardInputError("no card: give --card-file FILE, --card-file - or --pan - (see --help)")
            given = [TEST_PANS[0]]
        if given.count("-") > 1:
            raise CardInputError("--pan - (standard input) may be given once")
        pans: list[str] = []
        for pan in given:
            if pan != "-":
                pans.append(pan)
                continue
            where = "--pan - (standard input)"
            if stdin.isatty():
                pans.append(_check_pan(ask("PAN: ").strip(), where))
                continue
            lines = [line.strip() for line in _read_stdin(stdin, where).splitlines() if line.strip()]
            if not lines or (len(lines) > 1 and not several):
                raise CardInputError(f"{where} must hold one PAN (one per line for mix)")
            pans.extend(_check_pan(line, where) for line in lines)
        card = Card(tuple(pans))
    expiry = getattr(args, "expiry", None)
    if expiry is not None:
        if card.expiry is not None:
            raise CardInputError("the expiry is given twice (--expiry and the card file)")
        card = msgspec.structs.replace(card, expiry=_check_expiry(expiry, "--expiry"))
    return card


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
        if kind in CARD_KINDS:
            p = sub.add_parser(
                kind,
                help=f"send a {kind}",
                epilog=CARD_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        else:
            p = sub.add_parser(kind, help=f"send a {kind}")
        _common(p)
        if kind in CARD_KINDS:
            card = p.add_mutually_exclusive_group(required=kind != "mix")
            card.add_argument(
                "--card-file",
                type=_card_file_argument,
                metavar="FILE",
                help="TOML card file of mode 0600, or - for standard input (see below)",
            )
            card.add_argument(
                "--pan",
                type=_pan_argument,
                action="append" if kind == "mix" else "store",
                metavar="PAN",
                help="- for the PAN from standard input, or a public test card (see below)"
                + ("; repeatable (default 4111111111111111)" if kind == "mix" else ""),
            )
        if kind in PIN_KINDS:
            p.add_argument("--pin-block", action=_RefusePinBlock, help=argparse.SUPPRESS)
            p.add_argument("--expiry", default=None, help="YYMM (field 14; or expiry in the card file)")
        if kind in ("purchase", "preauth", "completion", "refund"):
            p.add_argument("--amount", required=kind in ("purchase", "preauth"), help="e.g. 12.34")
        if kind in ("completion", "void", "refund", "reversal"):
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


def _original(args: argparse.Namespace, card: Card) -> TxnResult:
    """The original a completion/void/refund/reversal names, rebuilt from the flags and the card."""
    kind = "pre_auth" if args.kind == "completion" else "purchase"
    return TxnResult(
        kind=kind,
        mti="0110" if kind == "pre_auth" else "0210",
        stan=args.original_stan,
        local_datetime=args.original_datetime,
        response_code="00",
        amount_minor=parse_amount(args.original_amount),
        pan=card.pans[0],
        processing_code="000000",
        rrn=args.rrn,
    )


async def _run(args: argparse.Namespace, card: Card | None) -> dict[str, Any]:
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
        elif k == "settle":
            r = await term.settlement()
        elif card is None:
            raise ValueError(f"{k} needs a card")
        elif k == "purchase":
            r = await term.purchase(
                card.pans[0], parse_amount(args.amount), expiry=card.expiry, pin_block_hex=card.pin_block
            )
        elif k == "preauth":
            r = await term.pre_auth(
                card.pans[0], parse_amount(args.amount), expiry=card.expiry, pin_block_hex=card.pin_block
            )
        elif k == "balance":
            r = await term.balance_inquiry(card.pans[0], pin_block_hex=card.pin_block)
        elif k == "completion":
            amount = parse_amount(args.amount) if args.amount else None
            r = await term.completion(_original(args, card), amount)
        elif k == "void":
            r = await term.void(_original(args, card))
        elif k == "refund":
            r = await term.refund(_original(args, card), parse_amount(args.amount) if args.amount else None)
        elif k == "reversal":
            r = await term.reversal(_original(args, card))
        else:
            stats = await run_mix(
                term,
                list(card.pans),
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
        card = card_from_args(args, sys.stdin) if args.kind in CARD_KINDS else None
        out = trio.run(_run, args, card)
    except (TerminalError, ValueError) as exc:
        print(f"switch terminal {args.kind}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, sort_keys=True))
    return 0 if out.get("approved", True) else 3

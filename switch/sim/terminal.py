"""POS terminal simulator: a library for tests, benchmarks and the demo, and the engine of
`switch terminal ...`.

It speaks what a real terminal sends to the switch's listener: profile ``terminal_ascii`` or
``terminal_packed``, 2-byte or 4-digit length framing, an optional 5-byte TPDU, MAC in field 64 (128 when
fields above 64 are present) under the MAC working key, and a STAN per terminal that only moves forward
(persisted in a small file when ``stan_path`` is set, so separate command-line calls never reuse one).
Many requests may be in flight on one connection; each answer is matched to its request by STAN.

Messages (field numbers; docs/messages.md has the full table):
- sign-on 0800 70=001, echo 0800 70=301: 11, 12, 13, 41, 42.
- purchase 0200 pc 000000; pre-authorisation 0100 pc 000000; balance inquiry 0200 pc 310000: 2, 3, 4,
  11, 12, 13, 14 (expiry, optional), 22, 25, 41, 42, 49, 52 (PIN block, optional).
- completion 0220 pc 000000, void 0200 pc 020000, refund 0200 pc 200000: as a purchase, plus 37 naming
  the original by its retrieval reference number.
- reversal 0400 (repeat 0401, same STAN): the original's 2, 3, 4, 49, a new STAN, 37 when the original
  got one, and 90 = original MTI + STAN + MMDDhhmmss + 22 zeros.
- settlement 0500 pc 920000: the ISO 8583:1987 totals of approved transactions since the last
  settlement, gross, with reversals on their own lines: 74/86 credits (refunds), 75/87 credit reversals,
  76/88 debits (purchases, completions), 77/89 debit reversals (voids, reversals of debits).

Sign-on keys: the MAC working key comes from a ``key_handler(answer_fields) -> bytes | None`` (the
sign-on answer carries it encrypted under the terminal master key; switch.codec.keys unwraps it), or is
set up front with ``mac_key_hex``. No key byte is ever logged or put in a repr.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec
import trio

from switch.codec import keys
from switch.codec.masking import mask_fields, mask_pan
from switch.codec.wire import FramingError, MacFn, Wire, WireError, mac_fn_from_hex, make_mac_fn
from switch.config import FramingKind

RECEIVE_BYTES = 65_536
KeyHandler = Callable[[dict[str, Any]], bytes | None]
Clock = Callable[[], dt.datetime]


def tmk_key_handler(tmk: bytes) -> KeyHandler:
    """The MAC working key of a sign-on answer: field 62 unwrapped under the terminal master key
    (switch.codec.keys; both check values verified, so a wrong TMK installs nothing)."""

    def handle(answer: dict[str, Any]) -> bytes | None:
        if "62" not in answer:
            return None
        try:
            return keys.parse_signon_field(tmk, answer["62"]).mac_key.value
        except ValueError as exc:  # KeyCheckError included; the message names no key bytes
            raise TerminalError(f"sign-on answer's working keys refused: {exc}") from None

    return handle


class TerminalError(RuntimeError):
    """The terminal could not complete an exchange (closed connection, timeout, bad answer)."""


class TerminalSimConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 0
    profile: str = "terminal_ascii"
    framing: FramingKind = "binary2"
    #: 10 hex digits (e.g. "6000030000") to send a TPDU; empty: no TPDU.
    tpdu_hex: str = ""
    terminal_id: str = "TERM0001"
    merchant_id: str = "MERCHANT0000001"
    currency: str = "978"
    #: File holding the last STAN used (survives separate runs); empty: STANs live in memory.
    stan_path: str = ""
    #: A static MAC key (32 hex digits) instead of one from sign-on; empty: MAC after sign-on only.
    mac_key_hex: str = ""
    #: The terminal master key (32 hex digits) that unwraps the sign-on's working keys (field 62).
    master_key_hex: str = ""
    max_inflight: int = 64
    request_timeout_ms: int = 30_000
    max_frame_bytes: int = 4096

    def __repr__(self) -> str:
        """Settings without key material: keys are named by presence only."""
        keys = [name for name, v in (("mac", self.mac_key_hex), ("master", self.master_key_hex)) if v]
        return (
            f"TerminalSimConfig({self.terminal_id!r}/{self.merchant_id!r} {self.host}:{self.port} "
            f"{self.profile} {self.framing} keys={'+'.join(keys) or 'none'})"
        )

    __str__ = __repr__


class TxnResult(msgspec.Struct, frozen=True):
    """One finished exchange as the terminal saw it."""

    kind: str
    mti: str
    stan: str
    local_datetime: str  # MMDDhhmmss of fields 13+12
    response_code: str
    amount_minor: int
    pan: str = ""
    processing_code: str = ""
    rrn: str = ""
    auth_code: str = ""
    latency_ms: float = 0.0
    answer: dict[str, Any] = {}

    @property
    def approved(self) -> bool:
        return self.response_code == "00"

    def __repr__(self) -> str:
        return (
            f"TxnResult({self.kind} {self.mti} stan={self.stan} rc={self.response_code} "
            f"amount={self.amount_minor} pan={mask_pan(self.pan)} rrn={self.rrn!r})"
        )

    __str__ = __repr__

    def summary(self) -> dict[str, Any]:
        """A printable, card-safe dict (CLI output, logs)."""
        return {
            "kind": self.kind,
            "mti": self.mti,
            "stan": self.stan,
            "response_code": self.response_code,
            "approved": self.approved,
            "amount_minor": self.amount_minor,
            "pan": mask_pan(self.pan),
            "rrn": self.rrn,
            "auth_code": self.auth_code,
            "latency_ms": round(self.latency_ms, 3),
            "answer": mask_fields(self.answer),
        }


def parse_amount(text: str, exponent: int = 2) -> int:
    """'12.34' -> 1234 minor units; refuses negatives, more decimals than the currency has, junk.
    A refused amount is quoted only when it cannot be a card number typed into --amount by mistake
    (at most 12 digits, the most field 4 holds); otherwise only its length is named."""
    text = str(text)
    shown = repr(text) if sum(ch.isdigit() for ch in text) <= 12 else f"of {len(text)} characters"
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"amount {shown} is not a number") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"amount {shown} must be a non-negative number")
    minor = value.scaleb(exponent)
    if minor != minor.to_integral_value():
        raise ValueError(f"amount {shown} has more than {exponent} decimals")
    if minor >= 10**12:
        raise ValueError(f"amount {shown} does not fit field 4 (12 digits)")
    return int(minor)


class StanCounter:
    """Per-terminal STAN 000001..999999, wrapping; persisted to a file when a path is given."""

    def __init__(self, path: str = "") -> None:
        self.path = Path(path) if path else None
        self._last = 0
        if self.path is not None and self.path.exists():
            text = self.path.read_text().strip()
            if not text.isdigit() or not 0 <= int(text) <= 999_999:
                raise TerminalError(f"STAN file {self.path} does not hold a STAN")
            self._last = int(text)

    def next(self) -> str:
        self._last = 1 if self._last >= 999_999 else self._last + 1
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"{self._last:06d}\n")
            os.replace(tmp, self.path)
        return f"{self._last:06d}"


#: Settlement line -> (count field, amount field), ISO 8583:1987 reconciliation totals.
SETTLEMENT_LINE_FIELDS = {
    "credits": ("74", "86"),
    "credit_reversals": ("75", "87"),
    "debits": ("76", "88"),
    "debit_reversals": ("77", "89"),
}
_DEBIT_KINDS = ("purchase", "completion")


class _Totals:
    """Counts and amounts per settlement line; gross lines never shrink, reversals have their own."""

    def __init__(self) -> None:
        self.lines = {line: [0, 0] for line in SETTLEMENT_LINE_FIELDS}

    def _add(self, line: str, amount: int) -> None:
        self.lines[line][0] += 1
        self.lines[line][1] += amount

    def approved(self, kind: str, amount: int) -> None:
        if kind in _DEBIT_KINDS:
            self._add("debits", amount)
        elif kind == "refund":
            self._add("credits", amount)

    def reversed(self, original_kind: str, amount: int) -> None:
        """A void or reversal of an approved `original_kind` transaction."""
        if original_kind in _DEBIT_KINDS:
            self._add("debit_reversals", amount)
        elif original_kind == "refund":
            self._add("credit_reversals", amount)

    def fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line, (count_field, amount_field) in SETTLEMENT_LINE_FIELDS.items():
            count, amount = self.lines[line]
            out[count_field] = f"{count:010d}"
            out[amount_field] = f"{amount:016d}"
        return out


class TerminalSim:
    """A connected terminal. ``async with TerminalSim.connect(config) as t: await t.purchase(...)``."""

    def __init__(
        self,
        config: TerminalSimConfig,
        stream: trio.abc.Stream,
        *,
        clock: Clock | None = None,
        key_handler: KeyHandler | None = None,
    ) -> None:
        if len(config.terminal_id) != 8 or len(config.merchant_id) != 15:
            raise TerminalError("terminal_id must be 8 characters and merchant_id 15 (fields 41, 42)")
        self.config = config
        self.wire = Wire(config.profile, config.framing, tpdu=bool(config.tpdu_hex))
        #: MAC of requests and check of answers: None until a sign-on delivers a key (or a static key).
        self.mac_fn: MacFn | None = mac_fn_from_hex(config.mac_key_hex)
        #: Fault injection: send requests whose MAC cannot verify (the switch must answer A0).
        self.wrong_mac = False
        self.tpdu = bytes.fromhex(config.tpdu_hex) if config.tpdu_hex else None
        self.stream = stream
        self.clock: Clock = clock or dt.datetime.now
        if key_handler is None and config.master_key_hex:
            key_handler = tmk_key_handler(bytes.fromhex(config.master_key_hex))
        self.key_handler = key_handler
        self.stans = StanCounter(config.stan_path)
        self.totals = _Totals()
        self.unmatched = 0
        self._waiting: dict[str, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._slots = trio.Semaphore(config.max_inflight)
        self._send_lock = trio.Lock()
        self._closed: str | None = None

    @classmethod
    def connect(
        cls, config: TerminalSimConfig, *, clock: Clock | None = None, key_handler: KeyHandler | None = None
    ) -> _Session:
        return _Session(config, clock, key_handler)

    # --- the exchange --------------------------------------------------------------------------
    async def _reader(self) -> None:
        reader = self.wire.reader(self.config.max_frame_bytes)
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    self._close_all("connection closed by the switch")
                    return
                for fr in reader.feed(data):
                    try:
                        fields, mac_ok = self.wire.decode_verified(fr.payload, self.mac_fn)
                    except WireError:
                        self.unmatched += 1
                        continue
                    waiter = self._waiting.get(str(fields.get("11", "")))
                    if waiter is None:
                        self.unmatched += 1
                        continue
                    if not mac_ok:
                        fields = {**fields, "_mac_failed": "1"}
                    waiter[1].append(fields)
                    waiter[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, FramingError) as exc:
            self._close_all(f"connection failed: {exc}")

    def _close_all(self, reason: str) -> None:
        self._closed = reason
        for event, _ in self._waiting.values():
            event.set()

    async def exchange(
        self, fields: dict[str, Any], kind: str = "request", stan: str | None = None
    ) -> TxnResult:
        """Send one request (STAN, local date/time, 41/42 filled in unless given) and await its answer."""
        if self._closed:
            raise TerminalError(self._closed)
        fields = dict(fields)
        now = self.clock()
        fields["11"] = stan or self.stans.next()
        fields.setdefault("12", now.strftime("%H%M%S"))
        fields.setdefault("13", now.strftime("%m%d"))
        fields.setdefault("41", self.config.terminal_id)
        fields.setdefault("42", self.config.merchant_id)
        key = fields["11"]
        try:
            data = self.wire.frame(self.wire.encode(fields, self.mac_fn, wrong_mac=self.wrong_mac), self.tpdu)
        except WireError as exc:
            raise TerminalError(f"cannot encode {fields.get('t')}: {exc}") from None
        async with self._slots:
            # Checked here, with no await before the registration: two exchanges of one STAN that both
            # waited for a slot must not both register (the second would steal the first's answer).
            if key in self._waiting:
                raise TerminalError(f"STAN {key} is already in flight on this terminal")
            event = trio.Event()
            box: list[dict[str, Any]] = []
            self._waiting[key] = (event, box)
            started = time.perf_counter()
            try:
                async with self._send_lock:
                    await self.stream.send_all(data)
                with trio.move_on_after(self.config.request_timeout_ms / 1000.0):
                    await event.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TerminalError(f"send failed: {exc}") from None
            finally:
                del self._waiting[key]
        if not box:
            raise TerminalError(
                self._closed
                or f"no answer to {fields['t']} STAN {key} within "
                f"request_timeout_ms={self.config.request_timeout_ms}"
            )
        answer = box[0]
        if answer.pop("_mac_failed", None):
            raise TerminalError(f"answer to STAN {key} failed its MAC")
        return TxnResult(
            kind=kind,
            mti=str(answer.get("t", "")),
            stan=key,
            local_datetime=fields["13"] + fields["12"],
            response_code=str(answer.get("39", "")),
            amount_minor=int(fields.get("4", "0") or 0),
            pan=str(fields.get("2", "")),
            processing_code=str(fields.get("3", "")),
            rrn=str(answer.get("37", "")).strip(),
            auth_code=str(answer.get("38", "")),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            answer=answer,
        )

    def set_mac_key(self, key16: bytes | None) -> None:
        """Start (or stop, with None) MACing: e.g. after a sign-on delivered a new MAC working key."""
        self.mac_fn = make_mac_fn(key16) if key16 is not None else None

    # --- transactions ---------------------------------------------------------------------------
    async def sign_on(self) -> TxnResult:
        result = await self.exchange({"t": "0800", "70": "001"}, "sign_on")
        if result.approved and self.key_handler is not None:
            key = self.key_handler(result.answer)
            if key is not None:
                self.set_mac_key(key)
        return result

    async def echo(self) -> TxnResult:
        return await self.exchange({"t": "0800", "70": "301"}, "echo")

    def _card(
        self, pan: str, amount_minor: int, pc: str, expiry: str | None, pin_block_hex: str | None
    ) -> dict:
        if not pan.isdigit() or not 12 <= len(pan) <= 19:
            raise TerminalError(f"PAN {mask_pan(pan)} must be 12-19 digits")
        if not 0 <= amount_minor < 10**12:
            raise TerminalError(f"amount {amount_minor} does not fit field 4")
        fields: dict[str, Any] = {
            "2": pan,
            "3": pc,
            "4": f"{amount_minor:012d}",
            "22": "021" if pin_block_hex else "012",
            "25": "00",
            "49": self.config.currency,
        }
        if expiry:
            fields["14"] = expiry
        if pin_block_hex:
            fields["52"] = pin_block_hex.upper()
        return fields

    async def _financial(self, kind: str, mti: str, fields: dict[str, Any]) -> TxnResult:
        result = await self.exchange({"t": mti, **fields}, kind)
        if result.approved:
            self.totals.approved(kind, result.amount_minor)
        return result

    async def purchase(
        self, pan: str, amount_minor: int, *, expiry: str | None = None, pin_block_hex: str | None = None
    ) -> TxnResult:
        return await self._financial(
            "purchase", "0200", self._card(pan, amount_minor, "000000", expiry, pin_block_hex)
        )

    async def pre_auth(
        self, pan: str, amount_minor: int, *, expiry: str | None = None, pin_block_hex: str | None = None
    ) -> TxnResult:
        return await self._financial(
            "pre_auth", "0100", self._card(pan, amount_minor, "000000", expiry, pin_block_hex)
        )

    async def completion(self, original: TxnResult, amount_minor: int | None = None) -> TxnResult:
        amount = original.amount_minor if amount_minor is None else amount_minor
        fields = {**self._card(original.pan, amount, "000000", None, None), "37": original.rrn}
        return await self._financial("completion", "0220", fields)

    async def void(self, original: TxnResult) -> TxnResult:
        fields = {**self._card(original.pan, original.amount_minor, "020000", None, None), "37": original.rrn}
        result = await self._financial("void", "0200", fields)
        if result.approved:
            self.totals.reversed(original.kind, original.amount_minor)
        return result

    async def refund(self, original: TxnResult, amount_minor: int | None = None) -> TxnResult:
        amount = original.amount_minor if amount_minor is None else amount_minor
        fields = {**self._card(original.pan, amount, "200000", None, None), "37": original.rrn}
        return await self._financial("refund", "0200", fields)

    async def reversal(self, original: TxnResult, *, repeat_of: TxnResult | None = None) -> TxnResult:
        """Reverse ``original``; with ``repeat_of`` (an unanswered 0400's STAN), send the 0401 repeat."""
        fields = self._card(original.pan, original.amount_minor, "000000", None, None)
        fields["3"] = original.processing_code or "000000"
        if original.rrn:
            fields["37"] = original.rrn
        fields["90"] = f"{original.mti[:2]}00{original.stan}{original.local_datetime}" + "0" * 22
        mti = "0401" if repeat_of is not None else "0400"
        result = await self.exchange(
            {"t": mti, **fields}, "reversal", stan=repeat_of.stan if repeat_of is not None else None
        )
        if result.approved and original.approved:
            self.totals.reversed(original.kind, original.amount_minor)
        return result

    async def balance_inquiry(self, pan: str, *, pin_block_hex: str | None = None) -> TxnResult:
        return await self.exchange(
            {"t": "0200", **self._card(pan, 0, "310000", None, pin_block_hex)}, "balance_inquiry"
        )

    async def settlement(self) -> TxnResult:
        fields = {"t": "0500", "3": "920000", "49": self.config.currency, **self.totals.fields()}
        result = await self.exchange(fields, "settlement")
        if result.approved:
            self.totals = _Totals()
        return result


class _Session:
    """``async with TerminalSim.connect(cfg) as term``: opens TCP, runs the reader, closes cleanly."""

    def __init__(
        self, config: TerminalSimConfig, clock: Clock | None, key_handler: KeyHandler | None
    ) -> None:
        self.config = config
        self.clock = clock
        self.key_handler = key_handler

    async def __aenter__(self) -> TerminalSim:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        try:
            stream = await trio.open_tcp_stream(self.config.host, self.config.port)
        except OSError as exc:
            await self._nursery_cm.__aexit__(None, None, None)
            raise TerminalError(f"cannot connect to {self.config.host}:{self.config.port}: {exc}") from None
        self.term = TerminalSim(self.config, stream, clock=self.clock, key_handler=self.key_handler)
        self._nursery = nursery
        nursery.start_soon(self.term._reader)
        return self.term

    async def __aexit__(self, *exc: object) -> None:
        # The caller's exception (if any) propagates as itself, not wrapped in the reader's nursery group.
        self._nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self.term.stream.aclose()
        await self._nursery_cm.__aexit__(None, None, None)


class MixStats(msgspec.Struct):
    """What a random-mix run did: counts by kind and response code, latencies, errors."""

    by_kind_code: dict[str, int] = {}
    latencies_ms: list[float] = []
    errors: int = 0

    def add(self, result: TxnResult) -> None:
        key = f"{result.kind}:{result.response_code}"
        self.by_kind_code[key] = self.by_kind_code.get(key, 0) + 1
        self.latencies_ms.append(result.latency_ms)

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


#: Default weights of the random mix (kinds needing an original fall back to a purchase).
DEFAULT_MIX = {
    "purchase": 60,
    "pre_auth": 5,
    "completion": 4,
    "void": 5,
    "refund": 8,
    "reversal": 4,
    "balance_inquiry": 10,
    "echo": 4,
}


async def run_mix(
    term: TerminalSim,
    pans: Sequence[str],
    *,
    count: int,
    rng: random.Random,
    concurrency: int = 8,
    weights: dict[str, int] | None = None,
    max_amount_minor: int = 20_000,
) -> MixStats:
    """Send ``count`` random transactions, ``concurrency`` at a time, over one terminal connection."""
    weights = weights or DEFAULT_MIX
    kinds = list(weights)
    stats = MixStats()
    approved: list[TxnResult] = []
    holds: list[TxnResult] = []
    todo = iter(range(count))

    async def one() -> TxnResult:
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        pan = rng.choice(pans)
        amount = rng.randint(1, max_amount_minor)
        if kind == "pre_auth":
            r = await term.pre_auth(pan, amount)
            if r.approved:
                holds.append(r)
            return r
        if kind == "completion" and holds:
            return await term.completion(holds.pop(rng.randrange(len(holds))))
        if kind in ("void", "refund", "reversal") and approved:
            original = approved.pop(rng.randrange(len(approved)))
            if kind == "void":
                return await term.void(original)
            if kind == "refund":
                return await term.refund(original, rng.randint(1, original.amount_minor))
            return await term.reversal(original)
        if kind == "balance_inquiry":
            return await term.balance_inquiry(pan)
        if kind == "echo":
            return await term.echo()
        r = await term.purchase(pan, amount)
        if r.approved and r.rrn:
            approved.append(r)
        return r

    async def worker() -> None:
        for _ in todo:
            try:
                stats.add(await one())
            except TerminalError:
                stats.errors += 1

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, concurrency)):
            nursery.start_soon(worker)
    return stats

"""Acquirer host simulator: a real ISO 8583:1987 TCP host for demos, tests and benchmarks.

It answers what a card network or issuer processor would: network management (0800 sign-on / echo),
authorisations and financial requests (0100 / 0200) approved or declined by simple rules (amount limit,
blocked PANs, a balance per card -> 51), advices (0220 -> 0230), reversals (0400 / 0401 / 0420:
idempotent, restoring the balance) and reconciliation (0500). Faults are injected on purpose so the
switch's timeout, reversal and reconnect paths can be exercised end to end:

- ``no_answer``: processes the request (money moves) and never answers: the switch must reverse.
- ``late``: processes and answers after ``late_ms``: the late approval must not reach the terminal.
- ``disconnect``: processes, then drops the connection.
- ``garbage``: answers with a frame of random bytes.
- ``wrong_mac``: answers with a MAC that does not verify.

A fault is chosen per card (``card_faults``: PAN -> fault) or per run (``fault`` with ``fault_rate``), and
applies only to the MTIs in ``fault_mtis`` (authorisations by default) so sign-on and reversals still
go through. Latency is drawn from a seeded distribution; each request is answered by its own task, so
many requests are in flight on one connection and answers leave in whatever order their delays give.

Everything approved, reversed or advised is recorded in :class:`SimRecords` for tests to assert on.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import random
from typing import Any, Literal

import msgspec
import trio

from switch.codec.masking import mask_pan
from switch.codec.wire import FramingError, MacFn, Wire, WireError, mac_fn_from_hex
from switch.config import FramingKind
from switch.netio import SocketReads

log = logging.getLogger(__name__)


class Fault(enum.StrEnum):
    NONE = "none"
    NO_ANSWER = "no_answer"
    LATE = "late"
    DISCONNECT = "disconnect"
    GARBAGE = "garbage"
    WRONG_MAC = "wrong_mac"


class AcquirerSimConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of one simulated acquirer (TOML-loadable; every limit named)."""

    name: str = "sim"
    host: str = "127.0.0.1"
    port: int = 0
    profile: str = "acquirer_1987"
    framing: FramingKind = "binary2"
    #: Hex double-length MAC key (32 hex digits); empty: messages are not MACed.
    mac_key_hex: str = ""
    max_frame_bytes: int = 8192
    max_connections: int = 64
    #: Requests a connection may have waiting for their answer; the reader pauses beyond this.
    max_inflight_per_connection: int = 1024
    # --- decision rules ---
    #: Amounts above this decline 61 (0: no limit).
    approve_max_minor: int = 0
    #: PANs declined 05 (do not honour).
    declined_pans: list[str] = []
    #: Opening balance per PAN; a debit above the balance declines 51.
    balances: dict[str, int] = {}
    #: Balance of any other card (None: unlimited).
    default_balance_minor: int | None = None
    # --- latency ---
    latency_distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    #: fixed: the delay; lognormal: the median.
    latency_ms: float = 0.0
    latency_min_ms: float = 0.0
    #: uniform: the upper bound; every distribution is capped here.
    latency_max_ms: float = 1_000.0
    #: lognormal shape (sigma of the underlying normal).
    latency_sigma: float = 0.5
    seed: int = 0
    # --- faults ---
    fault: Fault = Fault.NONE
    #: Fraction of eligible requests that get the per-run fault.
    fault_rate: float = 1.0
    card_faults: dict[str, Fault] = {}
    fault_mtis: list[str] = msgspec.field(default_factory=lambda: ["0100", "0200"])
    #: Delay of a ``late`` answer.
    late_ms: int = 10_000

    def __repr__(self) -> str:
        """Settings without the MAC key (named by presence only) and with every PAN masked."""
        cards = {*self.declined_pans, *self.balances, *self.card_faults}
        return (
            f"AcquirerSimConfig(name={self.name!r} {self.host}:{self.port} {self.profile} {self.framing} "
            f"mac={'on' if self.mac_key_hex else 'off'} fault={self.fault.value} "
            f"cards=[{', '.join(sorted(mask_pan(c) for c in cards))}])"
        )

    __str__ = __repr__


class Authorisation(msgspec.Struct):
    """One approved 0100/0200/0220 as the simulated host remembers it."""

    mti: str
    processing_code: str
    pan: str
    amount_minor: int
    currency: str
    rrn: str
    terminal_id: str
    stan: str
    auth_code: str
    reversed: bool = False

    def __repr__(self) -> str:
        return (
            f"Authorisation({self.mti} pc={self.processing_code} pan={mask_pan(self.pan)} "
            f"amount={self.amount_minor} rrn={self.rrn!r} reversed={self.reversed})"
        )


class SimRecords:
    """What the host did, for tests: approvals by RRN, reversals, advices, answers by MTI and code."""

    def __init__(self) -> None:
        self.approved: dict[str, Authorisation] = {}
        self.reversals: list[str] = []  # RRNs (or original keys) reversed, each once
        self.reversal_requests = 0  # every 0400/0401/0420 received, repeats included
        self.unknown_reversals = 0
        self.advices: list[dict[str, Any]] = []
        self.settlements: list[dict[str, Any]] = []
        self.answers: dict[tuple[str, str], int] = {}  # (request MTI, response code) -> count
        self.faults: dict[str, int] = {}
        self.sign_ons = 0
        self.echoes = 0
        self.bad_macs = 0
        self.undecodable = 0
        self.connections = 0

    def count(self, mti: str, code: str) -> None:
        self.answers[(mti, code)] = self.answers.get((mti, code), 0) + 1


class AcquirerSim:
    """Build with a config, then ``port = await nursery.start(sim.serve)``; read ``sim.records``."""

    def __init__(self, config: AcquirerSimConfig) -> None:
        self.config = config
        self.wire = Wire(config.profile, config.framing)
        self.mac_fn: MacFn | None = mac_fn_from_hex(config.mac_key_hex)
        self.records = SimRecords()
        self._rng = random.Random(config.seed)
        self._balances: dict[str, int] = dict(config.balances)
        self._declined = frozenset(config.declined_pans)
        self._fault_mtis = frozenset(config.fault_mtis)
        self._by_terminal_stan: dict[tuple[str, str], str] = {}  # (41, 11) -> RRN, for field 90 lookups
        self._auth_seq = 0
        self._connections = 0
        self.port: int | None = None

    # --- decisions (pure, synchronous) ----------------------------------------------------------
    def balance(self, pan: str) -> int | None:
        """Available balance of a card (None: unlimited)."""
        return self._balances.get(pan, self.config.default_balance_minor)

    def _debit(self, pan: str, amount: int) -> bool:
        bal = self.balance(pan)
        if bal is None:
            return True
        if amount > bal:
            return False
        self._balances[pan] = bal - amount
        return True

    def _credit(self, pan: str, amount: int) -> None:
        bal = self.balance(pan)
        if bal is not None:
            self._balances[pan] = bal + amount

    def fault_for(self, fields: dict[str, Any]) -> Fault:
        if fields.get("t") not in self._fault_mtis:
            return Fault.NONE
        card = self.config.card_faults.get(str(fields.get("2", "")))
        if card is not None:
            return card
        if self.config.fault is not Fault.NONE and self._rng.random() < self.config.fault_rate:
            return self.config.fault
        return Fault.NONE

    def delay_ms(self) -> float:
        cfg = self.config
        if cfg.latency_distribution == "fixed":
            d = cfg.latency_ms
        elif cfg.latency_distribution == "uniform":
            d = self._rng.uniform(cfg.latency_min_ms, cfg.latency_max_ms)
        else:
            d = cfg.latency_ms * math.exp(self._rng.gauss(0.0, cfg.latency_sigma))
        return max(0.0, min(d, cfg.latency_max_ms))

    def respond(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to one decoded request (None: not a request this host answers)."""
        mti = str(fields.get("t", ""))
        handler = {
            "0800": self._network,
            "0100": self._authorise,
            "0200": self._authorise,
            "0220": self._advice,
            "0221": self._advice,
            "0400": self._reverse,
            "0401": self._reverse,
            "0420": self._reverse,
            "0421": self._reverse,
            "0500": self._settle,
            "0501": self._settle,
        }.get(mti)
        if handler is None:
            return None
        answer = handler(fields)
        self.records.count(mti, answer["39"])
        return answer

    def _base_answer(self, fields: dict[str, Any], code: str) -> dict[str, Any]:
        mti = str(fields["t"])
        out = {k: v for k, v in fields.items() if k in _ECHOED}
        out["t"] = f"{mti[:2]}{int(mti[2]) + 1}0"
        out["39"] = code
        return out

    def _network(self, fields: dict[str, Any]) -> dict[str, Any]:
        code = fields.get("70")
        if code == "001":
            self.records.sign_ons += 1
        elif code == "301":
            self.records.echoes += 1
        return self._base_answer(fields, "00")

    def _authorise(self, fields: dict[str, Any]) -> dict[str, Any]:
        pan = str(fields.get("2", ""))
        pc = str(fields.get("3", "000000"))
        amount_text = str(fields.get("4", "0"))
        if not pan.isdigit() or not amount_text.isdigit():
            return self._base_answer(fields, "30")
        amount = int(amount_text)
        txn = pc[:2]
        if txn in ("30", "31"):  # balance inquiry
            answer = self._base_answer(fields, "00")
            bal = self.balance(pan)
            if bal is not None:
                cur = str(fields.get("49", "978"))
                answer["54"] = f"0002{cur}C{bal:012d}"  # account type 00, amount type 02 available
            return answer
        if pan in self._declined:
            return self._base_answer(fields, "05")
        if self.config.approve_max_minor and amount > self.config.approve_max_minor:
            return self._base_answer(fields, "61")
        if txn == "20":  # refund: credit the card
            self._credit(pan, amount)
        elif txn == "02":  # void: undo the original purchase named by 37 / 90
            original = self._find_original(fields)
            if original is not None and not original.reversed:
                original.reversed = True
                self._credit(original.pan, original.amount_minor)
        elif not self._debit(pan, amount):
            return self._base_answer(fields, "51")
        return self._approve(fields, pan, pc, amount)

    def _approve(self, fields: dict[str, Any], pan: str, pc: str, amount: int) -> dict[str, Any]:
        self._auth_seq += 1
        auth_code = f"{self._auth_seq % 1_000_000:06d}"
        rrn = str(fields.get("37", "")) or f"S{self._auth_seq:011d}"
        tid = str(fields.get("41", ""))
        self.records.approved[rrn] = Authorisation(
            mti=str(fields["t"]),
            processing_code=pc,
            pan=pan,
            amount_minor=amount,
            currency=str(fields.get("49", "")),
            rrn=rrn,
            terminal_id=tid,
            stan=str(fields.get("11", "")),
            auth_code=auth_code,
        )
        self._by_terminal_stan[(tid, str(fields.get("11", "")))] = rrn
        answer = self._base_answer(fields, "00")
        answer["38"] = auth_code
        answer["37"] = rrn
        return answer

    def _advice(self, fields: dict[str, Any]) -> dict[str, Any]:
        """0220: completion or stand-in advice; the host books it (once per RRN) and acknowledges."""
        self.records.advices.append({k: v for k, v in fields.items() if k in _ECHOED})
        rrn = str(fields.get("37", ""))
        pan = str(fields.get("2", ""))
        amount_text = str(fields.get("4", "0"))
        if rrn and rrn in self.records.approved and self.records.approved[rrn].mti.startswith("02"):
            return self._base_answer(fields, "00")  # a repeat of an advice already booked
        if pan.isdigit() and amount_text.isdigit():
            amount = int(amount_text)
            hold = self._find_original(fields)
            if hold is not None and hold.mti == "0100" and not hold.reversed:
                hold.reversed = True  # the pre-authorisation's hold is replaced by the completion
                self._credit(hold.pan, hold.amount_minor)
            bal = self.balance(pan)
            if bal is not None:
                self._balances[pan] = bal - amount  # an advice is booked even into overdraft
            self._approve(fields, pan, str(fields.get("3", "000000")), amount)
        return self._base_answer(fields, "00")

    def _find_original(self, fields: dict[str, Any]) -> Authorisation | None:
        """The approval a void/completion/reversal names: by field 90 (original STAN), else by RRN."""
        f90 = str(fields.get("90", ""))
        if len(f90) >= 10 and f90[4:10].isdigit():
            rrn = self._by_terminal_stan.get((str(fields.get("41", "")), f90[4:10]))
            if rrn is not None:
                return self.records.approved.get(rrn)
        return self.records.approved.get(str(fields.get("37", "")))

    def _reverse(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Reversal (repeats included): restores the balance once; an unknown original is answered 00
        too (nothing to undo), so the switch's store-and-forward item completes."""
        self.records.reversal_requests += 1
        original = self._find_original(fields)
        if original is None:
            self.records.unknown_reversals += 1
        elif not original.reversed:
            original.reversed = True
            bal = self.balance(original.pan)
            if bal is not None:  # undo exactly what the original did (a refund had credited the card)
                sign = -1 if original.processing_code[:2] == "20" else 1
                self._balances[original.pan] = bal + sign * original.amount_minor
            self.records.reversals.append(original.rrn)
        return self._base_answer(fields, "00")

    def _settle(self, fields: dict[str, Any]) -> dict[str, Any]:
        self.records.settlements.append(
            {k: v for k, v in fields.items() if k in _ECHOED or (k.isdigit() and 74 <= int(k) <= 97)}
        )
        return self._base_answer(fields, "00")

    # --- TCP -------------------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until cancelled; reports the bound port through ``task_status``."""
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("acquirer simulator %s listening on %s:%s", self.config.name, self.config.host, self.port)
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._connections >= self.config.max_connections:
            log.warning(
                "acquirer simulator %s: max_connections=%d reached; refusing",
                self.config.name,
                self.config.max_connections,
            )
            await stream.aclose()
            return
        self._connections += 1
        self.records.connections += 1
        try:
            await _Connection(self, stream).run()
        finally:
            self._connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()


#: Fields an answer copies from its request (never track data, PIN block, ICC data or MAC).
_ECHOED = frozenset(
    {
        "2",
        "3",
        "4",
        "7",
        "11",
        "12",
        "13",
        "14",
        "18",
        "22",
        "25",
        "32",
        "33",
        "37",
        "41",
        "42",
        "49",
        "70",
        "90",
    }
)


class _Connection:
    """One TCP connection: a reader that answers no-latency requests inline and delayed or faulty ones
    from a task each; answers go to the kernel at once from the task that made them (a writer task takes
    only what a full socket buffer refused). The simulator shares the cores with the switch in the
    benchmarks, so a read is one `recv` (no extra scheduler yield after it) and an answer one `send`
    (no hop through a writer task)."""

    def __init__(self, sim: AcquirerSim, stream: trio.SocketStream) -> None:
        self.sim = sim
        self.stream = stream
        self.sock = stream.socket
        self.fd = stream.socket.fileno()
        self.slots = trio.Semaphore(sim.config.max_inflight_per_connection)
        self._outbox: list[bytes] = []  # refused by a full socket buffer: the writer task sends it
        self._wake = trio.Event()
        self._writing = False  # the writer task is sending: new answers queue behind it
        self._broken = False

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            await self._reader()
            nursery.cancel_scope.cancel()

    def _send(self, data: bytes) -> None:
        """Write `data` now, or behind what is already waiting for the writer task (order kept)."""
        if self._broken:
            return
        if self._outbox or self._writing:
            self._outbox.append(data)
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # reset by the peer: the reader sees it and ends the connection
            self._broken = True
            return
        if n < len(data):
            self._outbox.append(data[n:])
            self._wake.set()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._outbox:
                out, self._outbox = self._outbox, []
                self._writing = True
                try:
                    await self.stream.send_all(b"".join(out))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._broken = True
                    self.nursery.cancel_scope.cancel()
                    return
                finally:
                    self._writing = False

    async def _reader(self) -> None:
        sim = self.sim
        reader = sim.wire.reader(sim.config.max_frame_bytes)
        reads = SocketReads(self.sock)
        while True:
            try:
                data = await reads.read()
            except (trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            try:
                frames = reader.feed(data)
            except FramingError as exc:
                log.warning("acquirer simulator %s: bad frame, closing: %s", sim.config.name, exc)
                return
            now_out: list[bytes] = []  # answers due at once: encoded here, sent in one write
            for fr in frames:
                try:
                    fields, mac_ok = sim.wire.decode_verified(fr.payload, sim.mac_fn)
                except WireError as exc:
                    sim.records.undecodable += 1
                    log.warning(
                        "acquirer simulator %s: undecodable request dropped: %s", sim.config.name, exc
                    )
                    continue
                if not mac_ok:
                    sim.records.bad_macs += 1
                    log.warning(
                        "acquirer simulator %s: request MTI %s STAN %s failed its MAC; dropped",
                        sim.config.name,
                        fields.get("t"),
                        fields.get("11"),
                    )
                    continue
                fault = sim.fault_for(fields)
                answer = sim.respond(fields)
                if answer is None:
                    continue
                if fault is not Fault.NONE:
                    sim.records.faults[fault.value] = sim.records.faults.get(fault.value, 0) + 1
                if fault is Fault.NO_ANSWER:
                    continue
                if fault is Fault.DISCONNECT:
                    if now_out:
                        self._send(b"".join(now_out))
                    return
                delay = sim.config.late_ms if fault is Fault.LATE else sim.delay_ms()
                if delay <= 0 and fault is Fault.NONE:
                    # No task per request on the no-latency path (benchmarks run the simulator on
                    # the same cores as the switch).
                    try:
                        now_out.append(sim.wire.frame(sim.wire.encode(answer, sim.mac_fn)))
                    except WireError as exc:
                        log.error("acquirer simulator %s: cannot encode answer: %s", sim.config.name, exc)
                    continue
                await self.slots.acquire()
                self.nursery.start_soon(self._answer, answer, fault, delay)
            if now_out:
                self._send(now_out[0] if len(now_out) == 1 else b"".join(now_out))

    async def _answer(self, answer: dict[str, Any], fault: Fault, delay_ms: float) -> None:
        sim = self.sim
        try:
            if delay_ms > 0:
                await trio.sleep(delay_ms / 1000.0)
            if fault is Fault.GARBAGE:
                # Not an MTI: no decoder can mistake it for a message.
                data = sim.wire.frame(b"\xffGARBAGE" + bytes(sim._rng.getrandbits(8) for _ in range(16)))
            else:
                try:
                    data = sim.wire.frame(
                        sim.wire.encode(answer, sim.mac_fn, wrong_mac=fault is Fault.WRONG_MAC)
                    )
                except WireError as exc:
                    log.error("acquirer simulator %s: cannot encode answer: %s", sim.config.name, exc)
                    return
            self._send(data)
        finally:
            self.slots.release()

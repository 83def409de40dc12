"""`switch demo --seconds N [--json]`: the switch, two acquirer simulators and a fleet of terminals.

Everything runs in this process on the embedded SQLite ledger in a temporary directory (or --dir):
terminals sign on and run a mixed load (purchase, pre-auth + completion, void, refund, reversal,
balance inquiry, a few deliberate repeats, settlement at the end); some cards never get an answer or
get a late one, and one acquirer link is dropped mid-run. Progress once a second; at the end a summary
table, and with --json the LAST line is the summary as one JSON object. Exit 0 when healthy: the ledger
verifies, nothing is posted twice, every timeout's reversal was delivered.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import trio

from switch.ledger.keys import load_signing_key
from switch.ledger.model import EntryKind
from switch.ledger.sqlite import SqliteBackend
from switch.ledger.verify import verify_ledger
from switch.server.app import Switch
from switch.server.testbed import ALPHA_BIN, BETA_BIN, build, card
from switch.sim.acquirer import AcquirerSim, AcquirerSimConfig
from switch.sim.terminal import TerminalError, TerminalSim, TerminalSimConfig, TxnResult

log = logging.getLogger("switch.demo")

#: Cards with faults at acquirer alpha: never answered, answered after the terminal deadline.
SILENT_CARD = card(ALPHA_BIN, 900)
LATE_CARD = card(ALPHA_BIN, 901)
#: Share of purchases that use a faulty card.
FAULT_SHARE = 0.01
TERMINAL_DEADLINE_MS = 1_000
LATE_MS = 1_500
#: Requests in flight per terminal connection.
CONCURRENCY = 8
#: After the load stops, how long to wait for store-and-forward to deliver the last reversals.
DRAIN_S = 8.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the switch with simulators and a mixed load", description=__doc__
    )
    p.add_argument("--seconds", type=float, default=20.0, help="how long the load runs (default 20)")
    p.add_argument("--terminals", type=int, default=4, help="terminals per listener (default 4)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the mix")
    p.add_argument("--dir", default="", help="state directory (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    p.set_defaults(handler=main)


class Stats:
    def __init__(self) -> None:
        self.by: Counter[tuple[str, str]] = Counter()
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.duplicates_answered = 0

    def add(self, r: TxnResult) -> None:
        self.by[(r.kind, r.response_code)] += 1
        self.latencies_ms.append(r.latency_ms)

    @property
    def total(self) -> int:
        return sum(self.by.values())

    def count(self, code: str) -> int:
        return sum(n for (_, rc), n in self.by.items() if rc == code)

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        s = sorted(self.latencies_ms)
        return round(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))], 2)


async def _terminal_load(term: TerminalSim, rng: random.Random, stats: Stats, until: float) -> None:
    approved: list[TxnResult] = []
    holds: list[TxnResult] = []

    def pan() -> str:
        x = rng.random()
        if x < FAULT_SHARE / 2:
            return SILENT_CARD
        if x < FAULT_SHARE:
            return LATE_CARD
        return card(ALPHA_BIN if rng.random() < 0.6 else BETA_BIN, rng.randrange(1, 200))

    async def one() -> None:
        k = rng.random()
        amount = rng.randint(100, 20_000)
        if k < 0.55 or not approved:
            r = await term.purchase(pan(), amount)
            if r.approved and r.rrn:
                approved.append(r)
        elif k < 0.62:
            r = await term.pre_auth(card(ALPHA_BIN, rng.randrange(1, 200)), amount)
            if r.approved:
                holds.append(r)
        elif k < 0.68 and holds:
            h = holds.pop(rng.randrange(len(holds)))
            r = await term.completion(h, max(1, h.amount_minor - rng.randint(0, h.amount_minor // 2)))
        elif k < 0.74:
            r = await term.void(approved.pop(rng.randrange(len(approved))))
        elif k < 0.82:
            o = approved.pop(rng.randrange(len(approved)))
            r = await term.refund(o, rng.randint(1, o.amount_minor))
        elif k < 0.86:
            r = await term.reversal(approved.pop(rng.randrange(len(approved))))
        elif k < 0.98:
            r = await term.balance_inquiry(card(BETA_BIN, rng.randrange(1, 200)))
        else:  # a repeat (0201) of a purchase the terminal already got: must replay, not post again
            # Taken out of `approved` while its repeat is in flight: a second worker repeating the same
            # STAN at once would be refused by the terminal itself ("already in flight").
            o = approved.pop()
            try:
                r = await term.exchange(
                    {
                        "t": "0201",
                        "2": o.pan,
                        "3": "000000",
                        "4": f"{o.amount_minor:012d}",
                        "22": "012",
                        "25": "00",
                        "49": "978",
                        "12": o.local_datetime[4:],
                        "13": o.local_datetime[:4],
                    },
                    "repeat",
                    stan=o.stan,
                )
            finally:
                approved.append(o)
            if r.rrn == o.rrn and r.response_code == o.response_code:
                stats.duplicates_answered += 1
        stats.add(r)

    async def worker() -> None:
        while trio.current_time() < until:
            try:
                await one()
            except TerminalError:
                stats.errors += 1

    async with trio.open_nursery() as n:
        for _ in range(CONCURRENCY):
            n.start_soon(worker)


async def _demo(args: argparse.Namespace, directory: Path, out: Any) -> dict[str, Any]:
    stats = Stats()
    rng = random.Random(args.seed)
    async with trio.open_nursery() as nursery:
        sims = {
            "alpha": AcquirerSim(
                msgspec.convert(
                    {
                        "name": "alpha",
                        "card_faults": {SILENT_CARD: "no_answer", LATE_CARD: "late"},
                        "late_ms": LATE_MS,
                        "latency_distribution": "lognormal",
                        "latency_ms": 1.0,
                        "latency_max_ms": 50.0,
                        "seed": args.seed,
                    },
                    AcquirerSimConfig,
                )
            ),
            "beta": AcquirerSim(
                AcquirerSimConfig(
                    name="beta",
                    latency_distribution="lognormal",
                    latency_ms=1.0,
                    latency_max_ms=50.0,
                    seed=args.seed + 1,
                )
            ),
        }
        ports = {name: await nursery.start(sim.serve) for name, sim in sims.items()}
        config, terminals = build(
            directory,
            ports,
            terminals_per_listener=args.terminals,
            processing={"terminal_deadline_ms": TERMINAL_DEADLINE_MS},
            acquirer={
                "request_timeout_ms": TERMINAL_DEADLINE_MS,
                "reconnect_backoff_min_ms": 100,
                "reconnect_backoff_max_ms": 1_000,
            },
            metrics_enabled=False,
        )
        switch = Switch(config)
        try:
            ports_info = await nursery.start(switch.run)
            with trio.fail_after(10):
                while not all(g.up for g in switch.core.groups.values()):
                    await trio.sleep(0.05)
            print(
                f"switch up: listeners {ports_info.listeners}; acquirers {ports}; state in {directory}",
                file=out,
            )
            started = trio.current_time()
            until = started + args.seconds

            async def run_terminal(i: int) -> None:
                t = terminals[i]
                lc = next(lc for lc in config.listeners if lc.name == t.listener)
                cfg = TerminalSimConfig(
                    port=ports_info.listeners[t.listener],
                    profile=lc.profile,
                    tpdu_hex="6000030000" if lc.tpdu else "",
                    terminal_id=t.terminal_id,
                    merchant_id=t.merchant_id,
                    master_key_hex=t.master_key_hex,
                    request_timeout_ms=TERMINAL_DEADLINE_MS * 5,
                )
                async with TerminalSim.connect(cfg) as term:
                    r = await term.sign_on()
                    stats.add(r)
                    await _terminal_load(term, random.Random(rng.random()), stats, until)
                    stats.add(await term.settlement())

            async def progress() -> None:
                last = 0
                dropped = False
                while trio.current_time() < until:
                    await trio.sleep(1.0)
                    t = trio.current_time() - started
                    if not dropped and t >= args.seconds / 2 and not os.environ.get("DEMO_NO_DROP"):
                        link = switch.core.groups["alpha"].links[0]
                        if link._scope is not None:
                            link._scope.cancel()  # fault: one acquirer link drops mid-run
                            print(f"  [{t:5.1f}s] dropping acquirer link {link.name}", file=out)
                        dropped = True
                    n = stats.total
                    print(
                        f"  [{t:5.1f}s] {n:7d} txns  {n - last:6d}/s  approved {stats.count('00'):7d}  "
                        f"timeouts {stats.count('68'):4d}  in flight {switch.processor.in_flight:4d}",
                        file=out,
                    )
                    last = n

            async with trio.open_nursery() as load:
                load.start_soon(progress)
                for i in range(len(terminals)):
                    load.start_soon(run_terminal, i)
            elapsed = trio.current_time() - started
            # Let store-and-forward deliver the last reversals.
            with trio.move_on_after(DRAIN_S):
                while switch.saf.depth() > 0:
                    await trio.sleep(0.1)
            reversals_pending = switch.saf.depth()
            completed = _counter_total(switch.metrics.reversals_completed)
            late = _counter_total(switch.metrics.unmatched)
        finally:
            nursery.cancel_scope.cancel()
    await trio.to_thread.run_sync(switch.close)
    return _summary(config, stats, elapsed, reversals_pending, completed, late)


def _counter_total(counter: Any) -> int:
    return sum(int(s.value) for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def _summary(config: Any, stats: Stats, elapsed: float, pending: int, completed: int, late: int) -> dict:
    backend = SqliteBackend(config.ledger.path, create=False)
    try:
        report = verify_ledger(backend, load_signing_key(config.ledger).public_key())
        seen: Counter[tuple[str, str]] = Counter()
        for row in backend.iter_entry_rows(0):
            if row.kind in (EntryKind.PURCHASE, EntryKind.CAPTURE, EntryKind.REFUND, EntryKind.STAND_IN):
                seen[(row.kind, row.idempotency_key)] += 1
        double = sum(n - 1 for n in seen.values() if n > 1)
        size = report.tree_size
    finally:
        backend.close()
    by_type: dict[str, dict[str, int]] = {}
    for (kind, rc), n in sorted(stats.by.items()):
        by_type.setdefault(kind, {})[rc] = n
    return {
        "seconds": round(elapsed, 1),
        "transactions": stats.total,
        "per_second": round(stats.total / elapsed, 1) if elapsed else 0,
        "approved": stats.count("00"),
        "timeouts": stats.count("68"),
        "reversals_completed": completed,
        "reversals_pending": pending,
        "late_answers_dropped": late,
        "duplicates_answered": stats.duplicates_answered,
        "double_postings": double,
        "errors": stats.errors,
        "latency_ms": {
            "p50": stats.pct(0.5),
            "p95": stats.pct(0.95),
            "p99": stats.pct(0.99),
            "max": stats.pct(1.0),
        },
        "by_type": by_type,
        "ledger_entries": size,
        "ledger_verified": report.ok,
        "ledger_problem": report.problem,
    }


def _table(s: dict[str, Any], out: Any) -> None:
    print("", file=out)
    print(f"{'type':<16}{'code':>6}{'count':>9}", file=out)
    for kind, codes in s["by_type"].items():
        for rc, n in codes.items():
            print(f"{kind:<16}{rc:>6}{n:>9}", file=out)
    lat = s["latency_ms"]
    rows = [
        ("transactions", f"{s['transactions']} in {s['seconds']} s ({s['per_second']}/s)"),
        ("approved", s["approved"]),
        ("latency ms", f"p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}"),
        ("timeouts (68)", s["timeouts"]),
        ("reversals completed", s["reversals_completed"]),
        ("reversals pending", s["reversals_pending"]),
        ("late answers dropped", s["late_answers_dropped"]),
        ("duplicates answered", s["duplicates_answered"]),
        ("double postings", s["double_postings"]),
        ("terminal errors", s["errors"]),
        ("ledger entries", s["ledger_entries"]),
        ("ledger verified", s["ledger_verified"] or s["ledger_problem"]),
    ]
    print("", file=out)
    for k, v in rows:
        print(f"{k:<22}{v}", file=out)


def main(args: argparse.Namespace) -> int:
    if args.seconds <= 0 or args.terminals < 1:
        print("switch demo: --seconds must be > 0 and --terminals >= 1", file=sys.stderr)
        return 2
    logging.getLogger("switch").setLevel(logging.ERROR if not os.environ.get("DEMO_LOG") else logging.INFO)
    out = sys.stdout
    t0 = time.monotonic()
    if args.dir:
        summary = trio.run(_demo, args, Path(args.dir), out)
    else:
        with tempfile.TemporaryDirectory(prefix="switch-demo-") as tmp:
            summary = trio.run(_demo, args, Path(tmp), out)
    _table(summary, out)
    healthy = (
        summary["ledger_verified"]
        and summary["double_postings"] == 0
        and summary["reversals_pending"] == 0
        and summary["approved"] > 0
    )
    print(f"\n{'HEALTHY' if healthy else 'NOT HEALTHY'} ({time.monotonic() - t0:.1f} s)", file=out)
    if args.json:
        print(json.dumps(summary, sort_keys=True), file=out)
    return 0 if healthy else 1

"""Latency of the switch <-> ledger-process hop alone (switch.server.ledger_process), as the switch uses it.

    .venv/bin/python bench/ledger_hop.py                          # 6 s per setting, windows 2 and 0 ms
    .venv/bin/python bench/ledger_hop.py --windows 2 1 0.5 --seconds 10

Every `--tick-ms` one flush, like the core's flusher at moderate load: `--posts` outcomes of two
drafts (sale + fee) and as many armed reversals, in one message. Per submission: time from the flush to
its callback (the entries durable, or the arms durable), median and p99, per group-commit window
(`ledger.batch_window_ms`). The results are read by the writer's own thread here (the switch reads them
on its trio thread, switch.server.core.ledger_pump); what is measured is the child's side: hand-offs
between its threads, the window, the writer's work, fsync. Prints interpreter and load average: on a
shared machine the tail follows the load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from switch.ledger.model import EntryDraft, EntryKind, Posting, Side, accounts
from switch.server.ledger_process import RemoteLedgerWriter
from switch.server.testbed import build


def _draft(
    key: str, kind: EntryKind, rrn: str, amount: int, debit: str, credit: str, original: str = ""
) -> EntryDraft:
    return EntryDraft(
        idempotency_key=key,
        kind=kind,
        rrn=rrn,
        at_ms=1_700_000_000_000,
        response_code="00",
        merchant_id="M1",
        terminal_id="T1",
        amount_minor=amount,
        currency="978",
        original_rrn=original,
        postings=(
            Posting(debit, Side.DEBIT, amount, "978"),
            Posting(credit, Side.CREDIT, amount, "978"),
        ),
    )


def _q(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[int(p * (len(s) - 1))] * 1000.0 if s else 0.0


def one(window_ms: float, seconds: float, posts: int, tick_ms: float) -> str:
    d = Path(tempfile.mkdtemp(prefix="ledger-hop-"))
    cfg, _ = build(d, {"alpha": 1}, packed_listener=False)
    cfg = msgspec.structs.replace(cfg, ledger=msgspec.structs.replace(cfg.ledger, batch_window_ms=window_ms))
    w = RemoteLedgerWriter(cfg)
    post_s: list[float] = []
    arm_s: list[float] = []
    n = 0
    clear, payable = accounts.acquirer_clearing("alpha"), accounts.merchant_payable("M1")
    t_end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            subs = []
            arms = []
            for _ in range(posts):
                n += 1
                rrn = f"{n:012d}"
                sale = _draft(f"k{n}", EntryKind.PURCHASE, rrn, 500, clear, payable)
                fee = _draft(f"f{n}", EntryKind.FEE, f"{rrn}/fee", 5, payable, accounts.FEE_INCOME, rrn)
                subs.append(([sale, fee], lambda e, err, t0=t0: post_s.append(time.perf_counter() - t0)))
                arms.append(("alpha", rrn, {"t": "0400", "37": rrn}))
            w.submit_many(subs)
            w.arm(arms, 0, lambda err, v, t0=t0: arm_s.append(time.perf_counter() - t0))
            w.flush()
            time.sleep(max(0.0, tick_ms / 1000.0 - (time.perf_counter() - t0)))
    finally:
        w.close(60)
    return (
        f"window {window_ms:>4} ms: {len(post_s) / seconds:7.0f} outcomes/s; post p50 {_q(post_s, 0.5):6.2f} "
        f"p99 {_q(post_s, 0.99):7.2f} ms; arm p50 {_q(arm_s, 0.5):6.2f} p99 {_q(arm_s, 0.99):7.2f} ms; "
        f"load {os.getloadavg()[0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=float, nargs="+", default=[2.0, 0.0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--posts", type=int, default=6, help="outcomes (and arms) per flush")
    parser.add_argument("--tick-ms", type=float, default=2.0, help="one flush every this many ms")
    parser.add_argument("--repeat", type=int, default=2, help="alternate the settings this many times")
    args = parser.parse_args(argv)
    print(f"interpreter: {sys.executable} {platform.python_version()}", file=sys.stderr)
    for _ in range(args.repeat):
        for window in args.windows:
            print(one(window, args.seconds, args.posts, args.tick_ms), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

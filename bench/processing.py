"""CPU per approved purchase of the sans-I/O processing core alone, with merchant services (fees, rules).

    .venv/bin/python bench/processing.py                  # 20,000 purchases, 5 rounds, best round
    .venv/bin/python bench/processing.py --profile 20     # cProfile, top 20 by own time

What one purchase is here: exactly the three events the server feeds for it -- `TerminalRequest`
(parsed, checked, rules, routed: SendToAcquirer), `AcquirerAnswered` (approval: Post of the sale and
its fee), `LedgerCommitted` (Reply, ReleaseReversal) -- straight into `Processor.handle`, with the real
MerchantRules and RegistryDirectory, no I/O, no harness in between. It measures the processing share of
the switch's trio thread (docs/performance.md "Switch end to end"); CPU time (time.process_time), so a
busy machine slows it less than wall time. Prints the interpreter.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import platform
import pstats
import sys
import time

from switch.ledger.model import Entry
from switch.merchant.directory import RegistryDirectory
from switch.processing import (
    AcquirerAnswered,
    HmacPanHasher,
    LedgerCommitted,
    Post,
    PrefixRouter,
    Processor,
    Recovered,
    ReserveRrns,
    RrnsReserved,
    SendToAcquirer,
    TerminalRequest,
)
from switch.processing.harness import NOW_MS, fee_merchant_rules, fin, make_config

CARDS = ("4111111111111111", "4000000000000002", "5555555555554444")


def build() -> Processor:
    rules = fee_merchant_rules(1_000_000)
    proc = Processor(
        make_config(),
        directory=RegistryDirectory(rules),
        router=PrefixRouter({"4": "A", "5": "C"}),
        pan_hasher=HmacPanHasher(b"k" * 32),
        rules=rules,
    )
    proc.handle(Recovered(now_ms=NOW_MS))
    proc.handle(RrnsReserved(1, 10_000_000))
    return proc


def run(proc: Processor, n: int, first_stan: int) -> int:
    """n purchases through the core; returns the approvals answered. The garbage collector as
    `switch run` has it (switch.server.gcpolicy: young threshold 2,000, survivors frozen)."""
    gc.set_threshold(2_000, *gc.get_threshold()[1:])
    handle = proc.handle
    approved = 0
    seq = 0
    now = NOW_MS
    rrn_start = 10_000_001 + first_stan * 10
    for i in range(n):
        stan = (first_stan + i) % 999_999 + 1
        now += 1
        fields = fin(amount=100 + i % 5_000, stan=stan, pan=CARDS[i % 3])
        fields["12"] = f"{(i // 3600) % 24:02d}{(i // 60) % 60:02d}{i % 60:02d}"
        send = None
        for dec in handle(TerminalRequest(1, "terminal_ascii", fields, now)):
            if type(dec) is SendToAcquirer:
                send = dec
            elif type(dec) is ReserveRrns:
                handle(RrnsReserved(rrn_start, dec.count))
                rrn_start += dec.count
        assert send is not None, "purchase not sent to an acquirer"
        answer = {"t": "0210", "11": "000001", "37": send.fields["37"], "38": "A1B2C3", "39": "00"}
        post = next(d for d in handle(AcquirerAnswered(send.txn_id, answer, now)) if type(d) is Post)
        entries = []
        for draft in post.drafts:
            entries.append(Entry(seq=seq, draft=draft))
            seq += 1
        for dec in handle(LedgerCommitted(post.txn_id, tuple(entries), now)):
            if type(dec).__name__ == "Reply" and dec.fields.get("39") == "00":
                approved += 1
        if i % 2_000 == 0:  # ~ once a second at the target rate
            gc.freeze()
    return approved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purchases", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, help="cProfile one round, show the top N")
    args = parser.parse_args(argv)
    print(f"interpreter: {sys.executable} {platform.python_version()}", file=sys.stderr)
    proc = build()
    run(proc, 2_000, 0)  # warm-up
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(proc, args.purchases, 100_000)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
        return 0
    best = float("inf")
    for r in range(args.rounds):
        t = time.process_time()
        approved = run(proc, args.purchases, 200_000 + r * args.purchases)
        cpu = time.process_time() - t
        assert approved == args.purchases, f"{approved} of {args.purchases} approved"
        best = min(best, cpu / approved * 1e6)
        print(f"round {r}: {cpu / approved * 1e6:.1f} us CPU per approved purchase", file=sys.stderr)
    print(f"best: {best:.1f} us CPU per approved purchase (processing core + merchant rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

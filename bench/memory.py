"""Memory and full-collection cost of the finished transactions the processing core remembers.

    .venv/bin/python bench/memory.py                        # 200,000 purchases
    .venv/bin/python bench/memory.py --purchases 1000000    # the default cap (max_remembered_keys)

Why: the switch keeps every finished transaction (by terminal key and by RRN, up to
`processing.max_remembered_keys` / `max_cached_originals`, 1,000,000 each) so later repeats, voids,
refunds, completions and reversals find it without a ledger lookup; and every
`server.gc_full_interval_s` (switch.server.gcpolicy) it unfreezes and runs one full collection, during
which every transaction in flight waits.

What it does: approved purchases straight into `Processor.handle` (bench/processing.py's core: real
MerchantRules with a fee contract, RegistryDirectory; three events per purchase), then
- bytes per remembered purchase: tracemalloc's traced-memory growth over the first `--traced`
  purchases (every byte Python allocated and still holds: the records, their strings, the maps'
  slots), and the process's RSS growth over all of them;
- the GC-tracked objects, and `gc.collect()` after `gc.unfreeze()` (what gcpolicy does every
  `gc_full_interval_s`) with all of them remembered: CPU and wall time, `--repeat` times;
- the same collection with the remembered records turned into the shape they had before session 5 (a
  `Txn` with its reply dict, reply extras, live lists and the fee's EntryDraft: `old_shape`), in the
  same process, for a ratio. Its "extra bytes" leave out the strings the old record shared with the
  new one (identity, card, codes), so the old cost per purchase is a run of this script on the old
  code (`--no-old-shape`).
Prints the interpreter, a table, and one JSON line last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processing import build, run  # bench/processing.py

from switch.merchant import drafts
from switch.processing import fields
from switch.processing.record import Txn


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def old_shape(rec: Any) -> Txn:
    """`rec` as the session-4 core kept it once answered: a `Txn` holding the echoed request fields
    (`reply_base`, what `fields.reply_base` keeps of a purchase), reply extras, its live lists emptied
    but present, and the sale's FEE `EntryDraft` with its postings (kept here in `merchant_cfg`, which
    the old record had empty: the field it had for it is gone)."""
    kept = {name: getattr(rec, name) for name in Txn.__struct_fields__ if hasattr(type(rec), name)}
    for live in ("stage", "conn_ids", "tried", "candidates", "pos_fields", "reply_base", "reply_extra"):
        kept.pop(live, None)
    kept.pop("merchant_cfg", None)
    base = {
        "3": rec.processing_code,
        "4": f"{rec.amount_minor:012d}",
        "11": rec.acq_stan or "000001",
        "12": "120000",
        "13": "0615",
        "25": "00",
        "41": rec.terminal_id,
        "42": rec.merchant_id,
        "49": rec.currency,
    }
    fee = rec.fee
    if fee is not None:
        fee = drafts.fee(
            rec.rrn, rec.merchant_id, rec.terminal_id, fee.amount_minor, rec.currency, rec.at_ms, fee.memo
        )
    return Txn(
        **kept,
        reply_base=fields.reply_base(base),
        reply_extra={},
        conn_ids=[],
        tried=[rec.acquirer],
        candidates=[],
        pos_fields={},
        merchant_cfg=fee,
    )


def collect(repeat: int) -> tuple[list[float], list[float], int]:
    """`gc.collect()` after `gc.unfreeze()`, as switch.server.gcpolicy does: CPU ms, wall ms, and the
    number of GC-tracked objects it walked."""
    cpu, wall = [], []
    tracked = 0
    for _ in range(repeat):
        gc.unfreeze()
        tracked = len(gc.get_objects())
        c0, w0 = time.process_time(), time.perf_counter()
        gc.collect()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return cpu, wall, tracked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purchases", type=int, default=200_000)
    parser.add_argument("--traced", type=int, default=20_000, help="purchases measured with tracemalloc")
    parser.add_argument("--repeat", type=int, default=3, help="full collections timed per shape")
    parser.add_argument("--no-old-shape", action="store_true", help="skip the old-shape comparison")
    args = parser.parse_args(argv)
    interp = f"{sys.executable} {platform.python_version()}"
    print(f"interpreter: {interp}", file=sys.stderr)
    n, traced = args.purchases, min(args.traced, args.purchases)
    proc = build()
    run(proc, 2_000, 0)  # warm-up: caches, counters, the first RRN block
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    t0 = tracemalloc.get_traced_memory()[0]
    run(proc, traced, 10_000)
    traced_bytes = tracemalloc.get_traced_memory()[0] - t0
    tracemalloc.stop()
    if n > traced:
        run(proc, n - traced, 10_000 + traced)
    gc.collect()
    rss_per = (rss_bytes() - rss0) / n
    book = proc.book
    records = list(book.by_rrn.values())
    remembered = len(records)
    tracked_records = sum(1 for r in records if gc.is_tracked(r))
    kind = type(records[-1]).__name__
    cpu, wall, tracked = collect(args.repeat)
    rows = [
        ("remembered (by RRN / by key)", f"{remembered:,} / {len(book.by_key):,}"),
        ("record type", kind),
        ("records tracked by the GC", f"{tracked_records:,}"),
        (f"bytes per purchase (tracemalloc, {traced:,})", f"{traced_bytes / traced:,.0f}"),
        (f"bytes per purchase (RSS, {n:,})", f"{rss_per:,.0f}"),
        ("GC-tracked objects in the process", f"{tracked:,}"),
        ("full gc.collect() CPU ms", " ".join(f"{x:.0f}" for x in cpu)),
        ("full gc.collect() wall ms", " ".join(f"{x:.0f}" for x in wall)),
    ]
    result: dict[str, Any] = {
        "bench": "memory",
        "interpreter": interp,
        "purchases": n,
        "remembered": remembered,
        "record_type": kind,
        "records_gc_tracked": tracked_records,
        "bytes_per_purchase_tracemalloc": round(traced_bytes / traced),
        "bytes_per_purchase_rss": round(rss_per),
        "gc_tracked_objects": tracked,
        "gc_full_cpu_ms": [round(x, 1) for x in cpu],
        "gc_full_wall_ms": [round(x, 1) for x in wall],
    }
    if not args.no_old_shape:
        tracemalloc.start()
        m0 = tracemalloc.get_traced_memory()[0]
        old = {r.rrn: old_shape(r) for r in records}
        extra = (tracemalloc.get_traced_memory()[0] - m0) / remembered
        tracemalloc.stop()
        by_key = {t.key: t for t in old.values()}
        book.by_rrn, book.by_key = old, by_key  # the same book, in the old shape
        del records
        gc.collect()
        ocpu, owall, otracked = collect(args.repeat)
        rows += [
            ("old shape: extra bytes per record (no strings)", f"{extra:,.0f}"),
            ("old shape: GC-tracked objects", f"{otracked:,}"),
            ("old shape: full gc.collect() CPU ms", " ".join(f"{x:.0f}" for x in ocpu)),
            ("old shape: full gc.collect() wall ms", " ".join(f"{x:.0f}" for x in owall)),
            ("old / new full collection (CPU, min)", f"{min(ocpu) / max(min(cpu), 0.001):.1f}x"),
        ]
        result.update(
            old_shape_extra_bytes_per_record=round(extra),
            old_shape_gc_tracked_objects=otracked,
            old_shape_gc_full_cpu_ms=[round(x, 1) for x in ocpu],
            old_shape_gc_full_wall_ms=[round(x, 1) for x in owall],
        )
    width = max(len(r[0]) for r in rows)
    print(f"interpreter: {interp}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

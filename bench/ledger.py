"""Durable ledger throughput: entries/s through the real group-commit writer, per backend and batch window.

What is measured: purchase entries (two postings, masked PAN, PAN hash, RRN) submitted one outcome at a
time, as the switch does, with up to `--inflight` outcomes waiting for durability (terminals waiting for
their answer); throughput = entries / (first submit .. last durable callback); commit latency = submit ..
durable callback, per entry; `storage_entries_per_s` = entries / time spent inside the backend's
`write_batch` (the commit and its fsync included), i.e. what the backend alone would sustain. The
Merkle work (leaf hashes, stored nodes, per-batch tree heads, signed checkpoints) is on. After each
run `verify_ledger` recomputes everything; `verified` is its verdict.

Backends: a throwaway PostgreSQL cluster started here (tests/pgcluster.py; fsync on, default commit) and
a temp SQLite file (WAL, synchronous=FULL). Output: a table, the interpreter, then one JSON line per run;
the LAST line is the default SQLite configuration.

    .venv/bin/python bench/ledger.py            # all runs
    .venv/bin/python bench/ledger.py --quick    # fewer entries
    .venv/bin/python bench/ledger.py --no-postgres
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from switch.config import LedgerConfig  # noqa: E402
from switch.ledger.backend import BatchRows, LedgerBackend  # noqa: E402
from switch.ledger.model import Entry, EntryDraft, EntryKind, Posting, Side, accounts  # noqa: E402
from switch.ledger.postgres import PostgresBackend  # noqa: E402
from switch.ledger.sqlite import SqliteBackend  # noqa: E402
from switch.ledger.verify import verify_ledger  # noqa: E402
from switch.ledger.writer import LedgerWriter  # noqa: E402

#: Batch windows tried besides the default one (ms).
WINDOWS_MS = (2.0, 5.0)
ACQUIRERS = 4
#: Key shapes (--keys): "switch" = what the running switch posts (idempotency key = terminal key
#: 41/42/11/13-12/MTI class, terminals chosen at random, so keys land all over the key index; RRNs
#: allocated in order; `MERCHANTS` merchants of `TERMINALS_PER_MERCHANT` terminals); "sequential" =
#: the old shape (keys and merchants in submission order, 200 merchants), which flatters B-tree indexes.
MERCHANTS = 1_000
TERMINALS_PER_MERCHANT = 5
SEQUENTIAL_MERCHANTS = 200


def interpreter() -> str:
    opt = "--enable-optimizations" in (sysconfig.get_config_var("CONFIG_ARGS") or "")
    return (
        f"{sys.executable} (CPython {platform.python_version()}, "
        f"{'PGO/LTO build' if opt else 'no --enable-optimizations'})"
    )


def make_drafts(n: int, prefix: str, keys: str = "switch") -> list[EntryDraft]:
    """n distinct purchases spread over merchants, terminals and acquirers (built before the clock
    starts); `keys` as in the module constants. `prefix` makes the keys of each run distinct."""
    drafts = []
    base_ms = 1_760_000_000_000
    rnd = random.Random(n)
    terminals = MERCHANTS * TERMINALS_PER_MERCHANT
    stans: dict[int, int] = {}
    for i in range(n):
        if keys == "sequential":
            m = f"M{i % SEQUENTIAL_MERCHANTS:05d}"
            t = f"T{i % 5000:07d}"
            key = f"{prefix}-{i}"
        else:
            ti = rnd.randrange(terminals)
            m = f"M{ti % MERCHANTS:014d}"
            t = f"T{ti:07d}"
            stan = stans[ti] = stans.get(ti, 0) + 1
            key = f"tk:{t}/{m}/{stan % 1_000_000:06d}/{(stan // 1_000_000) % 10_000:04d}120000/02:out"
        amount = 100 + (i * 7919) % 100_000
        drafts.append(
            EntryDraft(
                idempotency_key=key,
                kind=EntryKind.PURCHASE,
                rrn=f"{i + 1:012d}",
                at_ms=base_ms + i,
                merchant_id=m,
                terminal_id=t,
                pan_masked="411111******1111",
                pan_hash=f"{i:064x}",
                amount_minor=amount,
                currency="978",
                postings=(
                    Posting(accounts.acquirer_clearing(f"A{i % ACQUIRERS}"), Side.DEBIT, amount, "978"),
                    Posting(accounts.merchant_payable(m), Side.CREDIT, amount, "978"),
                ),
            )
        )
    return drafts


def run(
    open_backend: Callable[[], LedgerBackend],
    *,
    n: int,
    window_ms: float,
    max_batch: int,
    inflight: int,
    group: int,
    keys: str = "switch",
    pipeline: bool = LedgerConfig().commit_pipeline,
) -> dict[str, object]:
    """Post n entries through a fresh writer; return throughput, latency percentiles and verify's verdict."""
    key = Ed25519PrivateKey.generate()
    extra = {"commit_pipeline": pipeline}
    cfg = LedgerConfig(batch_window_ms=window_ms, max_batch_entries=max_batch, **extra)
    drafts = make_drafts(n, f"b{time.time_ns()}", keys)
    # The bench's own input: in the switch each draft arrives just before it is submitted and dies
    # once answered; here all of them live through the run, and the collector should not walk them.
    gc.freeze()
    latencies_ns = [0] * n
    slots = threading.BoundedSemaphore(inflight)
    all_done = threading.Event()
    failures: list[BaseException] = []
    remaining = [n]
    lock = threading.Lock()
    perf = time.perf_counter_ns

    backend = open_backend()
    batch_write_ns: list[int] = []
    write_batch = backend.write_batch

    def timed_write_batch(rows: BatchRows) -> None:
        t0 = perf()
        write_batch(rows)
        batch_write_ns.append(perf() - t0)

    backend.write_batch = timed_write_batch  # type: ignore[method-assign]  # storage share of the time
    writer = LedgerWriter(backend, signing_key=key, config=cfg)

    def submit(i: int) -> None:
        t0 = perf()

        def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
            latencies_ns[i] = perf() - t0
            slots.release()
            if error is not None:
                failures.append(error)
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

        writer.submit([drafts[i]], on_done)

    # group > 1: as the switch's ledger process does, each round of `group` outcomes is one
    # submit_many call with one callback per batch (tokens: (index, submit time)).
    cond = threading.Condition()
    waiting = [0]  # outcomes submitted and not yet answered

    def on_batch(results: list[tuple[object, list[Entry] | None, BaseException | None]]) -> None:
        now = perf()
        for token, _entries, error in results:
            i, t0 = token  # type: ignore[misc]
            latencies_ns[i] = now - t0
            if error is not None:
                failures.append(error)
        with cond:
            waiting[0] -= len(results)
            remaining[0] -= len(results)
            if remaining[0] == 0:
                all_done.set()
            cond.notify()

    def submit_round(lo: int, hi: int) -> None:
        with cond:
            while waiting[0] + (hi - lo) > inflight:
                cond.wait()
            waiting[0] += hi - lo
        t0 = perf()
        refused = writer.submit_many([((i, t0), [drafts[i]]) for i in range(lo, hi)], on_batch)
        if refused:
            raise RuntimeError(f"ledger bench: {len(refused)} outcomes refused, first: {refused[0][1]!r}")

    writer_clock = time.pthread_getcpuclockid(writer._thread.ident)  # type: ignore[arg-type]
    committer = getattr(writer, "_committer", None)  # the pipeline's commit thread (None: in line)
    committer_clock = None if committer is None else time.pthread_getcpuclockid(committer.thread.ident)  # type: ignore[arg-type]
    committer0 = 0.0 if committer_clock is None else time.clock_gettime(committer_clock)
    cpu0, caller0, writer0 = time.process_time(), time.thread_time(), time.clock_gettime(writer_clock)
    start = perf()
    if group > 1:
        for lo in range(0, n, group):
            submit_round(lo, min(n, lo + group))
    else:
        for i in range(n):
            slots.acquire()
            submit(i)
    caller_cpu_s = time.thread_time() - caller0
    if not all_done.wait(300):
        raise RuntimeError("ledger bench: the writer did not finish within 300 s")
    elapsed_s = (perf() - start) / 1e9
    cpu_s = time.process_time() - cpu0
    writer_cpu_s = time.clock_gettime(writer_clock) - writer0
    committer_cpu_s = 0.0 if committer_clock is None else time.clock_gettime(committer_clock) - committer0
    size = writer.size
    # SQLite's C batch writer: time with the GIL released (BEGIN .. COMMIT) vs all of write_batch.
    batch_writer = getattr(backend, "_batch_writer", None)
    released_ns = batch_writer.released_ns if batch_writer else None
    writer.close()
    if failures:
        raise RuntimeError(f"ledger bench: {len(failures)} submissions failed, first: {failures[0]!r}")

    reader = open_backend()
    t0 = perf()
    report = verify_ledger(reader, key.public_key())
    verify_s = (perf() - t0) / 1e9
    reader.close()
    lat = sorted(latencies_ns)
    writes = sorted(batch_write_ns) or [0]
    return {
        "entries": n,
        "tree_size": size,
        "batch_window_ms": window_ms,
        "max_batch_entries": max_batch,
        "inflight": inflight,
        "group": group,
        "keys": keys,
        "pipeline": pipeline,
        "entries_per_s": round(n / elapsed_s),
        "p50_commit_ms": round(lat[n // 2] / 1e6, 2),
        "p99_commit_ms": round(lat[min(n - 1, (n * 99) // 100)] / 1e6, 2),
        "max_commit_ms": round(lat[-1] / 1e6, 2),
        # CPU per entry (us): whole process, the submitting thread, the writer thread, its committer.
        "cpu_us_per_entry": round(cpu_s / n * 1e6, 1),
        "caller_cpu_us": round(caller_cpu_s / n * 1e6, 1),
        "writer_cpu_us": round(writer_cpu_s / n * 1e6, 1),
        "committer_cpu_us": round(committer_cpu_s / n * 1e6, 1),
        "batches": len(batch_write_ns),
        "storage_share": round(sum(batch_write_ns) / 1e9 / elapsed_s, 2),
        # What the backend alone sustains: entries / time inside write_batch (commit included).
        "storage_entries_per_s": round(n / max(sum(batch_write_ns) / 1e9, 1e-9)),
        # Share of write_batch spent with the GIL released (SQLite's C batch writer; None otherwise).
        "storage_released_share": None
        if released_ns is None
        else round(released_ns / max(sum(batch_write_ns), 1), 2),
        "p99_batch_write_ms": round(writes[min(len(writes) - 1, (len(writes) * 99) // 100)] / 1e6, 2),
        "verified": bool(report.ok and report.tree_size == size),
        "verify_s": round(verify_s, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000, help="entries per SQLite run")
    ap.add_argument("--pg-entries", type=int, default=60_000, help="entries per PostgreSQL run")
    ap.add_argument("--max-batch", type=int, default=LedgerConfig().max_batch_entries)
    ap.add_argument(
        "--inflight",
        type=int,
        default=2_000,
        help="outcomes waiting for durability at once (default: two batches, one committing, one filling)",
    )
    ap.add_argument(
        "--group",
        type=int,
        default=100,
        help="outcomes per submit_many call, as the switch's ledger process receives them per flush "
        "(1: one submit and one callback per outcome)",
    )
    ap.add_argument(
        "--keys",
        choices=("switch", "sequential"),
        default="switch",
        help="key shapes: the switch's (random terminal keys, 1,000 merchants) or the old sequential ones",
    )
    ap.add_argument(
        "--no-pipeline",
        action="store_true",
        help="commit every batch in line on the writer thread (LedgerConfig.commit_pipeline=false; "
        "the default commits batches of pipeline_min_batch_entries or more on a second thread)",
    )
    ap.add_argument(
        "--windows", default="", help="comma-separated batch windows (ms) instead of the default set"
    )
    ap.add_argument(
        "--python-gc",
        action="store_true",
        help="keep Python's default collector instead of the ledger process's policy "
        "(switch.server.gcpolicy: young threshold, survivors frozen every second)",
    )
    ap.add_argument("--quick", action="store_true", help="a tenth of the entries (smoke run)")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-sqlite", action="store_true", help="(then the last line is not SQLite's)")
    args = ap.parse_args()
    if args.quick:
        args.entries //= 10
        args.pg_entries //= 10
    default_window = LedgerConfig().batch_window_ms
    windows = sorted({*WINDOWS_MS, default_window})
    if args.windows:
        windows = sorted({float(w) for w in args.windows.split(",")})
    results: list[dict[str, object]] = []
    if not args.python_gc:
        # The writer runs in the switch's ledger process, which applies this policy
        # (switch.server.ledger_process.child_main); measured here the same way.
        from switch.config import SwitchConfig
        from switch.server import gcpolicy
        from switch.server.ledger_process import ledger_gc_policy

        policy = ledger_gc_policy(SwitchConfig())
        gcpolicy.apply_thresholds(policy)
        gcpolicy.run_in_thread(policy, threading.Event())

    if not args.no_postgres:
        from tests.pgcluster import PgCluster, PgClusterError

        try:
            cluster = PgCluster().start()
        except PgClusterError as exc:
            print(f"bench/ledger.py: no PostgreSQL ({exc}); --no-postgres skips it", file=sys.stderr)
            return 2
        with cluster:
            for w in windows:
                dsn = cluster.create_database()
                r = run(lambda dsn=dsn: PostgresBackend(dsn, writer=True), n=args.pg_entries, window_ms=w,
                        max_batch=args.max_batch, inflight=args.inflight, group=args.group,
                        keys=args.keys, pipeline=not args.no_pipeline)  # fmt: skip
                results.append({"backend": "postgres", **r})
                print(f"  postgres window {w} ms: {r['entries_per_s']} entries/s", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        # The default configuration runs last so its line is the last one printed.
        last = [default_window] if default_window in windows else []
        for w in [] if args.no_sqlite else [x for x in windows if x != default_window] + last:
            path = os.path.join(tmp, f"ledger-{w}.db")
            r = run(lambda path=path: SqliteBackend(path), n=args.entries, window_ms=w,
                    max_batch=args.max_batch, inflight=args.inflight, group=args.group,
                    keys=args.keys, pipeline=not args.no_pipeline)  # fmt: skip
            results.append({"backend": "sqlite", **r})
            print(f"  sqlite window {w} ms: {r['entries_per_s']} entries/s", file=sys.stderr)

    cols = ("backend", "batch_window_ms", "entries", "entries_per_s", "p50_commit_ms", "p99_commit_ms",
            "group", "batches", "cpu_us_per_entry", "caller_cpu_us", "writer_cpu_us", "committer_cpu_us",
            "storage_entries_per_s", "verified")  # fmt: skip
    gc_policy = "Python's default collector" if args.python_gc else "the ledger process's GC policy"
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in results:
        print(" | ".join(f"{r[c]!s:>14}" for c in cols))
    print(f"interpreter: {interpreter()}; {gc_policy}")
    for r in results:
        print(json.dumps({**r, "python": platform.python_version()}))
    return 0 if all(r["verified"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The process the crash tests SIGKILL: it posts entries under load through the real group-commit
writer and reports every acknowledgement on a side channel before it counts as given.

Side channel: an append-only file, one `os.write` per acknowledged submission, issued from the writer's
durable callback -- i.e. after the batch is committed and before anything else could act on the ack.
The kernel keeps what was written when the process is killed, so the parent reads exactly the
acknowledgements that were given (a torn last line, which has no newline, is ignored by the reader).

Lines:  `S <pid>`                       writer open (state loaded), posting starts
        `A <seq>:<key> [<seq>:<key>..]`  one acknowledged submission: its entries' seqs and keys
        `F <key> <error type>`           a submission refused (rule error or failed commit)

Drafts are a pure function of (round, index), so a later round can re-submit a previous round's
possibly-committed drafts unchanged (`--retry`), as a client retrying after a timeout would: the
ledger must answer with the original entries, never a second copy. Outcomes: every 5th index is a
purchase plus its fee in ONE submission (all or nothing), every 7th+3 a partial refund of index-3's
purchase, the rest plain purchases.

Run: python tests/ledger/crash_writer.py --backend sqlite --target /tmp/l.db --acks /tmp/acks --round 0
The signing key comes hex-encoded in CRASH_SIGNING_KEY (never on the command line).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger.backend import LedgerBackend
from switch.ledger.model import Entry, EntryDraft, EntryKind, Posting, Side, accounts
from switch.ledger.writer import LedgerBusy, LedgerWriter

CURRENCY = "978"
FEE_MINOR = 25
REFUND_MINOR = 100
#: Safety net: a writer nobody kills exits by itself after this long (a broken test never leaks it).
DEFAULT_MAX_SECONDS = 30.0
PR_SET_PDEATHSIG = 1


def rrn(round_no: int, index: int) -> str:
    return f"{round_no:04d}{index:08d}"


def outcome(round_no: int, index: int) -> list[EntryDraft]:
    """The drafts of submission `index` of round `round_no` (deterministic: retries are identical)."""
    key = f"r{round_no}-{index}"
    merchant = f"M{index % 17:03d}"
    acquirer = f"A{index % 3}"
    at_ms = 1_760_000_000_000 + round_no * 1_000_000 + index
    common = {"merchant_id": merchant, "terminal_id": f"T{index % 50:04d}", "currency": CURRENCY}
    if index % 7 == 3:
        return [
            EntryDraft(
                idempotency_key=key,
                kind=EntryKind.REFUND,
                rrn=rrn(round_no, index),
                original_rrn=rrn(round_no, index - 3),
                at_ms=at_ms,
                amount_minor=REFUND_MINOR,
                postings=(
                    Posting(accounts.merchant_payable(merchant), Side.DEBIT, REFUND_MINOR, CURRENCY),
                    Posting(accounts.acquirer_clearing(acquirer), Side.CREDIT, REFUND_MINOR, CURRENCY),
                ),
                **common,  # type: ignore[arg-type]
            )
        ]
    amount = 1_000 + index % 500
    drafts = [
        EntryDraft(
            idempotency_key=key,
            kind=EntryKind.PURCHASE,
            rrn=rrn(round_no, index),
            at_ms=at_ms,
            pan_masked="411111******1111",
            pan_hash=f"{index:064x}",
            amount_minor=amount,
            postings=(
                Posting(accounts.acquirer_clearing(acquirer), Side.DEBIT, amount, CURRENCY),
                Posting(accounts.merchant_payable(merchant), Side.CREDIT, amount, CURRENCY),
            ),
            **common,  # type: ignore[arg-type]
        )
    ]
    if index % 5 == 0:
        drafts.append(
            EntryDraft(
                idempotency_key=f"{key}-fee",
                kind=EntryKind.FEE,
                rrn=rrn(round_no, index),
                at_ms=at_ms,
                amount_minor=FEE_MINOR,
                postings=(
                    Posting(accounts.merchant_payable(merchant), Side.DEBIT, FEE_MINOR, CURRENCY),
                    Posting(accounts.FEE_INCOME, Side.CREDIT, FEE_MINOR, CURRENCY),
                ),
                **common,  # type: ignore[arg-type]
            )
        )
    return drafts


def open_backend(kind: str, target: str) -> LedgerBackend:
    if kind == "sqlite":
        from switch.ledger.sqlite import SqliteBackend

        return SqliteBackend(target)
    if kind == "postgres":
        from switch.ledger.postgres import PostgresBackend

        return PostgresBackend(target, writer=True)
    raise SystemExit(f"unknown backend {kind!r}")


def die_with_parent() -> None:
    """Linux: get SIGKILLed if the test process dies, so no writer outlives a crashed test run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("sqlite", "postgres"), required=True)
    ap.add_argument("--target", required=True, help="SQLite path or PostgreSQL DSN")
    ap.add_argument("--acks", required=True, help="side-channel file (appended)")
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--retry", default="", help="ROUND:FIRST:STOP drafts of an earlier round to re-submit")
    ap.add_argument("--batch-window-ms", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=200)
    ap.add_argument("--inflight", type=int, default=400)
    ap.add_argument("--checkpoint-every", type=int, default=300)
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    ap.add_argument("--index-run-entries", type=int, default=500, help="small: kills land around index runs")
    ap.add_argument("--pipeline", action="store_true", help="LedgerConfig.commit_pipeline")
    ap.add_argument("--pipeline-min", type=int, default=1, help="LedgerConfig.pipeline_min_batch_entries")
    args = ap.parse_args()
    die_with_parent()

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(os.environ["CRASH_SIGNING_KEY"]))
    cfg = LedgerConfig(
        batch_window_ms=args.batch_window_ms,
        max_batch_entries=args.max_batch,
        max_queue_entries=max(args.max_batch, 4 * args.inflight),
        checkpoint_every_entries=args.checkpoint_every,
        index_run_entries=args.index_run_entries,
        commit_pipeline=args.pipeline,
        pipeline_min_batch_entries=args.pipeline_min,
    )
    fd = os.open(args.acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    writer = LedgerWriter(open_backend(args.backend, args.target), signing_key=key, config=cfg)
    os.write(fd, f"S {os.getpid()}\n".encode())

    slots = threading.BoundedSemaphore(args.inflight)

    def submit(drafts: list[EntryDraft]) -> None:
        def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
            if error is None and entries is not None:
                line = "A " + " ".join(f"{e.seq}:{e.draft.idempotency_key}" for e in entries) + "\n"
            else:
                line = f"F {drafts[0].idempotency_key} {type(error).__name__}\n"
            os.write(fd, line.encode())  # the ack exists once this returns
            slots.release()

        slots.acquire()
        while True:
            try:
                writer.submit(drafts, on_done)
                return
            except LedgerBusy:
                time.sleep(0.001)

    if args.retry:
        retry_round, first, stop = (int(x) for x in args.retry.split(":"))
        for index in range(first, stop):
            submit(outcome(retry_round, index))
    deadline = time.monotonic() + args.max_seconds
    index = 0
    while time.monotonic() < deadline:
        submit(outcome(args.round, index))
        index += 1
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

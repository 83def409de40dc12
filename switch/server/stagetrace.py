"""Opt-in per-transaction stage timestamps: where does a slow purchase wait inside the switch?

Off by default (`server.stage_trace_path = ""`): the core then holds `trace = None` and every hook is
one `if` on the hot path. On, the core, the acquirer links and the terminal connections stamp
`time.perf_counter()` (CLOCK_MONOTONIC on Linux: comparable across the processes of one machine, so a
load generator's own stamps join these) at each hand-off of a transaction that goes to an acquirer:

| stage | where |
|---|---|
| read | the terminal frame's read was handed to the core (`SwitchCore.on_frames`) |
| decided | the processor decided `SendToAcquirer` |
| arm_flushed | the arms of the round were handed to the ledger process (`_flush`) |
| arm_back | the ledger process's "armed" answer was read by the results thread |
| armed | that answer reached the trio thread (`_armed`) |
| link_queued | the request was queued on an acquirer link |
| link_written | the link's writer handed it to the kernel |
| answer_read | the link's reader got the answer's bytes |
| post_flushed | the outcome's `Post` was handed to the ledger process |
| commit_back | the ledger's "durable" answer was read by the results thread |
| committed | it reached the trio thread |
| reply_queued | the answer was encoded and queued on the terminal connection |
| written | the connection's writer handed it to the kernel |

`dump()` (at shutdown) writes one JSON object: `stages` and `txns`, each txn `[terminal id, STAN,
rrn, stamps...]` (0.0 = stage not reached). bench/e2e.py `--trace` joins it with the load
generators' own stamps (scheduled, sent, answer arrived). At most `max_txns` transactions are kept.
No card data: terminal id, STAN and RRN only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

STAGES = (
    "read",
    "decided",
    "arm_flushed",
    "arm_back",
    "armed",
    "link_queued",
    "link_written",
    "answer_read",
    "post_flushed",
    "commit_back",
    "committed",
    "reply_queued",
    "written",
)
(
    READ,
    DECIDED,
    ARM_FLUSHED,
    ARM_BACK,
    ARMED,
    LINK_QUEUED,
    LINK_WRITTEN,
    ANSWER_READ,
    POST_FLUSHED,
    COMMIT_BACK,
    COMMITTED,
    REPLY_QUEUED,
    WRITTEN,
) = range(len(STAGES))

#: Transactions traced at most by default (13 floats each).
DEFAULT_MAX_TXNS = 500_000

Stamps = list[float]


class StageTrace:
    """Stamps by transaction id until the answer, then by (terminal id, STAN) in `done`."""

    def __init__(self, path: str, max_txns: int = DEFAULT_MAX_TXNS) -> None:
        self.path = path
        self.max_txns = max_txns
        self._by_txn: dict[int, Stamps] = {}
        self._by_rrn: dict[str, tuple[int, Stamps]] = {}
        self._done: list[tuple[str, str, str, Stamps]] = []
        self._count = 0

    def start(self, txn_id: int, rrn: str) -> None:
        """A transaction goes to an acquirer (a retry on a backup keeps its first stamps)."""
        if txn_id in self._by_txn or self._count >= self.max_txns:
            return
        self._count += 1
        stamps = [0.0] * len(STAGES)
        stamps[DECIDED] = time.perf_counter()
        self._by_txn[txn_id] = stamps
        if rrn:
            self._by_rrn[rrn] = (txn_id, stamps)

    def mark(self, txn_id: object, stage: int, at: float | None = None) -> None:
        stamps = self._by_txn.get(txn_id)  # type: ignore[call-overload]
        if stamps is not None and not stamps[stage]:
            stamps[stage] = time.perf_counter() if at is None else at

    def marker(self, txn_ids: list[int], stage: int) -> _Marker:
        """A callable stamping `stage` on all of `txn_ids` when called (from any thread)."""
        return _Marker(self, txn_ids, stage)

    def answered(self, terminal_id: str, stan: str, rrn: str, read_at: float) -> Stamps | None:
        """The answer is queued: the record moves to `done`; returned so the writer stamps WRITTEN."""
        hit = self._by_rrn.pop(rrn, None) if rrn else None
        if hit is None:
            return None
        txn_id, stamps = hit
        self._by_txn.pop(txn_id, None)
        stamps[READ] = read_at
        stamps[REPLY_QUEUED] = time.perf_counter()
        self._done.append((terminal_id, stan, rrn, stamps))
        return stamps

    def dump(self) -> None:
        data = {"stages": STAGES, "txns": [[t, s, r, *st] for t, s, r, st in self._done]}
        Path(self.path).write_text(json.dumps(data, separators=(",", ":")))


class _Marker:
    __slots__ = ("stage", "trace", "txn_ids")

    def __init__(self, trace: StageTrace, txn_ids: list[int], stage: int) -> None:
        self.trace = trace
        self.txn_ids = txn_ids
        self.stage = stage

    def __call__(self) -> None:
        at = time.perf_counter()
        for txn_id in self.txn_ids:
            self.trace.mark(txn_id, self.stage, at)

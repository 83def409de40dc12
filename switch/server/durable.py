"""The server's own small durable writes, made by one thread in group commits, off the trio thread.

Why: besides the ledger (which has its own writer thread), the server writes three things durably --
armed reversals (before each acquirer request leaves), store-and-forward items (reversals and advices
it owes), and RRN blocks. Each is an fsync, and an fsync costs 0.2 ms on a quiet disk and several ms on
a busy one. Done on the trio thread they stall every connection for that long, once per batch; here the
trio thread only queues the work and carries on parsing, while this thread turns everything queued
meanwhile into ONE commit per store and calls back when it is durable. The slower the disk, the larger
the groups: throughput stops depending on fsync latency. SQLite releases the GIL while it writes, so
this thread also puts the second core to use.

Order: jobs are applied in the order they were queued. Per group: store-and-forward appends first (one
fsync), then every armed-reversal insert and delete in queue order in one transaction (one fsync when
it contains an arm; a group of releases only waits for nothing: synchronous=NORMAL, as ArmedStore
documents), then RRN reservations. A store-and-forward item's "release the armed reversal" runs in the
armed transaction that follows its durable append, never before.

Callbacks run on the trio thread: the thread hands the finished group to `deliver` (the core wraps it
in ONE `TrioToken.run_sync_soon`), never calls into trio itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from switch.routing.store_forward import StoreForward
from switch.server.armed import ArmedStore
from switch.server.group_thread import Callback, Deliver, Done, GroupThread
from switch.server.rrn_store import RrnStore

log = logging.getLogger(__name__)

ArmItem = tuple[str, str, Mapping[str, Any] | None]  # acquirer, rrn, reversal fields
ReleaseItem = tuple[str, str]  # acquirer, rrn
SafItem = tuple[str, str, Mapping[str, Any], str | None]  # acquirer, mti, fields, dedup key


class DurableBusy(RuntimeError):
    """More items are queued than `max_pending_items`: the disk is not keeping up."""


class _Job:
    __slots__ = ("arms", "count", "kind", "now_ms", "on_done", "releases", "saf")

    def __init__(
        self,
        kind: str,
        on_done: Callable[[BaseException | None, Any], None] | None,
        *,
        arms: Sequence[ArmItem] = (),
        releases: Sequence[ReleaseItem] = (),
        saf: Sequence[SafItem] = (),
        count: int = 0,
        now_ms: int = 0,
    ) -> None:
        self.kind = kind
        self.on_done = on_done
        self.arms = arms
        self.releases = releases
        self.saf = saf
        self.count = count
        self.now_ms = now_ms

    @property
    def items(self) -> int:
        return len(self.arms) + len(self.releases) + len(self.saf) + (1 if self.count else 0)


class DurableWriter(GroupThread[_Job]):
    """Owns no store (the caller closes them); start() the thread, close() drains and stops it."""

    def __init__(
        self,
        armed: ArmedStore,
        saf: StoreForward,
        rrns: RrnStore,
        deliver: Deliver,
        *,
        max_pending_items: int,
        name: str = "durable-writer",
    ) -> None:
        if max_pending_items < 1:
            raise ValueError(f"max_pending_items must be >= 1, got {max_pending_items}")
        super().__init__(deliver, name=name)
        self.armed = armed
        self.saf = saf
        self.rrns = rrns
        self.max_pending_items = max_pending_items

    @property
    def pending_items(self) -> int:
        return self.pending

    # --- queueing (any thread; the core calls from the trio thread) --------------------------------------
    def arm(
        self, items: Sequence[ArmItem], now_ms: int, on_done: Callable[[BaseException | None, Any], None]
    ) -> None:
        """Store armed reversals durably; `on_done(error, None)` once they are (or are not)."""
        self._queue_job(_Job("arm", on_done, arms=items, now_ms=now_ms), must=False)

    def release(self, items: Sequence[ReleaseItem]) -> None:
        """Delete armed reversals (no callback; a lost release is resolved by recovery)."""
        self._queue_job(_Job("release", None, releases=items), must=True)

    def append_saf(
        self,
        items: Sequence[SafItem],
        now_ms: int,
        release_after: Sequence[ReleaseItem],
        on_done: Callable[[BaseException | None, Any], None],
    ) -> None:
        """Store store-and-forward items durably, then release `release_after` armed reversals."""
        self._queue_job(_Job("saf", on_done, saf=items, releases=release_after, now_ms=now_ms), must=True)

    def reserve_rrns(self, count: int, on_done: Callable[[BaseException | None, Any], None]) -> None:
        """Durably reserve an RRN block; `on_done(None, start)`."""
        self._queue_job(_Job("rrn", on_done, count=count), must=True)

    def _queue_job(self, job: _Job, *, must: bool) -> None:
        # Arms are refused past the limit (the request is then not sent); what the switch already
        # owes (store-and-forward, releases, RRNs) is always taken.
        outcome = self._put(job, None if must else self.max_pending_items)
        if outcome == "closed":
            raise DurableBusy("durable writer is closed")
        if outcome == "full":
            raise DurableBusy(
                f"{self.pending} durable items queued (server.max_pending_durable_items="
                f"{self.max_pending_items})"
            )

    # --- the thread ---------------------------------------------------------------------------------
    def weight(self, job: _Job) -> int:
        return job.items

    def callbacks(self, job: _Job) -> list[Callback]:
        return [] if job.on_done is None else [job.on_done]

    def run_group(self, jobs: list[_Job]) -> list[Done]:
        return self._write(jobs)

    def _write(self, jobs: list[_Job]) -> list[Done]:
        done: list[Done] = []
        # 1. store-and-forward appends, one commit
        saf_jobs = [j for j in jobs if j.kind == "saf"]
        saf_failed: set[int] = set()
        if saf_jobs:
            items = [it for j in saf_jobs for it in j.saf]
            try:
                self.saf.append_many(items, max(j.now_ms for j in saf_jobs))
                done.extend((j.on_done, None, None) for j in saf_jobs if j.on_done is not None)
            except Exception as exc:  # StoreForwardError, StoreForwardFullError, ValueError
                saf_failed = {id(j) for j in saf_jobs}
                done.extend((j.on_done, exc, None) for j in saf_jobs if j.on_done is not None)
        # 2. armed reversals: inserts and deletes in queue order, one transaction
        ops: list[tuple[bool, Any]] = []
        arm_jobs: list[_Job] = []
        for j in jobs:
            if j.kind == "arm":
                arm_jobs.append(j)
                ops.extend((True, (acq, rrn, f, j.now_ms)) for acq, rrn, f in j.arms)
            elif j.releases and id(j) not in saf_failed:
                ops.extend((False, item) for item in j.releases)
        if ops:
            try:
                self.armed.apply(ops)
                done.extend((j.on_done, None, None) for j in arm_jobs if j.on_done is not None)
            except Exception as exc:  # ArmedStoreError: the arms are not durable, their sends must not go
                log.error("armed reversals not written (%d operations): %s", len(ops), exc)
                done.extend((j.on_done, exc, None) for j in arm_jobs if j.on_done is not None)
        # 3. RRN blocks
        for j in jobs:
            if j.kind == "rrn" and j.on_done is not None:
                try:
                    done.append((j.on_done, None, self.rrns.reserve(j.count)))
                except Exception as exc:  # RrnStoreError
                    done.append((j.on_done, exc, None))
        return done

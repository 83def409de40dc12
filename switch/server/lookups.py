"""Ledger reads the processor asks for (FindOriginal), on a thread of their own.

Why: an original lookup is an indexed SQLite read, ~0.1 ms on a quiet disk and several ms while the
ledger process commits next to it; on the trio thread it stalled every connection for that long, and a
storage error there would have escaped into the event loop. Lookups are rare (voids, refunds and
reversals of transactions the processor no longer holds, late answers after a restart), so one thread
in order is enough. Results come back to the trio thread through the core's completion path; a failed
read is logged and answered as "not found" (the processor declines the request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from switch.server.group_thread import Callback, Deliver, Done, GroupThread

log = logging.getLogger(__name__)

_Lookup = tuple[Callable[..., Any], tuple, Callback]


class LookupThread(GroupThread[_Lookup]):
    """Runs `fn(*args)` calls in order on one thread; `callback(error, result)` via `deliver`."""

    def __init__(self, deliver: Deliver, *, max_pending: int, name: str = "ledger-lookups") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        super().__init__(deliver, name=name)
        self.max_pending = max_pending

    def submit(self, fn: Callable[..., Any], args: tuple, callback: Callback) -> bool:
        """Queue a read; False (nothing queued) when closed or max_pending reads are waiting."""
        return self._put((fn, args, callback), self.max_pending) == "queued"

    def close(self, timeout_s: float | None = 10.0) -> None:
        super().close(timeout_s)

    def run_group(self, jobs: list[_Lookup]) -> list[Done]:
        done: list[Done] = []
        for fn, args, callback in jobs:
            try:
                done.append((callback, None, fn(*args)))
            except Exception as exc:  # a storage error: the request is declined, the switch lives
                log.error("ledger lookup failed: %s: %s", type(exc).__name__, exc)
                done.append((callback, exc, None))
        return done

    def callbacks(self, job: _Lookup) -> list[Callback]:
        return [job[2]]

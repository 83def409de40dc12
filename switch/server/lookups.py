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
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[[BaseException | None, Any], None]
Deliver = Callable[[list[tuple[Callback, BaseException | None, Any]]], None]


class LookupThread:
    """Runs `fn(*args)` calls in order on one thread; `callback(error, result)` via `deliver`."""

    def __init__(self, deliver: Deliver, *, max_pending: int, name: str = "ledger-lookups") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._deliver = deliver
        self._cond = threading.Condition()
        self._queue: deque[tuple[Callable[..., Any], tuple, Callback]] = deque()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[..., Any], args: tuple, callback: Callback) -> bool:
        """Queue a read; False (nothing queued) when closed or max_pending reads are waiting."""
        with self._cond:
            if self._closing or len(self._queue) >= self.max_pending:
                return False
            self._queue.append((fn, args, callback))
            self._cond.notify()
            return True

    def close(self, timeout_s: float | None = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                jobs = list(self._queue)
                self._queue.clear()
            done: list[tuple[Callback, BaseException | None, Any]] = []
            for fn, args, callback in jobs:
                try:
                    done.append((callback, None, fn(*args)))
                except Exception as exc:  # a storage error: the request is declined, the switch lives
                    log.error("ledger lookup failed: %s: %s", type(exc).__name__, exc)
                    done.append((callback, exc, None))
            try:
                self._deliver(done)
            except Exception:
                log.exception("could not deliver %d lookup results", len(done))

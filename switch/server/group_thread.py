"""One thread that takes every job queued since its last turn and runs them as one group.

Why: the server's blocking work (durable writes, ledger reads) must stay off the trio thread, and what
queues up while one group runs is cheapest done together (one commit, one hand-back). The completions
of a group go back in ONE call to `deliver` (the core wraps it in one `TrioToken.run_sync_soon`); this
thread never calls into trio itself. Used by `durable.DurableWriter` and `lookups.LookupThread`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

log = logging.getLogger(__name__)

Callback = Callable[[BaseException | None, Any], None]
#: A finished job's callback and its result: (callback, error or None, value).
Done = tuple[Callback, BaseException | None, Any]
Deliver = Callable[[list[Done]], None]
J = TypeVar("J")


class GroupThread(Generic[J]):
    """Subclasses say what a group does (`run_group`), whom to tell when it fails as a whole
    (`callbacks`), and what a job weighs against the queue limit (`weight`, 1 by default)."""

    def __init__(self, deliver: Deliver, *, name: str) -> None:
        self._deliver = deliver
        self._cond = threading.Condition()
        self._queue: deque[J] = deque()
        self._pending = 0
        self._closing = False
        self._idle = True
        self.groups = 0  # groups run (for metrics and tests)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def run_group(self, jobs: list[J]) -> list[Done]:
        raise NotImplementedError

    def callbacks(self, job: J) -> list[Callback]:
        raise NotImplementedError

    def weight(self, job: J) -> int:
        return 1

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Weight of the jobs queued or being run."""
        return self._pending

    def idle(self) -> bool:
        """True when nothing is queued or being run."""
        with self._cond:
            return self._idle

    def _put(self, job: J, limit: int | None) -> Literal["queued", "closed", "full"]:
        """Queue `job` unless closed, or unless `limit` is given and its weight would pass it."""
        w = self.weight(job)
        with self._cond:
            if self._closing:
                return "closed"
            if limit is not None and self._pending + w > limit:
                return "full"
            self._queue.append(job)
            self._pending += w
            self._idle = False
            self._cond.notify()
            return "queued"

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Run what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._idle = True
                    self._cond.wait()
                if not self._queue:
                    self._idle = True
                    return
                jobs = list(self._queue)
                self._queue.clear()
            try:
                done = self.run_group(jobs)
            except BaseException as exc:  # a bug here must not strand callers: fail them all
                log.exception("%s failed on a group of %d jobs", self._thread.name, len(jobs))
                done = [(cb, exc, None) for j in jobs for cb in self.callbacks(j)]
            with self._cond:
                self._pending -= sum(self.weight(j) for j in jobs)
            self.groups += 1
            if done:
                try:
                    self._deliver(done)
                except Exception:
                    log.exception("%s could not deliver %d completions", self._thread.name, len(done))

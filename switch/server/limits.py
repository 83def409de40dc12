"""One clear log line when a configured limit is hit, not one per event.

Why: a limit is usually hit in bursts (a flood of connections, a terminal pushing past its in-flight
window). Logging every rejection would put logging on the hot path exactly when the switch is busiest;
logging none would hide it. `LimitLog` logs the first hit, then at most one summary line per interval
with how many hits it swallowed, and counts every hit in Prometheus.
"""

from __future__ import annotations

import logging
import time
from typing import Any

#: Minimum time between two log lines about the same limit.
LIMIT_LOG_INTERVAL_S = 10.0


class LimitLog:
    """Rate-limited log line + counter for one named limit of one listener."""

    __slots__ = ("_counter", "_last_s", "_log", "_suppressed", "interval_s", "limit", "where")

    def __init__(
        self,
        log: logging.Logger,
        where: str,
        limit: str,
        counter: Any = None,
        interval_s: float = LIMIT_LOG_INTERVAL_S,
    ) -> None:
        self._log = log
        self.where = where
        self.limit = limit
        self._counter = counter
        self.interval_s = interval_s
        self._last_s = -1e18
        self._suppressed = 0

    def hit(self, detail: str) -> None:
        if self._counter is not None:
            self._counter.inc()
        now = time.monotonic()
        if now - self._last_s < self.interval_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last line)" if self._suppressed else ""
        self._log.warning("%s: limit %s hit: %s%s", self.where, self.limit, detail, more)
        self._last_s = now
        self._suppressed = 0

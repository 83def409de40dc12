"""Refusals made before the processing core, kept for operators (admin API) since they leave no
ledger entry: e.g. a registered terminal that never signed on and sends a purchase gets 58 from the
server's MAC step (it has no working key to MAC with, so the request cannot reach the rules).

Bounded both ways (TIGER_STYLE): the newest `per_terminal` refusals per terminal, and at most
`max_terminals` terminals (the least recently refused one is forgotten first). Pure, no I/O; the clock
is passed in. `add` also says whether this refusal should be logged, so a terminal retrying in a loop
produces one log line per `log_interval_ms` (with the count of the ones not logged), not a flood.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import msgspec

#: One log line per terminal per this interval at most.
LOG_INTERVAL_MS = 60_000


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    terminal_id: str
    at_ms: int
    mti: str
    stan: str
    response_code: str
    reason: str


class _Seen:
    __slots__ = ("last_logged_ms", "recent", "unlogged")

    def __init__(self, per_terminal: int) -> None:
        self.recent: deque[Refusal] = deque(maxlen=per_terminal)
        self.last_logged_ms: int | None = None
        self.unlogged = 0


class RefusalLog:
    def __init__(self, per_terminal: int, max_terminals: int, log_interval_ms: int = LOG_INTERVAL_MS) -> None:
        if per_terminal <= 0 or max_terminals <= 0:
            raise ValueError("per_terminal and max_terminals must be > 0")
        self.per_terminal = per_terminal
        self.max_terminals = max_terminals
        self.log_interval_ms = log_interval_ms
        self._by_terminal: OrderedDict[str, _Seen] = OrderedDict()
        self.total = 0

    def add(self, r: Refusal) -> int | None:
        """Record `r`. Returns None when it should not be logged, else how many earlier refusals of
        this terminal were not logged (0 usually)."""
        self.total += 1
        seen = self._by_terminal.get(r.terminal_id)
        if seen is None:
            seen = self._by_terminal[r.terminal_id] = _Seen(self.per_terminal)
            while len(self._by_terminal) > self.max_terminals:
                self._by_terminal.popitem(last=False)
        else:
            self._by_terminal.move_to_end(r.terminal_id)
        seen.recent.append(r)
        if seen.last_logged_ms is not None and r.at_ms - seen.last_logged_ms < self.log_interval_ms:
            seen.unlogged += 1
            return None
        skipped, seen.unlogged, seen.last_logged_ms = seen.unlogged, 0, r.at_ms
        return skipped

    def of(self, terminal_id: str) -> list[Refusal]:
        """Newest last."""
        seen = self._by_terminal.get(terminal_id)
        return list(seen.recent) if seen is not None else []

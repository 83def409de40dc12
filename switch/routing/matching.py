"""Outstanding acquirer requests on one link: the switch's own STANs, deadlines, and answer matching.

jPOS's MUX habit: a request is remembered under (MTI class, STAN, terminal id) and its answer is found by
the same key. Why the switch allocates its own STANs per link instead of forwarding the terminal's: many
terminals share a link, and their STANs collide; a link-owned counter that never hands out a STAN still
outstanding makes the key unique on the link by construction.

An answer that finds nobody waiting (late after its deadline, duplicated, or never asked for) comes back
as :class:`Unmatched` so the caller counts and logs it. It is never delivered: a late approval must not
reach a terminal that has already been told "timed out" (its reversal is already queued).

Sans-I/O: the clock is an argument (``now_ms``); nothing here sleeps or reads the time.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import msgspec

from switch.config import AcquirerConfig

#: STANs are six digits; 000000 is never used (many hosts treat it as "absent").
STAN_MIN = 1
STAN_MAX = 999_999

C = TypeVar("C")


class MatchingError(ValueError):
    """A request cannot be registered (link full, bad MTI); the message says which limit or field."""


class LinkFullError(MatchingError):
    """``max_outstanding_per_link`` requests already wait on this link; route elsewhere or decline (91)."""


class RequestKey(msgspec.Struct, frozen=True):
    """(MTI class, field 11, field 41): how an answer finds its request on one link.

    ``mti_class`` is the MTI's version and class digits ("02" for 0200/0210/0220/0230), so a request
    and its answer share it.
    """

    mti_class: str
    stan: str
    terminal_id: str


class Pending(msgspec.Struct, Generic[C]):
    """One request waiting for its answer; ``context`` is whatever the caller needs to resume."""

    key: RequestKey
    request_mti: str
    sent_ms: int
    deadline_ms: int
    context: C


class Matched(msgspec.Struct, Generic[C], frozen=True):
    """The answer found its request (now removed from the table)."""

    pending: Pending[C]
    elapsed_ms: int


class Unmatched(msgspec.Struct, frozen=True):
    """An answer nobody waits for. ``reason``: 'unknown' (never asked or already answered/expired),
    'not a response', 'wrong response type' (e.g. 0230 for a 0200), or 'malformed'."""

    reason: str
    mti: str
    stan: str
    terminal_id: str


def _key_parts(fields: Mapping[str, Any]) -> tuple[str, str, str]:
    return str(fields.get("t", "")), str(fields.get("11", "")), str(fields.get("41", ""))


class StanAllocator:
    """Per-link STAN counter: 000001..999999, wrapping, skipping any STAN still in use."""

    __slots__ = ("_in_use", "_next")

    def __init__(self, start: int = STAN_MIN) -> None:
        if not STAN_MIN <= start <= STAN_MAX:
            raise MatchingError(f"STAN start must be {STAN_MIN}..{STAN_MAX}, got {start}")
        self._next = start
        self._in_use: set[int] = set()

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def allocate(self) -> str:
        """The next free STAN as six digits. Raises MatchingError if all 999,999 are in use."""
        if len(self._in_use) >= STAN_MAX:
            raise MatchingError("every STAN on this link is outstanding")
        stan = self._next
        while stan in self._in_use:
            stan = STAN_MIN if stan == STAN_MAX else stan + 1
        self._next = STAN_MIN if stan == STAN_MAX else stan + 1
        self._in_use.add(stan)
        return f"{stan:06d}"

    def release(self, stan: str) -> None:
        """Give a STAN back (its request was answered or expired). Unknown STANs are ignored.

        The counter keeps moving forward, so a released STAN is handed out again only after the other
        999,998: a late answer to an expired request cannot match a newer request in practice.
        """
        if stan.isdigit():
            self._in_use.discard(int(stan))


class LinkMatcher(Generic[C]):
    """The outstanding requests of one acquirer link.

    Use: ``stan = m.next_stan()``; put it in field 11; ``m.register(fields, now_ms, ctx)`` when the frame
    is handed to the socket; ``m.match(answer_fields, now_ms)`` per answer; ``m.expire(now_ms)`` at
    ``m.next_deadline_ms()``; ``m.drain()`` when the connection drops (every waiter fails at once).
    """

    def __init__(self, max_outstanding: int, request_timeout_ms: int, stan_start: int = STAN_MIN) -> None:
        if max_outstanding < 1:
            raise MatchingError(f"max_outstanding_per_link must be >= 1, got {max_outstanding}")
        if request_timeout_ms < 1:
            raise MatchingError(f"request_timeout_ms must be >= 1, got {request_timeout_ms}")
        self.max_outstanding = max_outstanding
        self.request_timeout_ms = request_timeout_ms
        self._stans = StanAllocator(stan_start)
        self._pending: dict[RequestKey, Pending[C]] = {}
        #: (deadline_ms, sequence, key); entries whose key was answered are skipped lazily.
        self._deadlines: list[tuple[int, int, RequestKey]] = []
        self._seq = 0
        #: STANs handed out by next_stan() but not yet registered.
        self._reserved: set[str] = set()

    @classmethod
    def from_config(cls, config: AcquirerConfig, stan_start: int = STAN_MIN) -> LinkMatcher[C]:
        return cls(config.max_outstanding_per_link, config.request_timeout_ms, stan_start)

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) + len(self._reserved) >= self.max_outstanding

    def next_stan(self) -> str:
        """Reserve a STAN for a request about to be sent. Raises LinkFullError when the link is full."""
        if self.full:
            raise LinkFullError(
                f"{len(self._pending)} requests outstanding on this link "
                f"(max_outstanding_per_link={self.max_outstanding})"
            )
        stan = self._stans.allocate()
        self._reserved.add(stan)
        return stan

    def cancel_stan(self, stan: str) -> None:
        """Give back a STAN from :meth:`next_stan` that was never sent (encode failed, say)."""
        if stan in self._reserved:
            self._reserved.discard(stan)
            self._stans.release(stan)

    def register(
        self, fields: Mapping[str, Any], now_ms: int, context: C, timeout_ms: int | None = None
    ) -> Pending[C]:
        """Remember a request carrying a STAN from :meth:`next_stan`; its deadline is now + timeout."""
        mti, stan, tid = _key_parts(fields)
        if len(mti) != 4 or not mti.isdigit() or mti[2] not in "0246":
            raise MatchingError(f"field t: {mti!r} is not a request MTI")
        if stan not in self._reserved:
            raise MatchingError(f"field 11: STAN {stan!r} was not reserved with next_stan() on this link")
        key = RequestKey(mti[:2], stan, tid)
        deadline_ms = now_ms + (self.request_timeout_ms if timeout_ms is None else timeout_ms)
        pending = Pending(key, mti, now_ms, deadline_ms, context)
        self._reserved.discard(stan)
        self._pending[key] = pending
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline_ms, self._seq, key))
        return pending

    def match(self, fields: Mapping[str, Any], now_ms: int) -> Matched[C] | Unmatched:
        """Find and remove the request this answer belongs to, or say why there is none."""
        mti, stan, tid = _key_parts(fields)
        if len(mti) != 4 or not mti.isdigit():
            return Unmatched("malformed", mti, stan, tid)
        if mti[2] not in "1357":
            return Unmatched("not a response", mti, stan, tid)
        key = RequestKey(mti[:2], stan, tid)
        pending = self._pending.get(key)
        if pending is None:
            return Unmatched("unknown", mti, stan, tid)
        if int(pending.request_mti[2]) + 1 != int(mti[2]):
            return Unmatched("wrong response type", mti, stan, tid)
        del self._pending[key]
        self._stans.release(stan)
        return Matched(pending, now_ms - pending.sent_ms)

    def next_deadline_ms(self) -> int | None:
        """When :meth:`expire` next has work, or None when nothing is outstanding."""
        heap = self._deadlines
        while heap and heap[0][2] not in self._pending:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now_ms: int) -> list[Pending[C]]:
        """Remove and return every request whose deadline is at or before ``now_ms``, oldest first.

        Their answers, if they ever come, match nothing and come back as Unmatched('unknown').
        """
        heap = self._deadlines
        out: list[Pending[C]] = []
        while heap and heap[0][0] <= now_ms:
            _, _, key = heapq.heappop(heap)
            pending = self._pending.get(key)
            if pending is not None and pending.deadline_ms <= now_ms:
                del self._pending[key]
                self._stans.release(key.stan)
                out.append(pending)
        return out

    def drain(self) -> list[Pending[C]]:
        """Remove and return everything outstanding (the connection is gone; no answer can come)."""
        out = sorted(self._pending.values(), key=lambda p: p.deadline_ms)
        for pending in out:
            self._stans.release(pending.key.stan)
        for stan in self._reserved:
            self._stans.release(stan)
        self._pending.clear()
        self._reserved.clear()
        self._deadlines.clear()
        return out

"""Sans-I/O state of acquirer links: connect, sign on, echo, mark down, reconnect with backoff.

Why sans-I/O (h11's habit): the trio connection code in switch/server only performs what this machine
decides and reports what happened, so every path (a flapping host, an echo that never comes back, a
sign-on refused) is a plain unit test with a fake clock and a seeded RNG.

    DISCONNECTED --poll: Connect--> CONNECTING --connected: SendSignOn--> SIGNING_ON --sign_on_ok--> UP
         ^                              |                                   |                    |
         |                        connect_failed                    sign_on_failed        echo failures,
         |                              v                                   v             connection_lost
         +------ poll at reconnect_due: Connect ---------------------- DOWN <-------- MarkDown ----+

Echoes are sent only on an idle link: any answered request (``traffic``) proves the link alive and
pushes the next echo ``echo_interval_ms`` away. The caller sends the echo and sign-on through the link's
LinkMatcher like any request (so their deadline is the request timeout) and reports the outcome here.

Backoff: the n-th consecutive failed attempt waits a uniformly random time in [d/2, d] with
d = min(max, min * 2**n) ("equal jitter": never hammer a host that just came back, never synchronise
all links of a fleet). The RNG is injected so tests and simulations are reproducible.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable, Mapping

import msgspec

from switch.config import AcquirerConfig


class LinkPhase(enum.StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    SIGNING_ON = "signing_on"
    UP = "up"
    DOWN = "down"


class Connect(msgspec.Struct, frozen=True, tag=True):
    """Open the TCP connection now; report ``connected`` or ``connect_failed``."""


class SendSignOn(msgspec.Struct, frozen=True, tag=True):
    """Send the 0800 sign-on; report ``sign_on_ok`` or ``sign_on_failed``."""


class SendEcho(msgspec.Struct, frozen=True, tag=True):
    """Send an 0800 echo (70=301); report ``echo_ok`` or ``echo_failed``."""


class MarkUp(msgspec.Struct, frozen=True, tag=True):
    """The link carries traffic from now on."""


class MarkDown(msgspec.Struct, frozen=True, tag=True):
    """Stop using the link: close the connection and fail what is outstanding on it."""

    reason: str


Decision = Connect | SendSignOn | SendEcho | MarkUp | MarkDown


class LinkStateError(RuntimeError):
    """An event that cannot happen in the current phase: a bug in the caller, named with both."""


class BackoffPolicy(msgspec.Struct, frozen=True):
    min_ms: int
    max_ms: int

    def delay_ms(self, failures: int, rng: random.Random) -> int:
        """Wait before attempt number ``failures`` (1 = first retry)."""
        ceiling = min(self.max_ms, self.min_ms * (2 ** min(max(failures - 1, 0), 40)))
        return int(ceiling / 2 + rng.random() * ceiling / 2)


class LinkState:
    """One link's phase, timers and counters. Feed it events with the current time; act on decisions."""

    def __init__(
        self,
        name: str,
        *,
        echo_interval_ms: int,
        max_echo_failures: int,
        backoff: BackoffPolicy,
        rng: random.Random,
    ) -> None:
        if (
            echo_interval_ms < 1
            or max_echo_failures < 1
            or backoff.min_ms < 1
            or backoff.max_ms < backoff.min_ms
        ):
            raise ValueError(
                f"link {name}: need echo_interval_ms >= 1, max_echo_failures >= 1 and "
                f"1 <= reconnect_backoff_min_ms <= reconnect_backoff_max_ms"
            )
        self.name = name
        self.echo_interval_ms = echo_interval_ms
        self.max_echo_failures = max_echo_failures
        self.backoff = backoff
        self._rng = rng
        self.phase = LinkPhase.DISCONNECTED
        #: Consecutive failed connect/sign-on attempts (drives the backoff; reset when up).
        self.failed_attempts = 0
        #: Consecutive unanswered echoes while up.
        self.echo_failures = 0
        self.reconnect_due_ms: int | None = None  # None: connect at the first poll
        self.echo_due_ms: int | None = None
        self.echo_in_flight = False
        self.last_down_reason = ""

    @classmethod
    def from_config(cls, config: AcquirerConfig, index: int, rng: random.Random) -> LinkState:
        return cls(
            f"{config.name}#{index}",
            echo_interval_ms=config.echo_interval_ms,
            max_echo_failures=config.max_echo_failures,
            backoff=BackoffPolicy(config.reconnect_backoff_min_ms, config.reconnect_backoff_max_ms),
            rng=rng,
        )

    @property
    def is_up(self) -> bool:
        return self.phase is LinkPhase.UP

    def __repr__(self) -> str:
        return f"LinkState({self.name!r}, {self.phase.value}, failed_attempts={self.failed_attempts})"

    # --- time ------------------------------------------------------------------------------------
    def next_due_ms(self) -> int | None:
        """When :meth:`poll` next has something to do; None while waiting for the caller's report."""
        if self.phase in (LinkPhase.DISCONNECTED, LinkPhase.DOWN):
            return self.reconnect_due_ms if self.reconnect_due_ms is not None else 0
        if self.phase is LinkPhase.UP and not self.echo_in_flight:
            return self.echo_due_ms
        return None

    def poll(self, now_ms: int) -> list[Decision]:
        """Decisions that are due at ``now_ms``: connect after the backoff, echo an idle link."""
        if self.phase in (LinkPhase.DISCONNECTED, LinkPhase.DOWN):
            if self.reconnect_due_ms is None or now_ms >= self.reconnect_due_ms:
                self.phase = LinkPhase.CONNECTING
                return [Connect()]
        elif (
            self.phase is LinkPhase.UP
            and not self.echo_in_flight
            and self.echo_due_ms is not None
            and now_ms >= self.echo_due_ms
        ):
            self.echo_in_flight = True
            return [SendEcho()]
        return []

    # --- reports from the connection code ---------------------------------------------------------
    def connected(self, now_ms: int) -> list[Decision]:
        self._expect("connected", LinkPhase.CONNECTING)
        self.phase = LinkPhase.SIGNING_ON
        return [SendSignOn()]

    def connect_failed(self, now_ms: int, reason: str = "connect failed") -> list[Decision]:
        self._expect("connect_failed", LinkPhase.CONNECTING)
        return self._fail(now_ms, reason)

    def sign_on_ok(self, now_ms: int) -> list[Decision]:
        self._expect("sign_on_ok", LinkPhase.SIGNING_ON)
        self.phase = LinkPhase.UP
        self.failed_attempts = 0
        self.echo_failures = 0
        self.echo_in_flight = False
        self.echo_due_ms = now_ms + self.echo_interval_ms
        return [MarkUp()]

    def sign_on_failed(self, now_ms: int, reason: str = "sign-on refused or unanswered") -> list[Decision]:
        self._expect("sign_on_failed", LinkPhase.SIGNING_ON)
        return self._fail(now_ms, reason)

    def traffic(self, now_ms: int) -> None:
        """An answer arrived on this link: it is alive, so the next echo moves away."""
        if self.phase is LinkPhase.UP:
            self.echo_failures = 0
            if not self.echo_in_flight:
                self.echo_due_ms = now_ms + self.echo_interval_ms

    def echo_ok(self, now_ms: int) -> list[Decision]:
        if self.phase is not LinkPhase.UP:
            return []  # a stale echo answer after the link went down: nothing to do
        self.echo_in_flight = False
        self.echo_failures = 0
        self.echo_due_ms = now_ms + self.echo_interval_ms
        return []

    def echo_failed(self, now_ms: int) -> list[Decision]:
        """An echo went unanswered (its deadline passed). Enough in a row mark the link down."""
        if self.phase is not LinkPhase.UP:
            return []
        self.echo_in_flight = False
        self.echo_failures += 1
        if self.echo_failures >= self.max_echo_failures:
            return self._fail(now_ms, f"{self.echo_failures} echoes unanswered")
        self.echo_due_ms = now_ms  # try again at once: one lost echo is not yet a dead host
        return []

    def connection_lost(self, now_ms: int, reason: str = "connection lost") -> list[Decision]:
        """The socket closed or errored (in any phase but the idle ones)."""
        if self.phase in (LinkPhase.DISCONNECTED, LinkPhase.DOWN):
            return []
        return self._fail(now_ms, reason)

    # --- internals -----------------------------------------------------------------------------
    def _expect(self, event: str, phase: LinkPhase) -> None:
        if self.phase is not phase:
            raise LinkStateError(
                f"link {self.name}: {event} while {self.phase.value}, expected {phase.value}"
            )

    def _fail(self, now_ms: int, reason: str) -> list[Decision]:
        self.phase = LinkPhase.DOWN
        self.failed_attempts += 1
        self.echo_in_flight = False
        self.echo_due_ms = None
        self.last_down_reason = reason
        # failed_attempts was reset when the link came up, so a link that just died waits the shortest
        # backoff; a host that keeps refusing waits longer each time, up to the maximum.
        self.reconnect_due_ms = now_ms + self.backoff.delay_ms(self.failed_attempts, self._rng)
        return [MarkDown(reason)]


class AcquirerHealth:
    """The links of one acquirer: the acquirer is up when any of its links is up."""

    def __init__(self, name: str, links: Iterable[LinkState]) -> None:
        self.name = name
        self.links = list(links)

    @classmethod
    def from_config(cls, config: AcquirerConfig, rng: random.Random) -> AcquirerHealth:
        if config.connections < 1:
            raise ValueError(f"acquirer {config.name}: connections must be >= 1")
        return cls(config.name, (LinkState.from_config(config, i, rng) for i in range(config.connections)))

    @property
    def is_up(self) -> bool:
        return any(link.is_up for link in self.links)

    def up_links(self) -> list[LinkState]:
        return [link for link in self.links if link.is_up]

    def next_due_ms(self) -> int | None:
        dues = [d for d in (link.next_due_ms() for link in self.links) if d is not None]
        return min(dues) if dues else None


def select_acquirer(
    primary: str | None,
    is_up: Callable[[str], bool],
    backups: Mapping[str, str | None],
) -> str | None:
    """The acquirer to use now: the primary when up, else the first up acquirer along its backup chain.

    ``backups`` maps an acquirer to its configured backup (AcquirerConfig.backup). Returns None when the
    primary and every backup are down, so the caller answers 91 at once instead of waiting for a
    deadline. Cycles in the chain (a -> b -> a) are walked once.
    """
    seen: set[str] = set()
    name = primary
    while name is not None and name not in seen:
        if is_up(name):
            return name
        seen.add(name)
        name = backups.get(name)
    return None


def backup_map(acquirers: Iterable[AcquirerConfig]) -> dict[str, str | None]:
    """AcquirerConfig.backup by name, refusing a backup that names no configured acquirer."""
    configs = list(acquirers)
    names = {a.name for a in configs}
    for a in configs:
        if a.backup is not None and a.backup not in names:
            raise ValueError(f"acquirer {a.name}: backup {a.backup!r} is not a configured acquirer")
    return {a.name: a.backup for a in configs}

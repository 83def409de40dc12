"""Link state machine: connect, sign on, echo on idle links, mark down, back off with seeded jitter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.config import AcquirerConfig
from switch.routing.link_state import (
    AcquirerHealth,
    BackoffPolicy,
    Connect,
    LinkPhase,
    LinkState,
    LinkStateError,
    MarkDown,
    MarkUp,
    SendEcho,
    SendSignOn,
    backup_map,
    select_acquirer,
)

CFG = AcquirerConfig(
    "acq",
    echo_interval_ms=1000,
    max_echo_failures=2,
    reconnect_backoff_min_ms=100,
    reconnect_backoff_max_ms=800,
    connections=2,
)


def link(seed: int = 1) -> LinkState:
    return LinkState.from_config(CFG, 0, random.Random(seed))


def bring_up(s: LinkState, now: int = 0) -> None:
    assert s.poll(now) == [Connect()]
    assert s.connected(now) == [SendSignOn()]
    assert s.sign_on_ok(now) == [MarkUp()]


def test_first_poll_connects_then_sign_on_brings_it_up() -> None:
    s = link()
    assert s.phase is LinkPhase.DISCONNECTED and s.next_due_ms() == 0
    bring_up(s, 10)
    assert s.is_up
    assert s.next_due_ms() == 1010


def test_echo_only_when_idle_and_traffic_postpones_it() -> None:
    s = link()
    bring_up(s)
    assert s.poll(999) == []
    s.traffic(500)
    assert s.poll(1000) == []  # traffic at 500 moved the echo to 1500
    assert s.poll(1500) == [SendEcho()]
    assert s.poll(1600) == []  # one echo in flight at a time
    assert s.next_due_ms() is None
    s.echo_ok(1700)
    assert s.next_due_ms() == 2700


def test_consecutive_echo_failures_mark_down_then_reconnect_after_backoff() -> None:
    s = link()
    bring_up(s)
    assert s.poll(1000) == [SendEcho()]
    assert s.echo_failed(2000) == []  # one miss: retry at once
    assert s.is_up and s.poll(2000) == [SendEcho()]
    assert s.echo_failed(3000) == [MarkDown("2 echoes unanswered")]
    assert s.phase is LinkPhase.DOWN
    due = s.next_due_ms()
    assert due is not None and 3050 <= due <= 3100  # first retry: [min/2, min]
    assert s.poll(due - 1) == []
    assert s.poll(due) == [Connect()]


def test_answer_between_echo_failures_resets_the_count() -> None:
    s = link()
    bring_up(s)
    s.poll(1000)
    s.echo_failed(2000)
    s.traffic(2100)
    s.poll(2100)
    assert s.echo_failed(3000) == []
    assert s.is_up


def test_backoff_grows_exponentially_to_the_cap_with_jitter_in_range() -> None:
    s = link(seed=7)
    now = 0
    waits = []
    for _ in range(8):
        assert s.poll(now) == [Connect()]
        assert s.connect_failed(now) == [MarkDown("connect failed")]
        due = s.next_due_ms()
        waits.append(due - now)
        now = due
    ceilings = [100, 200, 400, 800, 800, 800, 800, 800]
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling
    bring_up(s, now)
    assert s.failed_attempts == 0


def test_same_seed_same_schedule_different_seed_differs() -> None:
    def schedule(seed: int) -> list[int]:
        s, now, out = link(seed), 0, []
        for _ in range(5):
            s.poll(now)
            s.connect_failed(now)
            now = s.next_due_ms()
            out.append(now)
        return out

    assert schedule(3) == schedule(3)
    assert schedule(3) != schedule(4)


def test_sign_on_failure_and_connection_loss_mark_down() -> None:
    s = link()
    s.poll(0)
    s.connected(0)
    assert s.sign_on_failed(5) == [MarkDown("sign-on refused or unanswered")]
    assert not s.is_up
    s.poll(s.next_due_ms())
    s.connected(1000)
    s.sign_on_ok(1000)
    assert s.connection_lost(1200, "reset by peer") == [MarkDown("reset by peer")]
    assert s.last_down_reason == "reset by peer"
    assert s.connection_lost(1300) == []  # already down: nothing more to do


def test_events_out_of_phase_are_caller_bugs_named_clearly() -> None:
    s = link()
    with pytest.raises(LinkStateError, match="sign_on_ok while disconnected, expected signing_on"):
        s.sign_on_ok(0)
    assert s.echo_ok(0) == [] and s.echo_failed(0) == []  # stale echo results are harmless


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="reconnect_backoff"):
        LinkState(
            "x", echo_interval_ms=1, max_echo_failures=1, backoff=BackoffPolicy(10, 5), rng=random.Random()
        )


def test_acquirer_is_up_when_any_link_is_up() -> None:
    h = AcquirerHealth.from_config(CFG, random.Random(1))
    assert len(h.links) == 2 and not h.is_up
    bring_up(h.links[1])
    assert h.is_up and h.up_links() == [h.links[1]]
    h.links[1].connection_lost(5)
    assert not h.is_up


def test_select_acquirer_follows_backup_chain() -> None:
    backups = backup_map(
        [AcquirerConfig("a", backup="b"), AcquirerConfig("b", backup="c"), AcquirerConfig("c", backup="a")]
    )
    up = {"a": False, "b": False, "c": True}
    assert select_acquirer("a", up.__getitem__, backups) == "c"
    up["c"] = False
    assert select_acquirer("a", up.__getitem__, backups) is None  # cycle walked once, then 91
    up["a"] = True
    assert select_acquirer("a", up.__getitem__, backups) == "a"
    assert select_acquirer(None, up.__getitem__, backups) is None


def test_backup_naming_unknown_acquirer_is_refused() -> None:
    with pytest.raises(ValueError, match="backup 'zz'"):
        backup_map([AcquirerConfig("a", backup="zz")])


EVENTS = [
    "poll",
    "connected",
    "connect_failed",
    "sign_on_ok",
    "sign_on_failed",
    "echo_ok",
    "echo_failed",
    "lost",
    "traffic",
]


@given(st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 500)), max_size=100), st.integers(0, 99))
def test_any_event_sequence_keeps_invariants(events, seed) -> None:
    s = link(seed)
    now = 0
    for name, dt in events:
        now += dt
        decisions = []
        try:
            if name == "poll":
                decisions = s.poll(now)
            elif name == "lost":
                decisions = s.connection_lost(now)
            elif name == "traffic":
                s.traffic(now)
            else:
                decisions = getattr(s, name)(now)
        except LinkStateError:
            continue
        if any(isinstance(d, MarkDown) for d in decisions):
            assert s.phase is LinkPhase.DOWN
            wait = s.reconnect_due_ms - now
            assert CFG.reconnect_backoff_min_ms / 2 <= wait <= CFG.reconnect_backoff_max_ms
        if any(isinstance(d, Connect) for d in decisions):
            assert s.phase is LinkPhase.CONNECTING
        if s.phase is LinkPhase.UP:
            assert s.failed_attempts == 0 and s.echo_failures < CFG.max_echo_failures
            assert s.echo_in_flight or s.echo_due_ms is not None

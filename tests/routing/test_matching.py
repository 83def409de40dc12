"""Acquirer request matching: own STANs, deadlines, bounded table, late/unknown answers never delivered."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.config import AcquirerConfig
from switch.routing.matching import (
    LinkFullError,
    LinkMatcher,
    Matched,
    MatchingError,
    StanAllocator,
    Unmatched,
)


def request(m: LinkMatcher, mti: str = "0200", tid: str = "T0000001", now_ms: int = 0, ctx=None):
    stan = m.next_stan()
    fields = {"t": mti, "11": stan, "41": tid}
    m.register(fields, now_ms, ctx if ctx is not None else stan)
    return fields


def answer(req: dict, mti: str | None = None) -> dict:
    mti = mti or req["t"][:2] + str(int(req["t"][2]) + 1) + "0"
    return {**req, "t": mti, "39": "00"}


def test_answer_matches_its_request_once() -> None:
    m: LinkMatcher[str] = LinkMatcher(10, 1000)
    req = request(m, ctx="purchase-1", now_ms=100)
    got = m.match(answer(req), now_ms=130)
    assert isinstance(got, Matched)
    assert got.pending.context == "purchase-1"
    assert got.elapsed_ms == 30
    again = m.match(answer(req), now_ms=140)
    assert isinstance(again, Unmatched) and again.reason == "unknown"
    assert len(m) == 0


def test_key_includes_mti_class_and_terminal() -> None:
    m: LinkMatcher[str] = LinkMatcher(10, 1000)
    req = request(m, "0200", tid="T1")
    assert m.match({**answer(req), "41": "T2"}, 1) == Unmatched("unknown", "0210", req["11"], "T2")
    assert isinstance(m.match(answer(req, "0410"), 1), Unmatched)
    assert isinstance(m.match(answer(req), 1), Matched)


def test_requests_answered_out_of_order() -> None:
    m: LinkMatcher[int] = LinkMatcher(100, 1000)
    reqs = [request(m, ctx=i) for i in range(50)]
    for i in reversed(range(50)):
        got = m.match(answer(reqs[i]), 5)
        assert isinstance(got, Matched) and got.pending.context == i


def test_wrong_function_and_requests_as_answers_are_unmatched() -> None:
    m: LinkMatcher[str] = LinkMatcher(10, 1000)
    req = request(m, "0200")
    assert m.match(answer(req, "0230"), 1).reason == "wrong response type"
    assert m.match({**req}, 1).reason == "not a response"
    assert m.match({"t": "02x0"}, 1).reason == "malformed"
    assert isinstance(m.match(answer(req), 1), Matched)  # still waiting after the wrong answers


def test_late_answer_after_deadline_is_unmatched_and_expire_returns_it() -> None:
    m: LinkMatcher[str] = LinkMatcher(10, 1000)
    early = request(m, ctx="early", now_ms=0)
    late = request(m, ctx="late", now_ms=500)
    assert m.next_deadline_ms() == 1000
    assert m.expire(999) == []
    expired = m.expire(1000)
    assert [p.context for p in expired] == ["early"]
    assert m.match(answer(early), 1001).reason == "unknown"
    assert m.next_deadline_ms() == 1500
    assert isinstance(m.match(answer(late), 1001), Matched)
    assert m.next_deadline_ms() is None


def test_per_request_timeout_overrides_config() -> None:
    m: LinkMatcher[str] = LinkMatcher(10, 1000)
    stan = m.next_stan()
    m.register({"t": "0800", "11": stan}, 0, "echo", timeout_ms=50)
    assert [p.context for p in m.expire(50)] == ["echo"]


def test_full_link_refuses_with_named_limit_and_recovers() -> None:
    m: LinkMatcher[int] = LinkMatcher.from_config(AcquirerConfig("a", max_outstanding_per_link=3))
    reqs = [request(m, ctx=i) for i in range(3)]
    with pytest.raises(LinkFullError, match="max_outstanding_per_link=3"):
        m.next_stan()
    assert isinstance(m.match(answer(reqs[0]), 1), Matched)
    request(m)
    assert len(m) == 3


def test_register_refuses_unreserved_stan_and_non_requests() -> None:
    m: LinkMatcher[str] = LinkMatcher(10, 1000)
    with pytest.raises(MatchingError, match="not reserved"):
        m.register({"t": "0200", "11": "000042", "41": "T"}, 0, "x")
    stan = m.next_stan()
    with pytest.raises(MatchingError, match="not a request"):
        m.register({"t": "0210", "11": stan}, 0, "x")
    m.cancel_stan(stan)
    assert not m.full and len(m) == 0


def test_drain_fails_everything_outstanding() -> None:
    m: LinkMatcher[int] = LinkMatcher(10, 1000)
    reqs = [request(m, ctx=i, now_ms=i) for i in range(4)]
    assert [p.context for p in m.drain()] == [0, 1, 2, 3]
    assert len(m) == 0 and m.next_deadline_ms() is None
    assert m.match(answer(reqs[0]), 10).reason == "unknown"


def test_stan_wraps_and_skips_outstanding() -> None:
    alloc = StanAllocator(start=999_998)
    assert [alloc.allocate() for _ in range(3)] == ["999998", "999999", "000001"]
    alloc.release("000001")
    # 999998 and 999999 still in use: after wrapping the counter must skip them.
    alloc2 = StanAllocator(start=999_998)
    held = alloc2.allocate()
    assert held == "999998"
    seen = set()
    for _ in range(999_998):  # every other STAN once: 999999, then 000001..999997
        stan = alloc2.allocate()
        seen.add(stan)
        alloc2.release(stan)
    assert held not in seen and len(seen) == 999_998
    assert alloc2.allocate() == "999999"  # wrapped past the held 999998


def test_stan_never_zero_and_always_six_digits() -> None:
    alloc = StanAllocator()
    for _ in range(5):
        s = alloc.allocate()
        assert len(s) == 6 and s != "000000"


@given(
    st.lists(st.tuples(st.sampled_from(["send", "answer", "tick", "late"]), st.integers(0, 30)), max_size=200)
)
def test_no_two_outstanding_requests_share_a_stan_and_nothing_is_delivered_twice(ops) -> None:
    m: LinkMatcher[int] = LinkMatcher(16, 100)
    now = 0
    sent: list[dict] = []
    delivered: set[int] = set()
    expired: set[int] = set()
    n = 0
    for op, arg in ops:
        now += arg
        if op == "send" and not m.full:
            sent.append(request(m, ctx=n, now_ms=now))
            n += 1
        elif op in ("answer", "late") and sent:
            req = sent[arg % len(sent)]
            got = m.match(answer(req), now)
            if isinstance(got, Matched):
                assert got.pending.context not in delivered | expired
                delivered.add(got.pending.context)
        else:
            for p in m.expire(now):
                assert p.context not in delivered
                expired.add(p.context)
        stans = [p.key.stan for p in m._pending.values()]
        assert len(stans) == len(set(stans))
        assert len(m) <= 16

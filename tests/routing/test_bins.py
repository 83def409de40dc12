"""BIN table behaviour: longest prefix wins, qualifiers narrow, bad config is refused with its name."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.config import RouteConfig, RoutingConfig
from switch.routing.bins import BinTable, Route, RoutingError


def table(*routes: RouteConfig, default: str | None = "dflt", acquirers=None) -> BinTable:
    return BinTable.from_config(RoutingConfig(default_acquirer=default, routes=list(routes)), acquirers)


def test_longest_prefix_wins() -> None:
    t = table(RouteConfig("411111", "a"), RouteConfig("41111122", "b"), RouteConfig("41111122334", "c"))
    assert t.acquirer_for("4111110000000000") == "a"
    assert t.acquirer_for("4111112200000000") == "b"
    assert t.acquirer_for("4111112233400000") == "c"
    assert t.acquirer_for("5500000000000004") == "dflt"


def test_no_route_and_no_default_is_none() -> None:
    assert table(RouteConfig("411111", "a"), default=None).acquirer_for("5500000000000004") is None


def test_currency_and_processing_code_narrow_a_route() -> None:
    t = table(
        RouteConfig("411111", "any"),
        RouteConfig("411111", "usd", currency="840"),
        RouteConfig("411111", "refunds", processing_code="20"),
        RouteConfig("411111", "usd-refunds", currency="840", processing_code="20"),
    )
    pan = "4111111111111111"
    assert t.acquirer_for(pan, "978", "000000") == "any"
    assert t.acquirer_for(pan, "840", "000000") == "usd"
    assert t.acquirer_for(pan, "978", "200000") == "refunds"
    assert t.acquirer_for(pan, "840", "200000") == "usd-refunds"
    assert t.acquirer_for(pan) == "any"


def test_qualified_miss_falls_through_to_shorter_prefix_then_default() -> None:
    t = table(RouteConfig("411111", "wide"), RouteConfig("4111112", "usd-only", currency="840"))
    assert t.acquirer_for("4111112000000000", "978") == "wide"
    t2 = table(RouteConfig("4111112", "usd-only", currency="840"))
    assert t2.acquirer_for("4111112000000000", "978") == "dflt"


def test_six_digit_processing_code_matches_exactly() -> None:
    t = table(RouteConfig("411111", "savings", processing_code="301000"))
    assert t.acquirer_for("4111111111111111", processing_code="301000") == "savings"
    assert t.acquirer_for("4111111111111111", processing_code="302000") == "dflt"


def test_six_digit_code_beats_two_digit_code_whatever_the_order() -> None:
    for order in (1, -1):
        routes = [
            RouteConfig("411111", "tt", processing_code="30"),
            RouteConfig("411111", "exact", processing_code="301000"),
        ][::order]
        t = table(*routes)
        assert t.acquirer_for("4111111111111111", processing_code="301000") == "exact"
        assert t.acquirer_for("4111111111111111", processing_code="302000") == "tt"


@pytest.mark.parametrize(
    ("route", "needle"),
    [
        (RouteConfig("41111", "a"), "6-11 digits"),
        (RouteConfig("411111222333", "a"), "6-11 digits"),
        (RouteConfig("41111x", "a"), "digits only"),
        (RouteConfig("４１１１１１", "a"), "digits only"),  # full-width digits pass str.isdigit()
        (RouteConfig("411111", ""), "acquirer is empty"),
        (RouteConfig("411111", "a", currency="EUR"), "currency"),
        (RouteConfig("411111", "a", processing_code="0000"), "processing_code"),
    ],
)
def test_bad_routes_are_refused_with_their_position(route: RouteConfig, needle: str) -> None:
    with pytest.raises(RoutingError, match=needle) as info:
        table(RouteConfig("400000", "ok"), route)
    assert "routing.routes[1]" in str(info.value)


def test_unknown_acquirers_and_duplicates_are_refused() -> None:
    with pytest.raises(RoutingError, match="unknown acquirer 'nope'"):
        table(RouteConfig("411111", "nope"), acquirers=["a"], default=None)
    with pytest.raises(RoutingError, match="default_acquirer"):
        table(RouteConfig("411111", "a"), acquirers=["a"], default="nope")
    with pytest.raises(RoutingError, match="duplicate route"):
        table(RouteConfig("411111", "a"), RouteConfig("411111", "b"))


def oracle(routes: list[Route], default: str | None, pan: str, cur: str | None, pc: str | None) -> str | None:
    """Brute force: every route that matches, ranked by (prefix length, specificity)."""
    matching = [r for r in routes if pan.startswith(r.prefix) and r.accepts(cur, pc)]
    if not matching:
        return default
    best = max(len(r.prefix) * 10 + r.specificity for r in matching)
    winners = [r.acquirer for r in matching if len(r.prefix) * 10 + r.specificity == best]
    assert len(winners) == 1, "two routes of equal rank accepted one message"
    return winners[0]


# Few distinct digits so that prefixes overlap often.
digits = st.text(alphabet="459", min_size=6, max_size=11)
currencies = st.sampled_from([None, "840", "978"])
codes = st.sampled_from([None, "00", "20", "000000"])


@given(
    routes=st.lists(st.tuples(digits, currencies, codes), max_size=40, unique=True),
    probes=st.lists(
        st.tuples(
            st.text(alphabet="459", min_size=12, max_size=19),
            st.sampled_from(["840", "978"]),
            st.sampled_from(["000000", "200000", "300000"]),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_matches_brute_force_oracle(routes, probes) -> None:
    built = [Route(p, f"acq{i}", c, pc) for i, (p, c, pc) in enumerate(routes)]
    t = BinTable(built, "dflt")
    for pan, cur, pc in probes:
        want = oracle(built, "dflt", pan, cur, pc)
        assert t.acquirer_for(pan, cur, pc) == want, (pan, cur, pc)

"""The ledger's Cython loops (switch._speedups.ledger) agree with the pure-Python reference, and
`submit_many` answers each caller once per batch. Both implementations run here: the reference via
`fast.use_fast_path(False)`, as SWITCH_LEDGER_PURE=1 would at import."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.config import LedgerConfig
from switch.ledger import codec, fast, writer
from switch.ledger.codec import InvalidDraft
from switch.ledger.merkle import Frontier, root_of
from switch.ledger.model import EntryDraft, EntryKind, Posting, Side, UnbalancedEntry
from switch.ledger.sqlite import SqliteBackend
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerWriter

from .drafts import draft

K = EntryKind


@pytest.fixture(params=[True, False], ids=["cython", "pure"])
def fast_path(request: pytest.FixtureRequest) -> Iterator[bool]:
    previous = fast.use_fast_path(request.param)
    yield request.param
    fast.use_fast_path(previous)


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except (InvalidDraft, UnbalancedEntry) as exc:
        return type(exc).__name__, None


_text = st.text(alphabet=st.sampled_from("09AZaz*f-é\x00"), max_size=6)
_amounts = st.one_of(st.integers(-2, 3), st.just(10**15), st.just(10**15 + 1), st.just(2**64), st.booleans())
_currencies = st.sampled_from(["978", "EUR", "eur", "97", "9788", "", "97A", "\u0669\u0669\u0669"])


@st.composite
def _drafts(draw: st.DrawFn) -> EntryDraft:
    """Mostly valid drafts with one field at a time pushed to or past a limit or to a wrong type."""
    amount = draw(st.integers(1, 10_000))
    d = draft(draw(st.sampled_from(["k", "key-1"])), draw(st.sampled_from(list(K))), "R1", amount)
    field = draw(st.sampled_from([
        None, "idempotency_key", "rrn", "merchant_id", "pan_masked", "pan_hash", "amount_minor",
        "currency", "at_ms", "memo", "kind", "postings", "posting_amount", "posting_currency",
        "posting_side", "posting_account",
    ]))  # fmt: skip
    if field is None:
        return d
    if field in ("idempotency_key", "rrn", "merchant_id"):
        value: Any = draw(st.one_of(_text, st.just("x" * 65), st.just("x" * 129), st.integers(0, 1)))
        return msgspec.structs.replace(d, **{field: value})
    if field == "pan_masked":
        value = draw(st.one_of(
            st.sampled_from(["411111******1111", "4111111111", "41111111111", "*", "1234567*1", "123*12345",
                             "411111****111a", "\u0661111"]),
            _text,
        ))  # fmt: skip
        return msgspec.structs.replace(d, pan_masked=value)
    if field == "pan_hash":
        value = draw(st.sampled_from(["", "ab" * 32, "AB" * 32, "ab" * 31, "ag" * 32, "ab" * 33]))
        return msgspec.structs.replace(d, pan_hash=value)
    if field == "amount_minor":
        return msgspec.structs.replace(d, amount_minor=draw(_amounts))
    if field == "currency":
        return msgspec.structs.replace(d, currency=draw(_currencies))
    if field == "at_ms":
        return msgspec.structs.replace(d, at_ms=draw(st.sampled_from([-1, 2**63, 2**64, 2**70, "1", 1.5])))
    if field == "memo":
        return msgspec.structs.replace(d, memo=draw(st.sampled_from(["", "m" * 512, "m" * 513])))
    if field == "kind":
        return msgspec.structs.replace(d, kind=draw(st.sampled_from(["purchase", "nope", K.DECLINE])))
    ps = list(d.postings)
    if not ps:
        ps = [Posting("a", Side.DEBIT, 5, "978"), Posting("b", Side.CREDIT, 5, "978")]
    i = draw(st.integers(0, len(ps) - 1))
    p = ps[i]
    if field == "posting_amount":
        ps[i] = Posting(p.account, p.side, draw(_amounts), p.currency)
    elif field == "posting_currency":
        ps[i] = Posting(p.account, p.side, p.amount_minor, draw(_currencies))
    elif field == "posting_side":
        ps[i] = Posting(p.account, draw(st.sampled_from([Side.DEBIT, Side.CREDIT, "D", "X"])), p.amount_minor,
                        p.currency)  # fmt: skip
    elif field == "posting_account":
        ps[i] = Posting(draw(st.one_of(_text, st.just("a" * 129))), p.side, p.amount_minor, p.currency)
    else:  # postings: a second currency, a list instead of a tuple, too many
        ps = draw(st.sampled_from([
            [*ps, Posting("c", Side.DEBIT, 7, "840"), Posting("d", Side.CREDIT, 7, "840")],
            [*ps, Posting("c", Side.DEBIT, 7, "840"), Posting("d", Side.CREDIT, 6, "840")],
            ps * 40,
        ]))  # fmt: skip
        if draw(st.booleans()):
            return msgspec.structs.replace(d, postings=ps)  # a list
    return msgspec.structs.replace(d, postings=tuple(ps))


@given(_drafts())
def test_cython_checks_accept_exactly_what_prepare_accepts_with_the_same_bytes(d: EntryDraft) -> None:
    reference = _outcome(lambda: codec.prepare(d))
    assert _outcome(lambda: fast.prepare(d)) == reference
    body = fast._ext.prepare_body(d)
    if body is not None:  # the extension never accepts what the reference refuses
        assert reference == ("ok", body)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 500), st.booleans()), min_size=1, max_size=40),
       st.integers(0, 300))  # fmt: skip
def test_cython_rows_equal_the_reference(specs: list[tuple[int, int, bool]], start: int) -> None:
    ds = [draft(f"k{i}", K.PURCHASE if fee else K.FEE, f"R{i}", amount, merchant_id=f"M{m}")
          for i, (m, amount, fee) in enumerate(specs)]  # fmt: skip
    new = [(start + i, d, codec.prepare(d)) for i, d in enumerate(ds)]
    leaves = [bytes([i % 256]) * 32 for i in range(start)]
    results = []
    for build in (writer._build_rows_py, fast._ext.build_rows):
        frontier = Frontier(2)
        for leaf in leaves:
            frontier.append(leaf)
        out: tuple[Any, ...] = ([], [], {}, [])
        maps: tuple[dict[Any, Any], ...] = ({}, {}, {})
        cache = {("merchant:M1:payable", "978"): -40}
        build(frontier, new, *out, *maps, cache, lambda a, c: 1000 if a.startswith("acquirer") else 0)
        results.append((out, maps, frontier.size, frontier.root()))
    assert results[0] == results[1]
    all_leaves = leaves + [row[-1] for row in results[0][0][0]]
    assert results[0][3] == root_of(all_leaves)


def test_rows_refuse_a_seq_that_is_not_the_next_leaf() -> None:
    d = draft("k", K.PURCHASE, "R", 5)
    for build in (writer._build_rows_py, fast._ext.build_rows):
        with pytest.raises(ValueError, match="next leaf index"):
            build(Frontier(8), [(3, d, codec.prepare(d))], [], [], {}, [], {}, {}, {}, {}, lambda a, c: 0)


def test_submit_many_answers_each_caller_once_per_batch_and_refuses_bad_outcomes_at_once(
    tmp_path, signing_key, fast_path: bool
) -> None:
    cfg = LedgerConfig(batch_window_ms=200, max_batch_entries=100)
    calls: list[list[tuple[object, Any, Any]]] = []
    done = threading.Event()

    def on_batch(results: list[tuple[object, Any, Any]]) -> None:
        calls.append(results)
        if sum(len(c) for c in calls) == 4:
            done.set()

    unbalanced = msgspec.structs.replace(
        draft("bad", K.PURCHASE, "R9", 5), postings=(Posting("a", Side.DEBIT, 5, "978"),)
    )
    with LedgerWriter(SqliteBackend(tmp_path / "l.db"), signing_key=signing_key, config=cfg) as w:
        w.append([draft("h", K.HOLD, "H1", 100)])
        refused = w.submit_many(
            [
                ("a", [draft("k1", K.PURCHASE, "R1", 500), draft("f1", K.FEE, "R1", 10)]),
                ("b", [unbalanced]),
                ("c", [draft("c1", K.CAPTURE, "C1", 60, "H1")]),
                ("d", [draft("c2", K.CAPTURE, "C2", 60, "H1")]),  # the hold is already captured
                ("e", [draft("k1", K.PURCHASE, "R1", 500)]),  # idempotent repeat inside the batch
            ],
            on_batch,
        )
        assert [(t, type(e)) for t, e in refused] == [("b", UnbalancedEntry)]
        assert done.wait(10)
    assert len(calls) == 1  # one batch, one call
    by_token = {t: (entries, error) for t, entries, error in calls[0]}
    assert [e.seq for e in by_token["a"][0]] == [1, 2] and by_token["a"][1] is None
    assert [e.seq for e in by_token["c"][0]] == [3]
    assert by_token["d"][0] is None and "already resolved" in str(by_token["d"][1])
    assert [e.seq for e in by_token["e"][0]] == [1]
    report = verify_ledger(SqliteBackend(tmp_path / "l.db", create=False), signing_key.public_key())
    assert report.ok and report.tree_size == 4


def test_both_paths_write_identical_ledgers(tmp_path, signing_key) -> None:
    """Same drafts through the Cython and the reference path: same bodies, leaves and root."""
    roots = []
    for enabled in (True, False):
        previous = fast.use_fast_path(enabled)
        try:
            with LedgerWriter(
                SqliteBackend(tmp_path / f"{enabled}.db"), signing_key=None,
                config=LedgerConfig(batch_window_ms=0),
            ) as w:  # fmt: skip
                for i in range(300):
                    w.append([draft(f"k{i}", K.PURCHASE, f"R{i}", 100 + i, merchant_id=f"M{i % 7}")])
                roots.append(w.root())
        finally:
            fast.use_fast_path(previous)
    assert roots[0] == roots[1]

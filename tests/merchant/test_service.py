"""Registry (validation, audit, versions) and the services over a real ledger, on SQLite and on
PostgreSQL: deposits, renewals, status, cutover and settlement report, terminal reconciliation."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from switch.config import MerchantServicesConfig
from switch.ledger.model import EntryDraft, EntryKind, Posting, Side, accounts
from switch.ledger.queries import LedgerReader
from switch.ledger.writer import LedgerWriter
from switch.merchant import settlement
from switch.merchant.model import DAY_MS, Contract, Merchant, Rate, RegistryError, TerminalKey, TerminalState
from switch.merchant.rules import MerchantRules
from switch.merchant.service import MerchantService
from switch.merchant.store import RegistryConflict
from switch.merchant.subscription import RenewalRefused
from tests.merchant.conftest import RegistryDb

T0 = 1_700_000_000_000 - (1_700_000_000_000 % DAY_MS)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def env(registry_db: RegistryDb) -> Iterator[tuple[MerchantService, Clock, LedgerWriter]]:
    """A service on a fresh ledger + registry, once per backend (SQLite, PostgreSQL)."""
    clock = Clock()
    writer = LedgerWriter(registry_db.open_backend(), signing_key=None, clock_ms=clock)
    reader = LedgerReader(registry_db.open_backend())
    store = registry_db.open_store()
    svc = MerchantService(store, reader, writer, MerchantServicesConfig(), clock)
    svc.create_merchant(Merchant(id="M1", name="Corner Shop", mcc="5411", currency="978"), "alice")
    svc.put_contract(
        Contract(
            id="c1",
            merchant_id="M1",
            currency="978",
            rates={"default": Rate(bps=100, fixed_minor=5)},
            subscription_fee_minor=1500,
            deposit_minor=5000,
            deposit_activation_days=10,
            deposit_volume_minor=2000,
            deposit_volume_days=30,
        ),
        "alice",
    )
    yield svc, clock, writer
    writer.close()
    reader.close()
    store.close()


def sale(
    writer: LedgerWriter,
    rrn: str,
    amount: int,
    at_ms: int,
    *,
    kind: EntryKind = EntryKind.PURCHASE,
    original: str = "",
    stan: str = "000001",
) -> None:
    """A sale (or refund/void/reversal of one) as the processing core posts it, plus our fee."""
    credit_merchant = kind in (EntryKind.PURCHASE, EntryKind.CAPTURE)
    acq, pay = accounts.acquirer_clearing("A"), accounts.merchant_payable("M1")
    debit, credit = (acq, pay) if credit_merchant else (pay, acq)
    writer.append(
        [
            EntryDraft(
                idempotency_key=f"tk:T1/M1/{stan}/0101120000/02:out",  # processing's outcome key
                kind=kind,
                rrn=rrn,
                at_ms=at_ms,
                merchant_id="M1",
                terminal_id="T1",
                amount_minor=amount,
                currency="978",
                original_rrn=original,
                pan_masked="411111******1111",
                postings=(
                    Posting(debit, Side.DEBIT, amount, "978"),
                    Posting(credit, Side.CREDIT, amount, "978"),
                ),
            )
        ]
    )


def test_registry_validation_versions_and_masked_audit(
    env: tuple[MerchantService, Clock, LedgerWriter],
) -> None:
    svc, _, _ = env
    with pytest.raises(RegistryError, match="mcc must be 4 digits"):
        svc.create_merchant(Merchant(id="M2", name="x", mcc="54", currency="978"), "bob")
    with pytest.raises(RegistryError, match="default"):
        svc.put_contract(Contract(id="c2", merchant_id="M1", currency="978", rates={}), "bob")
    with pytest.raises(RegistryConflict, match="already exists"):
        svc.create_merchant(Merchant(id="M1", name="Again", mcc="5411", currency="978"), "bob")
    svc.register_terminal("T1", "M1", "bob")
    with pytest.raises(RegistryError, match="clear key"):
        svc.add_key(TerminalKey(terminal_id="T1", key_index=0, encrypted_hex="zz"), "bob")
    svc.add_key(
        TerminalKey(terminal_id="T1", key_index=0, encrypted_hex="AB" * 24, check_value="1A2B3C"), "bob"
    )
    updated = svc.update_merchant("M1", "carol", mcc="5812")
    assert updated.mcc == "5812"
    audit = svc.store.audit()
    actions = [(a.actor, a.action, a.object_kind, a.object_id) for a in audit]
    assert ("alice", "create", "merchant", "M1") in actions
    assert ("bob", "register", "terminal", "T1") in actions
    assert ("carol", "update", "merchant", "M1") in actions
    key_row = next(a for a in audit if a.object_kind == "key")
    assert "AB" * 24 not in key_row.after and "encrypted key, 48 hex" in key_row.after
    mcc_row = next(a for a in audit if a.actor == "carol")
    assert '"mcc":"5411"' in mcc_row.before and '"mcc":"5812"' in mcc_row.after
    with pytest.raises(Exception, match="append-only"):
        svc.store.conn.execute("DELETE FROM registry_audit")
    # A stale writer cannot overwrite a newer record.
    with pytest.raises(RegistryConflict, match="changed meanwhile"):
        svc.store.save("merchant", "M1", "M1", updated, actor="x", action="update", at_ms=0, expect_version=1)


def test_registration_charges_deposit_and_first_period_then_renew_and_cancel(
    env: tuple[MerchantService, Clock, LedgerWriter],
) -> None:
    svc, clock, _ = env
    t = svc.register_terminal("T1", "M1", "bob")
    assert t.state is TerminalState.REGISTERED and t.paid_until_ms == T0 + 30 * DAY_MS
    kinds = [e.draft.kind for e in svc.reader.entries_by_rrn(t.deposit_rrn)]
    assert kinds == [EntryKind.DEPOSIT]
    assert svc.reader.balance(accounts.merchant_payable("M1"), "978") == 5000 + 1500  # debit-normal view
    clock.now += DAY_MS
    ren = svc.renew("T1", "bob")
    assert (ren.period_from_ms, ren.period_to_ms) == (T0 + 30 * DAY_MS, T0 + 60 * DAY_MS)
    clock.now = T0 + DAY_MS + 14 * DAY_MS + 1
    with pytest.raises(RenewalRefused, match="past its refund window"):
        svc.cancel_renewal("T1", ren.rrn, "bob")
    clock.now = T0 + DAY_MS + 14 * DAY_MS
    svc.cancel_renewal("T1", ren.rrn, "bob")
    assert svc.terminal("T1")[0].paid_until_ms == T0 + 30 * DAY_MS
    refunds = [e for e in svc.reader.entries_by_rrn(f"{ren.rrn}/refund")]
    assert [e.draft.kind for e in refunds] == [EntryKind.SUBSCRIPTION_REFUND]


def test_deposit_refunded_when_condition_met_and_outcome_posted_once(
    env: tuple[MerchantService, Clock, LedgerWriter],
) -> None:
    svc, clock, writer = env
    svc.register_terminal("T1", "M1", "bob")
    rules = MerchantRules(
        MerchantServicesConfig(), [svc.merchant("M1")[0]], [svc.contract_for("M1")], [svc.terminal("T1")[0]]
    )
    for changed in (rules.sign_on("T1", T0 + 1), rules.approved("T1", "purchase", T0 + 2)):
        assert changed is not None
        svc.record_terminal(changed)
    sale(writer, "000000000001", 1999, T0 + 2)
    clock.now = T0 + 3
    ev = svc.evaluate_deposit("T1", "ops")
    assert ev.result == "pending" and ev.processed_minor == 1999
    sale(writer, "000000000002", 1, T0 + 4, stan="000002")
    ev = svc.evaluate_deposit("T1", "ops")
    assert ev.result == "refund" and svc.terminal("T1")[0].deposit_outcome == "refunded"
    posted = svc.reader.entries_by_rrn(f"{svc.terminal('T1')[0].deposit_rrn}/refund")
    assert [e.draft.kind for e in posted] == [EntryKind.DEPOSIT_REFUND]
    assert '"result":"refund"' in posted[0].draft.memo
    assert svc.evaluate_deposit("T1", "ops").result == "refund"  # evaluation again: nothing posted twice
    assert len(svc.reader.entries_by_rrn(f"{svc.terminal('T1')[0].deposit_rrn}/refund")) == 1


def test_status_cutover_settlement_report_and_reconciliation(
    env: tuple[MerchantService, Clock, LedgerWriter],
) -> None:
    svc, clock, writer = env
    svc.register_terminal("T1", "M1", "bob")
    sale(writer, "000000000001", 10_000, T0 + 10)
    rules = MerchantRules(MerchantServicesConfig(), [svc.merchant("M1")[0]], [svc.contract_for("M1")])
    fee = rules.fee_drafts(
        sale_rrn="000000000001",
        merchant_id="M1",
        terminal_id="T1",
        pan_prefix="411111",
        amount_minor=10_000,
        currency="978",
        at_ms=T0 + 10,
    )
    writer.append(list(fee))
    sale(
        writer, "000000000002", 4_000, T0 + 20, kind=EntryKind.REFUND, original="000000000001", stan="000002"
    )
    back = rules.fee_refund_drafts(
        refund_rrn="000000000002",
        fee_entry=fee[0],
        original_amount_minor=10_000,
        refunded_before_minor=0,
        refund_minor=4_000,
        at_ms=T0 + 20,
    )
    writer.append(list(back))
    st = svc.status("000000000001")
    assert (st.state, st.refunded_minor, st.fee_minor, st.settled) == ("partly_refunded", 4_000, 105, False)
    assert svc.status("999999999999").state == "pending"
    assert [s.rrn for s in svc.status_by_stan("T1", "000002")] == ["000000000002"]

    report = svc.report()
    (row,) = report
    assert (
        row.gross_minor,
        row.refunds_minor,
        row.fees_minor,
        row.deposits_minor,
        row.subscriptions_minor,
    ) == (10_000, 4_000, 105 - 42, 5_000, 1_500)
    assert row.net_payable_minor == 10_000 - 4_000 - 63 - 5_000 - 1_500
    assert row.balanced and row.payable_check_minor == row.net_payable_minor
    parsed = list(csv.DictReader(io.StringIO(settlement.to_csv(report))))
    assert parsed[0]["net_payable_minor"] == str(row.net_payable_minor)
    assert msgspec.json.decode(settlement.to_json(report))[0]["gross_minor"] == 10_000

    declared = settlement.TerminalTotals(
        terminal_id="T1",
        currency="978",
        debits=settlement.TotalsLine(1, 10_000),
        credits=settlement.TotalsLine(1, 3_999),
    )
    rec = svc.reconcile(declared)
    assert not rec.balanced and [x.name for x in rec.out_of_balance] == ["credits"]
    assert rec.out_of_balance[0].ledger_amount_minor == 4_000

    clock.now = T0 + DAY_MS
    cut, rows = svc.cutover("ops")
    assert rows == report
    assert svc.status("000000000001").settled
    settle_entries = svc.reader.entries_by_rrn(f"settle/M1/978/{cut.to_seq}")
    assert settle_entries[0].draft.kind is EntryKind.SETTLEMENT
    assert svc.reader.balance(accounts.merchant_payable("M1"), "978") == 0  # all of it settled
    assert svc.report() == []  # the open batch holds only the settlement entry itself
    assert svc.report(cut.to_seq) == report
    again, rows2 = svc.cutover("ops")  # nothing new: no double settlement
    assert rows2 == [] and again.from_seq == cut.to_seq


def test_status_by_stan_on_a_postgres_database_with_a_linguistic_collation(pg_cluster: Any) -> None:
    """Under a collation that ignores punctuation ('/' in the keys), a byte-prefix range on the
    database's own order misses the terminal's entries; the registry must still find them."""
    import psycopg

    name = f"icu_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
            "ICU_LOCALE 'en-US-u-ka-shifted' LOCALE 'C.UTF-8'"
        )
    try:
        db = RegistryDb("postgres", pg_cluster.dsn(name))
        clock = Clock()
        writer = LedgerWriter(db.open_backend(), signing_key=None, clock_ms=clock)
        reader, store = LedgerReader(db.open_backend()), db.open_store()
        try:
            svc = MerchantService(store, reader, writer, MerchantServicesConfig(), clock)
            svc.create_merchant(Merchant(id="M1", name="Shop", mcc="5411", currency="978"), "alice")
            svc.put_contract(
                Contract(id="c1", merchant_id="M1", currency="978", rates={"default": Rate()}), "a"
            )
            svc.register_terminal("T1", "M1", "bob")
            sale(writer, "000000000001", 100, T0 + 1, stan="000002")
            sale(writer, "000000000002", 200, T0 + 2, stan="000001")
            assert [s.rrn for s in svc.status_by_stan("T1", "000002")] == ["000000000001"]
            assert [s.rrn for s in svc.status_by_stan("T1", "000001")] == ["000000000002"]
        finally:
            writer.close()
            reader.close()
            store.close()
    finally:
        pg_cluster.drop_database(name)


def test_scheduled_sweep_keeps_a_deposit_after_its_window_once_and_skips_what_cannot_be_decided(
    env: tuple[MerchantService, Clock, LedgerWriter],
) -> None:
    svc, clock, _ = env
    t = svc.register_terminal("T1", "M1", "bob")  # never activated; activation deadline: 10 days
    clock.now = T0 + 10 * DAY_MS  # the last millisecond it could still be activated: nothing to decide
    sweep = svc.sweep_deposits("sched", 100)
    assert (sweep.checked, sweep.decided) == (0, [])
    clock.now += 1
    sweep = svc.sweep_deposits("sched", 100)
    assert [ev.result for ev in sweep.decided] == ["keep"] and sweep.errors == []
    kept = svc.reader.entries_by_rrn(f"{t.deposit_rrn}/kept")
    assert [(e.draft.kind, e.draft.amount_minor) for e in kept] == [(EntryKind.ADJUSTMENT, 5000)]
    assert svc.terminal("T1")[0].deposit_outcome == "kept"
    assert svc.sweep_deposits("sched", 100).checked == 0  # decided: never looked at again
    assert len(svc.reader.entries_by_rrn(f"{t.deposit_rrn}/kept")) == 1
    assert [a.actor for a in svc.store.audit(object_kind="terminal")][-1] == "sched"


def test_deposit_outcome_posted_once_across_a_crash_and_a_race(
    env: tuple[MerchantService, Clock, LedgerWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, clock, writer = env
    t = svc.register_terminal("T1", "M1", "bob")
    clock.now = T0 + 11 * DAY_MS
    # A crash after posting, before the registry was updated: the next pass only records it.
    from switch.merchant import drafts

    writer.append([drafts.deposit_kept(t.deposit_rrn, "M1", "T1", 5000, "978", clock.now, "{}")])
    assert svc.terminal("T1")[0].deposit_outcome == ""
    assert [ev.result for ev in svc.sweep_deposits("sched", 100).decided] == ["keep"]
    assert svc.terminal("T1")[0].deposit_outcome == "kept"
    assert len(svc.reader.entries_by_rrn(f"{t.deposit_rrn}/kept")) == 1

    # A race: another evaluation posts the other outcome between our ledger check and our post.
    t2 = svc.register_terminal("T2", "M1", "bob")
    clock.now += 11 * DAY_MS
    other = drafts.deposit_refund(t2.deposit_rrn, "M1", "T2", 5000, "978", clock.now, "{}")
    real_lookup = svc._deposit_outcome_entry
    calls = []

    def lookup_then_lose_the_race(rrn: str) -> Any:
        calls.append(rrn)
        if len(calls) == 1:
            writer.append([other])  # the other evaluation commits right after our look
            return None
        return real_lookup(rrn)

    monkeypatch.setattr(svc, "_deposit_outcome_entry", lookup_then_lose_the_race)
    svc.evaluate_deposit("T2", "ops")  # decides "keep", but the ledger already holds the refund
    assert svc.terminal("T2")[0].deposit_outcome == "refunded"
    assert len(svc.reader.entries_by_rrn(f"{t2.deposit_rrn}/refund")) == 1
    assert svc.reader.entries_by_rrn(f"{t2.deposit_rrn}/kept") == []

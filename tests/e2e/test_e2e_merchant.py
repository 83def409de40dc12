"""Merchant services (issue 6) end to end: the real switch over TCP with its admin API, a terminal
registered through the API (deposit, first subscription period, master key), the rules acting on its
live traffic, and what operators see: terminal state and reasons, transaction status, the ledger, the
settlement report and reconciliation. The switch's clock is moved to cross refund windows and grace
periods."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
from prometheus_client.parser import text_string_to_metric_families

from switch.codec import keys as keymod
from switch.ledger.model import EntryKind, Side, accounts
from switch.merchant.model import DAY_MS
from switch.server.testbed import ALPHA_BIN, card
from switch.sim.terminal import TerminalSim, TerminalSimConfig, TxnResult
from tests.e2e.harness import ADMIN_TOKEN, Harness, running_switch, trio_test
from tests.pgcluster import pg_cluster, pg_dsn, pg_session_db  # noqa: F401  (fixtures)

SHOP = "SHOP00000000001"  # field 42: 15 characters
TID = "SHOPT001"  # field 41: 8 characters
MCC = "5411"
FEE_BPS, FEE_FIXED = 150, 10  # visa (the test cards' BIN 400000)
CONTRACT = {
    "id": "c-shop",
    "merchant_id": SHOP,
    "currency": "978",
    "rates": {"default": {"bps": 200}, "visa": {"bps": FEE_BPS, "fixed_minor": FEE_FIXED}},
    "refund_window_days": 3,
    "single_refund_cap_minor": 50_000,
    "subscription_fee_minor": 2_000,
    "subscription_period_days": 30,
    "subscription_grace_days": 7,
    "deposit_minor": 3_000,
    "deposit_activation_days": 10,
    "deposit_volume_minor": 1_000,
    "deposit_volume_days": 30,
}
SWITCH = {
    "admin": True,
    "merchant_services": {"registry_poll_interval_ms": 100},
    "server": {"housekeeping_interval_ms": 50},
    "packed_listener": False,
    "terminals_per_listener": 1,
}


class Clock:
    """The switch's wall clock, moved forward by tests (`offset_ms`)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


def fee_of(amount_minor: int) -> int:
    return (amount_minor * FEE_BPS + 5_000) // 10_000 + FEE_FIXED


@asynccontextmanager
async def admin_api(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{h.ports.admin}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Actor": "e2e"},
        timeout=10,
    ) as client:
        yield client


async def call(api: httpx.AsyncClient, method: str, path: str, **kw: Any) -> Any:
    r = await api.request(method, path, **kw)
    assert r.status_code == 200, (method, path, r.status_code, r.text)
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text


async def onboard(h: Harness, api: httpx.AsyncClient) -> TerminalSimConfig:
    """Merchant, contract, terminal and its master key, all through the admin API."""
    await call(
        api, "POST", "/merchants", json={"id": SHOP, "name": "Corner Shop", "mcc": MCC, "currency": "978"}
    )
    await call(api, "PUT", "/contracts/c-shop", json=CONTRACT)
    t = await call(api, "POST", "/terminals", json={"id": TID, "merchant_id": SHOP})
    assert t["state"] == "registered" and t["deposit_rrn"]
    tmk = keymod.generate_working_key()
    kek = keymod.Kek(bytes.fromhex((h.directory / "kek.hex").read_text().strip()))
    key = {"terminal_id": TID, "key_index": 0, "encrypted_hex": kek.seal(TID, tmk)}
    await call(api, "POST", f"/terminals/{TID}/keys", json=key)
    return TerminalSimConfig(
        port=h.ports.listeners["ascii"],
        terminal_id=TID,
        merchant_id=SHOP,
        master_key_hex=tmk.hex().upper(),
    )


async def terminal_state(api: httpx.AsyncClient, state: str, recorded: str = "") -> dict[str, Any]:
    """The terminal as the registry shows it once it reached `state` (and has `recorded` set):
    lifecycle saves are asynchronous."""
    with trio.fail_after(5):
        while True:
            t = await call(api, "GET", f"/terminals/{TID}")
            if t["state"] == state and (not recorded or t.get(recorded) is not None):
                return t  # type: ignore[no-any-return]
            await trio.sleep(0.02)


async def with_mcc(term: TerminalSim, pan: str, amount_minor: int, mcc: str) -> TxnResult:
    fields = {"t": "0200", "2": pan, "3": "000000", "4": f"{amount_minor:012d}", "18": mcc}
    fields.update({"22": "012", "25": "00", "49": "978"})
    return await term.exchange(fields, "purchase")


async def unkeyed_refusals(metrics_port: int) -> float:
    """switch_unkeyed_refusals_total as the switch's /metrics shows it."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "switch_unkeyed_refusals_total":
                return float(sample.value)
    raise AssertionError("switch_unkeyed_refusals_total is not exported")


def mine(h: Harness) -> list[Any]:
    return [d for d in h.ledger_drafts() if d.merchant_id == SHOP]


@trio_test
async def test_activation_mcc_check_and_status_through_the_api(tmp_path: Path) -> None:
    async with running_switch(tmp_path, **SWITCH) as h, admin_api(h) as api:
        cfg = await onboard(h, api)
        async with TerminalSim.connect(cfg) as term:
            assert (await term.sign_on()).response_code == "00"
            await terminal_state(api, "registered", "signed_on_at_ms")
            # Signed on, not activated: only the test transaction (purchase / inquiry) is allowed.
            hold = await term.pre_auth(card(ALPHA_BIN, 1), 500)
            assert hold.response_code == "58"
            st = await call(api, "GET", f"/transactions/{hold.rrn}")
            assert st["state"] == "declined" and "not activated" in st["reason"]
            (by_stan,) = await call(api, "GET", f"/terminals/{TID}/stan/{hold.stan}")
            assert by_stan["rrn"] == hold.rrn and by_stan["response_code"] == "58"
            test = await term.purchase(card(ALPHA_BIN, 1), 100)
            assert test.response_code == "00"
            activated = await terminal_state(api, "activated")
            assert activated["activated_at_ms"] is not None and activated["live_at_ms"] is None
            assert (await term.pre_auth(card(ALPHA_BIN, 1), 500)).response_code == "00"
            assert (await terminal_state(api, "active"))["live_at_ms"] is not None
            # The request's MCC must be the registered one: declined and flagged, nothing priced.
            wrong = await with_mcc(term, card(ALPHA_BIN, 2), 1_000, "7995")
            assert wrong.response_code == "58"
            st = await call(api, "GET", f"/transactions/{wrong.rrn}")
            assert "mcc_mismatch" in st["reason"] and "7995" in st["reason"]
            right = await with_mcc(term, card(ALPHA_BIN, 2), 1_000, MCC)
            assert right.response_code == "00"
            kinds = {d.rrn: d.kind for d in mine(h)}
            assert kinds[wrong.rrn] is EntryKind.DECLINE and f"{wrong.rrn}/fee" not in kinds
            assert kinds[f"{right.rrn}/fee"] is EntryKind.FEE
            # A change made with the CLI (another process) reaches the running switch.
            cli = [sys.executable, "-m", "switch", "terminal-admin", "state", "--db", h.config.ledger.path]
            await trio.run_process(
                [*cli, "--id", TID, "--to", "deactivated", "--actor", "ops"], capture_stdout=True
            )
            await terminal_state(api, "deactivated")
            with trio.fail_after(5):
                while (gone := await term.purchase(card(ALPHA_BIN, 2), 300)).response_code == "00":
                    await trio.sleep(0.05)
            assert gone.response_code == "58"
            assert "deactivated" in (await call(api, "GET", f"/transactions/{gone.rrn}"))["reason"]


@trio_test
async def test_fees_refund_rules_and_deposit_evaluation(tmp_path: Path) -> None:
    clock = Clock()
    async with running_switch(tmp_path, clock_ms=clock, **SWITCH) as h, admin_api(h) as api:
        cfg = await onboard(h, api)
        async with TerminalSim.connect(cfg) as term:
            await term.sign_on()
            assert (await term.purchase(card(ALPHA_BIN, 3), 100)).response_code == "00"  # activation
            sale = await term.purchase(card(ALPHA_BIN, 4), 20_000)
            assert sale.response_code == "00"
            fee = next(d for d in mine(h) if d.kind is EntryKind.FEE and d.original_rrn == sale.rrn)
            assert fee.amount_minor == fee_of(20_000) == 310
            # Partial refund: the fee comes back pro rata (cumulative floor), posted with the refund.
            r1 = await term.refund(sale, 4_000)
            assert r1.response_code == "00"
            back1 = next(d for d in mine(h) if d.kind is EntryKind.FEE_REFUND and d.rrn == f"{r1.rrn}/fee")
            assert back1.original_rrn == f"{sale.rrn}/fee" and back1.amount_minor == 310 * 4_000 // 20_000
            st = await call(api, "GET", f"/transactions/{sale.rrn}")
            assert (st["state"], st["refunded_minor"], st["fee_minor"], st["fee_refunded_minor"]) == (
                "partly_refunded",
                4_000,
                310,
                62,
            )
            # Unsettled: -3,000 deposit -2,000 subscription +100 -12 +20,000 -310 -4,000 +62 = 10,840.
            over = await term.refund(sale, 12_000)
            assert over.response_code == "51"
            assert "refund_balance" in (await call(api, "GET", f"/transactions/{over.rrn}"))["reason"]
            # Deposit rule met (activated in time, 1,000 processed): its refund is posted ...
            ev = await call(api, "POST", f"/terminals/{TID}/deposit")
            assert ev["result"] == "refund", ev
            assert [d.amount_minor for d in mine(h) if d.kind is EntryKind.DEPOSIT_REFUND] == [3_000]
            # ... and the running rules see it at once: 13,840 now covers the refund.
            r2 = await term.refund(sale, 12_000)
            assert r2.response_code == "00"
            back2 = next(d for d in mine(h) if d.kind is EntryKind.FEE_REFUND and d.rrn == f"{r2.rrn}/fee")
            assert back2.amount_minor == 310 * 16_000 // 20_000 - 62
            # Refund window 3 days: the day after its last day is refused.
            clock.offset_ms += 4 * DAY_MS
            late = await term.refund(sale, 1_000)
            assert late.response_code == "12"
            assert "refund_window" in (await call(api, "GET", f"/transactions/{late.rrn}"))["reason"]


@trio_test
async def test_expiry_renewal_cutover_settlement_and_reconciliation(tmp_path: Path) -> None:
    clock = Clock()
    async with running_switch(tmp_path, clock_ms=clock, **SWITCH) as h, admin_api(h) as api:
        cfg = await onboard(h, api)
        async with TerminalSim.connect(cfg) as term:
            await term.sign_on()
            assert (await term.purchase(card(ALPHA_BIN, 5), 100)).response_code == "00"
            sale = await term.purchase(card(ALPHA_BIN, 5), 5_000)
            assert sale.response_code == "00"
            # Paid for 30 days, 7 days of grace: on day 38 the terminal is suspended, with the reason.
            clock.offset_ms += 38 * DAY_MS
            t = await terminal_state(api, "suspended")
            assert "lapsed" in t["state_reason"]
            refused = await term.purchase(card(ALPHA_BIN, 5), 700)
            assert refused.response_code == "58"
            st = await call(api, "GET", f"/transactions/{refused.rrn}")
            assert "subscription_lapsed" in st["reason"] and "renew" in st["reason"]
            renewal = await call(api, "POST", f"/terminals/{TID}/renew")
            assert renewal["period_from_ms"] >= clock() - 60_000  # lapsed: the new period starts now
            assert (await call(api, "GET", f"/terminals/{TID}"))["state"] == "active"
            again = await term.purchase(card(ALPHA_BIN, 5), 6_000)
            assert again.response_code == "00"  # usable at once
            assert (await term.refund(again, 1_000)).response_code == "00"

            # 0500 reconciliation against the ledger, every line listed; one line off by one cent.
            declared = {
                "terminal_id": TID,
                "currency": "978",
                "debits": {"count": 3, "amount_minor": 11_100},
                "credits": {"count": 1, "amount_minor": 999},
            }
            rec = await call(api, "POST", "/reconcile", json=declared)
            assert not rec["balanced"] and [x["name"] for x in rec["out_of_balance"]] == ["credits"]
            assert rec["out_of_balance"][0]["ledger_amount_minor"] == 1_000
            term.totals.lines["credits"][1] -= 1
            assert (await term.settlement()).response_code == "95"  # the terminal's 0500 too

            cut = await call(api, "POST", "/cutover")
            (row,) = [r for r in cut["merchants"] if r["merchant_id"] == SHOP]
            report = await call(api, "GET", f"/settlement?to_seq={cut['cutover']['to_seq']}")
            assert [r for r in report if r["merchant_id"] == SHOP] == [row]
            text = await call(api, "GET", f"/settlement?to_seq={cut['cutover']['to_seq']}&format=csv")
            (csv_row,) = [r for r in csv.DictReader(io.StringIO(text)) if r["merchant_id"] == SHOP]
            assert int(csv_row["net_payable_minor"]) == row["net_payable_minor"]

            # The report is the ledger: recompute it from the entries.
            entries = [d for d in mine(h) if d.kind is not EntryKind.SETTLEMENT]
            total = {k: sum(d.amount_minor for d in entries if d.kind is k) for k in EntryKind}
            fees = total[EntryKind.FEE] - total[EntryKind.FEE_REFUND]
            assert fees == fee_of(100) + fee_of(5_000) + fee_of(6_000) - (fee_of(6_000) * 1_000 // 6_000)
            assert row["gross_minor"] == 100 + 5_000 + 6_000 == total[EntryKind.PURCHASE]
            assert row["refunds_minor"] == 1_000 == total[EntryKind.REFUND]
            assert row["fees_minor"] == fees
            assert row["deposits_minor"] == 3_000 and row["subscriptions_minor"] == 4_000
            payable = accounts.merchant_payable(SHOP)
            moved = sum(
                p.amount_minor if p.side is Side.CREDIT else -p.amount_minor
                for d in entries
                for p in d.postings
                if p.account == payable
            )
            assert row["net_payable_minor"] == moved == 11_100 - 1_000 - fees - 3_000 - 4_000
            assert row["balanced"]
            # Settled: nothing is owed any more, so a refund is over the unsettled balance.
            assert (await call(api, "GET", f"/transactions/{again.rrn}"))["settled"]
            assert (await term.refund(again, 100)).response_code == "51"


@trio_test
async def test_registered_terminal_that_never_signed_on_gets_58_over_tcp(tmp_path: Path) -> None:
    async with running_switch(tmp_path, metrics_enabled=True, **SWITCH) as h, admin_api(h) as api:
        cfg = await onboard(h, api)
        before = len(mine(h))
        async with TerminalSim.connect(cfg) as term:
            # No sign-on yet, so no MAC key: the lifecycle answers 58 (not A0), unMACed, nothing posted.
            refused = await term.purchase(card(ALPHA_BIN, 6), 700)
            assert refused.response_code == "58" and "64" not in refused.answer
            assert len(mine(h)) == before
            (seen,) = await call(api, "GET", f"/terminals/{TID}/refusals")
            assert (seen["stan"], seen["response_code"]) == (refused.stan, "58")
            assert "has not signed on" in seen["reason"]
            assert await unkeyed_refusals(h.ports.metrics) == 1.0, "operators see it in /metrics"
            # Sign-on is what it may do; then its test purchase is processed as before.
            assert (await term.sign_on()).response_code == "00"
            assert (await term.purchase(card(ALPHA_BIN, 6), 100)).response_code == "00"
        # A terminal the registry does not know keeps its answer: A0 (no key, nothing to consult).
        stranger = TerminalSimConfig(port=cfg.port, terminal_id="NOBODY01", merchant_id=SHOP)
        async with TerminalSim.connect(stranger) as term:
            assert (await term.purchase(card(ALPHA_BIN, 6), 700)).response_code == "A0"
        missing = await api.get("/terminals/NOBODY01/refusals")
        assert missing.status_code == 404


@trio_test
async def test_running_switch_refunds_and_keeps_deposits_on_its_schedule(tmp_path: Path) -> None:
    clock = Clock()
    scheduled = {
        **SWITCH,
        "merchant_services": {"registry_poll_interval_ms": 100, "deposit_check_interval_s": 1},
    }
    async with running_switch(tmp_path, clock_ms=clock, **scheduled) as h, admin_api(h) as api:
        cfg = await onboard(h, api)
        idle = await call(api, "POST", "/terminals", json={"id": "SHOPT002", "merchant_id": SHOP})
        async with TerminalSim.connect(cfg) as term:
            await term.sign_on()
            assert (await term.purchase(card(ALPHA_BIN, 7), 100)).response_code == "00"  # activation
            assert (await term.purchase(card(ALPHA_BIN, 7), 900)).response_code == "00"  # 1,000 reached
        # Nobody calls the deposit endpoint: the switch's schedule posts the refund by itself.
        t = await terminal_state(api, "active")
        with trio.fail_after(5):
            while (t := await call(api, "GET", f"/terminals/{TID}"))["deposit_outcome"] != "refunded":
                await trio.sleep(0.05)
        audit = await call(api, "GET", f"/audit?object_kind=terminal&object_id={TID}")
        assert audit[-1]["actor"] == "switch:deposit-schedule" and audit[-1]["action"] == "deposit refunded"
        # The idle terminal was never activated: once its activation window passed, it is kept.
        clock.offset_ms += 10 * DAY_MS + 60_000
        with trio.fail_after(5):
            while (await call(api, "GET", "/terminals/SHOPT002"))["deposit_outcome"] != "kept":
                await trio.sleep(0.05)
        await trio.sleep(1.3)  # at least one more pass: it posts nothing again
        outcomes = [
            (d.kind, d.original_rrn) for d in mine(h) if d.idempotency_key.startswith("deposit_outcome:")
        ]
        assert sorted(outcomes) == sorted(
            [(EntryKind.DEPOSIT_REFUND, t["deposit_rrn"]), (EntryKind.ADJUSTMENT, idle["deposit_rrn"])]
        )


@trio_test
async def test_cli_posts_through_the_running_switch_and_a_second_writer_is_refused(tmp_path: Path) -> None:
    async with running_switch(tmp_path, **SWITCH) as h, admin_api(h) as api:
        await onboard(h, api)
        # The operator's switch.toml: the same ledger and admin API the running switch uses.
        toml = tmp_path / "switch.toml"
        lc, ac = h.config.ledger, h.config.admin
        toml.write_text(
            f'[ledger]\npath = "{lc.path}"\ncheckpoint_key_file = "{lc.checkpoint_key_file}"\n'
            f'[admin]\nenabled = true\nport = {h.ports.admin}\ntoken_env = "{ac.token_env}"\n'
        )
        renew = [sys.executable, "-m", "switch", "terminal-admin", "renew", "--id", TID, "--actor", "ops"]

        def subscriptions() -> list[Any]:
            return [d for d in mine(h) if d.kind is EntryKind.SUBSCRIPTION]

        assert len(subscriptions()) == 1  # the first period, paid at registration
        # While the switch runs, the command goes through its admin API: posted once, by its writer.
        done = await trio.run_process([*renew, "--config", str(toml)], capture_stdout=True)
        renewal = msgspec.json.decode(done.stdout)
        assert len(subscriptions()) == 2 and subscriptions()[-1].rrn == renewal["rrn"]
        audit = await call(api, "GET", f"/audit?object_kind=renewal&object_id={renewal['rrn']}")
        assert [(a["actor"], a["action"]) for a in audit] == [("ops", "renew")]
        # Forced offline, it would be a second writer: refused, naming the switch's ledger process.
        refused = await trio.run_process(
            [*renew, "--config", str(toml), "--offline"], capture_stderr=True, check=False
        )
        assert refused.returncode == 2
        assert b"already has a writer (pid" in refused.stderr and b"admin API" in refused.stderr
        assert len(subscriptions()) == 2
        # --api names the switch explicitly (no config at hand: the token is in $SWITCH_ADMIN_TOKEN).
        url = f"http://127.0.0.1:{h.ports.admin}"
        cancel = [sys.executable, "-m", "switch", "terminal-admin", "cancel-renewal", "--id", TID]
        done = await trio.run_process(
            [*cancel, "--rrn", renewal["rrn"], "--db", lc.path, "--api", url, "--actor", "ops"],
            capture_stdout=True,
            env={**os.environ, "SWITCH_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        assert msgspec.json.decode(done.stdout)["status"] == "refunded"
        refunds = [d for d in mine(h) if d.kind is EntryKind.SUBSCRIPTION_REFUND]
        assert [d.original_rrn for d in refunds] == [renewal["rrn"]]


@trio_test
async def test_merchant_services_on_a_postgres_ledger(tmp_path: Path, pg_dsn: str) -> None:  # noqa: F811
    """The same database holds the ledger and the registry on PostgreSQL too: onboarding through the
    API, the never-signed-on 58, activation, fee, status, and the scheduled deposit refund."""
    scheduled = {
        **SWITCH,
        "merchant_services": {"registry_poll_interval_ms": 100, "deposit_check_interval_s": 1},
    }
    ledger = {"backend": "postgres", "dsn": pg_dsn}
    async with running_switch(tmp_path, ledger=ledger, **scheduled) as h, admin_api(h) as api:
        cfg = await onboard(h, api)
        async with TerminalSim.connect(cfg) as term:
            assert (await term.purchase(card(ALPHA_BIN, 8), 700)).response_code == "58"
            assert (await term.sign_on()).response_code == "00"
            assert (await term.purchase(card(ALPHA_BIN, 8), 100)).response_code == "00"
            sale = await term.purchase(card(ALPHA_BIN, 8), 2_000)
            assert sale.response_code == "00"
        st = await call(api, "GET", f"/transactions/{sale.rrn}")
        assert (st["state"], st["fee_minor"]) == ("approved", fee_of(2_000))
        (by_stan,) = await call(api, "GET", f"/terminals/{TID}/stan/{sale.stan}")
        assert by_stan["rrn"] == sale.rrn
        with trio.fail_after(5):
            while (await call(api, "GET", f"/terminals/{TID}"))["deposit_outcome"] != "refunded":
                await trio.sleep(0.05)
        audit = await call(api, "GET", f"/audit?object_kind=terminal&object_id={TID}")
        assert ("switch:deposit-schedule", "deposit refunded") in [(a["actor"], a["action"]) for a in audit]

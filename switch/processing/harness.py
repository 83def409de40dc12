"""A deterministic driver that plays the server around the processing core, for tests, the
simulation and examples: an in-memory ledger with the real ledger's contract (idempotency keys,
balanced postings, refunds <= original, all-or-nothing posts), a store-and-forward table of armed /
queued / released reversals, and automatic RRN grants and original lookups. No I/O, no clock."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from switch.config import (
    AcquirerConfig,
    MerchantConfig,
    MerchantServicesConfig,
    ProcessingConfig,
    SwitchConfig,
    TerminalConfig,
)
from switch.ledger.model import Entry, EntryDraft, EntryKind, Side, check_balanced
from switch.merchant.model import DAY_MS, Contract, Merchant, Rate, Terminal, TerminalState
from switch.merchant.rules import MerchantRules
from switch.processing import (
    AcquirerAnswered,
    ConfigDirectory,
    FindOriginal,
    HmacPanHasher,
    LedgerCommitted,
    LedgerFailed,
    Log,
    OriginalFound,
    Post,
    PrefixRouter,
    Processor,
    QueueAdvice,
    QueueReversal,
    RecordLifecycle,
    Recovered,
    ReleaseReversal,
    Reply,
    ReserveRrns,
    RrnsReserved,
    SendToAcquirer,
    TerminalRequest,
)

NOW_MS = 1_749_988_800_000  # 2025-06-15 12:00:00 UTC
PAN = "4111111111111111"
PAN_C = "5555555555554444"
PAN_NOROUTE = "6011000990139424"
PIN_BLOCK = "0123456789ABCDEF"


class FakeLedger:
    """Contract of switch.ledger: all-or-nothing posts, idempotent keys, balanced postings, refunds never
    above the original minus earlier (unreversed) refunds."""

    def __init__(self) -> None:
        self.entries: list[EntryDraft] = []
        self.by_key: dict[str, EntryDraft] = {}
        self.fail: Callable[[tuple[EntryDraft, ...]], bool] = lambda drafts: False

    def commit(self, drafts: tuple[EntryDraft, ...]) -> tuple[bool, bool, str]:
        """(ok, conflict, error)."""
        if self.fail(drafts):
            return False, False, "disk on fire"
        fresh = []
        for d in drafts:
            old = self.by_key.get(d.idempotency_key)
            if old is not None:
                if old != d:
                    return False, True, f"idempotency conflict on {d.idempotency_key}"
                continue
            check_balanced(d.postings)
            fresh.append(d)
        trial = self.entries + fresh
        for d in fresh:
            if (
                d.kind is EntryKind.REFUND
                and d.original_rrn
                and refunded(trial, d.original_rrn) > original_amount(trial, d.original_rrn)
            ):
                return False, False, "refund above original"
        for d in fresh:
            self.entries.append(d)
            self.by_key[d.idempotency_key] = d
        return True, False, ""

    def find(self, rrn: str | None = None, key: str | None = None) -> tuple[EntryDraft, ...]:
        if key is not None:
            hit = self.by_key.get(key)
            if hit is None:
                return ()
            rrn = hit.rrn
        fee = f"{rrn}/fee"  # the original's fee family comes with it (docs/flows.md, FindOriginal)
        return tuple(
            d for d in self.entries if rrn in (d.rrn, d.original_rrn) or fee in (d.rrn, d.original_rrn)
        )

    def balances(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = defaultdict(int)
        for d in self.entries:
            for p in d.postings:
                out[(p.account, p.currency)] += p.amount_minor if p.side is Side.DEBIT else -p.amount_minor
        return {k: v for k, v in out.items() if v}

    def kinds(self, rrn: str) -> list[EntryKind]:
        return [d.kind for d in self.entries if rrn in (d.rrn, d.original_rrn)]


def original_amount(entries: Iterable[EntryDraft], rrn: str) -> int:
    for d in entries:
        if (
            d.rrn == rrn
            and d.kind in (EntryKind.PURCHASE, EntryKind.CAPTURE, EntryKind.STAND_IN)
            and d.idempotency_key.endswith(":out")
        ):
            return d.amount_minor
    return 0


def refunded(entries: Iterable[EntryDraft], original_rrn: str) -> int:
    entries = list(entries)
    reversed_rrns = {d.original_rrn for d in entries if d.kind is EntryKind.REVERSAL}
    return sum(
        d.amount_minor
        for d in entries
        if d.kind is EntryKind.REFUND
        and d.original_rrn == original_rrn
        and d.idempotency_key.endswith(":out")
        and d.rrn not in reversed_rrns
    )


def make_config(**processing: Any) -> SwitchConfig:
    return SwitchConfig(
        acquirers=[
            AcquirerConfig(name="A", backup="B", request_timeout_ms=5_000),
            AcquirerConfig(name="B", request_timeout_ms=5_000),
            AcquirerConfig(name="C", request_timeout_ms=5_000, stand_in_floor_minor=5_000),
        ],
        merchants=[MerchantConfig(id="M1", currency="978"), MerchantConfig(id="M2", currency="978")],
        terminals=[
            TerminalConfig(id="T1", merchant_id="M1"),
            TerminalConfig(id="T2", merchant_id="M1"),
            TerminalConfig(id="T3", merchant_id="M2"),
        ],
        processing=ProcessingConfig(**processing),
    )


def fin(
    mti: str = "0200",
    pc: str = "000000",
    amount: int = 1_000,
    stan: int = 1,
    tid: str = "T1",
    mid: str = "M1",
    pan: str = PAN,
    time: str = "120000",
    date: str = "0615",
    **extra: str,
) -> dict[str, str]:
    f = {
        "t": mti,
        "2": pan,
        "3": pc,
        "4": f"{amount:012d}",
        "11": f"{stan:06d}",
        "12": time,
        "13": date,
        "14": "2712",
        "22": "051",
        "25": "00",
        "41": tid,
        "42": mid,
        "49": "978",
    }
    f.update(extra)
    return {k: v for k, v in f.items() if v != ""}


class Driver:
    """Plays the server: feeds events, carries decisions out, remembers what went where."""

    def __init__(
        self,
        config: SwitchConfig | None = None,
        *,
        auto_ledger: bool = True,
        router: Any = None,
        rules: Any = None,
        ledger: FakeLedger | None = None,
        rrn_start: int = 1,
        grant_rrns: bool = True,
        recover: Recovered | None = None,
        directory: Any = None,
    ) -> None:
        self.config = config or make_config()
        self.proc = Processor(
            self.config,
            directory=directory or ConfigDirectory(self.config.terminals, self.config.merchants),
            router=router or PrefixRouter({"411111": "A", "555555": "C"}),
            pan_hasher=HmacPanHasher(b"k" * 32),
            rules=rules,
        )
        self.ledger = ledger or FakeLedger()
        self.auto_ledger = auto_ledger
        self.now_ms = NOW_MS
        self.next_rrn = rrn_start
        self.grant_rrns = grant_rrns
        self.replies: list[Reply] = []
        self.sent: dict[int, SendToAcquirer] = {}
        self.saf: dict[tuple[str, str], str] = {}
        self.reversals: list[QueueReversal] = []
        self.advices: list[QueueAdvice] = []
        self.logs: list[Log] = []
        self.lifecycle: list[RecordLifecycle] = []
        self.pending_posts: list[Post] = []
        self.all: list[Any] = []
        recover = recover or Recovered(now_ms=self.now_ms)
        for a in recover.armed:
            self.saf[(a.acquirer, a.rrn)] = "armed"
        self.run(recover)

    # --- plumbing ---------------------------------------------------------------------------------
    def run(self, event: Any) -> list[Any]:
        queue = [event]
        produced: list[Any] = []
        while queue:
            for d in self.proc.handle(queue.pop(0)):
                produced.append(d)
                self.all.append(d)
                if isinstance(d, Post):
                    if self.auto_ledger:
                        queue.append(self.ledger_result(d))
                    else:
                        self.pending_posts.append(d)
                elif isinstance(d, FindOriginal):
                    queue.append(
                        OriginalFound(d.txn_id, self.ledger.find(d.rrn, d.idempotency_key), self.now_ms)
                    )
                elif isinstance(d, ReserveRrns) and self.grant_rrns:
                    queue.append(RrnsReserved(self.next_rrn, d.count))
                    self.next_rrn += d.count
                elif isinstance(d, Reply):
                    self.replies.append(d)
                elif isinstance(d, SendToAcquirer):
                    self.sent[d.txn_id] = d
                    if d.reversal is not None:
                        self.saf[(d.acquirer, d.fields["37"])] = "armed"
                elif isinstance(d, QueueReversal):
                    self.saf[(d.acquirer, d.rrn)] = "queued"
                    self.reversals.append(d)
                elif isinstance(d, ReleaseReversal):
                    assert self.saf.get((d.acquirer, d.rrn)) == "armed", (
                        d,
                        self.saf.get((d.acquirer, d.rrn)),
                    )
                    self.saf[(d.acquirer, d.rrn)] = "released"
                elif isinstance(d, QueueAdvice):
                    self.advices.append(d)
                elif isinstance(d, Log):
                    self.logs.append(d)
                elif isinstance(d, RecordLifecycle):
                    self.lifecycle.append(d)
        return produced

    def ledger_result(self, post: Post) -> LedgerCommitted | LedgerFailed:
        ok, conflict, error = self.ledger.commit(post.drafts)
        if ok:
            return LedgerCommitted(
                post.txn_id, tuple(Entry(seq=i, draft=d) for i, d in enumerate(post.drafts)), self.now_ms
            )
        return LedgerFailed(post.txn_id, error, self.now_ms, conflict=conflict)

    def commit_pending(self) -> list[Any]:
        out: list[Any] = []
        while self.pending_posts:
            out += self.run(self.ledger_result(self.pending_posts.pop(0)))
        return out

    # --- terminal and acquirer --------------------------------------------------------------------
    def request(self, fields: dict[str, str], conn: int = 1) -> list[Reply]:
        before = len(self.replies)
        self.run(TerminalRequest(conn, "terminal_ascii", fields, self.now_ms))
        return self.replies[before:]

    def last_sent(self) -> SendToAcquirer:
        return list(self.sent.values())[-1]

    def answer(self, send: SendToAcquirer, rc: str = "00", auth: str = "A1B2C3", **extra: str) -> list[Reply]:
        before = len(self.replies)
        f = {
            "t": "0" + send.fields["t"][1] + "10",
            "11": "000777",
            "37": send.fields["37"],
            "39": rc,
            "41": send.fields["41"],
        }
        if auth:
            f["38"] = auth
        f.update(extra)
        self.run(AcquirerAnswered(send.txn_id, f, self.now_ms))
        return self.replies[before:]

    def approve(self, fields: dict[str, str], conn: int = 1) -> Reply:
        """A request that goes to the acquirer and is approved; returns the terminal's answer."""
        self.request(fields, conn)
        replies = self.answer(self.last_sent())
        assert len(replies) == 1 and replies[0].fields["39"] == "00", replies
        return replies[0]

    def one(self, replies: list[Reply]) -> dict[str, Any]:
        assert len(replies) == 1, replies
        return replies[0].fields


def fee_merchant_rules(deposit_minor: int) -> MerchantRules:
    """Merchant services with one fee-charging merchant: M1 (EUR) on a contract of visa 1.5% + 0.10
    (else 1%), terminal T1 active and paid for a year, `deposit_minor` held for M1 -- the merchant of
    bench/processing.py and the memory tests, so fees, fee refunds and fee reversals all occur."""
    far = NOW_MS + 365 * DAY_MS
    rules = MerchantRules(
        MerchantServicesConfig(),
        merchants=[Merchant(id="M1", name="Shop", mcc="5411", currency="978", contract_id="c1")],
        contracts=[
            Contract(
                id="c1",
                merchant_id="M1",
                currency="978",
                rates={"default": Rate(bps=100), "visa": Rate(bps=150, fixed_minor=10)},
            )
        ],
        terminals=[
            Terminal(
                id="T1",
                merchant_id="M1",
                paid_until_ms=far,
                state=TerminalState.ACTIVE,
                signed_on_at_ms=1,
                activated_at_ms=1,
                live_at_ms=1,
            )
        ],
    )
    rules.recover({("M1", "978"): deposit_minor}, {})
    return rules

"""No card data or key at rest or in text, suite-level: run real flows through the whole switch over TCP
(sign-on, purchases carrying track 2, PIN block and ICC data, a timeout whose reversal stays queued, a
timeout whose reversal is delivered, a late answer, a garbage answer, an undecodable request, a bad MAC,
a duplicate, a stand-in approval whose advice stays queued), with every logger at DEBUG; then scan every
file the switch wrote (ledger database and WAL, store-and-forward, armed reversals, RRN file, the log
file) while it runs and again after it stopped, every log record, and the /metrics text, for full PANs
(ASCII, ASCII-hex, BCD), track 2, PIN blocks, ICC data and key bytes (terminal master keys, the working
keys sign-on delivered, the KEK and the ledger's keys). It must find none."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from switch.codec import keys as keymod
from switch.server.testbed import ALPHA_BIN, BETA_BIN, card
from switch.sim.terminal import TerminalSim
from tests.e2e.harness import Harness, running_switch, trio_test

PIN_BLOCK = "0412AC89ABCDEF67"
ICC = "9F2608A1B2C3D4E5F607189F2701809F100706010A03A00000950500000000005F2A0209789A03260508"
DISCRETIONARY = "2011758928889"  # track 2 after the expiry: service code + discretionary data
EXPIRY = "3012"

APPROVED = card(ALPHA_BIN, 101)
QUEUED = card(ALPHA_BIN, 102)  # no answer to the 0200 nor to its reversals: stays in store-and-forward
DELIVERED = card(BETA_BIN, 103)  # no answer to the 0200; its reversal is delivered and completed
LATE = card(BETA_BIN, 104)
GARBAGE = card(ALPHA_BIN, 105)
BAD_LUHN = ALPHA_BIN + "0000001060"  # fails the check digit: declined before routing
UNDECODABLE = card(ALPHA_BIN, 107)
BAD_MAC = card(ALPHA_BIN, 108)
DUPLICATE = card(ALPHA_BIN, 109)
STAND_IN = card(ALPHA_BIN, 110)
OVER_FLOOR = card(ALPHA_BIN, 111)
PANS = [
    APPROVED,
    QUEUED,
    DELIVERED,
    LATE,
    GARBAGE,
    BAD_LUHN,
    UNDECODABLE,
    BAD_MAC,
    DUPLICATE,
    STAND_IN,
    OVER_FLOOR,
]
#: Files the test bed wrote for the switch (its secrets, by design); everything else the switch wrote.
INPUT_FILES = {"kek.hex", "checkpoint.key", "pan_hash.key"}


def track2(pan: str, sep: str = "=") -> str:
    return f"{pan}{sep}{EXPIRY}{DISCRETIONARY}"


class Secrets:
    """Everything that must never be found, as text needles and as byte needles."""

    def __init__(self) -> None:
        self.text: dict[str, str] = {}  # needle -> what it is
        self.raw: dict[bytes, str] = {}

    def pan(self, pan: str) -> None:
        self.text[pan] = f"PAN {pan[:6]}..{pan[-4:]}"
        self.text[pan[6:]] = f"PAN digits after the BIN of {pan[:6]}..{pan[-4:]}"
        self.text[pan.encode().hex()] = f"ASCII-hex PAN {pan[:6]}..{pan[-4:]}"
        self.raw[bytes.fromhex(pan if len(pan) % 2 == 0 else pan + "F")] = f"BCD PAN {pan[:6]}..{pan[-4:]}"

    def secret_hex(self, hex_text: str, what: str) -> None:
        self.text[hex_text.upper()] = what
        self.text[hex_text.lower()] = what
        self.raw[bytes.fromhex(hex_text)] = f"raw {what}"

    def found_in_text(self, text: str) -> list[str]:
        return sorted({what for needle, what in self.text.items() if needle in text})

    def found_in_bytes(self, data: bytes) -> list[str]:
        hits = {what for needle, what in self.raw.items() if needle in data}
        low = data.lower()
        hits |= {what for needle, what in self.text.items() if needle.lower().encode() in low}
        return sorted(hits)


class Capture(logging.Handler):
    """Every record, kept whole: the formatted line, and the raw args and extras a structured
    handler would serialise."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
        self.texts.append(f"{self.format(record)} | args={record.args!r} | extras={extras!r}")


_STANDARD_ATTRS = set(logging.LogRecord("x", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


@pytest.fixture
def debug_logs(tmp_path: Path) -> Iterator[tuple[Capture, Path]]:
    root = logging.getLogger()
    old_level = root.level
    capture = Capture()
    log_file = tmp_path / "logs" / "switch.log"
    log_file.parent.mkdir(parents=True)
    to_file = logging.FileHandler(log_file)
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(capture)
    root.addHandler(to_file)
    root.setLevel(logging.DEBUG)
    try:
        yield capture, log_file
    finally:
        root.removeHandler(capture)
        root.removeHandler(to_file)
        to_file.close()
        root.setLevel(old_level)


async def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


async def metrics_text(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := await stream.receive_some(65536):
            body += chunk
    return body.decode()


def card_fields(pan: str, amount_minor: int, *, sep: str = "=") -> dict[str, str]:
    """A chip-and-PIN purchase: PAN, expiry, track 2 (separator "=", or "D" where BCD), PIN, ICC."""
    fields = {
        "t": "0200",
        "2": pan,
        "3": "000000",
        "4": f"{amount_minor:012d}",
        "14": EXPIRY,
        "22": "051",
        "25": "00",
        "49": "978",
        "52": PIN_BLOCK,
        "55": ICC,
        "35": track2(pan, sep),
    }
    return fields


async def sign_on(stack: AsyncExitStack, h: Harness, index: int, secrets: Secrets) -> TerminalSim:
    """A signed-on terminal; the working keys its sign-on delivered join the secrets."""
    term = await stack.enter_async_context(TerminalSim.connect(h.terminal_config(index)))
    r = await term.sign_on()
    assert r.response_code == "00", r
    t = h.terminals[index]
    keys = keymod.parse_signon_field(bytes.fromhex(t.master_key_hex), r.answer["62"])
    secrets.secret_hex(keys.pin_key.value.hex(), f"PIN working key of {t.terminal_id}")
    secrets.secret_hex(keys.mac_key.value.hex(), f"MAC working key of {t.terminal_id}")
    return term


def switch_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in INPUT_FILES)


def scan(directory: Path, secrets: Secrets, capture: Capture, metrics: str | None) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in switch_files(directory):
        hits = secrets.found_in_bytes(path.read_bytes())
        if hits:
            found[str(path.relative_to(directory))] = hits
    for i, text in enumerate(capture.texts):
        hits = secrets.found_in_text(text)
        if hits:
            found[f"log record {i}: {text[:300]}"] = hits
    if metrics is not None:
        body = metrics.split("\r\n\r\n", 1)[1]
        hits = secrets.found_in_text(body)
        if re.search(r"(?<![\d.])\d{12,19}(?![\d.])", body):
            hits.append("a 12-19 digit run")
        if hits:
            found["/metrics"] = hits
    return found


def base_secrets(h: Harness) -> Secrets:
    s = Secrets()
    for pan in PANS:
        s.pan(pan)
        s.text[f"{EXPIRY}{DISCRETIONARY}"] = "track 2 expiry and discretionary data"
        s.text[DISCRETIONARY] = "track 2 discretionary data"
    s.secret_hex(PIN_BLOCK, "PIN block")
    s.secret_hex(ICC, "ICC data")
    for t in h.terminals:
        s.secret_hex(t.master_key_hex, f"master key of {t.terminal_id}")
    for name, what in (
        ("kek.hex", "KEK"),
        ("checkpoint.key", "checkpoint key"),
        ("pan_hash.key", "PAN hash key"),
    ):
        s.secret_hex((h.directory / name).read_text().strip(), what)
    return s


@trio_test
async def test_flows_leave_no_card_data_or_keys_in_files_logs_or_metrics(
    tmp_path: Path, debug_logs: tuple[Capture, Path]
) -> None:
    capture, _ = debug_logs
    sims = {
        "alpha": {
            "card_faults": {QUEUED: "no_answer", GARBAGE: "garbage"},
            "fault_mtis": ["0100", "0200", "0400", "0401"],
        },
        "beta": {"card_faults": {DELIVERED: "no_answer", LATE: "late"}, "late_ms": 600},
    }
    async with (
        running_switch(tmp_path / "run", sims=sims, metrics_enabled=True) as h,
        AsyncExitStack() as stack,
    ):
        secrets = base_secrets(h)
        ascii_term = await sign_on(stack, h, 0, secrets)
        packed_index = next(i for i, t in enumerate(h.terminals) if t.listener == "packed")
        packed_term = await sign_on(stack, h, packed_index, secrets)
        for term, sep in ((ascii_term, "="), (packed_term, "D")):
            ok = await term.exchange(card_fields(APPROVED, 1_000, sep=sep), "purchase")
            assert ok.response_code == "00", ok
        no_pan_field = {k: v for k, v in card_fields(APPROVED, 1_100).items() if k != "2"}
        assert (await ascii_term.exchange(no_pan_field, "purchase")).response_code == "00"
        assert (await ascii_term.exchange(card_fields(QUEUED, 2_000), "purchase")).response_code == "68"
        assert (
            await packed_term.exchange(card_fields(DELIVERED, 3_000, sep="D"), "purchase")
        ).response_code == "68"
        assert (await ascii_term.exchange(card_fields(LATE, 4_000), "purchase")).response_code == "68"
        garbage = await ascii_term.exchange(card_fields(GARBAGE, 5_000), "purchase")
        assert garbage.response_code != "00"
        bad = await ascii_term.exchange(card_fields(BAD_LUHN, 6_000), "purchase")
        assert bad.response_code == "14"
        fields = {**card_fields(DUPLICATE, 7_000), "12": "101010", "13": "0102"}
        assert (await ascii_term.exchange(fields, "purchase", stan="004242")).response_code == "00"
        assert (await ascii_term.exchange(fields, "purchase", stan="004242")).response_code == "94"
        # an undecodable request that starts like a purchase (MTI, bitmap, PAN, ...) on its own link
        async with TerminalSim.connect(h.terminal_config(1)) as raw_term:
            payload = raw_term.wire.encode(card_fields(UNDECODABLE, 8_000) | {"11": "000777"}, None)
            await raw_term.stream.send_all(raw_term.wire.frame(payload[:-7], raw_term.tpdu))
            await trio.sleep(0.3)
        async with TerminalSim.connect(h.terminal_config(2)) as mac_term:
            assert (await mac_term.sign_on()).response_code == "00"
            mac_term.wrong_mac = True
            bad_mac = await mac_term.exchange(card_fields(BAD_MAC, 9_000), "purchase")
            assert bad_mac.response_code == "A0"
        beta = h.sims["beta"].records
        await wait_for(lambda: len(beta.reversals) >= 2)  # DELIVERED's and LATE's, via SAF
        await trio.sleep(0.8)  # the late answer arrives and is dropped; QUEUED's 0401s go unanswered
        metrics = await metrics_text(h.ports.metrics)
        assert "switch_transactions_total" in metrics
        running = scan(h.directory, secrets, capture, metrics)
        written = [p.name for p in switch_files(h.directory)]
    assert {"ledger.db", "saf.db", "armed.db", "rrn.hwm"} <= set(written), written
    assert any(p.name == "switch.log" for p in switch_files(tmp_path))
    assert "saf.db-wal" in written or "ledger.db-wal" in written  # scanned while the WAL files live
    assert _pending_saf(h) == 2  # QUEUED's and GARBAGE's reversals (alpha never answers them), sealed
    assert len(capture.texts) > 20 and any(" DEBUG " in t for t in capture.texts)
    stopped = scan(tmp_path, secrets, capture, None)
    assert running == {} and stopped == {}, {"while running": running, "after stop": stopped}


def _pending_saf(h: Harness) -> int:
    import sqlite3

    conn = sqlite3.connect(h.config.store_forward.path)
    try:
        return int(conn.execute("SELECT count(*) FROM saf_item WHERE completed_ms IS NULL").fetchone()[0])
    finally:
        conn.close()


@trio_test
async def test_stand_in_advice_queued_while_acquirer_down_leaves_no_card_data(
    tmp_path: Path, debug_logs: tuple[Capture, Path]
) -> None:
    capture, _ = debug_logs
    overrides = {"alpha": {"stand_in_floor_minor": 5_000}}
    async with (
        running_switch(
            tmp_path / "run",
            sims={"beta": {}},
            wait_up=False,
            acquirer_overrides=overrides,
            extra_acquirers={"alpha": 0},
            metrics_enabled=True,
        ) as h,
        AsyncExitStack() as stack,
    ):
        secrets = base_secrets(h)
        await wait_for(lambda: h.sims["beta"].records.sign_ons >= 2)
        term = await sign_on(stack, h, 0, secrets)
        small = await term.exchange(card_fields(STAND_IN, 4_000), "purchase")
        big = await term.exchange(card_fields(OVER_FLOOR, 6_000), "purchase")
        assert small.response_code == "00" and big.response_code == "91"
        await trio.sleep(0.3)
        metrics = await metrics_text(h.ports.metrics)
        running = scan(h.directory, secrets, capture, metrics)
    assert _pending_saf(h) == 1  # the stand-in advice, owed to the acquirer that is down
    stopped = scan(tmp_path, secrets, capture, None)
    assert running == {} and stopped == {}, {"while running": running, "after stop": stopped}


def test_the_scan_finds_each_form_a_leak_can_take(tmp_path: Path) -> None:
    """The leak tests above pass because nothing leaks, not because the scan is blind."""
    s = Secrets()
    s.pan(APPROVED)
    s.secret_hex(PIN_BLOCK, "PIN block")
    s.text[DISCRETIONARY] = "track 2 discretionary data"
    assert s.found_in_text(f"fields {{'2': '{APPROVED}'}}")
    assert s.found_in_text(f"frame 0200...{APPROVED.encode().hex().upper()}...")  # ASCII-profile hex dump
    assert s.found_in_text(f"frame 0200...{APPROVED}D{EXPIRY}{DISCRETIONARY}...")  # BCD hex dump
    assert s.found_in_text(f"pin={PIN_BLOCK.lower()}")
    assert not s.found_in_text(f"pan={APPROVED[:6]}******{APPROVED[-4:]}")  # masked is allowed
    assert s.found_in_bytes(b"\x00\x01" + bytes.fromhex(APPROVED) + b"\x02")  # BCD in a binary file
    assert s.found_in_bytes(b"xx" + bytes.fromhex(PIN_BLOCK))
    assert s.found_in_bytes(f'{{"2":"{APPROVED}"}}'.encode())

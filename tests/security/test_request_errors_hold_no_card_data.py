"""Exceptions that a malicious or broken terminal request can trigger in the processing core
(switch.processing) and in merchant services (switch.merchant) carry no card data, and neither does
anything the core hands on because of them: operator log decisions, ledger drafts (a decline is posted
with its reason), decision reprs.

As in tests/security/test_codec_errors_hold_no_card_data.py, "carry" means anywhere: str(), repr(),
every attribute, `__dict__`, `args`, the `__cause__`/`__context__` chain, `__notes__`, and a pickle.
Every exception of a `switch.*` type raised while a request is processed is caught in flight (a trace
function sees it even when the core catches it, as it does Decline) and walked. Card data is planted
where a broken or hostile terminal would put it: an almost-PAN in field 2, a PAN in the merchant id
(a 15-digit card fits field 42), track 2 without a separator or with a bad expiry, a PIN block and ICC
data alongside, and a field value of the wrong type (the core's contained-bug path)."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import msgspec
import pytest

from switch.processing import PrefixRouter
from switch.processing.request import Decline, check_card, parse
from tests.processing.test_merchant_services import world
from tests.security.reachable import walk

PAN = "4761739001010119"  # Luhn-valid, routed to acquirer A below
AMEX = "378282246310005"  # Luhn-valid, 15 digits: fits the merchant id (42)
DISCRETIONARY = "2011758928889"  # track 2 after the expiry: service code + discretionary data (CVV)
PIN_BLOCK = "0412AC89ABCDEF67"
ICC = "9F2608A1B2C3D4E5F607189F2701809F1007"
NOW_MS = 1_749_988_800_000

#: What must never show: the middle digits of each PAN (masking keeps BIN + last 4 at most), whole
#: PANs, track 2 discretionary data, PIN block, ICC data.
SECRETS = (PAN, PAN[6:-4], AMEX, AMEX[6:-4], DISCRETIONARY, PIN_BLOCK, ICC)


def leaks(texts: list[str]) -> list[tuple[str, str]]:
    return [(s, t[:200]) for t in texts for s in SECRETS if s.upper() in t.upper()]


def exception_texts(exc: BaseException) -> list[str]:
    texts = [str(exc), repr(exc)]
    for value in walk(exc):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, bytes | bytearray):
            texts += [bytes(value).hex(), bytes(value).decode("latin-1")]
        elif value is not exc and not isinstance(value, int | float | bool | type(None)):
            texts.append(repr(value))
    try:
        data = pickle.dumps(exc)
        texts += [data.hex(), data.decode("latin-1")]
    except (TypeError, pickle.PicklingError, AttributeError):
        pass  # not picklable: cannot travel that way either
    return texts


class InFlight:
    """Every exception of a switch.* type raised while the block runs, caught or not."""

    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "exception":
            exc = arg[1]
            if type(exc).__module__.startswith("switch.") and all(exc is not e for e in self.seen):
                self.seen.append(exc)
        return self._trace

    def __enter__(self) -> InFlight:
        self._old = sys.gettrace()
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._old)


def base(**extra: Any) -> dict[str, Any]:
    f = {
        "t": "0200",
        "2": PAN,
        "3": "000000",
        "4": "000000001000",
        "11": "000001",
        "12": "120000",
        "13": "0615",
        "14": "2712",
        "22": "051",
        "25": "00",
        "41": "T1",
        "42": "M1",
        "49": "978",
        "52": PIN_BLOCK,
        "55": ICC,
    }
    f.update(extra)
    return {k: v for k, v in f.items() if v is not None}


#: (name, request fields): each broken or hostile in one way; card data planted around it.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("pan with a letter", base(**{"2": PAN + "X"})),
    ("pan failing Luhn", base(**{"2": PAN[:-1] + "8"})),
    ("pan too long", base(**{"2": PAN + "0000"})),
    ("track 2 without separator", base(**{"2": None, "14": None, "35": PAN + "3012" + DISCRETIONARY})),
    ("track 2 with a bad expiry", base(**{"2": None, "14": None, "35": f"{PAN}=9913{DISCRETIONARY}"})),
    ("track 2 of an expired card", base(**{"2": None, "14": None, "35": f"{PAN}=2001{DISCRETIONARY}"})),
    ("track 2 in field 2", base(**{"2": f"{PAN}=3012{DISCRETIONARY}"})),
    ("card in the merchant id", base(**{"42": AMEX})),
    (
        "card in the terminal id of a sign-on",
        {"t": "0800", "11": "000002", "41": AMEX[:8], "42": AMEX, "70": "001"},
    ),
    ("unsupported processing code", base(**{"3": "990000"})),
    ("amount not numeric", base(**{"4": PAN[:11] + "X"})),
    ("currency not numeric", base(**{"49": "97X"})),
    ("MCC of another merchant", base(**{"18": "7995"})),
    ("refund of an unknown original", base(**{"3": "200000", "37": "000000999999"})),
    ("void naming its original by field 90 only", base(**{"3": "020000", "90": "0200000001" + "0" * 32})),
    ("amount of the wrong type", base(**{"4": 1000})),
    ("pan of the wrong type", base(**{"2": int(PAN)})),
    ("expiry of the wrong type", base(**{"14": 2712})),
]


@pytest.mark.parametrize(("name", "fields"), CASES, ids=[c[0] for c in CASES])
def test_parse_and_card_checks_raise_clean_declines(name: str, fields: dict[str, Any]) -> None:
    raised: list[BaseException] = []
    try:
        check_card(parse(dict(fields)), NOW_MS, 10**9)
    except Exception as exc:  # any exception is what we inspect
        raised.append(exc)
    for exc in raised:
        assert not leaks(exception_texts(exc)), (name, type(exc).__name__, leaks(exception_texts(exc)))
    if name.startswith(("pan ", "track 2", "amount", "currency", "unsupported")):
        assert raised and isinstance(raised[0], Decline), (name, raised)  # refused, and cleanly


@pytest.mark.parametrize(("name", "fields"), CASES, ids=[c[0] for c in CASES])
def test_the_core_with_merchant_rules_hands_on_no_card_data(name: str, fields: dict[str, Any]) -> None:
    sw, _ = world(router=PrefixRouter({"476173": "A", "378282": "B"}))
    with InFlight() as flight:
        replies = sw.request(dict(fields))
        for send in list(sw.sent.values()):  # whatever reached an acquirer is declined there
            replies += sw.answer(send, rc="05", auth="")
    assert replies, name  # every request is answered
    texts: list[str] = []
    for exc in flight.seen:
        texts += exception_texts(exc)
    texts += [log.text for log in sw.logs]
    texts += [repr(d) for d in sw.all]
    for draft in sw.ledger.entries:  # what would be posted (and kept for ever)
        texts += [v for v in walk(msgspec.to_builtins(draft)) if isinstance(v, str)]
    found = leaks(texts)
    assert not found, (name, found)


def test_the_trace_sees_declines_the_core_catches() -> None:
    """The in-flight capture works: a format error the core catches and answers 30 is seen."""
    sw, _ = world(router=PrefixRouter({"476173": "A"}))
    with InFlight() as flight:
        (reply,) = sw.request(base(**{"2": PAN + "X"}))
    assert reply.fields["39"] == "30"
    assert any(isinstance(e, Decline) and e.reason == "field 2 must be numeric" for e in flight.seen)


# --- merchant registry validation and the simulators: a card number pasted in the wrong place ---------


def test_contract_validation_does_not_echo_a_pan_pasted_as_a_bin_class_or_card_type() -> None:
    from switch.merchant.model import Contract, Rate, RegistryError, validate_contract

    cases = [
        ({"default": Rate(bps=100)}, {PAN: "visa"}, "bin class prefix of 16 characters (16 digits) must be"),
        ({"default": Rate(bps=100)}, {"476173": AMEX}, "bin class card type of 15 characters"),
        (
            {"default": Rate(bps=100), PAN: Rate(bps=1)},
            {},
            "card type of 16 characters (16 digits) malformed",
        ),
        ({"default": Rate(bps=100)}, {f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]}": "visa"}, "bin class prefix of 14"),
    ]
    for rates, bins, message in cases:
        contract = Contract(id="c1", merchant_id="M1", currency="978", rates=rates, bin_classes=bins)
        with pytest.raises(RegistryError) as info:
            validate_contract(contract)
        assert message in str(info.value)
        assert not leaks(exception_texts(info.value)), leaks(exception_texts(info.value))
    ok = Contract(id="c1", merchant_id="M1", currency="978", rates={"default": Rate(bps=1)},
                  bin_classes={"47617390": "visa"})  # fmt: skip
    assert validate_contract(ok) is ok  # 6-11 digit prefixes are still taken


def test_simulator_configs_repr_hides_keys_and_cards() -> None:
    from switch.sim.acquirer import AcquirerSimConfig, Fault
    from switch.sim.terminal import TerminalSimConfig

    key, tmk = "0123456789ABCDEFFEDCBA9876543210", "239E9176D6080DAE1F57CDF449465204"
    acq = AcquirerSimConfig(
        mac_key_hex=key, declined_pans=[PAN], balances={AMEX: 5}, card_faults={PAN: Fault.NO_ANSWER}
    )
    term = TerminalSimConfig(mac_key_hex=key, master_key_hex=tmk)
    for text in (repr(acq), str(acq), repr(term), str(term), repr([acq, term]), f"{acq} {term}"):
        assert key not in text and tmk not in text, text
        assert not leaks([text]), text
    assert "mac=on" in repr(acq) and "476173******0119" in repr(acq)
    assert "keys=mac+master" in repr(term)


def test_terminal_amount_errors_do_not_echo_a_card_number() -> None:
    from switch.sim.terminal import parse_amount

    for typed in (PAN, f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}", f"{PAN}.5", f"-{AMEX}"):
        with pytest.raises(ValueError) as info:
            parse_amount(typed)
        assert not leaks(exception_texts(info.value)), (typed, str(info.value))
    with pytest.raises(ValueError, match=r"amount '1\.234' has more than 2 decimals"):
        parse_amount("1.234")  # a plain amount is still quoted


def test_a_request_repr_and_an_expired_card_decline_hold_no_card_data() -> None:
    """A parsed request's repr shows the PAN masked; the expired-card decline (logged, and kept for
    ever as the decline entry's memo) does not carry the card's expiry date."""
    req = parse(dict(base(**{"14": "2001"})))
    assert PAN not in repr(req) and PAN[:6] in repr(req)
    with pytest.raises(Decline) as info:
        check_card(req, NOW_MS, 10**9)
    assert not leaks(exception_texts(info.value))
    assert "2001" not in str(info.value) and "01/20" not in str(info.value)

"""Card data and keys never reach text: the reprs of the processing core's events and decisions (which
carry whole field dicts), the server's log gate for the core's Log decisions, free-text scrubbing of
track 2, and the reprs of everything that holds a key (and the refusal of an acquirer link's MAC key
in clear in the config). Each test here was written for a leak found by reading the code (see the audit in the
commit message)."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any

import pytest

from switch.codec.keys import Kek, SecretKey, WorkingKeys
from switch.codec.mac import DesMacKey, RetailMacKey
from switch.codec.masking import masked_repr, scrub_text
from switch.codec.sealing import FieldSealer
from switch.config import AcquirerConfig, ConfigError, load_config
from switch.processing import decisions as d
from switch.processing import events as ev
from switch.processing.ports import HmacPanHasher
from switch.server.core import SwitchCore

PAN = "4761739001010119"
DISCRETIONARY = "2011438780890"
TRACK2 = f"{PAN}=2512{DISCRETIONARY}"
TRACK2_BCD_HEX = f"{PAN}D2512{DISCRETIONARY}F"
PIN_BLOCK = "0412AC89ABCDEF12"
ICC = "9F2608A1B2C3D4E5F607189F2701809F1007"
REQUEST = {"t": "0200", "2": PAN, "4": "000000001000", "35": TRACK2, "52": PIN_BLOCK, "55": ICC}
CARD_SECRETS = (PAN, PAN[6:], TRACK2, DISCRETIONARY, PIN_BLOCK, PIN_BLOCK.lower(), ICC)

OBJECTS: list[Any] = [
    ev.TerminalRequest(1, "terminal_ascii", REQUEST, 0),
    ev.AcquirerAnswered(1, {**REQUEST, "t": "0210", "39": "00"}, 0),
    ev.AcquirerUnavailable(1, REQUEST, 0, f"link refused {PAN}"),
    ev.ArmedReversal("alpha", "000000000001", REQUEST),
    ev.Recovered(now_ms=0, armed=(ev.ArmedReversal("alpha", "000000000001", REQUEST),)),
    d.SendToAcquirer(1, "alpha", REQUEST, 0, reversal={**REQUEST, "t": "0400"}),
    d.Reply(1, {**REQUEST, "t": "0210"}),
    d.QueueReversal("alpha", "000000000001", {**REQUEST, "t": "0400"}),
    d.QueueAdvice("alpha", "000000000001", {**REQUEST, "t": "0220"}),
    d.SignOn(1, "T0000001", "M000000000001", {**REQUEST, "t": "0810"}),
]


def renderings(obj: Any) -> list[str]:
    return [repr(obj), str(obj), f"{obj}", "%s %r" % (obj, obj)]  # noqa: UP031


def assert_clean(text: str, secrets: tuple[str, ...] = CARD_SECRETS) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} in {text[:300]!r}"


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: type(o).__name__)
def test_events_and_decisions_render_without_card_data(obj: Any) -> None:
    for text in renderings(obj):
        assert_clean(text)
    assert "476173******0119" in repr(obj)  # masked, still useful to an operator


@pytest.mark.parametrize("obj", OBJECTS[:3], ids=lambda o: type(o).__name__)
def test_a_log_line_or_traceback_quoting_an_event_is_clean(
    obj: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("switch.test").debug("handling %s", obj)
    try:
        raise RuntimeError(f"bug while handling {obj!r}")
    except RuntimeError as exc:
        tb = "".join(traceback.format_exception(exc))
    assert_clean(caplog.text)
    assert_clean(tb)


def test_masked_repr_keeps_the_struct_equal_and_named() -> None:
    a = ev.TerminalRequest(1, "terminal_ascii", dict(REQUEST), 0)
    assert a == ev.TerminalRequest(1, "terminal_ascii", dict(REQUEST), 0)
    assert masked_repr(a).startswith("TerminalRequest(conn_id=1, profile='terminal_ascii', fields={")
    assert "[16 wiped]" in repr(a)  # the PIN block's length only


def test_the_servers_log_gate_scrubs_what_the_core_says(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="switch.server.core")
    SwitchCore._log(None, d.Log("warning", "internal_error", f"KeyError: {PAN} / {TRACK2}"))  # type: ignore[arg-type]
    assert "internal_error" in caplog.text and "476173******0119" in caplog.text
    assert_clean(caplog.text)


@pytest.mark.parametrize("track", [TRACK2, TRACK2_BCD_HEX, TRACK2.replace("=", "d")])
def test_scrub_text_wipes_track_2_whole(track: str) -> None:
    text = scrub_text(f"field 35 was {track}; field 2 was {PAN}")
    assert_clean(text)
    assert text.count("476173******0119") == 2 and "=[track 2 data wiped]" in text
    assert "2512" not in text  # not even the expiry that follows the separator


def test_key_holders_never_show_key_bytes() -> None:
    raw16 = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    raw32 = os.urandom(32)
    kek = Kek(raw32)
    holders = [
        SecretKey(raw16),
        WorkingKeys(SecretKey(raw16), SecretKey(raw16[::-1])),
        kek,
        FieldSealer(kek, "saf"),
        HmacPanHasher(raw32),
        RetailMacKey(raw16),
        DesMacKey(raw16[:8]),
    ]
    for holder in holders:
        for text in renderings(holder):
            for key in (raw16, raw16[::-1], raw16[:8], raw32):
                assert key.hex() not in text.lower(), f"key bytes in {text!r}"


def test_acquirer_mac_key_in_clear_is_refused_without_quoting_it(tmp_path: Any) -> None:
    key_hex = "0123456789ABCDEFFEDCBA9876543210"
    with pytest.raises(ValueError, match="in clear, which is refused") as info:
        AcquirerConfig(name="alpha", mac_key_hex=key_hex)
    assert key_hex not in str(info.value).upper()
    path = tmp_path / "switch.toml"
    path.write_text(f'[[acquirers]]\nname = "alpha"\nmac_key_hex = "{key_hex}"\n')
    with pytest.raises(ConfigError, match="switch keys seal --acquirer") as loaded:
        load_config(path)
    assert key_hex not in str(loaded.value).upper()
    assert "mac_key_hex=''" in repr(AcquirerConfig(name="beta"))  # an empty setting is shown as empty

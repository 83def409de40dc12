"""Which path runs: the Cython plan really handles valid messages, SWITCH_CODEC_PURE really selects
pyiso8583, uncovered spec features fall back and are logged once, and plans follow spec identity."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import iso8583
import pytest

import switch.codec as codec
from switch.codec.specs import SPECS

PAN = "4761739001010119"
ICC = "9F2608A1B2C3D4E5F60718" + "9F2701809F100706010A03A0000095050000000000" + "5F2A0209789A03260508"


def purchase(name: str) -> dict[str, str]:
    track2 = f"{PAN}D25122011143878089" if name == "terminal_packed" else f"{PAN}=25122011143878089"
    return {
        "t": "0200",
        "2": PAN,
        "3": "000000",
        "4": "000000012345",
        "11": "000123",
        "12": "103045",
        "13": "0508",
        "22": "051",
        "35": track2,
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
        "52": "0123456789ABCDEF",
        "55": ICC,
    }


@pytest.fixture
def fast() -> Iterator[None]:
    if codec._fast is None:
        pytest.fail("the codec extension is not built (run: make build)")
    previous = codec.use_fast_path(True)
    yield
    codec.use_fast_path(previous)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_valid_messages_never_reach_pyiso8583_on_the_fast_path(name: str, fast: None) -> None:
    spec = SPECS[name]
    fields = purchase(name)
    if name == "default_ascii":
        fields["52"] = "0123456789ABCDEF"
    expected_raw, expected_enc = iso8583.encode(copy.deepcopy(fields), spec)
    expected = iso8583.decode(bytes(expected_raw), spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iso8583, "decode", lambda *a: pytest.fail("pyiso8583.decode was called"))
        mp.setattr(iso8583, "encode", lambda *a: pytest.fail("pyiso8583.encode was called"))
        raw, enc = codec.encode(copy.deepcopy(fields), spec)
        assert (raw, enc) == (expected_raw, expected_enc)
        assert codec.decode(bytes(raw), spec) == expected
        assert codec.decode_fields(bytes(raw), spec) == expected[0]
        assert codec.encode_bytes(fields, spec) == expected_raw


class _Key(str):
    """A str subclass key: pyiso8583 accepts it; the fast path must not treat it as an exact str."""


@pytest.mark.parametrize("name", sorted(SPECS))
def test_keys_equal_to_but_not_the_interned_field_numbers_encode_the_same(name: str, fast: None) -> None:
    """The encoder finds a field's number by identity with its own interned keys; keys built at run
    time (equal, other objects) take the parsing path, and give the same bytes, dicts and side effects
    on the fast path (pyiso8583 is not called for them)."""
    spec = SPECS[name]
    fields = purchase(name)
    fields["64"] = "A1B2C3D4E5F60718"
    expected_fields = copy.deepcopy(fields)
    expected = iso8583.encode(expected_fields, spec)
    rebuilt = {"".join(list(k)) if len(k) > 1 else k: v for k, v in fields.items()}
    assert any(k is not original for k, original in zip(rebuilt, fields) if len(k) > 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iso8583, "encode", lambda *a: pytest.fail("pyiso8583.encode was called"))
        assert codec.encode(rebuilt, spec) == expected
        assert list(rebuilt.items()) == list(expected_fields.items())
        assert codec.encode_bytes(rebuilt, spec) == expected[0]
    subclassed = {_Key(k) if k.isdigit() else k: v for k, v in fields.items()}
    assert codec.encode(dict(subclassed), spec) == iso8583.encode(dict(subclassed), spec)


def test_malformed_input_goes_to_pyiso8583_for_its_error(fast: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = iso8583.decode
    monkeypatch.setattr(iso8583, "decode", lambda *a: calls.append(1) or real(*a))
    spec = SPECS["terminal_ascii"]
    raw = bytes(codec.encode(purchase("terminal_ascii"), spec)[0])
    with pytest.raises(codec.DecodeError) as info:
        codec.decode(raw[:-3], spec)
    assert calls == [1]
    assert info.value.field == "55" and isinstance(info.value, iso8583.DecodeError)


def _run(code: str, **env: str) -> Any:
    environ = {k: v for k, v in os.environ.items() if k != "SWITCH_CODEC_PURE"} | env
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, iso8583, switch.codec as c
from switch.codec.specs import SPECS
spec = SPECS["terminal_packed"]
calls = []
real = iso8583.decode
iso8583.decode = lambda *a: calls.append(1) or real(*a)
raw = bytes(iso8583.encode({"t": "0800", "11": "000001", "70": "301"}, spec)[0])
c.decode(raw, spec)
print(json.dumps({"fast": c.FAST_PATH, "reference_calls": len(calls)}))
"""


def test_switch_codec_pure_selects_pyiso8583_in_a_fresh_process() -> None:
    assert _run(PROBE, SWITCH_CODEC_PURE="1") == {"fast": False, "reference_calls": 1}
    assert _run(PROBE) == {"fast": True, "reference_calls": 0}
    assert _run(PROBE, SWITCH_CODEC_PURE="0") == {"fast": True, "reference_calls": 0}


FILL_PROBE = """
import json, switch.codec as c
from switch.codec.specs import SPECS
spec = SPECS["terminal_ascii"]
raw = bytes(c.encode({"t": "0200", "2": "4761739001010119", "55": "AB" * 30}, spec)[0])
result = c.decode(raw, spec)
print(json.dumps({"in_place": c._fast.set_dict_fill(False), "same": c.decode(raw, spec) == result}))
"""


def test_switch_codec_dict_fill_0_turns_in_place_filling_off_in_a_fresh_process() -> None:
    available = codec._fast is not None and codec._fast.dict_fill_available()
    assert _run(FILL_PROBE, SWITCH_CODEC_DICT_FILL="") == {"in_place": available, "same": True}
    assert _run(FILL_PROBE, SWITCH_CODEC_DICT_FILL="0") == {"in_place": False, "same": True}


def test_configure_turns_in_place_filling_off_and_on(fast: None) -> None:
    before = codec._fast.set_dict_fill(codec._fast.dict_fill_available())
    try:
        codec.configure(fill_dicts_in_place=False)
        assert codec._fast.set_dict_fill(False) is False
        codec.configure(fill_dicts_in_place=True)
        assert codec._fast.set_dict_fill(False) is codec._fast.dict_fill_available()
    finally:
        codec._fast.set_dict_fill(before)


def test_use_fast_path_toggles_and_reports(fast: None) -> None:
    assert codec.FAST_PATH is True
    assert codec.use_fast_path(False) is True
    assert codec.FAST_PATH is False and not codec._fast.is_enabled()
    assert codec.use_fast_path(True) is False
    assert codec._fast.is_enabled()


def test_uncovered_spec_feature_falls_back_and_is_logged_once(
    fast: None, caplog: pytest.LogCaptureFixture
) -> None:
    spec = copy.deepcopy(SPECS["terminal_ascii"])
    spec["48"] = {"data_enc": "ascii", "len_enc": "b", "len_type": 9, "max_len": 999, "desc": "x"}
    assert codec.uncovered(spec) == ("48: binary length of 9 bytes",)
    fields = purchase("terminal_ascii") | {"48": "abc"}
    caplog.set_level(logging.WARNING, logger="switch.codec")
    for _ in range(3):
        mine, theirs = copy.deepcopy(fields), copy.deepcopy(fields)
        ours = codec.encode(mine, spec)
        assert ours == iso8583.encode(theirs, spec) and mine == theirs
        assert codec.decode(bytes(ours[0]), spec) == iso8583.decode(bytes(ours[0]), spec)
    warnings = [r.getMessage() for r in caplog.records if "does not cover" in r.getMessage()]
    assert len(warnings) == 1
    assert "48: binary length of 9 bytes" in warnings[0]
    assert PAN not in caplog.text
    # Messages without field 48 still take the fast path under that spec.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iso8583, "decode", lambda *a: pytest.fail("pyiso8583.decode was called"))
        raw = bytes(codec.encode(purchase("terminal_ascii"), spec)[0])
        codec.decode(raw, spec)


def test_shipped_specs_are_fully_covered() -> None:
    for name, spec in SPECS.items():
        assert codec.uncovered(spec) == (), name


def test_plans_follow_spec_identity_and_forget_spec(fast: None) -> None:
    spec = copy.deepcopy(SPECS["acquirer_1987"])
    raw = bytes(codec.encode({"t": "0800", "70": "301", "11": "000001"}, spec)[0])
    assert codec.decode(raw, spec)[0]["70"] == "301"
    # Editing a spec in place is only seen after forget_spec (documented: specs are read-only in use).
    spec["70"] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 2, "desc": "x"}
    codec.forget_spec(spec)
    with pytest.raises(codec.DecodeError, match="Extra data after last field: field 70"):
        codec.decode(raw, spec)
    # An equal copy is a different object with its own plan and the same answers.
    twin = copy.deepcopy(spec)
    twin["70"]["max_len"] = 3
    assert codec.decode(raw, twin) == iso8583.decode(raw, twin)


def test_plan_cache_is_bounded(fast: None) -> None:
    codec.forget_spec()
    try:
        codec.configure(max_cached_plans=4)
        specs = [copy.deepcopy(SPECS["terminal_ascii"]) for _ in range(10)]
        raw = bytes(codec.encode({"t": "0800", "11": "000001"}, specs[0])[0])
        for spec in specs:
            assert codec.decode(raw, spec)[0]["11"] == "000001"
        assert codec._fast.cached_plans() <= 4
    finally:
        codec.configure()
    with pytest.raises(ValueError):
        codec.configure(max_cached_plans=0)

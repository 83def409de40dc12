"""switch.codec against pyiso8583 itself: same bytes, same dicts (values, key order, types), same errors.

Every case runs three times: on the Cython fast path filling result dicts in place, on the fast path
building them through PyDict_SetItem, and on the reference path (the `path` fixture). Inputs are
generated for every shipped spec and for random specs that exercise each feature the plan compiler
knows (binary/BCD/text lengths, nibble counts, pads, headers, ASCII bitmaps, other codecs, and
features it must leave to pyiso8583), valid and then mutated: values too long, non-hex, non-ASCII,
wrong types, strange keys; bytes truncated, flipped, inserted, deleted.

How errors are compared: our exception must be an instance of pyiso8583's exception class, with the
same field and position, pyiso8583's partial dicts as `masking.mask_fields`/`mask_encoded_fields` make
them, no raw message (`s` is b""), and a message equal to pyiso8583's after `masking.scrub_text`
(which only changes text that quotes a card number). tests/security/test_codec_errors_hold_no_card_data.py
checks what is left for card data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import iso8583
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import switch.codec as codec
from switch.codec.masking import mask_encoded_fields, mask_fields, scrub_text
from switch.codec.specs import SPECS

SHIPPED = sorted(SPECS)
HEX = "0123456789ABCDEFabcdef"
#: Examples per test: a quarter of the profile's (HYPOTHESIS_PROFILE=thorough raises it), keeping this
#: file near 15 s per path on the 2-core machine.
EXAMPLES = max(settings.default.max_examples // 4, 10)
SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
#: Longest generated value: keeps examples fast while still crossing 1- and 2-byte length prefixes.
MAX_GEN_LEN = 300


@pytest.fixture(params=["fast", "fast-setitem", "pure"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """fast: the Cython plan, result dicts filled in place where the interpreter allows it;
    fast-setitem: the Cython plan building every dict through PyDict_SetItem; pure: pyiso8583."""
    fast = request.param != "pure"
    if fast and codec._fast is None:
        pytest.fail("the codec extension is not built (run: make build)")
    previous = codec.use_fast_path(fast)
    fill = None
    if codec._fast is not None:
        fill = codec._fast.set_dict_fill(request.param == "fast" and codec._fast.dict_fill_available())
    try:
        yield request.param
    finally:
        codec.use_fast_path(previous)
        if fill is not None:
            codec._fast.set_dict_fill(fill)


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


def canon(value: Any) -> Any:
    """A comparable form that also sees key order and exact types."""
    if isinstance(value, dict):
        return (type(value).__name__, [(canon(k), canon(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [canon(v) for v in value])
    return (type(value).__name__, value)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except Exception as e:
        return "error", e


def assert_same(ref: tuple[str, Any], ours: tuple[str, Any]) -> None:
    assert ref[0] == ours[0], f"reference {ref!r} vs ours {ours!r}"
    if ref[0] == "ok":
        assert canon(ours[1]) == canon(ref[1])
        return
    r, o = ref[1], ours[1]
    assert isinstance(o, type(r)), f"{type(o)} is not a {type(r)}"
    if isinstance(r, iso8583.DecodeError):
        assert isinstance(o, codec.DecodeError)
        assert (o.msg, o.field, o.pos) == (scrub_text(r.msg), r.field, r.pos)
        assert canon(o.doc_dec) == canon(mask_fields(r.doc_dec))
        assert canon(o.doc_enc) == canon(mask_encoded_fields(r.doc_enc))
        assert o.s == b""  # the raw message is not kept (card data)
    elif isinstance(r, iso8583.EncodeError):
        assert isinstance(o, codec.EncodeError)
        assert (o.msg, o.field) == (scrub_text(r.msg), r.field)
        assert canon(o.doc_dec) == canon(mask_fields(r.doc_dec))
        assert canon(o.doc_enc) == canon(mask_encoded_fields(r.doc_enc))
    else:
        assert type(o) is type(r)
    assert str(o) == scrub_text(str(r))


def check_encode(fields: dict, spec: dict) -> bytes | None:
    """Encode with both; compare results and what each did to its input dict. The bytes if any."""
    mine, theirs = copy.deepcopy(fields), copy.deepcopy(fields)
    ref = outcome(iso8583.encode, theirs, spec)
    ours = outcome(codec.encode, mine, spec)
    assert_same(ref, ours)
    assert canon(mine) == canon(theirs), "the input dict was changed differently"
    lean = outcome(codec.encode_bytes, copy.deepcopy(fields), spec)
    assert lean[0] == ref[0]
    if ref[0] == "ok":
        assert lean[1] == ref[1][0] and type(lean[1]) is bytearray
        return bytes(ref[1][0])
    return None


def check_decode(data: bytes | bytearray, spec: dict) -> None:
    ref = outcome(iso8583.decode, data, spec)
    assert_same(ref, outcome(codec.decode, data, spec))
    lean = outcome(codec.decode_fields, data, spec)
    assert lean[0] == ref[0]
    if ref[0] == "ok":
        assert canon(lean[1]) == canon(ref[1][0])
    else:
        assert_same(ref, lean)


# --------------------------------------------------------------------------------------------------
# Generated messages
# --------------------------------------------------------------------------------------------------


@st.composite
def field_value(draw: st.DrawFn, field_spec: dict) -> str:
    """A value pyiso8583 can usually encode under this field spec (sometimes on the edge)."""
    data_enc = field_spec.get("data_enc")
    max_len = field_spec.get("max_len", 0)
    if not isinstance(max_len, int) or max_len < 0:
        max_len = 4
    fixed = field_spec.get("len_type", 0) == 0
    size = min(max_len if fixed else draw(st.integers(0, min(max_len, MAX_GEN_LEN))), MAX_GEN_LEN)
    if data_enc == "b":
        nibbles = field_spec.get("len_count") == "nibbles"
        count = size if nibbles else 2 * size
        return draw(st.text(alphabet=HEX, min_size=count, max_size=count))
    alphabet = st.characters(min_codepoint=32, max_codepoint=126)
    if data_enc not in ("ascii",):
        alphabet = alphabet | st.sampled_from("éß€")
    return draw(st.text(alphabet=alphabet, min_size=size, max_size=size))


def mti_value(spec: dict) -> st.SearchStrategy[str]:
    if spec.get("t", {}).get("data_enc") == "b":
        return st.text(alphabet=HEX, min_size=4, max_size=4)
    return st.text(alphabet="0123456789", min_size=4, max_size=4)


@st.composite
def message(draw: st.DrawFn, spec: dict, max_fields: int = 14) -> dict:
    numbers = [int(k) for k in spec if k.isdigit() and k not in ("1", "65")]
    chosen = draw(st.lists(st.sampled_from(numbers), max_size=max_fields, unique=True))
    fields: dict[str, Any] = {"t": draw(mti_value(spec))}
    header = spec.get("h", {})
    if isinstance(header.get("max_len"), int) and header["max_len"] > 0:
        fields["h"] = draw(field_value(header))
    for n in chosen:
        fields[str(n)] = draw(field_value(spec[str(n)]))
    if draw(st.integers(0, 9)) == 0:  # stale bitmaps / extended indicator the encoder must drop
        fields[draw(st.sampled_from(["1", "65", "p"]))] = "stale"
    return fields


BAD_VALUES = st.sampled_from(["", "Z", "ZZ", "ABC", "é", "0" * 1200, "\x00", "12 34"]) | st.builds(
    lambda n: "9" * n, st.integers(0, 40)
)
BAD_KEYS = st.sampled_from(
    [0, 2, "0", "02", "002", "193", "999", "٣", "½", "4761739001010119", b"2", ("t",), "", " 2", "x"]
)


@st.composite
def mutated_message(draw: st.DrawFn, spec: dict) -> dict:
    fields = draw(message(spec))
    keys = [k for k in fields if k != "t"]
    choice = draw(st.integers(0, 5))
    if choice == 0 and keys:
        fields[draw(st.sampled_from(keys))] = draw(BAD_VALUES)
    elif choice == 1 and keys:
        fields[draw(st.sampled_from(keys))] = draw(st.sampled_from([b"12", 12, None, 1.5, ["1"]]))
    elif choice == 2:
        fields[draw(BAD_KEYS)] = draw(st.sampled_from(["12", "ABCD", ""]))
    elif choice == 3:
        del fields["t"]
    elif choice == 4:
        fields["t"] = draw(st.sampled_from(["", "02000", "020", "02é0", "ZZZZ", "0x00"]))
    else:
        if keys:
            key = draw(st.sampled_from(keys))
            value = fields[key]
            fields[key] = value + draw(st.sampled_from(["0", "00", "F", "é"]))
    return fields


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 5))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == 0:
            del raw[at:]
        elif op == 1 and raw:
            raw[at] = draw(st.integers(0, 255))
        elif op == 2:
            raw.insert(at, draw(st.integers(0, 255)))
        elif op == 3 and raw:
            del raw[at]
        elif op == 4:
            raw += draw(st.binary(min_size=1, max_size=4))
        elif raw:
            # A bit in the first 24 bytes: lands in the MTI or the bitmaps of every shipped spec.
            bit_at = draw(st.integers(0, min(len(raw), 24) - 1))
            raw[bit_at] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


# --------------------------------------------------------------------------------------------------
# Shipped specs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
@given(data=st.data())
@settings(max_examples=EXAMPLES, suppress_health_check=SLOW_OK)
def test_valid_messages_round_trip_identically(path: str, name: str, data: st.DataObject) -> None:
    spec = SPECS[name]
    fields = data.draw(message(spec))
    raw = check_encode(fields, spec)
    if raw is not None:
        check_decode(raw, spec)
        check_decode(bytearray(raw), spec)


@pytest.mark.parametrize("name", SHIPPED)
@given(data=st.data())
@settings(max_examples=EXAMPLES, suppress_health_check=SLOW_OK)
def test_mutated_dicts_and_bytes_fail_identically(path: str, name: str, data: st.DataObject) -> None:
    spec = SPECS[name]
    check_encode(data.draw(mutated_message(spec)), spec)
    fields = data.draw(message(spec))
    raw = check_encode(fields, spec)
    if raw is not None:
        check_decode(data.draw(mutated_bytes(raw)), spec)


@pytest.mark.parametrize("name", SHIPPED)
@given(raw=st.binary(max_size=80))
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_decode_identically(path: str, name: str, raw: bytes) -> None:
    check_decode(raw, SPECS[name])


# --------------------------------------------------------------------------------------------------
# Random specs: every plan feature, and the ones left to pyiso8583
# --------------------------------------------------------------------------------------------------

PADS = st.sampled_from([None, "", "0", "F", "f", "D", "X", "01", 5])


@st.composite
def field_spec(draw: st.DrawFn) -> dict:
    data_encodings = ["b", "b", "ascii", "ascii", "latin-1", "cp500", "utf-8", "utf-16"]
    spec: dict[str, Any] = {
        "data_enc": draw(st.sampled_from(data_encodings)),
        "len_enc": draw(st.sampled_from(["ascii", "ascii", "b", "bcd", "cp500", "latin-1", "utf-16"])),
        "len_type": draw(st.sampled_from([0, 0, 1, 2, 3, 4])),
        "max_len": draw(st.integers(0, 60)),
        "desc": "generated",
    }
    count = draw(st.sampled_from([None, "bytes", "nibbles", "nibbles"]))
    if count is not None:
        spec["len_count"] = count
    for side in ("left_pad", "right_pad"):
        pad = draw(PADS)
        if pad is not None:
            spec[side] = pad
    if draw(st.integers(0, 19)) == 0:  # features the plan leaves to pyiso8583
        spec.update(
            draw(
                st.sampled_from(
                    [
                        {"data_enc": "no-such-codec"},
                        {"len_type": 9, "len_enc": "b"},
                        {"len_count": "digits"},
                        {"max_len": -1},
                        {"len_type": True},
                        {"max_len": 8.0},
                    ]
                )
            )
        )
    return spec


@st.composite
def random_spec(draw: st.DrawFn) -> dict:
    spec = copy.deepcopy(iso8583.specs.default)
    for n in draw(st.lists(st.integers(2, 128), min_size=1, max_size=8, unique=True)):
        spec[str(n)] = draw(field_spec())
    spec["t"]["data_enc"] = draw(st.sampled_from(["ascii", "b", "cp500"]))
    bitmap = draw(st.sampled_from(["b", "ascii", "cp500"]))
    spec["p"]["data_enc"] = spec["1"]["data_enc"] = bitmap
    if draw(st.booleans()):
        header = draw(field_spec())
        header["max_len"] = draw(st.integers(1, 12))
        spec["h"] = header
    return spec


@given(data=st.data())
@settings(max_examples=2 * EXAMPLES, suppress_health_check=SLOW_OK)
def test_random_specs_agree_with_pyiso8583(path: str, data: st.DataObject) -> None:
    spec = data.draw(random_spec())
    generated = [k for k in spec if k.isdigit() and spec[k].get("desc") == "generated"]
    fields = data.draw(message(spec, max_fields=4))
    for key in generated:  # always include the generated fields, they are the point
        fields.setdefault(key, data.draw(field_value(spec[key])))
    raw = check_encode(fields, spec)
    if raw is not None:
        check_decode(raw, spec)
        check_decode(data.draw(mutated_bytes(raw)), spec)
    check_encode(data.draw(mutated_message(spec)), spec)


def test_tertiary_bitmap_fields(path: str) -> None:
    """Fields 129-192 (a tertiary bitmap appended to field 1) exist in pyiso8583: same on both paths."""
    spec = copy.deepcopy(iso8583.specs.default)
    for n in range(129, 193):
        spec[str(n)] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 2, "max_len": 20, "desc": "x"}
    fields = {"t": "0200", "3": "000000", "70": "001", "130": "abc", "192": "", "128": "0011223344556677"}
    raw = check_encode(fields, spec)
    assert raw is not None
    check_decode(raw, spec)
    # The same bytes under a spec without 129-192: pyiso8583 raises KeyError, so must we.
    check_decode(raw, SPECS["default"])


def test_non_bytes_and_non_dict_inputs(path: str) -> None:
    spec = SPECS["terminal_ascii"]
    for bad in ("0200", memoryview(b"0200"), None, 12):
        check_decode(bad, spec)  # type: ignore[arg-type]
    for bad_fields in ([("t", "0200")], None, "0200"):
        ref = outcome(iso8583.encode, bad_fields, spec)
        assert_same(ref, outcome(codec.encode, bad_fields, spec))

    class Sub(bytes):
        pass

    raw = check_encode({"t": "0800", "70": "301", "11": "000001"}, spec)
    assert raw is not None
    check_decode(Sub(raw), spec)

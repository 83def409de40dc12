"""What a caller can do with the fast path's results: they are its own (mutating one never changes a
later result), the collector sees through them, lengths on both sides of the shared length-prefix
cache come out right, and threads hammering one plan get pyiso8583's answers.

Each test runs with result dicts filled in place (CPython 3.11) and built through PyDict_SetItem.
"""

from __future__ import annotations

import copy
import gc
import platform
import sys
import threading
import tracemalloc
import weakref
from collections.abc import Iterator
from typing import Any

import iso8583
import pytest

import switch.codec as codec
from switch.codec.specs import SPECS

PAN = "4761739001010119"


def purchase(stan: int = 123, pan: str = PAN) -> dict[str, str]:
    return {
        "t": "0200",
        "2": pan,
        "3": "000000",
        "4": f"{stan:012d}",
        "11": f"{stan % 1_000_000:06d}",
        "22": "051",
        "35": f"{pan}=25122011438780890",
        "41": "TERM0001",
        "49": "978",
        "52": "0412AC89ABCDEF12",
        "55": "9F2608A1B2C3D4E5F607189F2701809F1012" + "00" * (stan % 40),
        "64": "A1B2C3D4E5F60718",
    }


@pytest.fixture(params=["in-place", "setitem"])
def fill(request: pytest.FixtureRequest) -> Iterator[str]:
    if codec._fast is None:
        pytest.fail("the codec extension is not built (run: make build)")
    in_place = request.param == "in-place"
    if in_place and not codec._fast.dict_fill_available():
        pytest.fail("in-place filling is unavailable on this interpreter (expected on CPython 3.11)")
    previous_path = codec.use_fast_path(True)
    previous_fill = codec._fast.set_dict_fill(in_place)
    try:
        yield request.param
    finally:
        codec._fast.set_dict_fill(previous_fill)
        codec.use_fast_path(previous_path)


def test_in_place_filling_is_on_where_cpython_311_runs() -> None:
    """A silent fall back to PyDict_SetItem would cost ~20% of decode/encode: say so here."""
    if codec._fast is None:
        pytest.fail("the codec extension is not built (run: make build)")
    expected = platform.python_implementation() == "CPython" and sys.version_info[:2] == (3, 11)
    assert codec._fast.dict_fill_available() is expected


@pytest.mark.parametrize("name", ["terminal_ascii", "terminal_packed", "acquirer_1987"])
def test_mutating_a_decoded_result_never_changes_a_later_one(fill: str, name: str) -> None:
    spec = SPECS[name]
    fields = purchase()
    if name == "terminal_packed":
        fields["35"] = fields["35"].replace("=", "D")
    raw = bytes(iso8583.encode(copy.deepcopy(fields), spec)[0])
    expected = iso8583.decode(raw, spec)

    doc_dec, doc_enc = codec.decode(raw, spec)
    lean = codec.decode_fields(raw, spec)
    assert (doc_dec, doc_enc) == expected and lean == expected[0]
    doc_dec["2"] = "tampered"
    doc_dec["999"] = "added"
    del doc_dec["t"]
    doc_enc["2"]["data"] = b"tampered"
    doc_enc["2"]["extra"] = b""
    doc_enc["35"].clear()
    del doc_enc["p"]
    lean.clear()

    again = codec.decode(raw, spec)
    assert again == expected
    assert list(again[0]) == list(expected[0]) and list(again[1]) == list(expected[1])
    assert codec.decode_fields(raw, spec) == expected[0]
    assert again[0] is not doc_dec and again[1]["2"] is not doc_enc["2"]


def test_mutating_an_encoded_result_never_changes_a_later_one(fill: str) -> None:
    spec = SPECS["terminal_ascii"]
    ref_raw, ref_enc = iso8583.encode(purchase(), spec)
    raw, doc_enc = codec.encode(purchase(), spec)
    assert (raw, doc_enc) == (ref_raw, ref_enc)
    raw[0:4] = b"XXXX"
    doc_enc["2"]["len"] = b"99"
    doc_enc["55"]["data"] = b""
    del doc_enc["t"]
    assert codec.encode(purchase(), spec) == (ref_raw, ref_enc)
    assert codec.encode_bytes(purchase(), spec) == ref_raw


def test_the_collector_sees_cycles_through_a_decoded_result(fill: str) -> None:
    """The encoded dict holds dicts, so the collector must track it, as CPython would have."""
    spec = SPECS["terminal_ascii"]
    raw = bytes(iso8583.encode(purchase(), spec)[0])

    class Box:
        doc: Any = None

    makers = [lambda: codec.decode(raw, spec)[1], lambda: codec.encode(purchase(), spec)[1]]
    for make in makers:
        doc_enc = make()
        assert gc.is_tracked(doc_enc)
        box = Box()
        box.doc = doc_enc
        doc_enc["2"]["box"] = box  # box -> doc_enc -> pair -> box
        alive = weakref.ref(box)
        del box, doc_enc
        gc.collect()
        assert alive() is None


@pytest.mark.parametrize("length", [0, 1, 9, 99, 100, 254, 255, 256, 257, 300, 999])
def test_lengths_around_the_shared_prefix_cache(fill: str, length: int) -> None:
    """Prefixes of lengths below 256 are shared objects per field; longer ones are built each time."""
    ascii_lll = SPECS["terminal_ascii"]  # 55: binary data, ASCII LLL length in bytes (max 255)
    default = SPECS["default"]  # 62: ASCII data, ASCII LLL length (max 999)
    cases: list[tuple[dict, dict[str, str]]] = [(default, {"t": "0800", "62": "x" * length})]
    if length <= 255:
        cases.append((ascii_lll, {"t": "0200", "55": "AB" * length}))
    packed = SPECS["terminal_packed"]  # 2: BCD digits, LL length counted in nibbles (max 19)
    if length <= 19:
        cases.append((packed, {"t": "0200", "2": "4" * length}))
    for spec, fields in cases:
        for _ in range(2):  # the second round takes the cached prefix
            ref = iso8583.encode(copy.deepcopy(fields), spec)
            assert codec.encode(copy.deepcopy(fields), spec) == ref
            assert codec.encode_bytes(fields, spec) == ref[0]
            raw = bytes(ref[0])
            assert codec.decode(raw, spec) == iso8583.decode(raw, spec)


def test_threads_sharing_one_plan_get_pyiso8583_answers(fill: str) -> None:
    spec = SPECS["terminal_ascii"]
    cases = []
    for stan in range(24):
        fields = purchase(stan, pan=f"47617390010{stan:05d}"[:16])
        raw, doc_enc = iso8583.encode(copy.deepcopy(fields), spec)
        cases.append((fields, bytes(raw), doc_enc, iso8583.decode(bytes(raw), spec)))
    codec.forget_spec(spec)  # every thread starts on a cold plan: templates and prefixes fill racing
    errors: list[str] = []
    start = threading.Barrier(4)

    def worker(offset: int) -> None:
        start.wait()
        for i in range(300):
            fields, raw, doc_enc, decoded = cases[(i + offset) % len(cases)]
            if codec.decode(raw, spec) != decoded or codec.decode_fields(raw, spec) != decoded[0]:
                errors.append(f"decode {i}")
            if codec.encode(dict(fields), spec) != (bytearray(raw), doc_enc):
                errors.append(f"encode {i}")
            if codec.encode_bytes(fields, spec) != raw:
                errors.append(f"encode_bytes {i}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(k * 7,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_no_references_leak_on_success_or_fallback(fill: str) -> None:
    """The C code counts references by hand: the caller's values and the shared prefixes keep their
    counts, and memory stays flat, over many successful calls and calls handed to pyiso8583."""
    spec = SPECS["terminal_ascii"]
    good = purchase()
    bad = dict(good, **{"55": "ZZ" + good["55"][2:]})  # not hex: encode bails to pyiso8583's error
    raw = bytes(iso8583.encode(copy.deepcopy(good), spec)[0])
    truncated = raw[:-3]
    values = list(good.values()) + list(bad.values())

    def run(rounds: int) -> None:
        for _ in range(rounds):
            codec.decode(raw, spec)
            codec.decode_fields(raw, spec)
            codec.encode(dict(good), spec)
            codec.encode_bytes(good, spec)
            failing = ((codec.encode, dict(bad)), (codec.encode_bytes, bad), (codec.decode, truncated))
            for call, arg in failing:
                with pytest.raises((codec.EncodeError, codec.DecodeError)):
                    call(arg, spec)

    run(50)
    gc.collect()  # tracebacks of the expected errors sit in reference cycles until collected
    counts = [sys.getrefcount(v) for v in values]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(400)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [sys.getrefcount(v) for v in values] == counts
    assert grown < 8 * 1024, f"{grown} bytes still allocated after 400 rounds"


def test_every_character_at_every_position_of_a_hex_field(fill: str) -> None:
    """Binary fields are converted 16, 8 and 1 hex digits at a time (SSE2, SWAR, table): a 42-digit
    value crosses all three. Any character at any position must give pyiso8583's bytes or error."""
    spec = SPECS["terminal_ascii"]  # 55: binary, LLL
    base = "0123456789ABCDEFabcdef" * 2
    base = base[:42]
    for position in range(len(base)):
        for code in [*range(0x100), 0x100, 0x2028, 0xFFFD]:
            value = base[:position] + chr(code) + base[position + 1 :]
            fields = {"t": "0200", "55": value}
            try:
                expected: Any = iso8583.encode(dict(fields), spec)
            except iso8583.EncodeError as e:
                with pytest.raises(codec.EncodeError) as info:
                    codec.encode(dict(fields), spec)
                assert info.value.msg == e.msg
                continue
            assert codec.encode(dict(fields), spec) == expected
            raw = bytes(expected[0])
            assert codec.decode(raw, spec) == iso8583.decode(raw, spec)


def test_every_byte_value_decodes_to_pyiso8583_hex() -> None:
    spec = SPECS["terminal_ascii"]
    for size in (0, 1, 7, 8, 9, 15, 16, 17, 255):
        for start in range(0, 256, 64):
            data = bytes((start + i) % 256 for i in range(size))
            raw = bytes(iso8583.encode({"t": "0200", "55": data.hex()}, spec)[0])
            assert codec.decode(raw, spec) == iso8583.decode(raw, spec)

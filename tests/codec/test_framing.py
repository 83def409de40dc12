"""Framing: frames survive any split of the stream; bad headers are clear errors that close the reader."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.codec.framing import (
    FrameReader,
    FrameTooLongError,
    FramingError,
    frame,
    swap_tpdu,
)

KINDS = ["binary2", "ascii4"]
MAX = 512
PAN = b"4761739001010119"

payloads = st.binary(min_size=1, max_size=200)
tpdus = st.tuples(st.binary(min_size=4, max_size=4)).map(lambda t: b"\x60" + t[0])


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, bool, list[tuple[bytes, bytes | None]], bytes]:
    kind = draw(st.sampled_from(KINDS))
    with_tpdu = draw(st.booleans())
    items = draw(st.lists(st.tuples(payloads, tpdus), min_size=1, max_size=6))
    frames = [(p, t if with_tpdu else None) for p, t in items]
    wire = b"".join(frame(p, kind, t) for p, t in frames)
    return kind, with_tpdu, frames, wire


def _collect(reader: FrameReader, chunks: list[bytes]) -> list[tuple[bytes, bytes | None]]:
    out = []
    for chunk in chunks:
        out.extend((f.payload, f.tpdu) for f in reader.feed(chunk))
    return out


@given(streams())
def test_every_two_way_split_gives_the_frames_back(case: tuple) -> None:
    kind, with_tpdu, frames, wire = case
    for cut in range(len(wire) + 1):
        reader = FrameReader(kind, with_tpdu, MAX)
        assert _collect(reader, [wire[:cut], wire[cut:]]) == frames
        assert reader.buffered_bytes == 0


@given(streams(), st.data())
def test_random_chunkings_give_the_frames_back(case: tuple, data: st.DataObject) -> None:
    kind, with_tpdu, frames, wire = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts"))
    bounds = [0, *cuts, len(wire)]
    chunks = [wire[a:b] for a, b in itertools.pairwise(bounds)]
    reader = FrameReader(kind, with_tpdu, MAX)
    assert _collect(reader, chunks) == frames


@given(streams())
def test_byte_by_byte_and_buffer_types(case: tuple) -> None:
    kind, with_tpdu, frames, wire = case
    reader = FrameReader(kind, with_tpdu, MAX)
    assert _collect(reader, [bytearray(wire[i : i + 1]) for i in range(len(wire))]) == frames
    reader = FrameReader(kind, with_tpdu, MAX)
    assert [(f.payload, f.tpdu) for f in reader.feed(memoryview(wire))] == frames


def test_partial_frame_waits_and_is_counted() -> None:
    reader = FrameReader("binary2", False, MAX)
    wire = frame(b"0200abcdef", "binary2")
    assert reader.feed(wire[:5]) == []
    assert reader.buffered_bytes == 5
    assert [f.payload for f in reader.feed(wire[5:])] == [b"0200abcdef"]


@pytest.mark.parametrize(
    ("kind", "header", "match"),
    [
        ("binary2", b"\x02\x01", r"frame length 513 exceeds max_frame_bytes 512 \(binary2 header 0x0201\)"),
        ("binary2", b"\xff\xff", "exceeds max_frame_bytes"),
        ("ascii4", b"0513", r"frame length 513 exceeds max_frame_bytes 512 \(ascii4 header '0513'\)"),
        ("ascii4", b"9999", "exceeds max_frame_bytes"),
    ],
)
def test_over_long_header_is_refused_before_the_body(kind: str, header: bytes, match: str) -> None:
    reader = FrameReader(kind, False, MAX)
    with pytest.raises(FrameTooLongError, match=match):
        reader.feed(header)  # no body sent: the header alone must be enough to refuse
    assert reader.failed


@pytest.mark.parametrize(
    ("kind", "header", "match"),
    [
        ("binary2", b"\x00\x00", r"zero-length frame \(binary2 header 0x0000\)"),
        ("ascii4", b"0000", "zero-length frame"),
        ("ascii4", b"12a4", r"non-numeric ascii4 length header b'12a4' \(0x31326134\)"),
        ("ascii4", b" 123", "non-numeric"),
        ("ascii4", b"-123", "non-numeric"),
        ("ascii4", b"+123", "non-numeric"),
        ("ascii4", "١٢٣٤".encode(), "non-numeric"),
    ],
)
def test_zero_and_garbage_headers_are_clear_errors(kind: str, header: bytes, match: str) -> None:
    reader = FrameReader(kind, False, MAX)
    with pytest.raises(FramingError, match=match):
        reader.feed(header + PAN)
    assert isinstance(FramingError("x"), ValueError)


@given(st.sampled_from(KINDS), st.binary(min_size=4, max_size=40))
def test_garbage_streams_error_or_frame_but_never_crash(kind: str, garbage: bytes) -> None:
    reader = FrameReader(kind, True, MAX)
    try:
        frames = reader.feed(garbage)
    except FramingError as exc:
        assert reader.failed
        beyond_tpdu = garbage[(2 if kind == "binary2" else 4) + 5 :]
        if len(beyond_tpdu) >= 4:
            text = str(exc)
            assert beyond_tpdu.hex() not in text.lower() and repr(beyond_tpdu)[2:-1] not in text
    else:
        assert all(f.tpdu is not None and f.tpdu[0] == 0x60 for f in frames)
        assert reader.buffered_bytes <= len(garbage)


def test_error_messages_never_quote_payload_bytes() -> None:
    wire = frame(PAN + b"=2512", "binary2", b"\x61\x00\x01\x00\x02")
    reader = FrameReader("binary2", True, MAX)
    with pytest.raises(FramingError) as info:
        reader.feed(wire)
    text = str(info.value)
    assert "TPDU id 0x61 is not 0x60" in text
    assert PAN.decode() not in text and PAN.hex() not in text.lower()
    assert PAN.decode() not in repr(reader)


def test_frame_repr_hides_the_payload() -> None:
    reader = FrameReader("binary2", False, MAX)
    (got,) = reader.feed(frame(PAN, "binary2"))
    assert PAN.decode() not in repr(got) and PAN.decode() not in str(got)
    assert "16 bytes" in repr(got)


def test_reader_is_poisoned_after_an_error() -> None:
    reader = FrameReader("binary2", False, MAX)
    with pytest.raises(FramingError):
        reader.feed(b"\x00\x00")
    with pytest.raises(FramingError, match="earlier framing error"):
        reader.feed(frame(b"fine", "binary2"))
    assert reader.buffered_bytes == 0


def test_tpdu_frames_need_room_for_a_message() -> None:
    reader = FrameReader("binary2", True, MAX)
    with pytest.raises(FramingError, match="too short for the 5-byte TPDU"):
        reader.feed(b"\x00\x05\x60\x00\x01\x00\x02")


def test_tpdu_is_split_from_the_payload_and_swapped_for_the_reply() -> None:
    tpdu = bytes.fromhex("6000030001")
    reader = FrameReader("ascii4", True, MAX)
    (got,) = reader.feed(frame(b"0800msg", "ascii4", tpdu))
    assert got.tpdu == tpdu and got.payload == b"0800msg"
    assert swap_tpdu(tpdu) == bytes.fromhex("6000010003")
    assert swap_tpdu(swap_tpdu(tpdu)) == tpdu
    with pytest.raises(FramingError):
        swap_tpdu(b"\x60\x00")


def test_any_tpdu_id_when_the_check_is_off() -> None:
    reader = FrameReader("binary2", True, MAX, tpdu_id=None)
    (got,) = reader.feed(frame(b"msg", "binary2", b"\x68\x00\x01\x00\x02"))
    assert got.tpdu == b"\x68\x00\x01\x00\x02"


def test_frame_headers() -> None:
    assert frame(b"abc", "binary2") == b"\x00\x03abc"
    assert frame(b"abc", "ascii4") == b"0003abc"
    assert frame(b"abc", "ascii4", b"\x60\x00\x01\x00\x02") == b"0008\x60\x00\x01\x00\x02abc"
    assert frame(b"x" * 300, "binary2")[:2] == b"\x01\x2c"


def test_frame_refuses_what_cannot_be_framed() -> None:
    with pytest.raises(FramingError, match="empty"):
        frame(b"", "binary2")
    with pytest.raises(FrameTooLongError):
        frame(b"x" * 10_000, "ascii4")
    with pytest.raises(FrameTooLongError):
        frame(b"x" * 65_536, "binary2")
    with pytest.raises(FrameTooLongError, match="exceeds 100 bytes"):
        frame(b"x" * 96, "binary2", b"\x60\x00\x00\x00\x00", max_frame_bytes=100)
    with pytest.raises(FramingError, match="TPDU must be 5 bytes"):
        frame(b"abc", "binary2", b"\x60")
    with pytest.raises(ValueError, match="unknown framing kind"):
        frame(b"abc", "binary4")


def test_reader_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown framing kind"):
        FrameReader("ascii2")
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameReader("ascii4", False, 10_000)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameReader("binary2", True, 5)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameReader("binary2", False, 0)


def test_stream_ending_inside_a_frame_is_reported() -> None:
    reader = FrameReader("binary2", False, MAX)
    reader.feed(frame(b"complete", "binary2") + b"\x00\x10abc")
    with pytest.raises(FramingError, match="stream ended inside a frame"):
        reader.end_of_stream()
    clean = FrameReader("binary2", False, MAX)
    clean.feed(frame(b"complete", "binary2"))
    clean.end_of_stream()


def test_exact_limit_is_accepted() -> None:
    reader = FrameReader("binary2", True, MAX)
    (got,) = reader.feed(frame(b"y" * (MAX - 5), "binary2", b"\x60\x00\x00\x00\x00"))
    assert len(got.payload) == MAX - 5


@given(st.sampled_from(KINDS), st.booleans(), st.integers(MAX + 1, 9999), st.integers(1, 4))
def test_any_over_long_header_raises_as_soon_as_it_is_complete(
    kind: str, with_tpdu: bool, length: int, first_chunk: int
) -> None:
    header = length.to_bytes(2, "big") if kind == "binary2" else b"%04d" % length
    reader = FrameReader(kind, with_tpdu, MAX)
    head, rest = header[:first_chunk], header[first_chunk:]
    if rest:
        assert reader.feed(head) == []
    with pytest.raises(FrameTooLongError, match=f"frame length {length} exceeds max_frame_bytes {MAX}"):
        reader.feed(rest or head)
    assert reader.failed and reader.buffered_bytes == 0

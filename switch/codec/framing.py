"""Message framing on a TCP stream, sans-I/O: bytes in, complete frames out (jPOS's "channel").

Kinds (switch.config.FramingKind)
- "binary2": 2-byte big-endian length, then the frame (the usual host-to-host and POS framing).
- "ascii4": 4 ASCII digits of length, then the frame.
With `tpdu=True` every frame starts with a 5-byte TPDU (0x60, destination address (2), source address
(2)), as Chinese bank-card POS terminals send it; the length counts the TPDU, and the reader hands it
back separately from the message. `swap_tpdu` turns a request's TPDU into the reply's.

Limits and errors (h11 habits)
- `max_frame_bytes` bounds the length a header may announce (TPDU included). The header is checked as
  soon as its bytes arrive, so an over-long frame is refused before its body is buffered: the reader
  never holds more than one partial frame plus the bytes of one `feed`.
- A zero length, a length above the limit, a length too short for the TPDU and a message, a
  non-numeric ascii4 header or a TPDU without the expected id raise `FramingError` (a ValueError). The
  message says what was wrong and quotes the header bytes, never payload bytes (card data).
- After an error the stream has lost its frame boundaries, so the reader is poisoned: every later
  `feed` raises again, and the connection must be closed.
"""

from __future__ import annotations

from typing import Final

import msgspec

from switch.config import FramingKind

#: Size of the TPDU that may precede each message.
TPDU_BYTES: Final = 5
#: First byte of a TPDU (the "TPDU id" POS terminals send).
TPDU_ID: Final = 0x60
#: Header size per framing kind.
HEADER_BYTES: Final[dict[str, int]] = {"binary2": 2, "ascii4": 4}
#: Largest length each header can express.
MAX_HEADER_LENGTH: Final[dict[str, int]] = {"binary2": 0xFFFF, "ascii4": 9999}


class FramingError(ValueError):
    """The byte stream does not follow its framing; the connection cannot continue."""


class FrameTooLongError(FramingError):
    """A header announced more than max_frame_bytes (or more than a header can carry)."""


class Frame(msgspec.Struct, frozen=True):
    """One message from the stream, and its TPDU when the listener is configured with one."""

    payload: bytes
    tpdu: bytes | None = None

    def __repr__(self) -> str:
        tpdu = f", tpdu={self.tpdu.hex().upper()}" if self.tpdu is not None else ""
        return f"Frame(<{len(self.payload)} bytes>{tpdu})"


def _check_kind(kind: str) -> int:
    try:
        return HEADER_BYTES[kind]
    except KeyError:
        raise ValueError(f"unknown framing kind {kind!r}; known: {sorted(HEADER_BYTES)}") from None


class FrameReader:
    """Feed it whatever the socket returned; it returns every frame completed by those bytes."""

    __slots__ = ("_buf", "_error", "_header_bytes", "kind", "max_frame_bytes", "tpdu", "tpdu_id")

    def __init__(
        self,
        kind: FramingKind | str,
        tpdu: bool = False,
        max_frame_bytes: int = 4096,
        *,
        tpdu_id: int | None = TPDU_ID,
    ) -> None:
        self._header_bytes = _check_kind(kind)
        smallest = TPDU_BYTES + 1 if tpdu else 1
        if not smallest <= max_frame_bytes <= MAX_HEADER_LENGTH[kind]:
            raise ValueError(
                f"max_frame_bytes {max_frame_bytes} must be between {smallest} and "
                f"{MAX_HEADER_LENGTH[kind]} for {kind} framing"
            )
        self.kind = kind
        self.tpdu = tpdu
        self.max_frame_bytes = max_frame_bytes
        #: Expected first TPDU byte; None accepts any.
        self.tpdu_id = tpdu_id
        self._buf = bytearray()
        self._error: str | None = None

    def __repr__(self) -> str:
        state = "poisoned" if self._error else f"{len(self._buf)} bytes buffered"
        return f"FrameReader({self.kind}, tpdu={self.tpdu}, max_frame_bytes={self.max_frame_bytes}, {state})"

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held until more data arrives."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        """True after a framing error; the connection must be closed."""
        return self._error is not None

    def _fail(self, error: FramingError) -> FramingError:
        """Poison the reader (feed drops the buffer once its view is released)."""
        self._error = str(error)
        return error

    def _length(self, header: bytes) -> int:
        """The length a header announces, or FramingError (feed calls it for out-of-range headers)."""
        if self.kind == "binary2":
            length = (header[0] << 8) | header[1]
            shown = f"binary2 header 0x{header.hex().upper()}"
        else:
            if not header.isdigit():
                raise self._fail(
                    FramingError(f"non-numeric ascii4 length header {header!r} (0x{header.hex().upper()})")
                )
            length = int(header)
            shown = f"ascii4 header {header.decode('ascii')!r}"
        if length == 0:
            raise self._fail(FramingError(f"zero-length frame ({shown})"))
        if length > self.max_frame_bytes:
            raise self._fail(
                FrameTooLongError(
                    f"frame length {length} exceeds max_frame_bytes {self.max_frame_bytes} ({shown})"
                )
            )
        if self.tpdu and length <= TPDU_BYTES:
            raise self._fail(
                FramingError(f"frame length {length} too short for the {TPDU_BYTES}-byte TPDU and a message "
                             f"({shown})")
            )
        return length

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Append received bytes; return the frames they complete (possibly none), in stream order."""
        if self._error is not None:
            raise FramingError(f"reader closed after an earlier framing error: {self._error}")
        buf = self._buf
        buf += data
        header_bytes = self._header_bytes
        binary = self.kind == "binary2"
        with_tpdu = self.tpdu
        tpdu_id = self.tpdu_id
        min_length = TPDU_BYTES + 1 if with_tpdu else 1
        max_length = self.max_frame_bytes
        frames: list[Frame] = []
        append = frames.append
        pos = 0
        end_of_data = len(buf)
        try:
            with memoryview(buf) as view:
                while end_of_data - pos >= header_bytes:
                    if binary:
                        length = (buf[pos] << 8) | buf[pos + 1]
                    else:
                        header = bytes(view[pos : pos + 4])
                        length = int(header) if header.isdigit() else -1
                    if not min_length <= length <= max_length:
                        self._length(bytes(view[pos : pos + header_bytes]))  # raises the precise error
                    start = pos + header_bytes
                    end = start + length
                    if end > end_of_data:
                        break
                    if with_tpdu:
                        tpdu = bytes(view[start : start + TPDU_BYTES])
                        if tpdu_id is not None and tpdu[0] != tpdu_id:
                            raise self._fail(
                                FramingError(f"TPDU id 0x{tpdu[0]:02X} is not 0x{tpdu_id:02X} "
                                             f"(TPDU {tpdu.hex().upper()})")
                            )
                        append(Frame(bytes(view[start + TPDU_BYTES : end]), tpdu))
                    else:
                        append(Frame(bytes(view[start:end])))
                    pos = end
        except FramingError:
            buf.clear()
            raise
        if pos:
            del buf[:pos]
        return frames

    def end_of_stream(self) -> None:
        """The peer closed the stream: raise FramingError if it stopped inside a frame."""
        if self._buf and self._error is None:
            pending = len(self._buf)
            self._buf.clear()
            raise self._fail(FramingError(f"stream ended inside a frame ({pending} bytes buffered)"))


def frame(
    payload: bytes | bytearray | memoryview,
    kind: FramingKind | str,
    tpdu: bytes | None = None,
    *,
    max_frame_bytes: int | None = None,
) -> bytes:
    """Length header (+ TPDU) + payload, ready for the socket."""
    _check_kind(kind)
    if tpdu is not None and len(tpdu) != TPDU_BYTES:
        raise FramingError(f"TPDU must be {TPDU_BYTES} bytes, got {len(tpdu)}")
    length = len(payload) + (TPDU_BYTES if tpdu is not None else 0)
    if not payload:
        raise FramingError("refusing to frame an empty message")
    limit = MAX_HEADER_LENGTH[kind]
    if max_frame_bytes is not None:
        limit = min(limit, max_frame_bytes)
    if length > limit:
        raise FrameTooLongError(f"frame length {length} exceeds {limit} bytes allowed for {kind} framing")
    header = length.to_bytes(2, "big") if kind == "binary2" else b"%04d" % length
    return b"".join((header, tpdu or b"", payload))


def swap_tpdu(tpdu: bytes) -> bytes:
    """The reply's TPDU: same id, destination and source addresses exchanged."""
    if len(tpdu) != TPDU_BYTES:
        raise FramingError(f"TPDU must be {TPDU_BYTES} bytes, got {len(tpdu)}")
    return bytes(tpdu[:1]) + bytes(tpdu[3:5]) + bytes(tpdu[1:3])

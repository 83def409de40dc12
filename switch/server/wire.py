"""One profile's wire format for the server: spec, encode/decode, MAC sign/verify, framing.

Why a small object: the listener and the acquirer links each speak one profile; binding the spec,
framing kind and MAC layout once keeps the hot path to plain calls, and keeps every use of the codec,
MAC and framing modules of switch.codec in this one file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from switch import codec
from switch.codec import framing, mac
from switch.codec.specs import SPECS

MacFn = Callable[[bytes], bytes]


class WireError(ValueError):
    """A message that cannot be decoded; `mti` is set when the MTI itself was readable."""

    def __init__(self, reason: str, mti: str | None = None) -> None:
        super().__init__(reason)
        self.mti = mti


def retail_mac_fn(key16: bytes) -> MacFn:
    """The MAC function of a double-length working key (ANSI X9.19 retail MAC)."""
    return functools.partial(mac.retail_mac, key16)


class Wire:
    """Encode/decode/sign/verify/frame for one profile and framing."""

    __slots__ = ("framing", "profile", "spec", "tpdu")

    def __init__(self, profile: str, framing_kind: str, tpdu: bool = False) -> None:
        try:
            self.spec = SPECS[profile]
        except KeyError:
            raise ValueError(f"unknown profile {profile!r}; known: {sorted(SPECS)}") from None
        self.profile = profile
        self.framing = framing_kind
        self.tpdu = tpdu

    def reader(self, max_frame_bytes: int) -> framing.FrameReader:
        # Any TPDU id is accepted: terminals in the field do not all send 0x60.
        return framing.FrameReader(self.framing, self.tpdu, max_frame_bytes, tpdu_id=None)

    def decode(self, payload: bytes) -> dict[str, Any]:
        """Fields of a payload; raises WireError (with the MTI when readable) on a format error."""
        try:
            fields, _ = codec.decode(payload, self.spec)
        except codec.DecodeError as exc:
            raise WireError(str(exc), self.peek_mti(payload)) from None
        return fields

    def peek_mti(self, payload: bytes) -> str | None:
        """The MTI of an undecodable message when its first bytes still read as one."""
        spec_t = self.spec["t"]
        try:
            if spec_t.get("data_enc") == "b":
                raw = bytes(payload[:2]).hex()
            else:
                raw = bytes(payload[:4]).decode("ascii")
        except (UnicodeDecodeError, ValueError):
            return None
        return raw if len(raw) == 4 and raw.isdigit() else None

    def encode(self, fields: dict[str, Any], mac_fn: MacFn | None = None) -> bytes:
        """Encode; with `mac_fn`, field 64 is added and filled with the MAC over the MACed bytes."""
        fields.pop("64", None)
        fields.pop("128", None)
        if mac_fn is not None:
            # The MAC is the last field: 64, or 128 when the message has fields above 64.
            mac_field = "128" if any(len(k) > 1 and k.isdigit() and int(k) > 64 for k in fields) else "64"
            fields[mac_field] = self._mac_placeholder(mac_field)
            raw, _ = codec.encode(fields, self.spec)
            return bytes(mac.sign_message(raw, self.spec, mac_fn))
        raw, _ = codec.encode(fields, self.spec)
        return bytes(raw)

    def verify(self, payload: bytes, mac_fn: MacFn) -> bool:
        return bool(mac.verify_message(payload, self.spec, mac_fn))

    def frame(self, payload: bytes, tpdu: bytes | None = None) -> bytes:
        if self.tpdu and tpdu is not None:
            return bytes(framing.frame(payload, self.framing, framing.swap_tpdu(tpdu)))
        return bytes(framing.frame(payload, self.framing))

    def _mac_placeholder(self, field: str) -> str:
        spec = self.spec[field]
        return "00" * 8 if spec.get("data_enc") == "b" else "0" * 16

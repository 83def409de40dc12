"""ISO 8583 codec: specs, encode/decode, framing, MAC and masking. Pure: no I/O.

`decode(data, spec)` and `encode(fields, spec)` have pyiso8583's signatures and results.
PLACEHOLDER: until the Cython fast path lands these delegate to pyiso8583 directly.
"""

from iso8583 import DecodeError, EncodeError
from iso8583 import decode as decode
from iso8583 import encode as encode

__all__ = ["DecodeError", "EncodeError", "decode", "encode"]

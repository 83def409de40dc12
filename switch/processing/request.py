"""Parse a terminal request into a typed `Request`, with the ISO 8583 code for whatever is wrong.

Format problems raise `Decline(30)`; card problems are checked separately (`check_card`) because the
terminal's identity and duplicate status are settled first (a repeat of a declined request replays
the stored decline instead of being re-judged). No card data ever appears in a `Decline.reason`.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import msgspec

from switch.codec.masking import masked_repr
from switch.processing import codes


class Decline(Exception):
    """The request is refused with `code`; `reason` is for the operator log (masked)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class Flow(enum.StrEnum):
    PURCHASE = "purchase"
    PREAUTH = "preauth"
    COMPLETION = "completion"
    VOID = "void"
    REFUND = "refund"
    INQUIRY = "inquiry"
    REVERSAL = "reversal"
    SETTLEMENT = "settlement"
    NETWORK = "network"


#: Flows that name an original transaction.
NAMES_ORIGINAL = frozenset({Flow.COMPLETION, Flow.VOID, Flow.REFUND, Flow.REVERSAL})
#: Flows that carry a card.
CARD_FLOWS = frozenset({Flow.PURCHASE, Flow.PREAUTH, Flow.COMPLETION, Flow.VOID, Flow.REFUND, Flow.INQUIRY})

MAX_AMOUNT_DIGITS = 12


class Request(msgspec.Struct, kw_only=True):
    """A terminal request the core understood. `pan` lives only as long as the request is processed."""

    __repr__ = masked_repr  # msgspec's own repr would print the PAN and its expiry

    flow: Flow
    mti: str
    is_repeat: bool
    terminal_id: str
    merchant_id: str
    stan: str
    local_time: str  # field 12, hhmmss
    local_date: str  # field 13, MMDD
    processing_code: str = ""
    pan: str = ""
    expiry_yymm: str = ""
    amount_minor: int = 0
    currency: str = ""  # "" = the merchant's currency
    original_rrn: str = ""
    original_key: str = ""  # terminal key of the original, from field 90
    original_mti: str = ""
    original_guessed: bool = False  # a 0400 without 37/90: the original shares its 11/12/13
    network_code: str = ""  # field 70

    @property
    def terminal_key(self) -> str:
        return terminal_key(
            self.terminal_id, self.merchant_id, self.stan, self.local_date + self.local_time, self.mti
        )


def terminal_key(terminal_id: str, merchant_id: str, stan: str, mmddhhmmss: str, mti: str) -> str:
    """41 + 42 + 11 + 13/12 + MTI class (version and class digits, so 0200 and 0201 share a key)."""
    return f"{terminal_id}/{merchant_id}/{stan}/{mmddhhmmss}/{mti[:2]}"


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
#: ASCII digit -> its Luhn-doubled value (as a byte value, no longer ASCII).
_DOUBLE_ASCII = bytes.maketrans(b"0123456789", bytes(_DOUBLED))


def luhn_ok(pan: str) -> bool:
    """Luhn (mod 10) check of an all-ASCII-digit string. Byte-level (translate + sum in C): 2.3x faster
    than a per-digit comprehension, and it runs on every card request."""
    b = pan.encode("ascii")
    plain = b[-1::-2]  # from the right: 1st, 3rd, ... digits as they are (ASCII, minus 48 each)
    doubled = b[-2::-2].translate(_DOUBLE_ASCII)
    return (sum(plain) - 48 * len(plain) + sum(doubled)) % 10 == 0


def _flow_of(mti: str, pc: str, fields: dict[str, Any]) -> Flow:
    cls = mti[1]
    tt = pc[:2]
    if cls == "1":
        if tt == "00":
            return Flow.PREAUTH
        if tt in ("30", "31"):
            return Flow.INQUIRY
    elif cls == "2":
        if mti[2] == "2":
            if tt == "00":
                return Flow.COMPLETION
        elif tt == "00":
            return Flow.COMPLETION if ("37" in fields or "90" in fields) else Flow.PURCHASE
        elif tt == "02":
            return Flow.VOID
        elif tt == "20":
            return Flow.REFUND
        elif tt in ("30", "31"):
            return Flow.INQUIRY
    raise Decline(codes.INVALID_TRANSACTION, f"MTI {mti} with processing code {pc or '-'} is not supported")


def _text(fields: dict[str, Any], f: str, max_len: int) -> str:
    v = fields.get(f)
    if not isinstance(v, str) or not v.strip():
        raise Decline(codes.FORMAT_ERROR, f"field {f} missing")
    v = v.strip()
    if len(v) > max_len or not v.isprintable():
        raise Decline(codes.FORMAT_ERROR, f"field {f} malformed")
    return v


def _digits(fields: dict[str, Any], f: str, lengths: tuple[int, ...]) -> str:
    v = fields.get(f)
    if not isinstance(v, str) or not v:
        raise Decline(codes.FORMAT_ERROR, f"field {f} missing")
    if not (v.isascii() and v.isdigit()) or len(v) not in lengths:
        raise Decline(codes.FORMAT_ERROR, f"field {f} must be {'/'.join(map(str, lengths))} digits")
    return v


def _check_time(hhmmss: str) -> None:
    if int(hhmmss[:2]) > 23 or int(hhmmss[2:4]) > 59 or int(hhmmss[4:6]) > 59:
        raise Decline(codes.FORMAT_ERROR, "field 12 is not a valid time")


def _check_date(mmdd: str) -> None:
    if not (1 <= int(mmdd[:2]) <= 12 and 1 <= int(mmdd[2:]) <= 31):
        raise Decline(codes.FORMAT_ERROR, "field 13 is not a valid date")


def _pan_and_expiry(fields: dict[str, Any]) -> tuple[str, str]:
    """PAN from field 2, else from track 2 (35); expiry from 14, else from track 2. Never echoed."""
    pan = fields.get("2")
    expiry = fields.get("14") or ""
    track2 = fields.get("35")
    if isinstance(track2, str) and track2:
        t2 = track2.upper().replace("D", "=")
        sep = t2.find("=")
        if sep < 0:
            raise Decline(codes.FORMAT_ERROR, "field 35 has no separator")
        if not pan:
            pan = t2[:sep]
        if not expiry:
            expiry = t2[sep + 1 : sep + 5]
    if not isinstance(pan, str) or not pan:
        raise Decline(codes.FORMAT_ERROR, "field 2 missing (and no track 2)")
    if not (pan.isascii() and pan.isdigit()):
        raise Decline(codes.FORMAT_ERROR, "field 2 must be numeric")
    if expiry and not (
        isinstance(expiry, str)
        and len(expiry) == 4
        and expiry.isascii()
        and expiry.isdigit()
        and 1 <= int(expiry[2:]) <= 12
    ):
        raise Decline(codes.FORMAT_ERROR, "field 14 must be YYMM")
    return pan, expiry


def _original(fields: dict[str, Any], req: Request) -> None:
    """Field 37 names the original by RRN; field 90 by its MTI, STAN and date/time (13+12)."""
    rrn = fields.get("37")
    if isinstance(rrn, str) and rrn.strip():
        rrn = rrn.strip()
        if len(rrn) > 12 or not rrn.isprintable():
            raise Decline(codes.FORMAT_ERROR, "field 37 malformed")
        req.original_rrn = rrn
    f90 = fields.get("90")
    if isinstance(f90, str) and f90:
        if len(f90) < 20 or not (f90[:20].isascii() and f90[:20].isdigit()):
            raise Decline(codes.FORMAT_ERROR, "field 90 must start with MTI(4) STAN(6) MMDDhhmmss(10)")
        omti = f90[:4]
        req.original_mti = omti
        req.original_key = terminal_key(req.terminal_id, req.merchant_id, f90[4:10], f90[10:20], omti)


def parse(fields: dict[str, Any]) -> Request:
    """Fields -> Request, or Decline(30/12). The MTI was checked by the caller."""
    mti: str = fields["t"]
    if mti[1] == "8":
        code = _digits(fields, "70", (3,))
        return Request(
            flow=Flow.NETWORK,
            mti=mti,
            is_repeat=mti[3] in "135",
            terminal_id=str(fields.get("41", "")).strip(),
            merchant_id=str(fields.get("42", "")).strip(),
            stan=str(fields.get("11", "")),
            local_time="",
            local_date="",
            network_code=code,
        )
    tid = _text(fields, "41", 8)
    mid = _text(fields, "42", 15)
    stan = _digits(fields, "11", (6,))
    if mti[1] == "5":
        lt = fields.get("12") or "000000"
        ld = fields.get("13") or "0000"
        return Request(
            flow=Flow.SETTLEMENT,
            mti=mti,
            is_repeat=mti[3] in "135",
            terminal_id=tid,
            merchant_id=mid,
            stan=stan,
            local_time=str(lt),
            local_date=str(ld),
            currency=_currency(fields),
        )
    local_time = _digits(fields, "12", (6,))
    local_date = _digits(fields, "13", (4,))
    _check_time(local_time)
    _check_date(local_date)
    if mti[1] == "4":
        req = Request(
            flow=Flow.REVERSAL,
            mti=mti,
            is_repeat=mti[3] in "135",
            terminal_id=tid,
            merchant_id=mid,
            stan=stan,
            local_time=local_time,
            local_date=local_date,
        )
        if "4" in fields:
            req.amount_minor = _amount(fields)
        _original(fields, req)
        if not req.original_rrn and not req.original_key:
            # A reversal carrying the original's own 11/12/13 (common on POS terminals).
            req.original_key = terminal_key(tid, mid, stan, local_date + local_time, "0200")
            req.original_guessed = True
        return req
    pc = _digits(fields, "3", (6,))
    flow = _flow_of(mti, pc, fields)
    req = Request(
        flow=flow,
        mti=mti,
        is_repeat=mti[3] in "135",
        terminal_id=tid,
        merchant_id=mid,
        stan=stan,
        local_time=local_time,
        local_date=local_date,
        processing_code=pc,
        currency=_currency(fields),
    )
    req.pan, req.expiry_yymm = _pan_and_expiry(fields)
    if flow is Flow.INQUIRY:
        req.amount_minor = _amount(fields) if "4" in fields else 0
    else:
        req.amount_minor = _amount(fields)
    if flow in NAMES_ORIGINAL:
        _original(fields, req)
        if not req.original_rrn and not req.original_key:
            raise Decline(codes.FORMAT_ERROR, f"{flow} must name its original by field 37 or 90")
    return req


def _amount(fields: dict[str, Any]) -> int:
    v = fields.get("4")
    if not isinstance(v, str) or not v:
        raise Decline(codes.FORMAT_ERROR, "field 4 missing")
    if not (v.isascii() and v.isdigit()) or len(v) > MAX_AMOUNT_DIGITS:
        raise Decline(codes.FORMAT_ERROR, "field 4 must be up to 12 digits")
    return int(v)


def _currency(fields: dict[str, Any]) -> str:
    v = fields.get("49")
    if v is None or v == "":
        return ""
    if not (isinstance(v, str) and len(v) == 3 and v.isascii() and v.isdigit()):
        raise Decline(codes.FORMAT_ERROR, "field 49 must be 3 digits")
    return v


_last_day = [-1, (0, 0)]


def month_of(now_ms: int) -> tuple[int, int]:
    """(year, month) in UTC, computed once per day."""
    day = now_ms // 86_400_000
    if day != _last_day[0]:
        d = dt.datetime.fromtimestamp(day * 86_400, tz=dt.UTC)
        _last_day[1] = (d.year, d.month)
        _last_day[0] = day
    return _last_day[1]  # type: ignore[return-value]


def check_card(req: Request, now_ms: int, max_amount_minor: int) -> None:
    """Card and amount checks after identity and duplicates: 14 (PAN), 54 (expiry), 13 (amount)."""
    pan = req.pan
    if not 12 <= len(pan) <= 19 or not luhn_ok(pan):
        raise Decline(codes.INVALID_CARD, "PAN fails length or Luhn check")
    if req.expiry_yymm:
        year, month = month_of(now_ms)
        exp_year = 2000 + int(req.expiry_yymm[:2])
        exp_month = int(req.expiry_yymm[2:])
        if (exp_year, exp_month) < (year, month):
            raise Decline(codes.EXPIRED_CARD, "card expired")  # the date would go to logs and the ledger
    if req.flow is not Flow.INQUIRY and req.amount_minor <= 0:
        raise Decline(codes.INVALID_AMOUNT, "amount must be positive")
    if req.amount_minor > max_amount_minor:
        raise Decline(codes.INVALID_AMOUNT, f"amount above the limit of {max_amount_minor} minor units")

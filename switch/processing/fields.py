"""Field dicts the core builds: acquirer-side requests, reversals and advices (ISO 8583:1987, profile
acquirer_1987), and the answers to terminals. docs/flows.md lists every field per message.

Acquirer side: field 11 is left to the link, which owns a STAN counter per connection
(switch.routing.matching); the server also writes that STAN into positions 5-10 of the pre-stored
reversal's field 90 before arming it. Field 37 is the switch's RRN; 32 its acquiring institution id.
Track 2 (35) and the PIN block (52) are forwarded only in the request built straight from the terminal's
fields, never copied into the core's own state.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from switch.processing.record import Done, Txn

Fields = dict[str, Any]

#: Terminal fields forwarded to the acquirer as they came (plus 2/14 which the core re-derives).
FORWARD_FIELDS = ("3", "4", "12", "13", "18", "22", "23", "25", "26", "41", "42", "43", "49", "55")
#: Terminal fields that are only forwarded, never kept (sensitive authentication data).
SENSITIVE_FIELDS = ("35", "52", "53")
#: Terminal fields echoed in the answer.
ECHO_FIELDS = ("3", "4", "11", "12", "13", "24", "25", "41", "42", "49")
#: POS condition fields kept for later messages (advices, reversals) after the request is gone.
POS_FIELDS = ("18", "22", "23", "25", "26", "43")


_last_second = [-1, ""]


def transmission_time(now_ms: int) -> str:
    """Field 7, MMDDhhmmss in UTC (formatted once per second: strftime costs more than the rest of a
    purchase's field building)."""
    second = now_ms // 1000
    if second != _last_second[0]:
        _last_second[1] = dt.datetime.fromtimestamp(second, tz=dt.UTC).strftime("%m%d%H%M%S")
        _last_second[0] = second
    return _last_second[1]


def response_mti(mti: str) -> str:
    return f"{mti[0]}{mti[1]}{int(mti[2]) + 1}0"


def acquirer_request(fields: Fields, txn: Txn, institution_id: str, now_ms: int) -> Fields:
    """The 0100/0200 for the acquirer from the terminal's request (or a returned undelivered one)."""
    out: Fields = {"t": f"0{txn.mti[1]}00"}
    for f in FORWARD_FIELDS:
        v = fields.get(f)
        if v is not None:
            out[f] = v
    for f in SENSITIVE_FIELDS:
        v = fields.get(f)
        if v is not None:
            out[f] = v
    out["2"] = txn.pan
    if txn.expiry_yymm:
        out["14"] = txn.expiry_yymm
    out["4"] = f"{txn.amount_minor:012d}"
    out["49"] = txn.currency
    out["7"] = txn.acq_datetime or transmission_time(now_ms)
    out["32"] = institution_id
    out["37"] = txn.rrn
    return out


def rebuilt_request(txn: Txn, institution_id: str, now_ms: int) -> Fields:
    """The acquirer request of a transaction that waited for a ledger lookup (refunds): built from the
    core's state only, so without track 2 or a PIN block."""
    base: Fields = {
        "3": txn.processing_code,
        "12": txn.reply_base.get("12", ""),
        "13": txn.reply_base.get("13", ""),
        "41": txn.terminal_id,
        "42": txn.merchant_id,
    }
    base.update(txn.pos_fields)
    return acquirer_request(base, txn, institution_id, now_ms)


def original_data(txn: Txn | Done, institution_id: str) -> str:
    """Field 90 naming `txn` on the acquirer side: MTI, STAN, field 7, acquiring and forwarding ids."""
    mti = f"0{txn.mti[1] if txn.mti else '2'}00"
    stan = txn.acq_stan or "000000"
    when = txn.acq_datetime or "0000000000"
    return f"{mti}{stan}{when}{institution_id[-11:]:0>11}{'':0>11}"


def reversal(txn: Txn | Done, institution_id: str, now_ms: int) -> Fields:
    """0400 reversing `txn` at its acquirer; store-and-forward repeats it as 0401."""
    out: Fields = {
        "t": "0400",
        "3": txn.processing_code or "000000",
        "4": f"{txn.amount_minor:012d}",
        "7": transmission_time(now_ms),
        "32": institution_id,
        "37": txn.rrn,
        "41": txn.terminal_id,
        "42": txn.merchant_id,
        "49": txn.currency,
        "90": original_data(txn, institution_id),
    }
    if txn.pan:
        out["2"] = txn.pan
    if txn.auth_code:
        out["38"] = txn.auth_code
    return out


def advice(txn: Txn | Done, institution_id: str, now_ms: int, original: Txn | Done | None = None) -> Fields:
    """0220 advice of an outcome the switch decided alone: a stand-in approval or a completion."""
    out: Fields = {
        "t": "0220",
        "3": txn.processing_code or "000000",
        "4": f"{txn.amount_minor:012d}",
        "7": transmission_time(now_ms),
        "32": institution_id,
        "37": txn.rrn,
        "38": txn.auth_code,
        "39": txn.response_code,
        "41": txn.terminal_id,
        "42": txn.merchant_id,
        "49": txn.currency,
    }
    out.update(txn.pos_fields)
    for f in ("12", "13"):
        if f in txn.reply_base:
            out[f] = txn.reply_base[f]
    if txn.pan:
        out["2"] = txn.pan
    if txn.expiry_yymm:
        out["14"] = txn.expiry_yymm
    if original is not None:
        out["90"] = original_data(original, institution_id)
        if original.auth_code:
            out["38"] = original.auth_code
    return out


def reply_base(fields: Fields) -> Fields:
    """The part of a request an answer echoes; no card data beyond what ECHO_FIELDS names."""
    return {f: fields[f] for f in ECHO_FIELDS if f in fields}


def answer(
    mti: str,
    base: Fields,
    code: str,
    rrn: str = "",
    auth_code: str = "",
    extra: Fields | tuple[tuple[str, Any], ...] | None = None,
) -> Fields:
    """`extra`: answer fields after the rest (a live transaction's dict or a `Done`'s pairs)."""
    out: Fields = {"t": response_mti(mti)}
    out.update(base)
    if rrn:
        out["37"] = rrn
    if auth_code:
        out["38"] = auth_code
    out["39"] = code
    if extra:
        out.update(extra)
    return out

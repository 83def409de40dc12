"""ISO 8583:1987 response codes (field 39) the processing core answers with, and why each is chosen.

One table so the flows, docs/flows.md and the metrics agree on meanings. Where ISO 8583 leaves a choice
(unknown terminal, refund above the remainder) the choice is made here once and documented.
"""

from __future__ import annotations

from typing import Final

APPROVED: Final = "00"
#: Unknown merchant, unknown terminal, or a terminal not registered to the merchant in field 42.
INVALID_MERCHANT: Final = "03"
DO_NOT_HONOUR: Final = "05"
#: The MTI / processing code pair is not a flow we run, or the original is not in a state that allows
#: it (void after settlement, refund of a voided purchase, completion of a resolved hold...).
INVALID_TRANSACTION: Final = "12"
#: Amount zero, above the configured maximum, refund above the refundable remainder, completion above
#: the hold. (Chosen over 61/64: the request's amount is what is wrong, not a cardholder limit.)
INVALID_AMOUNT: Final = "13"
#: PAN fails the Luhn check or is not 12-19 digits.
INVALID_CARD: Final = "14"
#: The original named by RRN (37), field 90 or the terminal key is not known to the switch.
UNKNOWN_ORIGINAL: Final = "25"
#: No route: the BIN table names no acquirer for this card (and there is no default).
NO_SUCH_ISSUER: Final = "15"
#: A mandatory field is missing or malformed (h11's "remote protocol error").
FORMAT_ERROR: Final = "30"
#: Card expired: field 14 (or the track 2 expiry) before the transaction month.
EXPIRED_CARD: Final = "54"
#: The transaction is not permitted to this card (rules step).
NOT_PERMITTED_CARDHOLDER: Final = "57"
#: The transaction is not permitted to this terminal (rules step, terminal lifecycle of issue 6).
NOT_PERMITTED_TERMINAL: Final = "58"
#: Void amount differs from the original's amount.
ORIGINAL_AMOUNT_INCORRECT: Final = "64"
#: Acquirer did not answer by the deadline (configurable: ProcessingConfig.timeout_response_code).
TIMEOUT: Final = "68"
#: Terminal settlement totals differ from the ledger's view.
RECONCILE_ERROR: Final = "95"
#: No acquirer (nor backup, nor stand-in) can take the transaction now.
ISSUER_UNAVAILABLE: Final = "91"
#: A fresh request (MTI not ending in 1) reusing a known terminal key.
DUPLICATE: Final = "94"
#: Local failure: the ledger could not make the outcome durable, an internal limit was hit, a bug.
SYSTEM_MALFUNCTION: Final = "96"

MEANINGS: Final[dict[str, str]] = {
    APPROVED: "approved",
    INVALID_MERCHANT: "invalid merchant or terminal",
    DO_NOT_HONOUR: "do not honour",
    INVALID_TRANSACTION: "invalid transaction",
    INVALID_AMOUNT: "invalid amount",
    INVALID_CARD: "invalid card number",
    NO_SUCH_ISSUER: "no such issuer",
    UNKNOWN_ORIGINAL: "unable to locate original",
    FORMAT_ERROR: "format error",
    EXPIRED_CARD: "expired card",
    NOT_PERMITTED_CARDHOLDER: "transaction not permitted to cardholder",
    NOT_PERMITTED_TERMINAL: "transaction not permitted to terminal",
    ORIGINAL_AMOUNT_INCORRECT: "original amount incorrect",
    TIMEOUT: "response received too late",
    RECONCILE_ERROR: "reconcile error (settlement out of balance)",
    ISSUER_UNAVAILABLE: "issuer or switch inoperative",
    DUPLICATE: "duplicate transmission",
    SYSTEM_MALFUNCTION: "system malfunction",
}


#: Acquirer answers that approve the full amount.
APPROVALS: Final = frozenset({"00", "08", "11"})
#: Partial approval (10): the core does not deliver partial approvals; the terminal hears 05 and the
#: partial authorisation is reversed at the acquirer, so no funds stay held.
PARTIAL_APPROVAL: Final = "10"


def is_approval(code: str) -> bool:
    """ISO 8583:1987 full approvals: 00 (approved), 08 (honour with identification), 11 (VIP)."""
    return code in APPROVALS

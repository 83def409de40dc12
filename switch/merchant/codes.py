"""Response codes (field 39) the merchant rules decline with, and why each was chosen.

The values are ISO 8583:1987 and agree with switch.processing.codes (the processing layer owns the
full table; this layer may not import it, so the few codes it uses are named here and a test checks
they match).
"""

from __future__ import annotations

from typing import Final

#: Terminal not allowed to do this: not signed on / not activated yet, suspended for a lapsed
#: subscription, deactivated or returned, and an MCC that is not the merchant's registered MCC (the
#: terminal is sending under a category it is not contracted for: the merchant's fault, not the card's,
#: so 58 rather than 57).
NOT_PERMITTED_TERMINAL: Final = "58"
#: Refund refused because of the original's state: not approved, voided, reversed, another merchant's,
#: another currency, or older than the refund window.
INVALID_TRANSACTION: Final = "12"
#: Refund above what is left of the original (cumulative refunds never exceed it).
INVALID_AMOUNT: Final = "13"
#: The original named by RRN is not known.
UNKNOWN_ORIGINAL: Final = "25"
#: Merchant's unsettled balance does not cover the refund.
INSUFFICIENT_FUNDS: Final = "51"
#: Refund above the merchant's single-refund cap or daily refund cap.
EXCEEDS_AMOUNT_LIMIT: Final = "61"
#: Unknown or closed merchant, terminal not registered to it.
INVALID_MERCHANT: Final = "03"

"""`luhn_ok` (the byte-level check every card request runs) agrees with the textbook Luhn algorithm
on every all-digit string, and so with the 14 it answers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from switch.processing.request import luhn_ok


def textbook(pan: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@given(st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_luhn_matches_the_textbook_algorithm(pan: str) -> None:
    assert luhn_ok(pan) == textbook(pan)


def test_known_cards() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("5555555555554444") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112") and not luhn_ok("5555555555554440")

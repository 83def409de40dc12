"""Business days: refund windows, daily refund caps and cutover count whole days, not 24-hour spans.

A day starts at 00:00 at the configured UTC offset (MerchantServicesConfig.business_day_utc_offset_minutes).
"The last day of a 180-day window" is day(original) + 180: a refund on that day is allowed, on the day
after it is not, whatever the hour of the original.
"""

from __future__ import annotations

from switch.merchant.model import DAY_MS

MINUTE_MS = 60_000


def business_day(at_ms: int, utc_offset_minutes: int = 0) -> int:
    """Day number (days since 1970-01-01 at the offset) containing `at_ms`."""
    return (at_ms + utc_offset_minutes * MINUTE_MS) // DAY_MS


def day_start_ms(day: int, utc_offset_minutes: int = 0) -> int:
    """First millisecond of business day `day`."""
    return day * DAY_MS - utc_offset_minutes * MINUTE_MS


def days_between(earlier_ms: int, later_ms: int, utc_offset_minutes: int = 0) -> int:
    """Whole business days from the day of `earlier_ms` to the day of `later_ms` (0 = same day)."""
    return business_day(later_ms, utc_offset_minutes) - business_day(earlier_ms, utc_offset_minutes)

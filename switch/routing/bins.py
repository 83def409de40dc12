"""BIN table: which acquirer gets a card, by longest PAN prefix, optionally by currency and processing code.

Why a dict per prefix length: card ranges are 6-11 digit prefixes, so a lookup is at most six dict probes
(longest length first) whatever the table size; 10,000 ranges cost the same as ten (bench/routing.py).

Precedence, most specific first:
1. the longest matching prefix;
2. for equal prefixes, the route naming the most: a 6-digit processing code, then a 2-digit one, then
   none; within each, a route that also names the currency first;
3. no route at all: the default acquirer (``None`` when there is none; the caller declines).

A prefix whose qualified routes all miss (say ``411111`` only for currency 840 and the card pays in 978)
falls through to shorter prefixes, then to the default: qualifiers narrow a route, they never block a
card that a wider route would carry.

Processing code qualifiers are 2 digits (transaction type, ``00`` purchase, ``20`` refund) or all 6; a
route matches when its code is a prefix of field 3.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from switch.config import RouteConfig, RoutingConfig

MIN_PREFIX_DIGITS = 6
MAX_PREFIX_DIGITS = 11


class RoutingError(ValueError):
    """The routing configuration cannot be used; the message names the offending route."""


class Route(msgspec.Struct, frozen=True):
    """One validated route; ``currency``/``processing_code`` ``None`` means "any"."""

    prefix: str
    acquirer: str
    currency: str | None = None
    processing_code: str | None = None

    @property
    def specificity(self) -> int:
        """Rank among routes of one prefix: a 6-digit code beats a 2-digit one, a code beats a currency.

        No two distinct routes of one prefix with equal rank can both accept one message, so the winner
        never depends on the order of the config file.
        """
        pc = self.processing_code
        code_rank = 0 if pc is None else (2 if len(pc) == 2 else 4)
        return code_rank + (1 if self.currency is not None else 0)

    def accepts(self, currency: str | None, processing_code: str | None) -> bool:
        if self.currency is not None and currency != self.currency:
            return False
        return self.processing_code is None or (
            processing_code is not None and processing_code.startswith(self.processing_code)
        )


def _describe(route: RouteConfig, index: int) -> str:
    return f"routing.routes[{index}] (prefix {route.prefix!r} -> {route.acquirer!r})"


def validate_route(route: RouteConfig, index: int, acquirers: frozenset[str] | None) -> Route:
    """Check one configured route; raise RoutingError naming it."""
    where = _describe(route, index)
    prefix = route.prefix
    if not prefix.isdigit() or not prefix.isascii():
        raise RoutingError(f"{where}: prefix must be digits only")
    if not MIN_PREFIX_DIGITS <= len(prefix) <= MAX_PREFIX_DIGITS:
        raise RoutingError(
            f"{where}: prefix must be {MIN_PREFIX_DIGITS}-{MAX_PREFIX_DIGITS} digits, got {len(prefix)}"
        )
    if not route.acquirer:
        raise RoutingError(f"{where}: acquirer is empty")
    if acquirers is not None and route.acquirer not in acquirers:
        raise RoutingError(f"{where}: unknown acquirer {route.acquirer!r}")
    if route.currency is not None and (
        len(route.currency) != 3 or not route.currency.isdigit() or not route.currency.isascii()
    ):
        raise RoutingError(f"{where}: currency must be 3 digits (ISO 4217 numeric)")
    pc = route.processing_code
    if pc is not None and (len(pc) not in (2, 6) or not pc.isdigit() or not pc.isascii()):
        raise RoutingError(f"{where}: processing_code must be 2 or 6 digits")
    return Route(prefix, route.acquirer, route.currency, pc)


class BinTable:
    """Immutable longest-prefix BIN table. Build with :meth:`from_config` or :meth:`from_routes`."""

    __slots__ = ("_by_length", "_default", "_lengths", "_size")

    def __init__(self, routes: Iterable[Route], default_acquirer: str | None = None) -> None:
        by_length: dict[int, dict[str, tuple[Route, ...]]] = {}
        seen: dict[tuple[str, str | None, str | None], Route] = {}
        size = 0
        for route in routes:
            key = (route.prefix, route.currency, route.processing_code)
            if key in seen:
                raise RoutingError(
                    f"duplicate route for prefix {route.prefix!r} currency {route.currency} "
                    f"processing_code {route.processing_code}: {seen[key].acquirer!r} and {route.acquirer!r}"
                )
            seen[key] = route
            bucket = by_length.setdefault(len(route.prefix), {})
            bucket[route.prefix] = (*bucket.get(route.prefix, ()), route)
            size += 1
        # Most specific route first within a prefix; stable on ties of different qualifier values.
        for bucket in by_length.values():
            for prefix, group in bucket.items():
                bucket[prefix] = tuple(sorted(group, key=lambda r: -r.specificity))
        self._by_length = by_length
        self._lengths = tuple(sorted(by_length, reverse=True))
        self._default = default_acquirer
        self._size = size

    @classmethod
    def from_config(cls, config: RoutingConfig, acquirers: Iterable[str] | None = None) -> BinTable:
        """Validate ``config``; when ``acquirers`` is given, every route and the default must name one."""
        known = frozenset(acquirers) if acquirers is not None else None
        routes = [validate_route(r, i, known) for i, r in enumerate(config.routes)]
        default = config.default_acquirer
        if default is not None and known is not None and default not in known:
            raise RoutingError(f"routing.default_acquirer: unknown acquirer {default!r}")
        return cls(routes, default)

    @property
    def default_acquirer(self) -> str | None:
        return self._default

    def __len__(self) -> int:
        return self._size

    def find(self, pan: str, currency: str | None = None, processing_code: str | None = None) -> Route | None:
        """The most specific route for this card, or ``None`` (the default applies)."""
        for length in self._lengths:
            group = self._by_length[length].get(pan[:length])
            if group is not None:
                for route in group:
                    if route.accepts(currency, processing_code):
                        return route
        return None

    def acquirer_for(
        self, pan: str, currency: str | None = None, processing_code: str | None = None
    ) -> str | None:
        """The acquirer name for this card, the default when no route matches, ``None`` if neither."""
        route = self.find(pan, currency, processing_code)
        return route.acquirer if route is not None else self._default

    def __repr__(self) -> str:
        return f"BinTable({self._size} routes, default={self._default!r})"

"""BIN table lookup cost with 10,000 ranges (6-11 digit prefixes, some qualified by currency/code).

Run: .venv/bin/python bench/routing.py   (prints the interpreter; compare like with like)
"""

from __future__ import annotations

import platform
import random
import sys
import timeit

from switch.routing.bins import BinTable, Route


def build(n_routes: int, seed: int = 1) -> tuple[BinTable, list[str]]:
    rng = random.Random(seed)
    routes: dict[tuple[str, str | None, str | None], Route] = {}
    while len(routes) < n_routes:
        prefix = "".join(rng.choice("0123456789") for _ in range(rng.randint(6, 11)))
        cur = rng.choice([None, None, None, "840", "978"])
        pc = rng.choice([None, None, None, "00", "20"])
        routes[(prefix, cur, pc)] = Route(prefix, f"acq{len(routes) % 8}", cur, pc)
    table = BinTable(routes.values(), "default")
    prefixes = [r.prefix for r in routes.values()]
    pans = []
    for i in range(1000):
        # half hit a configured range, half are random cards that fall to the default
        head = rng.choice(prefixes) if i % 2 else ""
        pans.append(head + "".join(rng.choice("0123456789") for _ in range(16 - len(head))))
    return table, pans


def main() -> None:
    print(f"interpreter: {sys.executable} ({platform.python_implementation()} {platform.python_version()})")
    for n in (10, 10_000):
        table, pans = build(n)
        lookup = table.acquirer_for
        loops = 200
        best = min(
            timeit.repeat(
                lambda lookup=lookup, pans=pans: [lookup(p, "978", "000000") for p in pans],
                number=loops,
                repeat=5,
            )
        )
        print(f"{n:>6} routes: {best / (loops * len(pans)) * 1e6:.2f} µs per lookup (best of 5)")


if __name__ == "__main__":
    main()

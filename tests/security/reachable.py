"""What an exception (or any object) carries, for the card-data leak tests: every value reachable
through attributes, __dict__, slots, msgspec fields, args, the exception chain and containers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec


def walk(obj: Any, seen: set[int] | None = None, depth: int = 0) -> Iterator[Any]:
    """Every value reachable from `obj` (each object once, 12 levels deep at most)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, str | bytes | bytearray | int | float | bool | type(None)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(k, seen, depth + 1)
            yield from walk(v, seen, depth + 1)
        return
    if isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from walk(v, seen, depth + 1)
        return
    if isinstance(obj, BaseException):
        for name in ("args", "__cause__", "__context__", "__notes__", "object"):
            if hasattr(obj, name):
                yield from walk(getattr(obj, name), seen, depth + 1)
    if isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            yield from walk(getattr(obj, name), seen, depth + 1)
    for name in getattr(obj, "__dict__", {}):
        yield from walk(obj.__dict__[name], seen, depth + 1)
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                yield from walk(getattr(obj, name), seen, depth + 1)

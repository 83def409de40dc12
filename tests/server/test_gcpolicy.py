"""switch.server.gcpolicy, in a fresh interpreter (it changes process-wide collector settings): survivors
are frozen out of collections, the young threshold is applied, and cyclic garbage that was frozen is
still reclaimed at the next full pass."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import gc, weakref, trio
    from switch.config import ServerConfig
    from switch.server import gcpolicy

    cfg = ServerConfig(gc_young_threshold=1234, gc_freeze_interval_ms=10, gc_full_interval_s=1)
    gcpolicy.apply_thresholds(cfg)
    assert gc.get_threshold()[0] == 1234

    class Node:
        pass

    freed = []

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(gcpolicy.run, cfg)
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: only the collector can free it
            weakref.finalize(a, freed.append, "a")
            await trio.sleep(0.1)
            assert gc.get_freeze_count() > 0  # survivors were frozen
            del a, b
            gc.collect()
            assert freed == []  # frozen: not collected yet
            await trio.sleep(1.2)  # the full pass unfreezes and collects
            assert freed == ["a"], freed
            n.cancel_scope.cancel()

    trio.run(main)
    print("ok")
    """
)


def test_freeze_then_full_collection_reclaims_frozen_cycles() -> None:
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"

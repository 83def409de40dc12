"""Garbage-collector policy of the switch's process: no long collector pauses under load.

Why: the processor keeps hundreds of thousands of long-lived objects (remembered terminal keys,
originals for voids and refunds, the recovered day). CPython's full collections walk all of them:
measured under a 1,300/s load, 10 full collections in 25 s took 950 ms, the longest 164 ms -- pauses
that every request in flight waits through, and the largest source of the p99 tail then. With this
policy (young threshold 2,000, freeze every second) the same run had no full collection, the longest
pause was 10 ms and collector time fell from 1.5 s to 0.4 s (docs/performance.md).

Applied only when the switch owns its process (`switch run`: `serve(..., manage_gc=True)`); tests and
the demo, which run switches inside another program, keep Python's collector as it is.

How: `gc.freeze()` every `gc_freeze_interval_ms` moves every object that survived so far into the
permanent generation, which collections skip; young collections still reclaim the short-lived cycles
(trio tasks, exceptions). The cost is that a frozen object that later becomes cyclic garbage is not
reclaimed until the next `gc_full_interval_s`, when everything is unfrozen and one full collection runs
(one long pause, at a known rate, instead of many at random). That pause stays short because the
largest population, the processor's finished transactions (up to a million), is kept as untracked
`Done` records (switch.processing.record) that no collection walks: a full collection with a million
remembered purchases takes ~20 ms against ~2.8 s when they were tracked `Txn`s (bench/memory.py).
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import trio

from switch.config import ServerConfig

log = logging.getLogger(__name__)


def apply_thresholds(config: ServerConfig) -> None:
    """Set the young-generation threshold (0 keeps Python's)."""
    if config.gc_young_threshold > 0:
        _, g1, g2 = gc.get_threshold()
        gc.set_threshold(config.gc_young_threshold, g1, g2)


async def run(config: ServerConfig) -> None:
    """Freeze survivors periodically; unfreeze and collect fully every gc_full_interval_s."""
    if config.gc_freeze_interval_ms <= 0:
        return
    gc.freeze()  # what start-up built (config, recovered book) is never scanned again
    interval_s = config.gc_freeze_interval_ms / 1000.0
    full_every_s = config.gc_full_interval_s
    next_full = time.monotonic() + full_every_s if full_every_s > 0 else float("inf")
    while True:
        await trio.sleep(interval_s)
        if time.monotonic() >= next_full:
            next_full = time.monotonic() + full_every_s
            t0 = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            took_ms = (time.perf_counter() - t0) * 1e3
            log.info("full garbage collection: %d unreachable objects, %.0f ms", found, took_ms)
        gc.freeze()


def run_in_thread(config: ServerConfig, stop: threading.Event) -> threading.Thread | None:
    """The same policy for a process without trio (the ledger process): a daemon thread until `stop`."""
    if config.gc_freeze_interval_ms <= 0:
        return None

    def loop() -> None:
        gc.freeze()
        interval_s = config.gc_freeze_interval_ms / 1000.0
        full_every_s = config.gc_full_interval_s
        next_full = time.monotonic() + full_every_s if full_every_s > 0 else float("inf")
        while not stop.wait(interval_s):
            if time.monotonic() >= next_full:
                next_full = time.monotonic() + full_every_s
                gc.unfreeze()
                gc.collect()
            gc.freeze()

    thread = threading.Thread(target=loop, name="gc-policy", daemon=True)
    thread.start()
    return thread

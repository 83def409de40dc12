"""The ledger writer seen from trio: `await append(writer, drafts)` returns once the entries are durable.

Why no thread hop per call: the writer thread already calls back when a batch is durable, so the
waiting task parks with `wait_task_rescheduled` and the callback wakes it with one
`TrioToken.run_sync_soon(reschedule, ...)`. Cancellation cannot un-submit money, so a cancelled caller
keeps waiting until the ledger answers (one batch, milliseconds), gets that true answer (entries or
error), and the cancellation is delivered at its next checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import outcome
import trio

from switch.ledger.model import Entry, EntryDraft
from switch.ledger.writer import LedgerWriter


async def append(writer: LedgerWriter, drafts: Sequence[EntryDraft]) -> list[Entry]:
    """Submit one outcome's drafts and wait until they are durable; raises what the writer raised
    (LedgerBusy and malformed drafts at once, rule errors and storage errors once the batch ran)."""
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def on_done(entries: list[Entry] | None, error: BaseException | None) -> None:
        result = outcome.Error(error) if error is not None else outcome.Value(entries)
        try:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)
        except trio.RunFinishedError:
            pass  # the trio run ended while the batch was committing; nobody is left to tell

    writer.submit(drafts, on_done)

    def abort(_: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED  # wait for the ledger's answer; the cancel lands after

    entries: list[Entry] = await trio.lowlevel.wait_task_rescheduled(abort)
    return entries

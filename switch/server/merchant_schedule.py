"""The deposit schedule of a running switch: undecided terminal deposits are evaluated every
`merchant_services.deposit_check_interval_s` and their refund or keep is posted once decided, with no
operator asking (issue 6: "refunded by rule when the activation condition holds, kept otherwise").

Only the trio task lives here; what is due and what is decided is switch.merchant (pure
`deposit.due` / `deposit.evaluate`, with the switch's clock), and the posting is
`MerchantService.sweep_deposits` -> `evaluate_deposit`, the same code the API and the CLI run. That
code makes every outcome happen exactly once: the ledger is the truth (an outcome already posted is
only recorded in the registry, e.g. after a crash between the two), and both outcomes of a deposit
share one idempotency key, so this schedule racing a manual evaluation posts one entry. Entries go
through the switch's one ledger writer; the registry change is audited with actor
`switch:deposit-schedule`, logged, and reaches the running rules at once (the refund moves the
merchant's unsettled balance).

The first pass runs at start-up (catching up on deposits decided while the switch was down), then one
pass per interval. A pass evaluates at most `max_deposit_checks_per_pass` terminals and continues
where the last one stopped. Its database work runs in a worker thread on the task's own registry and
ledger-reader connections; shutdown waits for a pass in progress to finish (its posts are bounded by
the ledger append timeout).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from switch.server.admin.wiring import MerchantWiring

log = logging.getLogger("switch.merchant")

#: Actor recorded in the registry audit for the schedule's changes.
ACTOR = "switch:deposit-schedule"


async def run_deposit_schedule(
    wiring: MerchantWiring, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    cfg = wiring.cfg
    service = wiring.posting_service()  # this task's own connections (one thread at a time)
    cursor = None
    passes = 0
    try:
        task_status.started()
        while True:
            try:
                sweep = await trio.to_thread.run_sync(
                    service.sweep_deposits, ACTOR, cfg.max_deposit_checks_per_pass, cursor
                )
            except Exception as exc:  # a database hiccup: the next pass tries again
                log.warning("deposit schedule: pass failed: %s", exc)
            else:
                cursor = sweep.cursor
                for ev in sweep.decided:
                    log.info(
                        "deposit of terminal %s %s by the schedule: %s",
                        ev.terminal_id,
                        "refunded" if ev.result == "refund" else "kept",
                        ev.reason,
                    )
                for error in sweep.errors:
                    log.error("deposit schedule: %s", error)
            passes += 1
            wiring.deposit_passes = passes
            await trio.sleep(cfg.deposit_check_interval_s)
    finally:
        service.store.close()
        service.reader.close()

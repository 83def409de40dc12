"""Reads the server needs from the ledger: originals (FindOriginal) and the start-up state (Recovered).

A second connection to the ledger database (SQLite WAL readers never block the writer thread). Reads
are small indexed lookups: the start-up state on the trio thread before traffic, originals on the
lookup thread (switch.server.lookups) -- one user at a time, never concurrently.
"""

from __future__ import annotations

from typing import Any

from switch.ledger.codec import decode_draft
from switch.ledger.model import EntryDraft


class LedgerReader:
    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def close(self) -> None:
        self.backend.close()

    def _drafts_at(self, seqs: list[int]) -> list[EntryDraft]:
        out = []
        for seq in sorted(set(seqs)):
            for row in self.backend.entry_rows(seq, seq + 1):
                out.append(decode_draft(row.body))
        return out

    def find_original(self, rrn: str | None, idempotency_key: str | None) -> list[EntryDraft]:
        """Every entry with this RRN as rrn or original_rrn (for a key: that entry's RRN), plus its
        merchant fee family (`<rrn>/fee`: the fee, its returns and reversals)."""
        b = self.backend
        if idempotency_key:
            found = b.find_idempotency([idempotency_key]).get(idempotency_key)
            if found is None:
                return []
            rrn = decode_draft(found[1]).rrn
        if not rrn:
            return []
        return self._drafts_at([row.seq for row in b.txn_rows([rrn, f"{rrn}/fee"])])

    def recovery_drafts(self, since_ms: int) -> list[EntryDraft]:
        """Entries at or after `since_ms`, plus every entry of still-open holds, in sequence order."""
        b = self.backend
        n = b.entry_count()
        lo, hi = 0, n  # first seq with at_ms >= since_ms (at_ms grows with seq, near enough)
        while lo < hi:
            mid = (lo + hi) // 2
            rows = b.entry_rows(mid, mid + 1)
            if rows and rows[0].at_ms < since_ms:
                lo = mid + 1
            else:
                hi = mid
        seqs: dict[int, EntryDraft] = {}
        for row in b.iter_entry_rows(lo):
            seqs[row.seq] = decode_draft(row.body)
        holds = b.open_holds()
        hold_rrns = [h[1] for h in holds]
        if hold_rrns:
            extra = [row.seq for row in b.txn_rows(hold_rrns) if row.seq not in seqs]
            for seq, draft in zip(sorted(set(extra)), self._drafts_at(extra)):
                seqs[seq] = draft
        return [seqs[k] for k in sorted(seqs)]

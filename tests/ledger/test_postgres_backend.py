"""PostgreSQL-specific behaviour of the ledger backend: durability settings it insists on, append-only
triggers, all-or-nothing batches, bounded waits and reconnects. The shared ledger suite (via the
`ledger_backend` fixture) covers the behaviour common to both backends."""

from __future__ import annotations

import hashlib

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.config import LedgerConfig
from switch.ledger.backend import APPEND_ONLY_TABLES, BatchRows, LedgerStorageError
from switch.ledger.model import EntryKind
from switch.ledger.postgres import PostgresBackend
from switch.ledger.verify import verify_ledger
from switch.ledger.writer import LedgerWriter
from tests.pgcluster import PgCluster, process_gone_within

from .drafts import draft

pytestmark = pytest.mark.postgres


def _batch(start: int, n: int) -> BatchRows:
    """n entries from seq `start`, rows shaped as the writer prepares them (hashes are stand-ins)."""
    entries = []
    for seq in range(start, start + n):
        body = f"entry-{seq}".encode()
        entries.append(
            (seq, f"idem-{seq}", "purchase", f"{seq:012d}", "", 1_700_000_000_000 + seq, "M1", 1_000, "978",
             body, hashlib.sha256(b"\0" + body).digest())
        )  # fmt: skip
    last = start + n - 1
    return BatchRows(
        entries=entries,
        nodes=[(8, start, b"\x44" * 32)],
        balances=[
            ("acquirer:A:clearing", "978", last, start, 1_000 * (start + n)),
            ("merchant:M1:payable", "978", last, start, -1_000 * (start + n)),
        ],
        tree_head=(start + n, b"\x11" * 32, 1),
    )


def test_batch_round_trips_with_binary_copy(pg_dsn: str) -> None:
    be = PostgresBackend(pg_dsn)
    be.write_batch(_batch(0, 300))
    be.write_batch(_batch(300, 200))
    assert be.entry_count() == 500
    row = be.entries_by_rrn("000000000042")[0]
    assert (row.seq, row.idempotency_key, row.body, row.amount_minor) == (42, "idem-42", b"entry-42", 1_000)
    assert be.leaf_hashes(42, 43) == [hashlib.sha256(b"\0entry-42").digest()]
    assert be.nodes(8, 0, 1000) == [(0, b"\x44" * 32), (300, b"\x44" * 32)]
    assert be.balance_at_or_before("acquirer:A:clearing", "978", None) == (
        "acquirer:A:clearing", "978", 499, 300, 500_000)  # fmt: skip
    assert be.balance_at_or_before("acquirer:A:clearing", "978", 400) == (
        "acquirer:A:clearing", "978", 299, 0, 300_000)  # fmt: skip
    assert [b.balance_minor for b in be.latest_balances()] == [500_000, -500_000]
    assert be.last_tree_head() == (500, b"\x11" * 32, 1)
    assert [e.seq for e in be.iter_entry_rows(495, chunk=2)] == [495, 496, 497, 498, 499]
    be.close()


def test_failed_batch_leaves_nothing_and_backend_stays_usable(pg_dsn: str) -> None:
    be = PostgresBackend(pg_dsn)
    be.write_batch(_batch(0, 10))
    with pytest.raises(LedgerStorageError, match="ledger commit failed"):
        be.write_batch(_batch(5, 10))  # seq 5..9 already exist: the whole batch must be rejected
    assert be.entry_count() == 10
    assert be.find_idempotency(["idem-12"]) == {}
    assert be.last_tree_head() == (10, b"\x11" * 32, 1)
    assert be.balance_at_or_before("acquirer:A:clearing", "978", None) == (
        "acquirer:A:clearing", "978", 9, 0, 10_000)  # fmt: skip
    be.write_batch(_batch(10, 5))
    assert be.entry_count() == 15
    be.close()


@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
def test_triggers_reject_update_delete_truncate(pg_dsn: str, table: str) -> None:
    be = PostgresBackend(pg_dsn)
    be.write_batch(_batch(0, 3))
    be.write_checkpoint((3, b"\x22" * 32, 5, "k1", b"\x33" * 64))
    be.write_index_run(0, 3, 7)  # rows in key_index, merchant_index, index_runs
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None and row[0] > 0
        column = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1", (table,)
        ).fetchone()
        assert column is not None
        for stmt in (
            f"UPDATE {table} SET {column[0]} = {column[0]}",
            f"DELETE FROM {table}",
            f"TRUNCATE {table}",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(stmt)
    be.close()


def test_insists_on_durable_commit(pg_cluster: PgCluster, pg_database_dsn: str) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(pg_database_dsn)["dbname"]
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    be = PostgresBackend(pg_database_dsn)
    assert be.conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    be.close()


def test_refuses_server_without_fsync_and_cluster_cleans_up() -> None:
    # Also the cluster helper's teardown check (one extra cluster instead of two).
    cluster = PgCluster(settings={"fsync": "off"}).start()
    root = cluster.root
    assert root is not None
    try:
        with pytest.raises(LedgerStorageError, match="fsync=off"):
            PostgresBackend(cluster.create_database())
        pid = int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    finally:
        cluster.stop()
    assert not root.exists()
    assert process_gone_within(pid, seconds=10.0)
    cluster.stop()  # idempotent


def test_reconnects_after_the_server_drops_the_connection(pg_cluster: PgCluster, pg_dsn: str) -> None:
    be = PostgresBackend(pg_dsn)
    be.write_batch(_batch(0, 5))
    pid = be.conn.info.backend_pid
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(LedgerStorageError):
        be.write_batch(_batch(5, 5))  # the broken connection fails this batch: no false success
    be.write_batch(_batch(5, 5))  # and is replaced for the next one
    assert be.entry_count() == 10
    assert be.conn.info.backend_pid != pid
    be.close()


def test_second_writer_waits_for_the_lock_and_times_out(pg_dsn: str) -> None:
    first = PostgresBackend(pg_dsn)
    second = PostgresBackend(pg_dsn, statement_timeout_ms=300)
    first.conn.execute("BEGIN")
    first.conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (0x1ED6E5,))
    with pytest.raises(LedgerStorageError, match="statement timeout"):
        second.write_batch(_batch(0, 5))
    first.conn.execute("ROLLBACK")
    second.write_batch(_batch(0, 5))
    assert first.entry_count() == 5
    first.close()
    second.close()


def test_unreachable_server_is_a_clear_error(tmp_path: object) -> None:
    dsn = f"host={tmp_path} port=5999 dbname=ledger user=switch password=s3cret"
    with pytest.raises(LedgerStorageError, match="cannot connect") as info:
        PostgresBackend(dsn, connect_timeout_s=2)
    assert "s3cret" not in str(info.value)


def test_open_without_schema_is_refused(pg_dsn: str) -> None:
    with pytest.raises(LedgerStorageError, match="no ledger schema"):
        PostgresBackend(pg_dsn, create=False)


def test_one_writer_at_a_time_readers_unaffected(pg_dsn: str) -> None:
    first = PostgresBackend(pg_dsn, writer=True)
    with pytest.raises(LedgerStorageError, match="another ledger writer"):
        PostgresBackend(pg_dsn, writer=True, writer_lock_timeout_ms=200)
    reader = PostgresBackend(pg_dsn)  # opening (schema present) and reading never wait for the writer
    first.write_batch(_batch(0, 5))
    assert reader.entry_count() == 5
    stray = PostgresBackend(pg_dsn, statement_timeout_ms=300)  # a non-writer session trying to write
    with pytest.raises(LedgerStorageError, match="statement timeout"):
        stray.write_batch(_batch(5, 5))
    first.close()
    second = PostgresBackend(pg_dsn, writer=True, writer_lock_timeout_ms=2_000)
    second.write_batch(_batch(5, 5))
    assert reader.entry_count() == 10
    for be in (second, reader, stray):
        be.close()


def test_batch_lookups_take_any_number_of_keys(pg_dsn: str) -> None:
    be = PostgresBackend(pg_dsn)
    be.write_batch(_batch(0, 1_200))
    refund = list(_batch(1_200, 1).entries[0])
    refund[1], refund[2], refund[3], refund[4] = "idem-refund", "refund", "R-REFUND", "000000000007"
    be.write_batch(
        BatchRows(entries=[tuple(refund)], nodes=[], balances=[], tree_head=(1_201, b"\x11" * 32, 2))
    )
    keys = [f"idem-{i}" for i in range(1_200)] + ["never-used"]
    found = be.find_idempotency(keys)
    assert len(found) == 1_200 and found["idem-1000"] == (1_000, b"entry-1000")
    assert be.find_idempotency([]) == {}
    rows = be.txn_rows([f"{i:012d}" for i in range(1_195)] + ["000000000007", "nothing"])
    assert len(rows) == 1_196 and [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert rows[-1].kind == "refund" and rows[-1].original_rrn == "000000000007"
    assert be.txn_rows([]) == []
    be.close()


class _AckLostBackend(PostgresBackend):
    """COMMITs, then reports the connection lost: the ambiguous outcome of a network failure."""

    lose_next = False

    def write_batch(self, batch: BatchRows) -> None:
        super().write_batch(batch)
        if self.lose_next:
            self.lose_next = False
            raise LedgerStorageError("server closed the connection unexpectedly (after COMMIT)")


def test_commit_whose_answer_is_lost_fails_callers_and_a_retry_finds_the_original(pg_dsn: str) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    backend = _AckLostBackend(pg_dsn, writer=True)
    cfg = LedgerConfig(batch_window_ms=0)
    with LedgerWriter(backend, signing_key=key, config=cfg) as w:
        first = w.append([draft("a", EntryKind.PURCHASE, "R1", 500)])
        backend.lose_next = True
        with pytest.raises(LedgerStorageError, match="after COMMIT"):
            w.append([draft("b", EntryKind.PURCHASE, "R2", 700)])  # durable, but nobody is told so
        (again,) = w.append([draft("b", EntryKind.PURCHASE, "R2", 700)])  # the caller's retry
        (later,) = w.append([draft("c", EntryKind.PURCHASE, "R3", 900)])
    assert (first[0].seq, again.seq, later.seq) == (0, 1, 2)
    reader = PostgresBackend(pg_dsn, create=False)
    assert verify_ledger(reader, key.public_key()).ok
    assert reader.entry_count() == 3
    reader.close()

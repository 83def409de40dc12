"""The storage interface of the ledger, and the SQL that SQLite and PostgreSQL share.

Why this shape: the writer thread (switch.ledger.writer) owns all the logic -- sequence numbers,
idempotency, hold/refund rules, the Merkle tree -- and hands a backend one fully prepared `BatchRows`
per group commit. A backend only moves rows in and out in bulk, so a new backend is small: it
connects, supplies its `Dialect`, and (optionally) overrides the bulk insert with something faster
(COPY on PostgreSQL). Everything else is `SqlBackend`, written once against DB-API cursors.

Tables (names and column orders are constants below; the PostgreSQL backend reuses them):

- `entries`       one row per committed entry, seq 0.. gap-free (= Merkle leaf index). `body` holds the
                  canonical draft bytes (`switch.ledger.codec`), postings included; the other columns
                  are projections of it for indexes and queries, cross-checked by `verify`. `leaf_hash`
                  is SHA-256(0x00 || entry bytes), stored so proofs need no rehashing and verify can
                  name the exact entry whose bytes changed.
- `merkle_nodes`  roots of complete subtrees at levels >= NODE_MIN_LEVEL: node (level, idx) covers
                  leaves [idx * 2**level, (idx + 1) * 2**level). Lower levels are rebuilt from
                  `leaf_hash` (at most 2**NODE_MIN_LEVEL hashes), which keeps the write cost ~1/128 row
                  per entry while proofs stay O(log n) reads.
- `tree_heads`    one row per committed batch: tree size and RFC 6962 root after that batch.
- `checkpoints`   signed tree heads (Ed25519 over `checkpoint_message`), every N entries and at shutdown.
- `balance_history` derived, append-only: one row per (account, currency) touched per batch: the
                  balance (debits minus credits) right after the batch's last entry touching it (`seq`),
                  and the batch's first such entry (`first_seq`). Current balance = latest row; balance
                  as of any seq = previous row + fold of at most one batch. `rebuild_check` refolds it.
- `key_index`     idempotency key -> seq, and `merchant_index` (merchant_id, at_ms, seq): the lookup
                  indexes of `entries`, filled in sorted runs (below), never per batch.
- `balance_index` the rows of `balance_history` (which is kept in seq order) by (account, currency,
                  seq), filled in the same runs.
- `index_runs`    one row per run: the runs cover exactly the entries with seq < MAX(upto_seq) (the
                  watermark); entries at or past it are the unindexed tail.
- `ledger_meta`   schema version and other facts, key/value.

Why index runs (LSM-style) instead of B-tree indexes on `entries`: an index whose keys are spread over
many values (idempotency keys start with the terminal id; merchant ids) makes each 1,000-entry batch
dirty ~one distinct leaf page per entry once the index outgrows a batch, and WAL mode writes every
dirty page as a full 4 KiB frame at every commit. Measured (bench/ledger.py key shapes, 100,000
entries): 1.3 -> 9.3 KB of WAL per entry from the first to the last 10,000, write_batch CPU 17 -> 64
us/entry. So `entries` keeps only indexes that grow in sequence order (rrn: allocated in order; the
partial indexes), balance_history is clustered by seq, and every `index_run_entries` entries the
writer's background indexer (its own thread and connection, off the commit path: switch.ledger.writer
"Index runs"; on SQLite the index tables are a file of their own, switch.ledger.sqlite) copies the
tail into the three index tables in ONE sorted INSERT ... SELECT per table (a
balance row per account touched per batch is ~one row per entry with many merchants): a run dirties
each leaf page it lands on once per run instead of once per batch. Lookups are exact at every
moment: each query reads the index tables and scans the tail (seq >= watermark, a range of the
clustering key of at most about one run) in ONE statement, so both halves see the same snapshot;
the writer keeps the tail's keys in memory. The index tables' primary keys still enforce unique
idempotency keys (at run time), and `rebuild_check` (verify) proves they hold exactly the entries
(and balance rows) below the watermark.

Every table but `ledger_meta` is append-only: triggers reject UPDATE and DELETE, so only
someone who drops the triggers (as the tamper tests do, on a copy) can change history -- and then
`verify` names the first index that differs.

Contract of `write_batch`: one transaction; when it returns the batch is durable (fsync'd); when it
raises nothing of the batch is visible (the backend rolled back) and the writer fails every caller of
that batch. Backends never invent sequence numbers or hashes; they store what they are given.

Why postings are not rows of their own: on this machine one SQLite row costs ~3.5 us plus ~1 us per
100 bytes, so two posting rows per entry (plus an account index) would eat the 50k entries/s budget;
balances are kept per batch in `balance_history` instead, and the postings live in the hashed body.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

import msgspec

#: Version of the schema below; stored in ledger_meta('schema_version'). Bump on incompatible change.
#: 3: on SQLite the index tables live in their own file (INDEX_TABLES, switch.ledger.sqlite).
SCHEMA_VERSION = 3
#: Versions `create_schema` upgrades in place (1: entries had the key and merchant B-tree indexes;
#: 2: SQLite's index tables were in the entries file).
UPGRADABLE_VERSIONS = (1, 2)

#: Lowest Merkle level stored in merkle_nodes (levels below are recomputed from entries.leaf_hash).
NODE_MIN_LEVEL = 8

#: Upper bound on values bound into one `IN (...)` list; larger lookups are chunked.
MAX_IN_LIST = 900
#: Keys per page of `indexed_keys` (the key filter's fill at start).
INDEXED_KEYS_PAGE = 50_000

ENTRY_COLUMNS: tuple[str, ...] = (
    "seq",
    "idempotency_key",
    "kind",
    "rrn",
    "original_rrn",
    "at_ms",
    "merchant_id",
    "amount_minor",
    "currency",
    "body",
    "leaf_hash",
)
#: Deprecated: postings are no longer a table (they live in entries.body). Kept only so existing
#: imports keep working; do not use.
POSTING_COLUMNS: tuple[str, ...] = ("seq", "idx", "account", "side", "amount_minor", "currency")
NODE_COLUMNS: tuple[str, ...] = ("level", "idx", "hash")
TREE_HEAD_COLUMNS: tuple[str, ...] = ("tree_size", "root_hash", "at_ms")
CHECKPOINT_COLUMNS: tuple[str, ...] = ("tree_size", "root_hash", "at_ms", "key_id", "signature")
BALANCE_COLUMNS: tuple[str, ...] = ("account", "currency", "seq", "first_seq", "balance_minor")

#: PostgreSQL binary COPY type of every column, per table, in *_COLUMNS order.
COPY_TYPES: dict[str, tuple[str, ...]] = {
    "entries": ("int8", "text", "text", "text", "text", "int8", "text", "int8", "text", "bytea", "bytea"),
    "merkle_nodes": ("int4", "int8", "bytea"),
    "balance_history": ("text", "text", "int8", "int8", "int8"),
}

#: Tables that triggers keep append-only.
APPEND_ONLY_TABLES: tuple[str, ...] = (
    "entries",
    "merkle_nodes",
    "tree_heads",
    "checkpoints",
    "balance_history",
    "key_index",
    "merchant_index",
    "balance_index",
    "index_runs",
)

#: The tables index runs write (derived from entries and balance_history; rebuildable). A backend may
#: keep them in a database of their own (SQLite: another file, so a run's write transaction does not
#: hold the entries file's write lock); queries name them unqualified either way.
INDEX_TABLES: tuple[str, ...] = ("key_index", "merchant_index", "balance_index", "index_runs")

#: The watermark, as a scalar subquery (0 before the first run).
WATERMARK_SQL = "(SELECT COALESCE(MAX(upto_seq), 0) FROM index_runs)"
#: entries_key_by_block indexes (seq >> TAIL_BLOCK_SHIFT, idempotency_key): ordered by blocks of
#: 1,024 entries, so a batch's keys land in the newest block or two (a few pages per batch, like an
#: index in seq order), while a key in the tail is found with one seek per tail block (about
#: index_run_entries / 1,024 seeks) instead of a scan of the tail: measured 4.7 -> 0.04 ms for one
#: key with 19,000 entries in the tail.
TAIL_BLOCK_SHIFT = 10
#: Prefix for statements that use TAIL_KEY_FILTER: the tail's block numbers.
TAIL_BLOCKS_CTE = (
    f"WITH RECURSIVE tail_block(x) AS (SELECT {WATERMARK_SQL} >> {TAIL_BLOCK_SHIFT} UNION ALL "
    "SELECT x + 1 FROM tail_block WHERE x < "
    f"(SELECT COALESCE(MAX(seq), 0) FROM entries) >> {TAIL_BLOCK_SHIFT}) "
)
#: Entries of the tail, found through entries_key_by_block (add a condition on idempotency_key).
TAIL_KEY_FILTER = f"(seq >> {TAIL_BLOCK_SHIFT}) IN (SELECT x FROM tail_block) AND seq >= {WATERMARK_SQL}"


def merchant_seqs_sql(p: str, limit: int) -> str:
    """Seqs of a merchant's entries with from_ms <= at_ms <= to_ms (params: merchant_id, from_ms,
    to_ms, twice), oldest first, at most `limit`: the merchant index plus the unindexed tail, one
    snapshot."""
    return (
        f"SELECT seq FROM (SELECT seq FROM merchant_index WHERE merchant_id = {p} AND at_ms >= {p} "
        f"AND at_ms <= {p} UNION ALL SELECT seq FROM entries WHERE seq >= {WATERMARK_SQL} "
        f"AND merchant_id = {p} AND at_ms >= {p} AND at_ms <= {p}) t ORDER BY seq LIMIT {int(limit)}"
    )


def key_range_seqs_sql(p: str, limit: int, key: str = "idempotency_key") -> str:
    """Seqs of entries whose idempotency key is in [lo, hi) (params: lo, hi, twice), newest first, at
    most `limit`: the key index plus the unindexed tail, one snapshot. `key` may add a collation."""
    return (
        f"{TAIL_BLOCKS_CTE}SELECT seq FROM (SELECT seq FROM key_index WHERE {key} >= {p} AND {key} < {p} "
        f"UNION ALL SELECT seq FROM entries WHERE {TAIL_KEY_FILTER} "
        f"AND {key} >= {p} AND {key} < {p}) t ORDER BY seq DESC LIMIT {int(limit)}"
    )


class EntryRowT(NamedTuple):
    """One `entries` row in ENTRY_COLUMNS order."""

    seq: int
    idempotency_key: str
    kind: str
    rrn: str
    original_rrn: str
    at_ms: int
    merchant_id: str
    amount_minor: int
    currency: str
    body: bytes
    leaf_hash: bytes


class BalanceRowT(NamedTuple):
    """One `balance_history` row in BALANCE_COLUMNS order."""

    account: str
    currency: str
    seq: int
    first_seq: int
    balance_minor: int


class TxnRow(NamedTuple):
    """What the hold/refund rules need of an existing entry (switch.ledger.rules)."""

    seq: int
    kind: str
    rrn: str
    original_rrn: str
    amount_minor: int
    currency: str


TXN_COLUMNS = "seq, kind, rrn, original_rrn, amount_minor, currency"


class BatchRows(msgspec.Struct, kw_only=True):
    """Everything one group commit writes, fully prepared by the writer (plain tuples, column order as
    the *_COLUMNS constants). All rows are inserts (no upserts, no updates)."""

    entries: list[tuple[Any, ...]]
    nodes: list[tuple[int, int, bytes]]
    balances: list[tuple[str, str, int, int, int]]
    tree_head: tuple[int, bytes, int] | None
    checkpoint: tuple[int, bytes, int, str, bytes] | None = None


class Dialect(msgspec.Struct, frozen=True):
    """The few spots where SQLite and PostgreSQL SQL differ."""

    name: str
    placeholder: str  # "?" (sqlite3) or "%s" (psycopg)
    bigint: str  # column type for 64-bit integers
    blob: str  # column type for bytes
    without_rowid: str  # table suffix for clustered-by-primary-key tables ("" where n/a)

    def params(self, n: int) -> str:
        return ", ".join([self.placeholder] * n)

    def insert(self, table: str, columns: Sequence[str]) -> str:
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({self.params(len(columns))})"

    def in_list(self, column: str, n: int) -> str:
        return f"{column} IN ({self.params(n)})"

    def append_only_triggers(self, table: str, db: str = "") -> list[str]:
        """`db`: the SQLite schema the table lives in, with a dot ("ix."), "" for main."""
        if self.name == "sqlite":
            return [
                f"CREATE TRIGGER IF NOT EXISTS {db}{table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'ledger table {table} is append-only: {op} rejected'); END"
                for op in ("UPDATE", "DELETE")
            ]
        # PostgreSQL: one shared function, one trigger per operation (TRUNCATE too).
        return [
            "CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'ledger table % is append-only: % rejected', TG_TABLE_NAME, TG_OP; "
            "END $$",
            f"DROP TRIGGER IF EXISTS {table}_no_update ON {table}",
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ledger_append_only()",
            f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()",
        ]


SQLITE = Dialect(
    name="sqlite", placeholder="?", bigint="INTEGER", blob="BLOB", without_rowid=" WITHOUT ROWID"
)
POSTGRES = Dialect(name="postgres", placeholder="%s", bigint="BIGINT", blob="BYTEA", without_rowid="")


def schema(d: Dialect, index_db: str = "") -> list[str]:
    """DDL statements, idempotent (IF NOT EXISTS), in order. `index_db` ("ix." or ""): the SQLite
    schema of the INDEX_TABLES."""
    i, b = d.bigint, d.blob
    x = index_db
    stmts = [
        f"""CREATE TABLE IF NOT EXISTS entries (
            seq {i} PRIMARY KEY CHECK (seq >= 0),
            idempotency_key TEXT NOT NULL,
            kind TEXT NOT NULL,
            rrn TEXT NOT NULL,
            original_rrn TEXT NOT NULL,
            at_ms {i} NOT NULL,
            merchant_id TEXT NOT NULL,
            amount_minor {i} NOT NULL,
            currency TEXT NOT NULL,
            body {b} NOT NULL,
            leaf_hash {b} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS entries_rrn ON entries (rrn)",
        "CREATE INDEX IF NOT EXISTS entries_original_rrn ON entries (original_rrn) WHERE original_rrn <> ''",
        "CREATE INDEX IF NOT EXISTS entries_holds ON entries (seq) WHERE kind = 'hold'",
        "CREATE INDEX IF NOT EXISTS entries_key_by_block "
        f"ON entries ((seq >> {TAIL_BLOCK_SHIFT}), idempotency_key)",
        f"""CREATE TABLE IF NOT EXISTS {x}key_index (
            idempotency_key TEXT NOT NULL PRIMARY KEY,
            seq {i} NOT NULL){d.without_rowid}""",
        f"""CREATE TABLE IF NOT EXISTS {x}merchant_index (
            merchant_id TEXT NOT NULL,
            at_ms {i} NOT NULL,
            seq {i} NOT NULL,
            PRIMARY KEY (merchant_id, at_ms, seq)){d.without_rowid}""",
        f"""CREATE TABLE IF NOT EXISTS {x}index_runs (
            upto_seq {i} PRIMARY KEY,
            at_ms {i} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS merkle_nodes (
            level INTEGER NOT NULL,
            idx {i} NOT NULL,
            hash {b} NOT NULL,
            PRIMARY KEY (level, idx)){d.without_rowid}""",
        f"""CREATE TABLE IF NOT EXISTS tree_heads (
            tree_size {i} PRIMARY KEY,
            root_hash {b} NOT NULL,
            at_ms {i} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS checkpoints (
            tree_size {i} PRIMARY KEY,
            root_hash {b} NOT NULL,
            at_ms {i} NOT NULL,
            key_id TEXT NOT NULL,
            signature {b} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS balance_history (
            account TEXT NOT NULL,
            currency TEXT NOT NULL,
            seq {i} NOT NULL,
            first_seq {i} NOT NULL,
            balance_minor {i} NOT NULL,
            PRIMARY KEY (seq, account, currency)){d.without_rowid}""",
        f"""CREATE TABLE IF NOT EXISTS {x}balance_index (
            account TEXT NOT NULL,
            currency TEXT NOT NULL,
            seq {i} NOT NULL,
            first_seq {i} NOT NULL,
            balance_minor {i} NOT NULL,
            PRIMARY KEY (account, currency, seq)){d.without_rowid}""",
        "CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ]
    for table in APPEND_ONLY_TABLES:
        stmts.extend(d.append_only_triggers(table, x if table in INDEX_TABLES else ""))
    return stmts


class LedgerStorageError(RuntimeError):
    """The database refused or failed an operation; the message says which."""


class LedgerBackend(Protocol):
    """What the writer, the queries and `verify` need from storage. `SqlBackend` implements it all on
    DB-API; a backend subclasses it and provides `_connect`, `_begin`, `dialect`.

    Threading: one backend object is used by one thread at a time. The writer thread owns its own
    backend; readers (queries, verify, CLI) open another one on the same database.
    """

    dialect: Dialect

    def create_schema(self) -> None: ...
    def close(self) -> None: ...

    # --- writer side -----------------------------------------------------------------------------
    def entry_count(self) -> int:
        """Number of entries (= next seq). Trusts the gap-free invariant; verify checks it."""
        ...

    def find_idempotency(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """key -> (seq, body) for keys already committed."""
        ...

    def txn_rows(self, rrns: Iterable[str]) -> list[TxnRow]:
        """Entries whose rrn OR original_rrn is in `rrns`, ordered by seq."""
        ...

    def write_batch(self, batch: BatchRows) -> None:
        """Insert the batch in ONE transaction and return only once it is durable; on failure roll
        back and raise LedgerStorageError (nothing of the batch is visible)."""
        ...

    def write_checkpoint(self, row: tuple[int, bytes, int, str, bytes]) -> None: ...
    def index_watermark(self) -> int:
        """Entries below this seq are in key_index and merchant_index; the rest is the tail."""
        ...

    def tail_keys(self, from_seq: int) -> list[tuple[str, int, bytes]]:
        """(idempotency_key, seq, body) of every entry with seq >= from_seq (the writer's tail)."""
        ...

    def find_idempotency_indexed(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """Like find_idempotency, but only below the watermark (the writer knows its tail)."""
        ...

    def indexed_keys(self) -> Iterator[str]:
        """Every idempotency key in the key index, in chunks (the writer's key filter, at start)."""
        ...

    def entry_rrns(self) -> Iterator[str]:
        """Every rrn and original_rrn of the entries, in chunks (the writer's rrn filter, at start)."""
        ...

    def write_index_run(self, from_seq: int, to_seq: int, at_ms: int) -> None:
        """Index entries [from_seq, to_seq) in ONE transaction (sorted inserts); from_seq must be the
        watermark. Durable when it returns; on failure nothing of it is visible."""
        ...

    def index_problems(self) -> list[str]:
        """Why the index tables do not hold exactly the entries below the watermark ([] if they do)."""
        ...

    # --- reader side -----------------------------------------------------------------------------
    def leaf_hashes(self, start: int, stop: int) -> list[bytes]: ...
    def nodes(self, level: int, start: int, stop: int) -> list[tuple[int, bytes]]: ...
    def iter_entry_rows(self, start: int = 0, chunk: int = 10_000) -> Iterator[EntryRowT]: ...
    def entries_by_rrn(self, rrn: str) -> list[EntryRowT]: ...
    def entry_rows(self, start: int, stop: int) -> list[EntryRowT]: ...
    def last_tree_head(self) -> tuple[int, bytes, int] | None: ...
    def last_checkpoint_size(self) -> int: ...
    def tree_heads(self) -> list[tuple[int, bytes, int]]: ...
    def checkpoints(self) -> list[tuple[int, bytes, int, str, bytes]]: ...
    def balance_at_or_before(self, account: str, currency: str, seq: int | None) -> BalanceRowT | None: ...
    def balance_after(self, account: str, currency: str, seq: int) -> BalanceRowT | None: ...
    def latest_balances(self) -> list[BalanceRowT]: ...
    def balance_rows_by_seq(self, chunk: int = 10_000) -> Iterator[BalanceRowT]: ...
    def merchant_totals(
        self, merchant_id: str, from_ms: int, to_ms: int
    ) -> list[tuple[str, str, int, int]]: ...
    def open_holds(
        self, placed_before_ms: int | None = None
    ) -> list[tuple[int, str, str, int, str, int]]: ...
    def meta(self, key: str) -> str | None: ...


class SqlBackend(abc.ABC):
    """LedgerBackend over a DB-API connection; subclasses supply the connection and dialect."""

    dialect: Dialect
    #: The schema (with its dot) holding INDEX_TABLES when they are a database of their own ("ix." on
    #: a SQLite file, see switch.ledger.sqlite); "" when they are in the main database.
    index_db: str = ""

    def __init__(self) -> None:
        self.conn: Any = self._connect()
        d = self.dialect
        self._sql_entry = d.insert("entries", ENTRY_COLUMNS)
        self._sql_node = d.insert("merkle_nodes", NODE_COLUMNS)
        self._sql_head = d.insert("tree_heads", TREE_HEAD_COLUMNS)
        self._sql_checkpoint = d.insert("checkpoints", CHECKPOINT_COLUMNS)
        self._sql_balance = d.insert("balance_history", BALANCE_COLUMNS)

    # --- subclass hooks --------------------------------------------------------------------------
    @abc.abstractmethod
    def _connect(self) -> Any:
        """Open the DB-API connection (settings for durability included)."""

    @abc.abstractmethod
    def _begin(self, cur: Any) -> None:
        """Start a write transaction on `cur` (SQLite: BEGIN IMMEDIATE; psycopg: implicit)."""

    def _begin_schema(self, cur: Any) -> None:
        """Start create_schema's transaction (it may write every database the backend uses)."""
        self._begin(cur)

    def _begin_index_run(self, cur: Any) -> None:
        """Start an index run's transaction. Runs happen on the writer's background indexer
        connection (switch.ledger.writer, "Index runs"): this must not wait for the writer's commits,
        nor make them wait."""
        self._begin(cur)

    def _insert_many(self, cur: Any, table: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Bulk insert; PostgreSQL may override with COPY (columns: the *_COLUMNS of `table`)."""
        cur.executemany(sql, rows)

    # --- plumbing --------------------------------------------------------------------------------
    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            return cur.fetchall()
        finally:
            cur.close()
            self._end_read()

    def _end_read(self) -> None:
        """Hook: end an implicit read transaction (psycopg opens one; sqlite3 autocommit has none)."""
        return None

    def close(self) -> None:
        self.conn.close()

    def create_schema(self) -> None:
        cur = self.conn.cursor()
        try:
            self._begin_schema(cur)
            for stmt in schema(self.dialect, self.index_db):
                cur.execute(stmt)
            cur.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'")
            row = cur.fetchone()
            if row is None:
                cur.execute(
                    f"INSERT INTO ledger_meta (key, value) VALUES ({self.dialect.params(2)})",
                    ("schema_version", str(SCHEMA_VERSION)),
                )
            elif int(row[0]) in UPGRADABLE_VERSIONS:
                self._upgrade(cur, int(row[0]))
            elif int(row[0]) != SCHEMA_VERSION:
                raise LedgerStorageError(
                    f"ledger schema version {row[0]} is not the supported {SCHEMA_VERSION}"
                )
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        finally:
            cur.close()

    # --- writer side -----------------------------------------------------------------------------
    def _upgrade(self, cur: Any, version: int) -> None:
        """Version 1 or 2 -> 3, inside create_schema's transaction: the new tables exist already (the
        DDL above). 1 -> 2: drop the per-batch B-tree indexes they replace. 2 -> 3 (index tables in a
        database of their own): drop the old index tables of the main database (derived data). The
        first index run (the writer starts one when the tail is a run or longer) then indexes the
        whole history; until it has, every lookup is still exact (the tail scan covers it)."""
        if version < 2:
            self._upgrade_from_1(cur)
        if self.index_db:
            for table in INDEX_TABLES:
                cur.execute(f"DROP TABLE IF EXISTS main.{table}")
        p = self.dialect.placeholder
        cur.execute(
            f"UPDATE ledger_meta SET value = {p} WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )

    def _upgrade_from_1(self, cur: Any) -> None:
        for index in ("entries_idempotency_key", "entries_merchant_time"):
            cur.execute(f"DROP INDEX IF EXISTS {index}")
        # balance_history was clustered by (account, currency, seq): rebuild it in seq order.
        cols = ", ".join(BALANCE_COLUMNS)
        cur.execute("ALTER TABLE balance_history RENAME TO balance_history_v1")
        for stmt in schema(self.dialect):
            if stmt.startswith("CREATE TABLE IF NOT EXISTS balance_history"):
                cur.execute(stmt)
        cur.execute(
            f"INSERT INTO balance_history ({cols}) SELECT {cols} FROM balance_history_v1 ORDER BY seq"
        )
        cur.execute("DROP TABLE balance_history_v1")
        for stmt in self.dialect.append_only_triggers("balance_history"):
            cur.execute(stmt)

    def entry_count(self) -> int:
        row = self._all("SELECT MAX(seq) FROM entries")[0]
        return 0 if row[0] is None else int(row[0]) + 1

    def find_idempotency(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """Exact at every moment: the key index and the tail in one statement (one snapshot)."""
        found: dict[str, tuple[int, bytes]] = {}
        for chunk in _chunks(list(keys)):
            n = len(chunk)
            sql = (
                f"{TAIL_BLOCKS_CTE}SELECT e.idempotency_key, e.seq, e.body FROM key_index k "
                f"JOIN entries e ON e.seq = k.seq AND e.idempotency_key = k.idempotency_key "
                f"WHERE {self.dialect.in_list('k.idempotency_key', n)} "
                f"UNION ALL SELECT idempotency_key, seq, body FROM entries WHERE {TAIL_KEY_FILTER} AND "
                + self.dialect.in_list("idempotency_key", n)
            )
            for key, seq, body in self._all(sql, chunk + chunk):
                found[key] = (int(seq), bytes(body))
        return found

    def find_idempotency_indexed(self, keys: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        found: dict[str, tuple[int, bytes]] = {}
        for chunk in _chunks(list(keys)):
            sql = (
                "SELECT e.idempotency_key, e.seq, e.body FROM key_index k "
                "JOIN entries e ON e.seq = k.seq AND e.idempotency_key = k.idempotency_key "
                f"WHERE {self.dialect.in_list('k.idempotency_key', len(chunk))}"
            )
            for key, seq, body in self._all(sql, chunk):
                found[key] = (int(seq), bytes(body))
        return found

    def index_watermark(self) -> int:
        return int(self._all(f"SELECT {WATERMARK_SQL}")[0][0])

    def indexed_keys(self) -> Iterator[str]:
        return self._distinct_values("key_index", "idempotency_key")

    def entry_rrns(self) -> Iterator[str]:
        yield from self._distinct_values("entries", "rrn")
        yield from self._distinct_values("entries", "original_rrn", "original_rrn <> ''")

    def _distinct_values(self, table: str, column: str, where: str = "") -> Iterator[str]:
        """The distinct values of an indexed column, in keyset pages of INDEXED_KEYS_PAGE in index
        order: memory stays flat however large the table, and no statement stays open between pages."""
        p = self.dialect.placeholder
        cond = f"{where} AND " if where else ""
        rows = self._all(f"SELECT DISTINCT {column} FROM {table} {'WHERE ' + where if where else ''} "
                         f"ORDER BY {column} LIMIT {p}", (INDEXED_KEYS_PAGE,))  # fmt: skip
        while rows:
            values = [str(r[0]) for r in rows]
            yield from values
            if len(rows) < INDEXED_KEYS_PAGE:
                return
            rows = self._all(
                f"SELECT DISTINCT {column} FROM {table} WHERE {cond}{column} > {p} "
                f"ORDER BY {column} LIMIT {p}",
                (values[-1], INDEXED_KEYS_PAGE),
            )

    def tail_keys(self, from_seq: int) -> list[tuple[str, int, bytes]]:
        p = self.dialect.placeholder
        rows = self._all(
            f"SELECT idempotency_key, seq, body FROM entries WHERE seq >= {p} ORDER BY seq", (from_seq,)
        )
        return [(str(k), int(q), bytes(b)) for k, q, b in rows]

    @contextmanager
    def _write_transaction(self, begin: Callable[[Any], None], what: str) -> Iterator[Any]:
        """One write transaction on a cursor: committed when the block ends, else rolled back (the
        connection may already be gone) and any driver error raised as LedgerStorageError."""
        cur = self.conn.cursor()
        try:
            begin(cur)
            yield cur
            self.conn.commit()
        except BaseException as exc:
            try:
                self.conn.rollback()
            except Exception:  # the connection may be gone; the transaction is gone with it
                pass
            if isinstance(exc, Exception) and not isinstance(exc, LedgerStorageError):
                raise LedgerStorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
            raise
        finally:
            cur.close()

    def write_index_run(self, from_seq: int, to_seq: int, at_ms: int) -> None:
        p = self.dialect.placeholder
        with self._write_transaction(self._begin_index_run, "ledger index run") as cur:
            cur.execute(f"SELECT {WATERMARK_SQL}")
            watermark = int(cur.fetchone()[0])
            if watermark != from_seq or to_seq <= from_seq:
                raise LedgerStorageError(
                    f"index run {from_seq}..{to_seq} does not start at the watermark {watermark}"
                )
            cur.execute(
                "INSERT INTO key_index (idempotency_key, seq) SELECT idempotency_key, seq FROM entries "
                f"WHERE seq >= {p} AND seq < {p} ORDER BY idempotency_key",
                (from_seq, to_seq),
            )
            cur.execute(
                "INSERT INTO merchant_index (merchant_id, at_ms, seq) SELECT merchant_id, at_ms, seq "
                f"FROM entries WHERE seq >= {p} AND seq < {p} ORDER BY merchant_id, at_ms, seq",
                (from_seq, to_seq),
            )
            cols = ", ".join(BALANCE_COLUMNS)
            cur.execute(
                f"INSERT INTO balance_index ({cols}) SELECT {cols} FROM balance_history "
                f"WHERE seq >= {p} AND seq < {p} ORDER BY account, currency, seq",
                (from_seq, to_seq),
            )
            cur.execute(f"INSERT INTO index_runs (upto_seq, at_ms) VALUES ({p}, {p})", (to_seq, at_ms))

    def index_problems(self) -> list[str]:
        w = self.index_watermark()
        problems: list[str] = []
        n = self.entry_count()
        if w > n:
            problems.append(f"index watermark {w} is past the last entry ({n} entries)")
        p = self.dialect.placeholder
        for table, match in (
            ("key_index", "e.idempotency_key = x.idempotency_key"),
            ("merchant_index", "e.merchant_id = x.merchant_id AND e.at_ms = x.at_ms"),
        ):
            rows = self._all(f"SELECT COUNT(*) FROM {table}")[0][0]
            good = self._all(
                f"SELECT COUNT(*) FROM {table} x JOIN entries e ON e.seq = x.seq AND {match} "
                f"WHERE x.seq < {p}",
                (w,),
            )[0][0]
            if int(rows) != w or int(good) != w:
                problems.append(
                    f"{table} holds {rows} rows ({good} matching entries below the watermark), "
                    f"expected exactly the {w} entries below the watermark"
                )
        rows, good, below = self._all(
            "SELECT (SELECT COUNT(*) FROM balance_index), (SELECT COUNT(*) FROM balance_index x JOIN "
            "balance_history h ON h.seq = x.seq AND h.account = x.account AND h.currency = x.currency "
            f"AND h.first_seq = x.first_seq AND h.balance_minor = x.balance_minor WHERE x.seq < {p}), "
            f"(SELECT COUNT(*) FROM balance_history WHERE seq < {p})",
            (w, w),
        )[0]
        if not int(rows) == int(good) == int(below):
            problems.append(
                f"balance_index holds {rows} rows ({good} matching balance_history), expected exactly "
                f"the {below} balance rows below the watermark"
            )
        dup = self._all(
            f"SELECT COUNT(*) FROM entries e WHERE e.seq >= {p} AND EXISTS (SELECT 1 FROM key_index k "
            "WHERE k.idempotency_key = e.idempotency_key)",
            (w,),
        )[0][0]
        tail = self._all(
            f"SELECT COUNT(*), COUNT(DISTINCT idempotency_key) FROM entries WHERE seq >= {p}", (w,)
        )[0]
        if int(dup) or int(tail[0]) != int(tail[1]):
            problems.append("an idempotency key is used by more than one entry")
        return problems

    def txn_rows(self, rrns: Iterable[str]) -> list[TxnRow]:
        rows: dict[int, TxnRow] = {}
        for chunk in _chunks(sorted(set(rrns))):
            n = len(chunk)
            sql = (
                f"SELECT {TXN_COLUMNS} FROM entries WHERE {self.dialect.in_list('rrn', n)} "
                f"UNION SELECT {TXN_COLUMNS} FROM entries WHERE "
                f"original_rrn <> '' AND {self.dialect.in_list('original_rrn', n)}"
            )
            for r in self._all(sql, chunk + chunk):
                rows[r[0]] = TxnRow(*r)
        return [rows[k] for k in sorted(rows)]

    def write_batch(self, batch: BatchRows) -> None:
        with self._write_transaction(self._begin, "ledger commit") as cur:
            if batch.entries:
                self._insert_many(cur, "entries", self._sql_entry, batch.entries)
            if batch.nodes:
                self._insert_many(cur, "merkle_nodes", self._sql_node, batch.nodes)
            if batch.balances:
                self._insert_many(cur, "balance_history", self._sql_balance, batch.balances)
            if batch.tree_head is not None:
                cur.execute(self._sql_head, batch.tree_head)
            if batch.checkpoint is not None:
                cur.execute(self._sql_checkpoint, batch.checkpoint)

    def write_checkpoint(self, row: tuple[int, bytes, int, str, bytes]) -> None:
        self.write_batch(BatchRows(entries=[], nodes=[], balances=[], tree_head=None, checkpoint=row))

    # --- reader side -----------------------------------------------------------------------------
    def leaf_hashes(self, start: int, stop: int) -> list[bytes]:
        p = self.dialect.placeholder
        rows = self._all(
            f"SELECT leaf_hash FROM entries WHERE seq >= {p} AND seq < {p} ORDER BY seq", (start, stop)
        )
        return [bytes(r[0]) for r in rows]

    def nodes(self, level: int, start: int, stop: int) -> list[tuple[int, bytes]]:
        p = self.dialect.placeholder
        rows = self._all(
            f"SELECT idx, hash FROM merkle_nodes WHERE level = {p} AND idx >= {p} AND idx < {p} ORDER BY idx",
            (level, start, stop),
        )
        return [(int(i), bytes(h)) for i, h in rows]

    def entry_rows(self, start: int, stop: int) -> list[EntryRowT]:
        p = self.dialect.placeholder
        rows = self._all(
            f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries WHERE seq >= {p} AND seq < {p} ORDER BY seq",
            (start, stop),
        )
        return [_entry_row(r) for r in rows]

    def iter_entry_rows(self, start: int = 0, chunk: int = 10_000) -> Iterator[EntryRowT]:
        """All entries from `start` in seq order, in chunks (keyset pagination, bounded memory)."""
        p = self.dialect.placeholder
        sql = (
            f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries WHERE seq >= {p} ORDER BY seq LIMIT {int(chunk)}"
        )
        while True:
            rows = self._all(sql, (start,))
            for r in rows:
                yield _entry_row(r)
            if len(rows) < chunk:
                return
            start = int(rows[-1][0]) + 1

    def entries_by_rrn(self, rrn: str) -> list[EntryRowT]:
        p = self.dialect.placeholder
        rows = self._all(
            f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries WHERE rrn = {p} ORDER BY seq", (rrn,)
        )
        return [_entry_row(r) for r in rows]

    def last_tree_head(self) -> tuple[int, bytes, int] | None:
        rows = self._all(
            f"SELECT {', '.join(TREE_HEAD_COLUMNS)} FROM tree_heads ORDER BY tree_size DESC LIMIT 1"
        )
        return None if not rows else (int(rows[0][0]), bytes(rows[0][1]), int(rows[0][2]))

    def last_checkpoint_size(self) -> int:
        rows = self._all("SELECT MAX(tree_size) FROM checkpoints")
        return 0 if rows[0][0] is None else int(rows[0][0])

    def tree_heads(self) -> list[tuple[int, bytes, int]]:
        rows = self._all(f"SELECT {', '.join(TREE_HEAD_COLUMNS)} FROM tree_heads ORDER BY tree_size")
        return [(int(s), bytes(h), int(t)) for s, h, t in rows]

    def checkpoints(self) -> list[tuple[int, bytes, int, str, bytes]]:
        rows = self._all(f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM checkpoints ORDER BY tree_size")
        return [(int(s), bytes(h), int(t), str(k), bytes(sig)) for s, h, t, k, sig in rows]

    def balance_at_or_before(self, account: str, currency: str, seq: int | None) -> BalanceRowT | None:
        """The latest balance row of (account, currency) with row seq <= `seq` (any if None): the
        latest in balance_index and the latest in the tail, in one statement (one snapshot)."""
        p = self.dialect.placeholder
        cols = ", ".join(BALANCE_COLUMNS)
        cond = f"account = {p} AND currency = {p}" + ("" if seq is None else f" AND seq <= {p}")
        params: tuple[Any, ...] = (account, currency) if seq is None else (account, currency, seq)
        rows = self._all(
            f"SELECT * FROM (SELECT {cols} FROM balance_index WHERE {cond} ORDER BY seq DESC LIMIT 1) a "
            f"UNION ALL SELECT * FROM (SELECT {cols} FROM balance_history WHERE seq >= {WATERMARK_SQL} "
            f"AND {cond} ORDER BY seq DESC LIMIT 1) b",
            params * 2,
        )
        return BalanceRowT(*max(rows, key=lambda r: r[2])) if rows else None

    def balance_after(self, account: str, currency: str, seq: int) -> BalanceRowT | None:
        """The first balance row of (account, currency) with row seq > `seq` (index and tail)."""
        p = self.dialect.placeholder
        cols = ", ".join(BALANCE_COLUMNS)
        cond = f"account = {p} AND currency = {p} AND seq > {p}"
        rows = self._all(
            f"SELECT * FROM (SELECT {cols} FROM balance_index WHERE {cond} ORDER BY seq LIMIT 1) a "
            f"UNION ALL SELECT * FROM (SELECT {cols} FROM balance_history WHERE seq >= {WATERMARK_SQL} "
            f"AND {cond} ORDER BY seq LIMIT 1) b",
            (account, currency, seq) * 2,
        )
        return BalanceRowT(*min(rows, key=lambda r: r[2])) if rows else None

    def latest_balances(self) -> list[BalanceRowT]:
        """The current balance of every (account, currency) ever posted to: the latest row per
        account in balance_index plus every tail row (at most about a run's worth), one statement."""
        cols = ", ".join(BALANCE_COLUMNS)
        rows = self._all(
            f"SELECT {', '.join('b.' + c for c in BALANCE_COLUMNS)} FROM balance_index b "
            "WHERE b.seq = (SELECT MAX(l.seq) FROM balance_index l "
            "WHERE l.account = b.account AND l.currency = b.currency) "
            f"UNION ALL SELECT {cols} FROM balance_history WHERE seq >= {WATERMARK_SQL}"
        )
        latest: dict[tuple[str, str], BalanceRowT] = {}
        for r in rows:
            row = BalanceRowT(*r)
            have = latest.get((row.account, row.currency))
            if have is None or have.seq < row.seq:
                latest[(row.account, row.currency)] = row
        return [latest[k] for k in sorted(latest)]

    def balance_rows_by_seq(self, chunk: int = 10_000) -> Iterator[BalanceRowT]:
        """Every balance_history row ordered by (seq, account, currency), in bounded chunks."""
        p = self.dialect.placeholder
        cols = ", ".join(BALANCE_COLUMNS)
        last: tuple[int, str, str] = (-1, "", "")
        while True:
            rows = self._all(
                f"SELECT {cols} FROM balance_history WHERE seq > {p} OR (seq = {p} AND "
                f"(account > {p} OR (account = {p} AND currency > {p}))) "
                f"ORDER BY seq, account, currency LIMIT {int(chunk)}",
                (last[0], last[0], last[1], last[1], last[2]),
            )
            for r in rows:
                yield BalanceRowT(*r)
            if len(rows) < chunk:
                return
            last = (int(rows[-1][2]), str(rows[-1][0]), str(rows[-1][1]))

    def merchant_totals(self, merchant_id: str, from_ms: int, to_ms: int) -> list[tuple[str, str, int, int]]:
        """(kind, currency, count, sum amount_minor) of approved entries with from_ms <= at_ms < to_ms."""
        p = self.dialect.placeholder
        rows = self._all(
            "SELECT kind, currency, COUNT(*), COALESCE(SUM(amount_minor), 0) FROM ("
            "SELECT e.kind, e.currency, e.amount_minor FROM merchant_index m JOIN entries e ON e.seq = m.seq "
            f"WHERE m.merchant_id = {p} AND m.at_ms >= {p} AND m.at_ms < {p} UNION ALL "
            f"SELECT kind, currency, amount_minor FROM entries WHERE seq >= {WATERMARK_SQL} "
            f"AND merchant_id = {p} AND at_ms >= {p} AND at_ms < {p}) t "
            "WHERE kind <> 'decline' GROUP BY kind, currency ORDER BY kind, currency",
            (merchant_id, from_ms, to_ms) * 2,
        )
        return [(str(k), str(c), int(n), int(s)) for k, c, n, s in rows]

    def open_holds(self, placed_before_ms: int | None = None) -> list[tuple[int, str, str, int, str, int]]:
        """Holds no capture, void, expiry or reversal has resolved: (seq, rrn, merchant_id,
        amount_minor, currency, at_ms), oldest first; only those placed before `placed_before_ms` if
        given (the expiry sweep)."""
        p = self.dialect.placeholder
        sql = (
            "SELECT h.seq, h.rrn, h.merchant_id, h.amount_minor, h.currency, h.at_ms FROM entries h "
            "WHERE h.kind = 'hold' AND NOT EXISTS (SELECT 1 FROM entries r WHERE r.original_rrn = h.rrn "
            "AND r.original_rrn <> '' AND r.seq > h.seq "
            "AND r.kind IN ('capture', 'hold_void', 'hold_expiry', 'reversal'))"
        )
        params: tuple[Any, ...] = ()
        if placed_before_ms is not None:
            sql += f" AND h.at_ms < {p}"
            params = (placed_before_ms,)
        rows = self._all(sql + " ORDER BY h.seq", params)
        return [(int(q), str(r), str(m), int(a), str(c), int(t)) for q, r, m, a, c, t in rows]

    def meta(self, key: str) -> str | None:
        rows = self._all(f"SELECT value FROM ledger_meta WHERE key = {self.dialect.placeholder}", (key,))
        return None if not rows else str(rows[0][0])


def _entry_row(r: Sequence[Any]) -> EntryRowT:
    row = list(r)
    row[9] = bytes(row[9])
    row[10] = bytes(row[10])
    return EntryRowT(*row)


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(values), MAX_IN_LIST):
        yield values[i : i + MAX_IN_LIST]

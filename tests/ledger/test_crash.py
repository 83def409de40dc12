"""Crash safety: a writer process posting under load is SIGKILLed at random moments, again and again on
the same ledger (30 kills on SQLite, 8 on PostgreSQL). After every kill:

- every acknowledged entry is present, at the sequence number it was acknowledged with;
- the ledger verifies (Merkle leaves, nodes, tree heads, signed checkpoints, balances);
- nothing half-written is visible: seqs are gap-free, every entry's postings balance, the last tree head
  covers exactly the stored entries, and each multi-entry outcome (purchase + fee) is whole or absent;
- a retry of the previous round's in-flight outcomes gets the original entries back, never copies.

Some kills land while the writer starts (imports, schema, state reload), most under load. The seed of
each test is in every failure message; CRASH_SEED=<n> reruns one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switch.ledger.backend import LedgerBackend
from switch.ledger.codec import decode_draft
from switch.ledger.model import EntryKind, check_balanced
from switch.ledger.postgres import PostgresBackend
from switch.ledger.queries import LedgerReader
from switch.ledger.sqlite import SqliteBackend
from switch.ledger.verify import verify_ledger

from .conftest import TEST_SEED

CRASH_WRITER = Path(__file__).with_name("crash_writer.py")
#: Chance that a kill lands during start-up instead of after the first acknowledgement.
STARTUP_KILL_CHANCE = 0.15
#: Kill this long (uniformly random) after the first acknowledgement of a round.
MAX_KILL_DELAY_S = 0.15
#: Bounds on waiting for the writer process (it never needs more than a fraction of this).
FIRST_ACK_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 10.0
#: Writer load: outcomes in flight and the batch bound. Small batches mean many commits per round (more
#: kill points between and inside commits) and a ledger that stays small enough to re-verify every round.
INFLIGHT = 100
MAX_BATCH = 100
#: Outcomes of the previous round re-submitted around its last acknowledgement.
RETRY_BEFORE, RETRY_AFTER = 20, 60

pytestmark = pytest.mark.slow


class Acks:
    """What the killed writers acknowledged, parsed from their side-channel files."""

    def __init__(self) -> None:
        self.seq_of: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.max_index: dict[int, int] = {}

    def read(self, path: Path, round_no: int, retry_keys: set[str]) -> int:
        """Add one round's acknowledgements; return how many submissions it acknowledged."""
        text = path.read_bytes().decode() if path.exists() else ""
        lines = text.split("\n")[:-1]  # the last piece has no newline: torn or empty, never an ack
        acked = 0
        for line in lines:
            tag, _, rest = line.partition(" ")
            if tag == "A":
                acked += 1
                for item in rest.split():
                    seq_text, _, key = item.partition(":")
                    seq = int(seq_text)
                    old = self.seq_of.setdefault(key, seq)
                    assert old == seq, f"{key} acknowledged at seq {old} and again at seq {seq}"
                    r, _, idx = key.removeprefix("r").partition("-")
                    if int(r) == round_no:
                        index = int(idx.removesuffix("-fee"))
                        self.max_index[round_no] = max(self.max_index.get(round_no, -1), index)
            elif tag == "F":
                key, _, error = rest.partition(" ")
                # Only a retried draft may be refused (e.g. a refund whose purchase never committed).
                assert key in retry_keys, f"round {round_no}: {key} refused with {error}"
                self.failed[key] = error
            elif tag != "S":
                raise AssertionError(f"round {round_no}: unexpected side-channel line {line!r}")
        return acked


def _open(kind: str, target: str) -> LedgerBackend:
    # create=True: a kill during the very first start-up may leave no schema yet (DDL is atomic).
    return SqliteBackend(target) if kind == "sqlite" else PostgresBackend(target)


def _wait_for_dead_sessions(be: LedgerBackend, where: str) -> None:
    """PostgreSQL: the killed writer's server sessions outlive it until they next read from their
    socket; one that had already received COMMIT still commits then. Checking before they end would
    read the ledger in two states (seen: the current balances a batch ahead of the entries scanned
    a moment before), so wait until no other session is on this database."""
    sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
           "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")  # fmt: skip
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while be._all(sql)[0][0]:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"{where}: the killed writer's sessions are still open"
        time.sleep(0.01)


def _check(kind: str, target: str, acks: Acks, key: Ed25519PrivateKey, where: str) -> int:
    """Every invariant a crash must not break; returns the ledger size."""
    be = _open(kind, target)
    try:
        if kind == "postgres":
            _wait_for_dead_sessions(be, where)
        size = be.entry_count()
        report = verify_ledger(be, key.public_key())
        assert report.ok, f"{where}: verify failed at {report.first_bad_index}: {report.problem}"
        assert report.tree_size == size, f"{where}: verified {report.tree_size} of {size} entries"
        head = be.last_tree_head()
        assert (head[0] if head else 0) == size, f"{where}: tree head {head} vs {size} entries"

        found = be.find_idempotency(list(acks.seq_of))
        missing = [k for k in acks.seq_of if k not in found]
        assert not missing, f"{where}: {len(missing)} acknowledged entries lost, e.g. {missing[:5]}"
        moved = [k for k, s in acks.seq_of.items() if found[k][0] != s]
        assert not moved, f"{where}: acknowledged entries at other seqs: {moved[:5]}"

        kinds_by_rrn: dict[str, list[EntryKind]] = defaultdict(list)
        keys: set[str] = set()
        expected = 0
        for row in be.iter_entry_rows():
            assert row.seq == expected, f"{where}: seq {expected} missing (next is {row.seq})"
            expected += 1
            draft = decode_draft(row.body)
            check_balanced(draft.postings)
            assert draft.idempotency_key not in keys, f"{where}: {draft.idempotency_key} stored twice"
            keys.add(draft.idempotency_key)
            kinds_by_rrn[draft.rrn].append(draft.kind)
        assert expected == size
        for rrn, kinds in kinds_by_rrn.items():
            index = int(rrn[4:])
            if index % 7 != 3 and index % 5 == 0:
                assert sorted(kinds) == [EntryKind.FEE, EntryKind.PURCHASE], f"{where}: rrn {rrn} has {kinds}"
        rebuild = LedgerReader(be).rebuild_check()
        assert rebuild.ok, f"{where}: balances disagree with the log: {rebuild}"
        return size
    finally:
        be.close()


def _crash_rounds(kind: str, target: str, rounds: int, tmp: Path, seed: int, *extra: str) -> None:
    rng = random.Random(seed)
    key = Ed25519PrivateKey.from_private_bytes(TEST_SEED)
    env = {**os.environ, "CRASH_SIGNING_KEY": TEST_SEED.hex()}
    acks = Acks()
    startup_kills = 0
    for round_no in range(rounds):
        where = f"{kind} seed {seed} round {round_no}"
        ack_path = tmp / f"acks-{round_no}.txt"
        argv = [sys.executable, str(CRASH_WRITER), "--backend", kind, "--target", target,
                "--acks", str(ack_path), "--round", str(round_no), "--inflight", str(INFLIGHT),
                "--max-batch", str(MAX_BATCH), *extra]  # fmt: skip
        retry_keys: set[str] = set()
        prev = acks.max_index.get(round_no - 1)
        if prev is not None:
            first, stop = max(0, prev - RETRY_BEFORE), prev + RETRY_AFTER
            argv += ["--retry", f"{round_no - 1}:{first}:{stop}"]
            retry_keys = {f"r{round_no - 1}-{i}" for i in range(first, stop)}
        err_path = tmp / f"stderr-{round_no}.txt"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            if rng.random() < STARTUP_KILL_CHANCE:
                startup_kills += 1
                time.sleep(rng.uniform(0.05, 0.6))
            else:
                _wait_first_ack(proc, ack_path, err_path, where)
                time.sleep(rng.uniform(0.0, MAX_KILL_DELAY_S))
            assert proc.poll() is None, f"{where}: writer exited by itself:\n{err_path.read_text()[-3000:]}"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(EXIT_TIMEOUT_S) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(EXIT_TIMEOUT_S)
        n_acked = acks.read(ack_path, round_no, retry_keys)
        size = _check(kind, target, acks, key, where)
        if os.environ.get("CRASH_VERBOSE"):
            print(f"{where}: {n_acked} acks, size {size}, failed {len(acks.failed)}", file=sys.stderr)
    assert len(acks.seq_of) > 0, f"{kind} seed {seed}: no acknowledgement in {rounds} rounds"
    assert startup_kills < rounds, "every kill landed during start-up; nothing was tested under load"


def _wait_first_ack(proc: subprocess.Popen[bytes], ack_path: Path, err_path: Path, where: str) -> None:
    deadline = time.monotonic() + FIRST_ACK_TIMEOUT_S
    while time.monotonic() < deadline:
        if ack_path.exists() and b"\nA " in b"\n" + ack_path.read_bytes():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{where}: writer exited before posting:\n{err_path.read_text()[-3000:]}")
        time.sleep(0.002)
    raise AssertionError(f"{where}: no acknowledgement within {FIRST_ACK_TIMEOUT_S} s")


def _seed(default: int) -> int:
    return int(os.environ.get("CRASH_SEED", default))


@pytest.mark.parametrize(
    ("seed", "extra"),
    # in line; pipelined from 50 entries (batches are up to 100: both paths, in turns); always pipelined
    [(101, ()), (202, ("--pipeline", "--pipeline-min", "50")), (303, ("--pipeline",))],
)
def test_sqlite_survives_sigkill(tmp_path: Path, seed: int, extra: tuple[str, ...]) -> None:
    _crash_rounds("sqlite", str(tmp_path / "ledger.db"), 10, tmp_path, _seed(seed), *extra)


@pytest.mark.postgres
def test_postgres_survives_sigkill(tmp_path: Path, pg_dsn: str) -> None:
    # Pipelined from 50 entries, as the default configuration does from 64: both paths, in turns.
    _crash_rounds("postgres", pg_dsn, 8, tmp_path, _seed(404), "--pipeline", "--pipeline-min", "50")

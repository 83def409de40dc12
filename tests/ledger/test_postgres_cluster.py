"""The throwaway PostgreSQL cluster helper: isolated fresh databases, durable settings, clean teardown,
and a loud failure (never a skip) when the server binaries are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from tests import pgcluster
from tests.pgcluster import PgCluster, PgClusterError, process_gone_within

pytestmark = pytest.mark.postgres


def test_each_test_namespace_starts_empty_and_is_isolated(pg_cluster: PgCluster, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchone() == (0,)
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    other = pg_cluster.create_database()
    with psycopg.connect(other) as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'").fetchone()
    assert row == (0,)


def test_fresh_database_fixture(pg_database_dsn: str) -> None:
    with psycopg.connect(pg_database_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert row == (0,)


def test_server_runs_durable_and_unprivileged(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings"
                " WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')"
            ).fetchall()
        )
        data_dir = conn.execute("SHOW data_directory").fetchone()
    assert settings == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    assert data_dir is not None
    owner = os.stat(data_dir[0]).st_uid
    assert owner != 0, "initdb refuses root; the server must run as an unprivileged user"


def test_missing_binaries_fail_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pgcluster, "PG_ROOT", tmp_path / "nowhere")
    monkeypatch.setenv("SWITCH_PG_BIN", str(tmp_path))
    with pytest.raises(PgClusterError, match="make system-deps"):
        PgCluster()


def test_failed_start_leaves_nothing_behind() -> None:
    # Not tmp_path: its parents are private to root, and the server runs as an unprivileged user.
    base = Path(tempfile.mkdtemp(prefix="pgc-base-"))
    try:
        os.chmod(base, 0o755)
        cluster = PgCluster(settings={"shared_buffers": "not-a-size"}, base_dir=str(base))
        with pytest.raises(PgClusterError, match="pg_ctl start failed"):
            cluster.start()
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_cluster_of_a_killed_test_run_is_reaped() -> None:
    repo = Path(__file__).resolve().parents[2]
    code = (
        "import time\nfrom tests.pgcluster import PgCluster\n"
        "c = PgCluster().start()\nprint(c.root, flush=True)\ntime.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        root = Path(proc.stdout.readline().decode().strip())
        pid = int((root / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
    finally:
        proc.kill()  # the "test run" dies without stopping its cluster
        proc.wait()
    assert process_gone_within(pid, seconds=15.0), "orphaned PostgreSQL server still running"
    deadline = time.monotonic() + 10.0
    while root.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not root.exists()

"""A throwaway PostgreSQL cluster for tests and benchmarks, built from the installed server binaries.

Why a real cluster: the ledger's promise is durability, and only the real server (fsync on, default
synchronous commit) shows what a commit costs and what survives a kill. Nothing is mocked.

Shape: `initdb` into a fresh temp directory, `pg_ctl start` with a unix socket in that same directory
(no TCP port, so parallel runs never collide), trust authentication for the one superuser, `fsync=on`.
Each test gets its own schema in a session database (`pg_dsn`; ~0.02 s) or, when it needs
database-level settings, its own database (`pg_database_dsn`; ~0.6 s), dropped afterwards. The cluster
is stopped with `pg_ctl stop -m immediate` and its directory deleted when the last user releases it,
on failure too.

initdb refuses to run as root; as root the cluster runs as the `postgres` OS user (or `nobody` if that
user does not exist) and the temp directory is handed to that user. Missing binaries raise
`PgClusterError` with the fix (`make system-deps`) — a test run must fail loudly, never skip.

Use from pytest: `from tests.pgcluster import pg_cluster, pg_session_db, pg_dsn, pg_database_dsn`
(fixtures; tests/ledger/conftest.py imports them for the ledger tests). Use elsewhere:
`with PgCluster() as cluster: dsn = cluster.create_database()`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

#: Where Debian's packages put the server binaries; the newest version wins unless SWITCH_PG_BIN is set.
PG_ROOT = Path("/usr/lib/postgresql")
PREFERRED_VERSION = "15"
#: The cluster's only role; trust authentication over the private unix socket.
SUPERUSER = "switch"
#: Bounds on the external commands so a wedged server fails the run instead of hanging it.
INITDB_TIMEOUT_S = 120
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
#: How long dropping a test's schema waits for locks a leaked connection holds before leaving it be.
DROP_LOCK_TIMEOUT_MS = 2_000
#: Unix socket paths are limited to 107 bytes; the temp dir must leave room for "/.s.PGSQL.5432".
MAX_SOCKET_DIR_CHARS = 90
#: Server settings. fsync and synchronous_commit stay ON: durability is what the tests measure.
DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": "''",
    "port": "5432",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "40",
    "shared_buffers": "64MB",
    "max_wal_size": "1GB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


#: Watches the process that started a cluster; if that process dies without stopping it (SIGKILL, a
#: CI timeout), stops the server (SIGQUIT = immediate shutdown, then SIGKILL) and deletes the directory,
#: so no orphan server keeps running on a shared machine. Polls twice a second; exits with the cluster.
REAPER_SOURCE = r"""
import os, shutil, signal, sys, time
parent, root = int(sys.argv[1]), sys.argv[2]
while True:
    time.sleep(0.5)
    if not os.path.isdir(root):
        sys.exit(0)
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    except PermissionError:
        pass
try:
    with open(os.path.join(root, "data", "postmaster.pid")) as fh:
        pid = int(fh.readline())
    os.kill(pid, signal.SIGQUIT)
    for _ in range(100):
        time.sleep(0.1)
        os.kill(pid, 0)
    os.kill(pid, signal.SIGKILL)
except (OSError, ValueError):
    pass
shutil.rmtree(root, ignore_errors=True)
"""


class PgClusterError(RuntimeError):
    """The throwaway cluster could not be found, created, started or stopped; the message says why."""


def find_pg_bin() -> Path:
    """The directory holding initdb, pg_ctl and postgres: SWITCH_PG_BIN, else 15, else the newest."""
    override = os.environ.get("SWITCH_PG_BIN")
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    candidates.append(PG_ROOT / PREFERRED_VERSION / "bin")
    if PG_ROOT.is_dir():
        versions = [p for p in PG_ROOT.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: tuple(int(x) for x in p.name.split(".")), reverse=True)
        candidates.extend(v / "bin" for v in versions)
    for cand in candidates:
        if all(os.access(cand / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return cand
    raise PgClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
        f"{', '.join(str(c) for c in candidates) or PG_ROOT}. Install them with `make system-deps` "
        "(Debian package `postgresql`) or point SWITCH_PG_BIN at their directory."
    )


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged OS user to run the server as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PgClusterError("running as root and neither a `postgres` nor a `nobody` user exists for initdb")


class PgCluster:
    """One throwaway PostgreSQL server in a temp directory, reachable over a unix socket.

    Not thread-safe for start/stop; `create_database` may be called from any thread.
    """

    def __init__(self, *, settings: dict[str, str] | None = None, base_dir: str | None = None) -> None:
        self.bin_dir = find_pg_bin()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._base_dir = base_dir
        self._user = _run_as_user()
        self.root: Path | None = None
        self._started = False
        self._reaper: subprocess.Popen[bytes] | None = None

    # -- paths -------------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self._require_root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._require_root()

    @property
    def log_path(self) -> Path:
        return self._require_root() / "server.log"

    def _require_root(self) -> Path:
        if self.root is None:
            raise PgClusterError("cluster not started")
        return self.root

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> PgCluster:
        """initdb + pg_ctl start; on any failure everything created so far is removed again."""
        if self._started:
            return self
        self.root = Path(tempfile.mkdtemp(prefix="pgc-", dir=self._base_dir))
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-c", REAPER_SOURCE, str(os.getpid()), str(self.root)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the test run must not kill the reaper first
            )
            if len(str(self.root)) > MAX_SOCKET_DIR_CHARS:
                raise PgClusterError(f"temp dir {self.root} too long for a unix socket path")
            if self._user is not None:
                os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
            os.chmod(self.root, 0o700)
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                    # The catalog files of a throwaway cluster need not survive an OS crash; the
                    # server itself runs with fsync on, which is what the tests depend on.
                    "--no-sync",
                ],
                timeout_s=INITDB_TIMEOUT_S,
                what="initdb",
            )
            self._write_settings()
            self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    str(START_TIMEOUT_S),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                ],
                timeout_s=START_TIMEOUT_S + 10,
                what="pg_ctl start",
            )
            self._started = True
            self._check_durable_settings()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop immediately (no shutdown checkpoint: nothing here must outlive the run) and delete."""
        root, self.root = self.root, None
        if root is None:
            return
        data_dir = root / "data"
        try:
            if (data_dir / "postmaster.pid").exists():
                try:
                    self._run(
                        [str(self.bin_dir / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(data_dir)],
                        timeout_s=STOP_TIMEOUT_S,
                        what="pg_ctl stop",
                        cwd=root,
                    )
                except (PgClusterError, OSError):
                    self._kill_postmaster(data_dir)
        finally:
            self._started = False
            shutil.rmtree(root, ignore_errors=True)
            reaper, self._reaper = self._reaper, None
            if reaper is not None:
                reaper.kill()
                reaper.wait()

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq conninfo string for `dbname` over the cluster's unix socket."""
        return psycopg.conninfo.make_conninfo(
            host=str(self.socket_dir), port=self.settings["port"], user=SUPERUSER, dbname=dbname
        )

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh, empty database and return its DSN."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it (a killed writer's leftovers)."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- helpers -----------------------------------------------------------------------------------------
    def _write_settings(self) -> None:
        settings = {**self.settings, "unix_socket_directories": f"'{self.socket_dir}'"}
        lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n# throwaway test cluster (tests/pgcluster.py)\n" + lines)

    def _check_durable_settings(self) -> None:
        """The server must run with the durability settings we asked for (on, unless a test asked off)."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            for name in ("fsync", "synchronous_commit"):
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                if row is None or row[0] != self.settings[name]:
                    want = self.settings[name]
                    raise PgClusterError(f"cluster started with {name}={row and row[0]!r}, asked {want!r}")

    def _run(self, argv: list[str], *, timeout_s: float, what: str, cwd: Path | None = None) -> None:
        env = {
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "LC_ALL": "C",
            "LANG": "C",
            "HOME": str(cwd or self.root),
            "TZ": "UTC",
        }
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd or self.root,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                **kwargs,  # type: ignore[arg-type]
            )
        except subprocess.TimeoutExpired:
            raise PgClusterError(f"{what} did not finish within {timeout_s} s{self._log_tail()}") from None
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()[-2000:]
            raise PgClusterError(f"{what} failed (exit {proc.returncode}): {out}{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            root = self.root
            text = (root / "server.log").read_text(errors="replace") if root else ""
        except OSError:
            return ""
        return f"\nserver log (tail):\n{text[-2000:]}" if text else ""

    @staticmethod
    def _kill_postmaster(data_dir: Path) -> None:
        """Last resort when pg_ctl cannot stop the server: SIGKILL the postmaster named in its pid file."""
        try:
            pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def process_gone_within(pid: int, *, seconds: float) -> bool:
    """True once the process has exited (or is a zombie awaiting its reaper); bounded, never hangs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# -- pytest fixtures -------------------------------------------------------------------------------------
# One cluster per test session even when several modules import these fixtures (each import makes its
# own session-scoped FixtureDef): a reference count decides when the last user stops it.
_shared_lock = threading.Lock()
_shared: PgCluster | None = None
_shared_users = 0


def acquire_shared_cluster() -> PgCluster:
    global _shared, _shared_users
    with _shared_lock:
        if _shared is None:
            _shared = PgCluster().start()
        _shared_users += 1
        return _shared


def release_shared_cluster() -> None:
    global _shared, _shared_users
    with _shared_lock:
        _shared_users -= 1
        if _shared_users <= 0 and _shared is not None:
            cluster, _shared, _shared_users = _shared, None, 0
            cluster.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's throwaway cluster (fails the run with the fix if PostgreSQL is not installed)."""
    cluster = acquire_shared_cluster()
    try:
        yield cluster
    finally:
        release_shared_cluster()


@pytest.fixture(scope="session")
def pg_session_db(pg_cluster: PgCluster) -> str:
    """DSN of one database shared by the session; tests get fresh schemas in it (see pg_dsn)."""
    return pg_cluster.create_database(f"session_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def pg_dsn(pg_session_db: str) -> Iterator[str]:
    """A DSN whose search_path is a fresh, empty schema (created and dropped around the test).

    Why a schema and not a database: CREATE + DROP DATABASE cost ~0.6 s here (WAL-logged copy of the
    template, fsync'd), a schema ~0.02 s, and everything a test creates with unqualified names lands
    in its own schema. Use `pg_database_dsn` for database-level settings."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_session_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(pg_session_db, options=f"-c search_path={name}")
    finally:
        with psycopg.connect(pg_session_db, autocommit=True) as conn:
            # A test that leaked an open transaction must not hang the suite: give up after a while
            # (the whole cluster is deleted at the end of the session anyway).
            conn.execute(f"SET lock_timeout = {DROP_LOCK_TIMEOUT_MS}")
            with contextlib.suppress(psycopg.errors.LockNotAvailable):
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_database_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """A DSN for a fresh, empty database, dropped after the test (slower than pg_dsn)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    dsn = pg_cluster.create_database(name)
    try:
        yield dsn
    finally:
        pg_cluster.drop_database(name)

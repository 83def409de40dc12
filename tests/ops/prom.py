"""A throwaway Prometheus server and promtool for the ops tests.

The binaries come from Debian's `prometheus` package, installed by scripts/system-deps.sh (which
`make test` runs). When they are missing the tests FAIL with that instruction, never skip: a missing
scrape check would hide a broken metrics endpoint.

The server runs on a free 127.0.0.1 port with a temporary config and data directory, scrapes every
`scrape_interval_s`, and is always killed when the context exits (terminate, then kill after a bounded
wait). Every wait here is bounded.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = (
    "install it with `bash scripts/system-deps.sh` (or `make system-deps`): Debian package prometheus"
)
#: Longest wait for the server to answer /-/ready.
READY_TIMEOUT_S = 20.0
#: Longest wait for the process to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 5.0


def binary(name: str) -> str:
    """Path of /usr/bin/<name> (or <name> on PATH); fails the test with the install hint if absent."""
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(f"{name} not found: {INSTALL_HINT}", pytrace=False)


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run promtool with a bounded time; output captured as text."""
    return subprocess.run(
        [binary("promtool"), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Handle on a running server: `query(expr)` through the HTTP API."""

    def __init__(self, port: int, proc: subprocess.Popen, log_path: Path) -> None:
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the API's JSON error body
            return json.loads(exc.read() or b"{}")

    def query(self, expr: str) -> dict[str, Any]:
        """The API answer to an instant query: {"status": ..., "data": {...}} or an error."""
        return self.get("/api/v1/query", query=expr)

    def targets(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/targets")["data"]["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health and last evaluation error."""
        groups = self.get("/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def running_prometheus(
    directory: Path,
    targets: list[str],
    *,
    scrape_interval_s: int = 1,
    job: str = "switch",
    rule_files: tuple[Path, ...] = (),
) -> Iterator[Prometheus]:
    """A Prometheus scraping `targets` (host:port) as `job`, evaluating `rule_files`; killed on exit
    whatever happens."""
    exe = binary("prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval_s}s\n"
        f"  evaluation_interval: {scrape_interval_s}s\n"
        + (f"rule_files: {json.dumps([str(p) for p in rule_files])}\n" if rule_files else "")
        + "scrape_configs:\n"
        f"  - job_name: {job}\n"
        f"    scrape_timeout: {scrape_interval_s}s\n"
        "    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    port = free_port()
    log_path = directory / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Prometheus(port, proc, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{server.log_tail()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{server.base}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus not ready in {READY_TIMEOUT_S}s:\n{server.log_tail()}", pytrace=False
                )
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll `predicate()` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}; last answer: {last!r}", pytrace=False)

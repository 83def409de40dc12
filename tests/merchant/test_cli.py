"""The command line: registry changes with validation, posting commands, status and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switch.cli import main
from tests.merchant.conftest import RegistryDb


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_register_renew_report_and_refusals(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    registry_db: RegistryDb,
) -> None:
    monkeypatch.setenv("SWITCH_CHECKPOINT_KEY", "11" * 32)
    db = registry_db.where
    opt = "--dsn" if registry_db.name == "postgres" else "--db"
    code, out, _ = run(
        capsys,
        "merchant",
        "add",
        opt,
        db,
        "--actor",
        "ops",
        "--id",
        "M1",
        "--name",
        "Shop",
        "--mcc",
        "5411",
        "--currency",
        "978",
    )
    assert code == 0 and json.loads(out)["mcc"] == "5411"
    code, _, err = run(
        capsys, "merchant", "add", opt, db, "--id", "M2", "--name", "X", "--mcc", "5", "--currency", "978"
    )
    assert code == 1 and "mcc must be 4 digits" in err
    contract = tmp_path / "c1.json"
    contract.write_text(
        json.dumps(
            {
                "id": "c1",
                "merchant_id": "M1",
                "currency": "978",
                "rates": {"default": {"bps": 100}},
                "subscription_fee_minor": 700,
            }
        )
    )
    assert run(capsys, "merchant", "contract", opt, db, str(contract))[0] == 0
    code, out, _ = run(capsys, "terminal-admin", "register", opt, db, "--id", "T1", "--merchant", "M1")
    assert code == 0 and json.loads(out)["state"] == "registered"
    code, out, _ = run(capsys, "terminal-admin", "renew", opt, db, "--id", "T1")
    assert code == 0 and json.loads(out)["amount_minor"] == 700
    code, _, err = run(capsys, "terminal-admin", "state", opt, db, "--id", "T1", "--to", "returned")
    assert code == 1 and "registered -> returned" in err
    code, out, _ = run(capsys, "settlement", "report", opt, db, "--format", "csv")
    assert code == 0 and out.splitlines()[1].split(",")[:2] == ["M1", "978"]
    code, out, _ = run(capsys, "txn", "status", opt, db, "--rrn", "000000000009")
    assert code == 0 and json.loads(out)["state"] == "pending"
    code, out, _ = run(capsys, "merchant", "audit", opt, db, "--kind", "merchant")
    assert code == 0 and json.loads(out)[0]["actor"] == "ops"


def test_a_forwarded_command_without_an_answer_reports_its_outcome_as_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin API took the request and went silent: the renewal may have been posted, so the
    command must not say 'error' (which reads as 'not done, retry'): exit 3, 'outcome unknown'."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        conn, _ = server.accept()
        accepted.append(conn)
        stop.wait(10)

    t = threading.Thread(target=accept_and_stay_silent, daemon=True)
    t.start()
    toml = tmp_path / "switch.toml"
    toml.write_text("[merchant_services]\ncli_api_timeout_s = 1\n")
    monkeypatch.setenv("SWITCH_ADMIN_TOKEN", "t")
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        code, _, err = run(
            capsys, "terminal-admin", "renew", "--id", "T0000001", "--config", str(toml), "--api", url
        )
    finally:
        stop.set()
        t.join(5)
        for c in accepted:
            c.close()
        server.close()
    assert code == 3, err
    assert "outcome unknown" in err and "may have been applied" in err

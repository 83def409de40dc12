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

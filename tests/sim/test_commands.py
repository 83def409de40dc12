"""The command line: `switch acquirer sim` serves until stopped; `switch terminal ...` prints one masked
JSON answer. The simulator (fixture `sim_port`, tests/sim/conftest.py) is run with the terminal profile
so the terminal can talk to it. Public test cards may go on the command line; other cards come from a
file or standard input (tests/sim/test_card_input.py)."""

from __future__ import annotations

import json
from pathlib import Path

from switch.cli import main

PAN = "4111111111111111"


def test_terminal_purchase_and_void_from_the_command_line(sim_port: int, tmp_path: Path, capsys) -> None:
    common = ["--port", str(sim_port), "--tid", "CLI00001", "--stan-file", str(tmp_path / "stan")]
    assert main(["terminal", "purchase", "--amount", "12.34", "--pan", PAN, *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["approved"] and out["amount_minor"] == 1234 and out["stan"] == "000002"  # 000001: sign-on
    assert PAN not in json.dumps(out) and out["pan"] == "411111******1111"
    void = ["--pan", PAN, "--rrn", out["rrn"], "--original-amount", "12.34"]
    assert main(["terminal", "void", *void, *common]) == 0
    assert json.loads(capsys.readouterr().out)["stan"] == "000004"


def test_decline_exit_code_and_bad_amount(sim_port: int, tmp_path: Path, capsys) -> None:
    common = ["--port", str(sim_port), "--stan-file", str(tmp_path / "stan")]
    assert main(["terminal", "purchase", "--amount", "5.00", "--pan", "4000000000000002", *common]) == 3
    assert json.loads(capsys.readouterr().out)["response_code"] == "51"
    assert main(["terminal", "purchase", "--amount", "1.234", "--pan", PAN, *common]) == 1
    assert "more than 2 decimals" in capsys.readouterr().err

"""bench/codec.py runs end to end (a smoke run, not a measurement): every fast output equals
pyiso8583's and the last line is the JSON summary the lead's tooling reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "codec.py"


def test_bench_quick_run(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_codec", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    assert summary["identical"] is True
    for key in ("decode_ratio", "encode_ratio", "decode_fields_ratio", "encode_bytes_ratio"):
        assert summary[key] > 0
    assert "mac_ratio" in summary

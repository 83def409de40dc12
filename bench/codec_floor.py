"""How fast can an exact pyiso8583 decode (and encode) be on this interpreter? Measures the floor.

Compiles bench/codec_floor.pyx (Cython, into a temporary directory) and, for the 0200 purchase of
bench/codec.py in each of the switch's three profiles, times in turn: pyiso8583.decode,
switch.codec.decode, and building (then dropping) only the output objects of that decode from
precomputed offsets, by four methods (codec_floor.pyx says which). The best method is the floor: no
decoder returning pyiso8583's exact (doc_dec, doc_enc) can beat it here, so pyiso8583 / floor is the
highest decode_ratio bench/codec.py could ever print on this interpreter. The same for encode: read
the caller's values, build doc_enc, the output bytearray and set "p", with nothing converted or checked.

Prints a table, then as its last line one JSON object.

    .venv/bin/python bench/codec_floor.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import iso8583

import switch.codec as codec
from switch.codec.specs import PROFILES, SPECS

HERE = Path(__file__).resolve().parent


def build_floor_module() -> ModuleType:
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    with tempfile.TemporaryDirectory(prefix="codec_floor_") as tmp:
        out = Path(tmp)
        ext = Extension("codec_floor", [str(HERE / "codec_floor.pyx")])
        dist = Distribution({"ext_modules": cythonize([ext], build_dir=str(out), quiet=True)})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib, cmd.build_temp = str(out), str(out / "tmp")  # type: ignore[attr-defined]
        cmd.ensure_finalized()
        cmd.run()
        (path,) = out.glob("codec_floor*.so")
        spec = importlib.util.spec_from_file_location("codec_floor", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # loaded: the file may go
    return module


def load_bench_codec() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_codec", HERE / "codec.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layout(raw: bytes, spec: dict) -> list[tuple[str, int, int, int, int, bool, bool]]:
    """Where each entry's length prefix and data sit in raw, in pyiso8583's order, and how its text
    is made (hex; hex without a leading pad nibble)."""
    doc_dec, doc_enc = iso8583.decode(raw, spec)
    entries, at = [], 0
    for key, pair in doc_enc.items():
        size_len, size_data = len(pair["len"]), len(pair["data"])
        as_hex = spec[key]["data_enc"] == "b"
        left_pad = as_hex and len(doc_dec[key]) == 2 * size_data - 1
        entries.append((key, at, size_len, at + size_len, size_data, as_hex, left_pad))
        at += size_len + size_data
    if at != len(raw):
        raise ValueError("layout does not cover the message")
    return entries


def decoder(fn: Callable[[bytes, dict], Any], raw: bytes, spec: dict, n: int) -> Callable[[], float]:
    """A timer of n decodes: CPU ns of this thread per call."""

    def run() -> float:
        start = time.thread_time_ns()
        for _ in range(n):
            fn(raw, spec)
        return (time.thread_time_ns() - start) / n

    return run


def encoder(fn: Callable[[dict, dict], Any], fields: dict, spec: dict, n: int) -> Callable[[], float]:
    """A timer of n encodes of fresh copies (encode writes "p" into its input): CPU ns per call."""

    def run() -> float:
        copies = [dict(fields) for _ in range(n)]
        start = time.thread_time_ns()
        for c in copies:
            fn(c, spec)
        return (time.thread_time_ns() - start) / n

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    args = parser.parse_args(argv)
    batch, ref_batch, repeats = (200, 20, 3) if args.quick else (20000, 1000, 15)
    floor = build_floor_module()
    bench = load_bench_codec()

    rows = []
    for profile in PROFILES:
        spec = SPECS[profile]
        raw = bytes(iso8583.encode(bench.purchase(profile), spec)[0])
        expected = iso8583.decode(raw, spec)
        floor.setup(raw, layout(raw, spec))
        for variant in floor.VARIANTS[1:]:
            if bench.same(floor.result(variant), expected) is not True:
                raise AssertionError(f"{variant} does not build pyiso8583's result for {profile}")

        fields = bench.purchase(profile)
        floor_fields = dict(fields)
        if bench.same(floor.encode_result(floor_fields), iso8583.encode(dict(fields), spec)) is not True:
            raise AssertionError(f"the encode floor does not build pyiso8583's result for {profile}")
        cases = {
            "pyiso8583": decoder(iso8583.decode, raw, spec, ref_batch),
            "switch.codec": decoder(codec.decode, raw, spec, batch),
            "enc_pyiso8583": encoder(iso8583.encode, fields, spec, ref_batch),
            "enc_switch.codec": encoder(codec.encode, fields, spec, batch),
            "enc_floor": lambda f=fields: floor.encode_cpu_ns_per_message(f, batch),
        }
        for variant in floor.VARIANTS:
            cases[variant] = lambda v=variant: floor.cpu_ns_per_message(v, batch)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, run in cases.items():
                times[name].append(run())
        rows.append({"profile": profile, **{k: statistics.median(v) for k, v in times.items()}})

    exact = [v for v in floor.VARIANTS if v != "objects_only"]
    print(f"exact-result floor of decode, CPU ns per 0200 (medians of {repeats} interleaved repeats)")
    header = f"{'profile':16} {'pyiso8583':>9} {'codec':>7} " + " ".join(f"{v:>17}" for v in floor.VARIANTS)
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(f"{r[v]:17.0f}" for v in floor.VARIANTS)
        print(f"{r['profile']:16} {r['pyiso8583']:9.0f} {r['switch.codec']:7.0f} {cells}")

    def total(key: str) -> float:
        return sum(r[key] for r in rows)

    best = min(exact, key=total)
    summary = {
        "floor_variant": best,
        "floor_ns": round(total(best) / len(rows)),
        "objects_only_ns": round(total("objects_only") / len(rows)),
        "decode_ns": round(total("switch.codec") / len(rows)),
        "pyiso8583_ns": round(total("pyiso8583") / len(rows)),
        "max_decode_ratio": round(total("pyiso8583") / total(best), 2),
        "max_decode_ratio_public_api": round(total("pyiso8583") / total("public_api"), 2),
        "decode_ratio": round(total("pyiso8583") / total("switch.codec"), 2),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
    }
    print(f"{'profile':16} {'enc pyiso8583':>13} {'enc codec':>9} {'enc floor':>9}")
    for r in rows:
        print(
            f"{r['profile']:16} {r['enc_pyiso8583']:13.0f} {r['enc_switch.codec']:9.0f} {r['enc_floor']:9.0f}"
        )
    summary.update(
        {
            "encode_floor_ns": round(total("enc_floor") / len(rows)),
            "encode_ns": round(total("enc_switch.codec") / len(rows)),
            "max_encode_ratio": round(total("enc_pyiso8583") / total("enc_floor"), 2),
            "encode_ratio": round(total("enc_pyiso8583") / total("enc_switch.codec"), 2),
        }
    )
    print(
        f"encode floor {summary['encode_floor_ns']} ns: no exact encode can exceed "
        f"{summary['max_encode_ratio']}x here; switch.codec.encode {summary['encode_ns']} ns = "
        f"{summary['encode_ratio']}x"
    )
    print(
        f"floor ({best}) {summary['floor_ns']} ns vs pyiso8583 {summary['pyiso8583_ns']} ns: no exact decode "
        f"can exceed {summary['max_decode_ratio']}x here ({summary['max_decode_ratio_public_api']}x with the "
        f"public C API only); switch.codec.decode {summary['decode_ns']} ns = {summary['decode_ratio']}x"
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

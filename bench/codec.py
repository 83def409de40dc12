"""Codec benchmark: switch.codec (Cython plan) against pyiso8583 on the same messages, plus retail MAC.

One process, the same reference messages for both sides: a 0200 purchase with ICC data and its 0210
answer, in every shipped profile. For each: decode and encode with pyiso8583 and with switch.codec
(full pyiso8583-compatible results), and the switch's hot-path calls decode_fields / encode_bytes.
Every fast output is compared with pyiso8583's before anything is timed. Times are CPU time of
the benchmark's thread (time.thread_time_ns), medians of repeats; each repeat times one batch of
calls of every variant in turn, so load from other processes hits baseline and fast path alike.
Encode inputs are fresh dict copies made outside the timed loop, since encode writes "p"/"1" into
its input. Then retail MAC (ANSI X9.19) over the encoded
0200: switch.codec.mac.retail_mac against switch.codec.mac_reference.retail_mac.

Prints a table, the interpreter, and as the LAST line one JSON object: decode_ratio, encode_ratio
(0200, summed over the switch's three profiles, full results), decode_fields_ratio,
encode_bytes_ratio, mac_ratio (baseline time / fast time) and identical.

    .venv/bin/python bench/codec.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import Any

import iso8583

import switch.codec as codec
from switch.codec.specs import PROFILES, SPECS

PAN = "4761739001010119"
#: ~150 bytes of EMV tags as a terminal sends them in an online authorisation request.
ICC_REQUEST = (
    "9F2608A1B2C3D4E5F60718"  # application cryptogram
    "9F2701809F10120110A04003240000000000000000000000FF"  # CID, issuer application data
    "9F3704A1B2C3D49F3602001C950500000080005F2A020978"  # unpredictable number, ATC, TVR, currency
    "9A032605089C01009F02060000000123459F03060000000000"  # date, type, amounts
    "82021C009F1A0209789F3303E0F0C89F34034203009F350122"  # AIP, country, capabilities, CVM, type
    "9F1E0831323334353637388407A00000000310109F09020002"  # IFD serial, AID, version
    "9F4104000001239F530152"  # sequence counter, category code
)
ICC_RESPONSE = "910A1A2B3C4D5E6F708900008A023030"  # issuer authentication data, ARC


def purchase(profile: str) -> dict[str, str]:
    separator = "D" if profile == "terminal_packed" else "="
    return {
        "t": "0200",
        "2": PAN,
        "3": "000000",
        "4": "000000012345",
        "7": "0508103045",
        "11": "000123",
        "12": "103045",
        "13": "0508",
        "14": "2512",
        "22": "051",
        "23": "001",
        "25": "00",
        "35": f"{PAN}{separator}25122011438780890",
        "37": "612910000123",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
        "52": "0412AC89ABCDEF12",
        "55": ICC_REQUEST,
        "64": "A1B2C3D4E5F60718",
    }


def answer() -> dict[str, str]:
    return {
        "t": "0210",
        "3": "000000",
        "4": "000000012345",
        "7": "0508103046",
        "11": "000123",
        "12": "103045",
        "13": "0508",
        "37": "612910000123",
        "38": "A1B2C3",
        "39": "00",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
        "55": ICC_RESPONSE,
        "64": "0718A1B2C3D4E5F6",
    }


#: The clock: CPU time of this thread. Other processes on the shared 2-core machine then cost only
#: through caches, not through the time this process waits for a core (wall clock swung 2x).
clock_ns = time.thread_time_ns


def per_call_ns(fn: Callable[[], Any], batch: int) -> float:
    """CPU time per call of one batch (fn runs `batch` calls)."""
    start = clock_ns()
    fn()
    return (clock_ns() - start) / batch


def interleaved_medians(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median per-call time of each case; every repeat runs each case once, round-robin, so a load
    swing on the machine hits the baseline and the fast path alike instead of one of them."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def time_decode(decode: Callable[..., Any], raw: bytes, spec: dict, batch: int) -> Callable[[], float]:
    def run() -> None:
        for _ in range(batch):
            decode(raw, spec)

    return lambda: per_call_ns(run, batch)


def time_encode(encode: Callable[..., Any], fields: dict, spec: dict, batch: int) -> Callable[[], float]:
    """Encode writes "p"/"1" into its input: each call gets a fresh copy, made outside the timing."""

    def one_batch() -> float:
        copies = [dict(fields) for _ in range(batch)]
        start = clock_ns()
        for c in copies:
            encode(c, spec)
        return (clock_ns() - start) / batch

    return one_batch


def same(a: Any, b: Any) -> bool:
    """Equal values, key order and types, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def interpreter() -> dict[str, Any]:
    config = sysconfig.get_config_var("CONFIG_ARGS") or ""
    return {
        "executable": sys.executable,
        "version": sys.version.split()[0],
        "optimized_build": "--enable-optimizations" in config,
        "lto": "--with-lto" in config,
        "cflags": sysconfig.get_config_var("PY_CFLAGS") or "",
    }


def bench_mac(data: bytes, batch: int, repeats: int) -> tuple[dict[str, Any], bool]:
    try:
        from switch.codec import mac, mac_reference
    except ImportError as e:
        return {"available": False, "reason": str(e)}, True
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    fast_out, ref_out = mac.retail_mac(key, data), mac_reference.retail_mac(key, data)

    def run(fn: Callable[[bytes, bytes], bytes]) -> Callable[[], None]:
        def loop() -> None:
            for _ in range(batch):
                fn(key, data)

        return loop

    medians = interleaved_medians(
        {
            "ref": lambda: per_call_ns(run(mac_reference.retail_mac), batch),
            "fast": lambda: per_call_ns(run(mac.retail_mac), batch),
        },
        repeats,
    )
    ref_ns, fast_ns = medians["ref"], medians["fast"]
    result = {"available": True, "bytes": len(data), "reference_ns": ref_ns, "fast_ns": fast_ns}
    return result, fast_out == ref_out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test, not a measurement)")
    args = parser.parse_args(argv)
    batch, ref_batch, repeats = (20, 5, 3) if args.quick else (2000, 200, 15)

    identical = True
    rows: list[dict[str, Any]] = []
    for profile in sorted(SPECS):
        spec = SPECS[profile]
        for kind, fields in (("0200", purchase(profile)), ("0210", answer())):
            mine, theirs = copy.deepcopy(fields), copy.deepcopy(fields)
            ref_enc = iso8583.encode(theirs, spec)
            fast_enc = codec.encode(mine, spec)
            raw = bytes(ref_enc[0])
            ref_dec = iso8583.decode(raw, spec)
            fast_dec = codec.decode(raw, spec)
            ok = (
                same(fast_enc, ref_enc)
                and same(mine, theirs)
                and same(fast_dec, ref_dec)
                and same(codec.decode_fields(raw, spec), ref_dec[0])
                and same(codec.encode_bytes(fields, spec), ref_enc[0])
            )
            identical &= ok
            medians = interleaved_medians(
                {
                    "dec_ref": time_decode(iso8583.decode, raw, spec, ref_batch),
                    "dec_fast": time_decode(codec.decode, raw, spec, batch),
                    "dec_lean": time_decode(codec.decode_fields, raw, spec, batch),
                    "enc_ref": time_encode(iso8583.encode, fields, spec, ref_batch),
                    "enc_fast": time_encode(codec.encode, fields, spec, batch),
                    "enc_lean": time_encode(codec.encode_bytes, fields, spec, batch),
                },
                repeats,
            )
            rows.append({"profile": profile, "mti": kind, "bytes": len(raw), "identical": ok, **medians})

    mac_data = bytes(codec.encode(purchase("terminal_ascii"), SPECS["terminal_ascii"])[0])
    mac_result, mac_same = bench_mac(mac_data, batch * 5, repeats)
    identical &= mac_same

    print(f"codec benchmark: switch.codec (fast path {codec.FAST_PATH}) vs pyiso8583 {iso8583.__version__}")
    print("CPU µs per call (this thread), medians of interleaved repeats; ratio = pyiso8583 / switch.codec")
    header = (
        f"{'profile':16} {'MTI':4} {'bytes':>5} | {'dec ref':>8} {'fast':>6} {'ratio':>6} {'fields':>6} "
        f"{'ratio':>6} | {'enc ref':>8} {'fast':>6} {'ratio':>6} {'bytes':>6} {'ratio':>6} | same"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['profile']:16} {r['mti']:4} {r['bytes']:5} | {r['dec_ref'] / 1e3:8.2f} "
            f"{r['dec_fast'] / 1e3:6.2f} {r['dec_ref'] / r['dec_fast']:6.1f} {r['dec_lean'] / 1e3:6.2f} "
            f"{r['dec_ref'] / r['dec_lean']:6.1f} | {r['enc_ref'] / 1e3:8.2f} {r['enc_fast'] / 1e3:6.2f} "
            f"{r['enc_ref'] / r['enc_fast']:6.1f} {r['enc_lean'] / 1e3:6.2f} "
            f"{r['enc_ref'] / r['enc_lean']:6.1f} | {'yes' if r['identical'] else 'NO'}"
        )
    if mac_result["available"]:
        print(
            f"retail MAC over {mac_result['bytes']} bytes: "
            f"reference {mac_result['reference_ns'] / 1e3:.2f} µs, "
            f"fast {mac_result['fast_ns'] / 1e3:.2f} µs, ratio "
            f"{mac_result['reference_ns'] / mac_result['fast_ns']:.1f}"
        )
    else:
        print(f"retail MAC: not available ({mac_result['reason']})")
    interp = interpreter()
    dict_fill = bool(codec._fast is not None and codec._fast.dict_fill_available())
    print(f"result dicts filled in place (CPython 3.11 layout): {dict_fill}; load average {os.getloadavg()}")
    print(
        f"interpreter: {interp['executable']} (Python {interp['version']}, optimised build "
        f"{interp['optimized_build']}, LTO {interp['lto']}, CFLAGS {interp['cflags']})"
    )

    headline = [r for r in rows if r["mti"] == "0200" and r["profile"] in PROFILES]

    def ratio(ref: str, fast: str) -> float:
        return round(sum(r[ref] for r in headline) / sum(r[fast] for r in headline), 2)

    summary = {
        "decode_ratio": ratio("dec_ref", "dec_fast"),
        "encode_ratio": ratio("enc_ref", "enc_fast"),
        "decode_fields_ratio": ratio("dec_ref", "dec_lean"),
        "encode_bytes_ratio": ratio("enc_ref", "enc_lean"),
        "mac_ratio": (
            round(mac_result["reference_ns"] / mac_result["fast_ns"], 2) if mac_result["available"] else None
        ),
        "decode_0200_us": round(sum(r["dec_fast"] for r in headline) / len(headline) / 1e3, 3),
        "encode_0200_us": round(sum(r["enc_fast"] for r in headline) / len(headline) / 1e3, 3),
        "fast_path": codec.FAST_PATH,
        "dict_fill": dict_fill,
        "identical": identical,
        "quick": args.quick,
        "python": interp["version"],
        "optimized_build": interp["optimized_build"],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

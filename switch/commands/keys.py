"""`switch keys ...`: the KEK and the keys sealed under it (docs/operations.md, "Keys").

- `generate-kek --out FILE`: a new AES-256 KEK in a 0600 file; prints its check value only.
- `seal --terminal ID | --acquirer NAME`: seals a clear terminal master key or acquirer link MAC key
  under the config's current KEK and prints the config line. The clear key is read from --key-file (a
  0600 file: one group or others can read is refused) or stdin (not echoed on a terminal), never from
  the command line, where `ps` and shell history see it.
- `reseal`: KEK rotation. With the new KEK configured as current and the old one listed in
  keys.previous_kek_envs/previous_kek_files, re-seals under the current KEK everything sealed under a
  previous one: the config file's master keys and link MAC keys (rewritten in place: only those values
  change), the registry's terminal keys (audited), and the store-and-forward and armed-reversal files
  (their records re-seal when opened with a previous KEK). Then checks that all of it opens under the
  current KEK alone: only then may the previous KEK be dropped.
- `check`: that last step alone (exit 1 when anything still needs a previous KEK or does not open).

Exit status: 0 ok, 1 something does not open under the current KEK alone, 2 usage, key or storage error.
Output names keys by check value, never by value.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from switch.codec import keys as keymod
from switch.commands.secret_files import write_secret_file
from switch.config import ConfigError, SwitchConfig, load_config
from switch.private_files import read_private_file

ACTOR = "switch keys reseal"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "keys",
        help="KEK, sealed keys and KEK rotation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")

    g = sub.add_parser("generate-kek", help="write a new AES-256 KEK to a 0600 file; print its check value")
    g.add_argument("--out", required=True, help="file to create (mode 0600)")
    g.add_argument("--force", action="store_true", help="replace OUT if it exists (what it sealed is lost)")
    g.set_defaults(handler=_guard(_generate_kek))

    s = sub.add_parser("seal", help="seal a clear key under the current KEK; print the config line")
    s.add_argument("--config", default="switch.toml", help="config whose [keys] names the KEK")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--terminal", help="terminal id: seal its master key (master_key_encrypted_hex)")
    which.add_argument("--acquirer", help="acquirer name: seal its link MAC key (mac_key_sealed_hex)")
    s.add_argument("--key-file", help="0600 file holding the clear key in hex (default: read stdin)")
    s.set_defaults(handler=_guard(_seal))

    for name, handler, text in (
        ("reseal", _reseal, "re-seal everything sealed under a previous KEK under the current one"),
        ("check", _check, "check that every sealed key and record opens under the current KEK alone"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--config", default="switch.toml", help="config file (default: switch.toml)")
        c.add_argument(
            "--skip-stores",
            action="store_true",
            help="leave the store-and-forward and armed-reversal files alone (a running switch holds "
            "them; it re-seals them itself when it starts with the previous KEK listed)",
        )
        c.set_defaults(handler=_guard(handler))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except (ConfigError, keymod.KeyStoreError, ValueError, OSError) as exc:
            sys.stderr.write(f"switch keys: {exc}\n")
            return 2

    return run


# --- generate-kek / seal ----------------------------------------------------------------------------


def _generate_kek(args: argparse.Namespace) -> int:
    text = keymod.generate_kek()
    path = write_secret_file(args.out, text + "\n", force=args.force)
    kcv = keymod.Kek(bytes.fromhex(text)).check_value
    print(f"KEK written to {path} (mode 0600), check value {kcv}; name it in keys.kek_file")
    return 0


def _read_clear_key(key_file: str | None) -> bytes:
    if key_file:
        text = read_private_file(key_file, "key file")
    elif sys.stdin.isatty():
        text = getpass.getpass("clear key (hex, not echoed): ")
    else:
        text = sys.stdin.readline()
    try:
        return bytes.fromhex("".join(text.split()))
    except ValueError:
        raise ValueError("the clear key is not hex") from None


def _seal(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    kek = keymod.load_kek(config.keys)
    clear = keymod.SecretKey(_read_clear_key(args.key_file))
    if args.terminal:
        sealed = kek.seal(args.terminal, clear)
        print(
            f'master_key_encrypted_hex = "{sealed}"  # terminal {args.terminal}, key check value '
            f"{clear.check_value()}, KEK {kek.check_value}"
        )
    else:
        sealed = kek.seal_link_mac_key(args.acquirer, clear)
        print(
            f'mac_key_sealed_hex = "{sealed}"  # acquirer {args.acquirer}, key check value '
            f"{clear.check_value()}, KEK {kek.check_value}"
        )
    return 0


# --- reseal / check ---------------------------------------------------------------------------------


class Report:
    """What reseal/check found, per place; printed as lines an operator can read."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.problems: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def problem(self, text: str) -> None:
        self.problems.append(text)


def _config_values(config: SwitchConfig) -> list[tuple[str, str, str]]:
    """(kind, name, sealed hex) of every sealed key in the config."""
    out = [
        ("terminal", t.id, t.master_key_encrypted_hex) for t in config.terminals if t.master_key_encrypted_hex
    ]
    out += [("acquirer", a.name, a.mac_key_sealed_hex) for a in config.acquirers if a.mac_key_sealed_hex]
    return out


def _reseal_value(kek: keymod.Kek, kind: str, name: str, sealed: str) -> str | None:
    if kind == "terminal":
        return kek.reseal(name, sealed)
    return kek.reseal_link_mac_key(name, sealed)


def _open_value(kek: keymod.Kek, kind: str, name: str, sealed: str) -> None:
    if kind == "terminal":
        kek.open(name, sealed)
    else:
        kek.open_link_mac_key(name, sealed)


def reseal_config_file(path: Path, config: SwitchConfig, kek: keymod.Kek, report: Report) -> SwitchConfig:
    """Rewrite the config file with every sealed value under a previous KEK re-sealed. Only those hex
    strings change (comments and layout stay); each must occur exactly once in the file. Atomic."""
    text = path.read_text(encoding="utf-8")
    changed = 0
    for kind, name, sealed in _config_values(config):
        new = _reseal_value(kek, kind, name, sealed)
        if new is None:
            continue
        if text.count(sealed) != 1:
            raise ValueError(
                f"{path}: the sealed key of {kind} {name!r} is not written exactly once; "
                "re-seal it by hand with `switch keys seal`"
            )
        text = text.replace(sealed, new)
        changed += 1
    if changed:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, path.stat().st_mode & 0o777)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            msgspec.toml.decode(tmp.read_bytes(), type=SwitchConfig)  # never install a file that won't load
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    report.say(f"config {path}: {changed} of {len(_config_values(config))} sealed keys re-sealed")
    return load_config(path)


def check_config(path: Path, config: SwitchConfig, kek: keymod.Kek, report: Report) -> None:
    values = _config_values(config)
    for kind, name, sealed in values:
        try:
            _open_value(kek, kind, name, sealed)
        except keymod.KeyStoreError as exc:
            report.problem(f"config {path}: {exc}")
    report.say(f"config {path}: {len(values)} sealed keys checked")


def _registry(config: SwitchConfig) -> Any:
    from switch.server.admin.wiring import open_store

    if config.ledger.backend == "sqlite" and not Path(config.ledger.path).exists():
        return None  # no ledger database yet: no registry keys
    return open_store(config)


def reseal_registry(config: SwitchConfig, kek: keymod.Kek, report: Report, *, write: bool) -> None:
    """Terminal keys in the registry (the ledger's database): re-sealed with an audited update each
    (the running switch picks the change up like any key change). Retired keys too, so none is left
    that only the old KEK opens."""
    from switch.merchant.model import TerminalKey
    from switch.server.admin.wiring import list_all

    store = _registry(config)
    if store is None:
        report.say("registry: no ledger database, no terminal keys")
        return
    try:
        records = list_all(store, "key", TerminalKey)
        changed = stale = 0
        for rec in records:
            try:
                new = kek.reseal(rec.terminal_id, rec.encrypted_hex)
            except keymod.KeyStoreError as exc:
                report.problem(f"registry key {rec.terminal_id}/{rec.key_index}: {exc}")
                continue
            if new is None:
                continue
            if not write:
                stale += 1
                report.problem(f"registry key {rec.terminal_id}/{rec.key_index}: sealed under a previous KEK")
                continue
            id_ = f"{rec.terminal_id}/{rec.key_index}"
            got = store.get("key", id_, TerminalKey)
            if got is None or got[0].encrypted_hex != rec.encrypted_hex:
                report.problem(f"registry key {id_} changed while re-sealing; run reseal again")
                continue
            store.save(
                "key",
                id_,
                rec.terminal_id,
                msgspec.structs.replace(rec, encrypted_hex=new),
                actor=ACTOR,
                action=f"re-seal under KEK {kek.check_value}",
                at_ms=int(time.time() * 1000),
                expect_version=got[1],
            )
            changed += 1
        if write:
            report.say(f"registry: {changed} of {len(records)} terminal keys re-sealed")
        else:
            report.say(f"registry: {len(records)} terminal keys checked, {stale} under a previous KEK")
    finally:
        store.close()


def _stores(config: SwitchConfig, kek: keymod.Kek, report: Report) -> None:
    """Open the store-and-forward queue and the armed-reversal file with `kek`: opening checks every
    record and re-seals those sealed under one of `kek.previous` (switch.routing.store_forward,
    switch.server.armed). With a `kek` without previous KEKs this is the check alone."""
    from switch.routing.store_forward import StoreForward, StoreForwardError
    from switch.server.armed import ArmedStore, ArmedStoreError

    saf_path = Path(config.store_forward.path)
    if saf_path.exists():
        try:
            with StoreForward.open(config.store_forward, kek=kek) as saf:
                report.say(f"store-and-forward {saf_path}: {saf.depth()} pending items open")
        except StoreForwardError as exc:
            report.problem(str(exc))
    else:
        report.say(f"store-and-forward {saf_path}: no file")
    armed_path = Path(config.server.armed_path)
    if ArmedStore.exists(armed_path):
        try:
            armed = ArmedStore(armed_path, kek=kek)
            try:
                report.say(f"armed reversals {armed_path}: {len(armed)} records open")
            finally:
                armed.close()
        except ArmedStoreError as exc:
            report.problem(str(exc))
    else:
        report.say(f"armed reversals {armed_path}: no file")


def _current_only(kek: keymod.Kek) -> keymod.Kek:
    return kek.with_previous(()) if kek.previous else kek


def _verify(path: Path, config: SwitchConfig, kek: keymod.Kek, report: Report, skip_stores: bool) -> None:
    alone = _current_only(kek)
    check_config(path, config, alone, report)
    reseal_registry(config, alone, report, write=False)
    if not skip_stores:
        _stores(config, alone, report)


def _finish(report: Report, kek: keymod.Kek) -> int:
    for line in report.lines:
        print(line)
    for line in report.problems:
        print(f"NOT UNDER THE CURRENT KEK: {line}")
    if report.problems:
        print(
            f"check FAILED: keep the previous KEK(s) listed until this passes (current KEK {kek.check_value})"
        )
        return 1
    print(f"check OK: everything opens under the current KEK {kek.check_value} alone")
    return 0


def _reseal(args: argparse.Namespace) -> int:
    path = Path(args.config)
    config = load_config(path)
    kek = keymod.load_kek(config.keys)
    report = Report()
    if kek.previous:
        report.say(
            f"current KEK {kek.check_value}; previous {', '.join(k.check_value for k in kek.previous)}"
        )
    else:
        report.say(f"current KEK {kek.check_value}; no previous KEK configured (nothing to rotate from)")
    config = reseal_config_file(path, config, kek, report)
    reseal_registry(config, kek, report, write=True)
    if not args.skip_stores:
        _stores(config, kek, report)
    if report.problems:
        return _finish(report, kek)
    _verify(path, config, kek, report, args.skip_stores)
    return _finish(report, kek)


def _check(args: argparse.Namespace) -> int:
    path = Path(args.config)
    config = load_config(path)
    kek = keymod.load_kek(config.keys)
    report = Report()
    _verify(path, config, kek, report, args.skip_stores)
    return _finish(report, kek)

"""Key handling from the command line: `switch ledger keygen` writes its seed only to a 0600 file,
`switch keys seal` seals what the config then loads, and a KEK rotation run with `switch keys reseal`
leaves every sealed thing (config master keys, the acquirer link MAC key, registry terminal keys, the
store-and-forward queue, the armed-reversal store) readable under the new KEK alone."""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

import msgspec
import pytest

from switch import cli
from switch.codec import keys as keymod
from switch.config import (
    AcquirerConfig,
    KeysConfig,
    LedgerConfig,
    ServerConfig,
    StoreForwardConfig,
    SwitchConfig,
    TerminalConfig,
    load_config,
)
from switch.ledger.keys import LedgerKeyError, load_signing_key, public_bytes
from switch.merchant.model import TerminalKey
from switch.merchant.store import RegistryStore
from switch.routing.store_forward import StoreForward, StoreForwardError
from switch.server.armed import ArmedStore, ArmedStoreError

PAN = "4761739001010119"
TMK = bytes.fromhex("239E9176D6080DAE1F57CDF449465204")
REGISTRY_TMK = bytes.fromhex("15C83E3EBF86DA641FC42937ADBC4338")
LINK_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def run(argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str = "") -> tuple[int, str]:
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = cli.main(argv)
    finally:
        sys.stdin = old
    out = capsys.readouterr()
    return code, out.out + out.err


def secret_file(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


# --- switch ledger keygen -------------------------------------------------------------------------


def test_ledger_keygen_writes_a_private_file_and_prints_only_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "checkpoint.key"
    code, text = run(["ledger", "keygen", "--out", str(out)], capsys)
    assert code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    seed_hex = out.read_text().strip()
    assert len(seed_hex) == 64 and seed_hex not in text.lower()
    key = load_signing_key(LedgerConfig(checkpoint_key_file=str(out)))  # the config loads what it wrote
    assert public_bytes(key.public_key()).hex() in text and str(out) in text

    code, text = run(["ledger", "keygen", "--out", str(out)], capsys)
    assert code == 2 and "refusing to overwrite" in text
    assert out.read_text().strip() == seed_hex  # untouched
    code, text = run(["ledger", "keygen", "--out", str(out), "--force"], capsys)
    assert code == 0 and out.read_text().strip() != seed_hex
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_ledger_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.key"
    path.write_text("11" * 32 + "\n")
    path.chmod(0o644)
    with pytest.raises(LedgerKeyError, match="chmod 600"):
        load_signing_key(LedgerConfig(checkpoint_key_file=str(path)))


def test_generate_kek_writes_a_private_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kek.hex"
    code, text = run(["keys", "generate-kek", "--out", str(out)], capsys)
    assert code == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600
    kek = keymod.load_kek(KeysConfig(kek_file=str(out)), {})
    assert kek.check_value in text and out.read_text().strip() not in text
    assert run(["keys", "generate-kek", "--out", str(out)], capsys)[0] == 2


# --- seal, then rotate ------------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return msgspec.json.encode(value).decode()  # strings, numbers and booleans read the same in TOML


def write_config(path: Path, config: SwitchConfig) -> None:
    """The parts of `config` these tests set, as TOML with a comment the re-seal must keep."""
    lines = ["# operator's notes: keep me"]
    for section in ("keys", "ledger", "store_forward", "server"):
        lines.append(f"[{section}]")
        obj = getattr(config, section)
        default = type(obj)()
        lines += [
            f"{name} = {_toml_value(getattr(obj, name))}"
            for name in obj.__struct_fields__
            if getattr(obj, name) != getattr(default, name)
        ]
    for table, items in (("acquirers", config.acquirers), ("terminals", config.terminals)):
        for item in items:
            lines.append(f"[[{table}]]")
            lines += [
                f"{f} = {_toml_value(getattr(item, f))}" for f in item.__struct_fields__ if getattr(item, f)
            ]
    path.write_text("\n".join(lines) + "\n")
    assert load_config(path) == config


@pytest.fixture
def installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, SwitchConfig, keymod.Kek]:
    """A config under K1: TMK of T1 and the link MAC key sealed through `switch keys seal`, a registry
    key of T2, one pending SAF item and one armed reversal."""
    k1_hex = keymod.generate_kek()
    k1 = keymod.Kek(bytes.fromhex(k1_hex))
    base = SwitchConfig(
        keys=KeysConfig(kek_file=secret_file(tmp_path / "kek1.hex", k1_hex)),
        acquirers=[AcquirerConfig(name="alpha")],
        terminals=[TerminalConfig(id="T1", merchant_id="M1")],
        ledger=LedgerConfig(path=str(tmp_path / "ledger.db")),
        store_forward=StoreForwardConfig(path=str(tmp_path / "saf.db")),
        server=ServerConfig(armed_path=str(tmp_path / "armed.db")),
    )
    path = tmp_path / "switch.toml"
    write_config(path, base)
    code, line = run(["keys", "seal", "--config", str(path), "--terminal", "T1"], capsys, TMK.hex() + "\n")
    assert code == 0 and TMK.hex() not in line.lower()
    tmk_sealed = line.split('"')[1]
    code, line = run(["keys", "seal", "--config", str(path), "--acquirer", "alpha"], capsys, LINK_KEY.hex())
    assert code == 0 and LINK_KEY.hex() not in line.lower()
    link_sealed = line.split('"')[1]
    config = msgspec.structs.replace(
        base,
        acquirers=[AcquirerConfig(name="alpha", mac_key_sealed_hex=link_sealed)],
        terminals=[TerminalConfig(id="T1", merchant_id="M1", master_key_encrypted_hex=tmk_sealed)],
    )
    write_config(path, config)
    store = RegistryStore.open_sqlite(config.ledger.path)
    key = TerminalKey(terminal_id="T2", key_index=0, encrypted_hex=k1.seal("T2", REGISTRY_TMK))
    store.save("key", "T2/0", "T2", key, actor="test", action="add key", at_ms=0, expect_version=None)
    store.close()
    with StoreForward.open(config.store_forward, kek=k1) as saf:
        saf.append("alpha", "0400", {"t": "0400", "2": PAN, "11": "000001"}, now_ms=0)
    armed = ArmedStore(config.server.armed_path, kek=k1)
    armed.arm_many([("alpha", "000000000001", {"t": "0400", "2": PAN})], now_ms=0)
    armed.close()
    return path, config, k1


def everything_reads(config: SwitchConfig, kek: keymod.Kek) -> None:
    assert keymod.load_master_keys(config.terminals, kek)["T1"].value == TMK
    assert keymod.load_link_mac_keys(config.acquirers, kek)["alpha"].value == LINK_KEY
    store = RegistryStore.open_sqlite(config.ledger.path)
    got = store.get("key", "T2/0", TerminalKey)
    store.close()
    assert got is not None and kek.open("T2", got[0].encrypted_hex).value == REGISTRY_TMK
    with StoreForward.open(config.store_forward, kek=kek) as saf:
        assert [item.fields["2"] for item in saf.due(now_ms=10**12)] == [PAN]
    armed = ArmedStore(config.server.armed_path, kek=kek)
    assert [f["2"] for _, _, f in armed.all()] == [PAN]
    armed.close()


def test_sealed_values_load_and_a_wrong_kek_is_named(
    installed: tuple[Path, SwitchConfig, keymod.Kek],
) -> None:
    path, _, k1 = installed
    loaded = load_config(path)
    assert keymod.load_link_mac_keys(loaded.acquirers, k1)["alpha"].value == LINK_KEY
    other = keymod.Kek(os.urandom(32))
    with pytest.raises(keymod.KeyStoreError, match=f"acquirer 'alpha'.*{other.check_value}"):
        keymod.load_link_mac_keys(loaded.acquirers, other)
    # a terminal's sealed master key pasted as the link key does not open as one
    tmk_sealed = loaded.terminals[0].master_key_encrypted_hex
    with pytest.raises(keymod.KeyStoreError, match="another acquirer"):
        k1.open_link_mac_key("alpha", tmk_sealed)


def test_kek_rotation_with_reseal(
    installed: tuple[Path, SwitchConfig, keymod.Kek], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, config, k1 = installed
    k2_file = tmp_path / "kek2.hex"
    assert run(["keys", "generate-kek", "--out", str(k2_file)], capsys)[0] == 0
    k1_file = config.keys.kek_file
    rotating = msgspec.structs.replace(
        config, keys=KeysConfig(kek_file=str(k2_file), previous_kek_files=[k1_file])
    )
    write_config(path, rotating)
    ring = keymod.load_kek(rotating.keys, {})
    k2_alone = keymod.load_kek(KeysConfig(kek_file=str(k2_file)), {})
    assert ring.check_value == k2_alone.check_value and [k.check_value for k in ring.previous] == [
        k1.check_value
    ]

    # K2 current, K1 previous: the config and the registry still read (no store opened yet)
    assert keymod.load_master_keys(rotating.terminals, ring)["T1"].value == TMK
    assert keymod.load_link_mac_keys(rotating.acquirers, ring)["alpha"].value == LINK_KEY
    code, text = run(["keys", "check", "--config", str(path)], capsys)
    assert code == 1 and "T1" in text and "alpha" in text and "T2/0" in text and "saf.db" in text

    code, text = run(["keys", "reseal", "--config", str(path)], capsys)
    assert code == 0, text
    assert f"check OK: everything opens under the current KEK {k2_alone.check_value} alone" in text
    assert path.read_text().startswith("# operator's notes: keep me\n")
    assert TMK.hex() not in text.lower() and LINK_KEY.hex() not in text.lower() and PAN not in text

    # K1 dropped: everything reads under K2 alone
    done = load_config(path)
    assert done.terminals[0].master_key_encrypted_hex != config.terminals[0].master_key_encrypted_hex
    final = msgspec.structs.replace(done, keys=KeysConfig(kek_file=str(k2_file)))
    write_config(path, final)
    assert run(["keys", "check", "--config", str(path)], capsys)[0] == 0
    everything_reads(final, k2_alone)
    with pytest.raises(keymod.KeyStoreError):  # and no longer under K1
        keymod.load_master_keys(final.terminals, k1)


def test_stores_sealed_under_a_dropped_kek_refuse_to_open(
    installed: tuple[Path, SwitchConfig, keymod.Kek],
) -> None:
    """Why the re-seal matters: without it, dropping K1 stops the switch at start."""
    _, config, k1 = installed
    k2 = keymod.Kek(os.urandom(32))
    with pytest.raises(StoreForwardError, match=k1.check_value):
        StoreForward.open(config.store_forward, kek=k2)
    with pytest.raises(ArmedStoreError, match=k1.check_value):
        ArmedStore(config.server.armed_path, kek=k2)
    everything_reads(config, k2.with_previous([k1]))  # listed as previous, they open (and re-seal)
    with StoreForward.open(config.store_forward, kek=k2) as saf:  # re-sealed on open: K2 alone now
        assert [item.fields["2"] for item in saf.due(now_ms=10**12)] == [PAN]
    assert [f["2"] for _, _, f in ArmedStore(config.server.armed_path, kek=k2).all()] == [PAN]


def test_missing_previous_kek_fails_at_load() -> None:
    with pytest.raises(keymod.KeyStoreError, match="OLD_KEK"):
        keymod.load_kek(KeysConfig(kek_env="K", previous_kek_envs=["OLD_KEK"]), {"K": keymod.generate_kek()})


def test_seal_key_file_must_be_private_and_its_bytes_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kek_hex = keymod.generate_kek()
    path = tmp_path / "switch.toml"
    write_config(path, SwitchConfig(keys=KeysConfig(kek_file=secret_file(tmp_path / "kek.hex", kek_hex))))
    key_file = tmp_path / "link.key"
    key_file.write_text(LINK_KEY.hex().upper() + "\n")
    key_file.chmod(0o644)
    argv = ["keys", "seal", "--config", str(path), "--acquirer", "alpha", "--key-file", str(key_file)]
    code, text = run(argv, capsys)
    assert code == 2 and "is accessible by group or others (mode 0644); chmod 600 it" in text
    assert LINK_KEY.hex().upper() not in text.upper()
    key_file.chmod(0o600)
    code, text = run(argv, capsys)
    assert code == 0 and "key check value 08D7B4" in text
    key_file.write_bytes(LINK_KEY.hex().upper().encode()[:20] + "é".encode() + b"\n")  # not ASCII
    code, text = run(argv, capsys)
    assert code == 2 and f"key file {key_file} is not hex text" in text
    assert "0xc3" not in text and "position" not in text  # no decode error quoting the file's bytes

"""`switch acquirer sim` takes its link MAC key from a private file or the environment, never from the
command line (where `ps` and shell history see it): --mac-key-file (refused when group or others may
read it), $SWITCH_SIM_MAC_KEY, or mac_key_hex in a private --config file. No message names the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from switch.cli import build_parser
from switch.commands.acquirer import MAC_KEY_ENV, load_sim_config
from tests.sim.simclient import MAC_KEY, Client, trio_test

KCV = "08D7B4"  # check value of MAC_KEY (switch.toml names it too)
ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str):
    return build_parser().parse_args(["acquirer", "sim", *argv])


def key_file(tmp_path: Path, mode: int, text: str = MAC_KEY + "\n", name: str = "link.key") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def refused(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SystemExit) as exc:
        load_sim_config(parse(*argv), environ or {})
    message = str(exc.value.code)
    assert MAC_KEY not in message.upper() and MAC_KEY.lower() not in message
    return message


def test_the_key_is_not_taken_on_the_command_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("--mac-key", MAC_KEY)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mac-key is refused" in err and f"--mac-key-file FILE (mode 0600) or ${MAC_KEY_ENV}" in err
    assert MAC_KEY not in err


def test_key_file_readable_by_group_or_others_is_refused(tmp_path: Path) -> None:
    for mode in (0o640, 0o604, 0o660, 0o644):
        path = key_file(tmp_path, mode)
        message = refused(["--mac-key-file", str(path)])
        assert f"{path} is accessible by group or others (mode {mode:04o}); chmod 600 it" in message


def test_private_key_file_is_used(tmp_path: Path) -> None:
    path = key_file(tmp_path, 0o600, text=f"  {MAC_KEY[:16]}\n{MAC_KEY[16:].lower()}\n")
    config, note = load_sim_config(parse("--mac-key-file", str(path)), {MAC_KEY_ENV: "00" * 16})
    assert config.mac_key_hex == MAC_KEY  # the file wins over the environment
    assert note == f"link MAC key check value {KCV} from --mac-key-file {path}"


def test_key_from_the_environment(tmp_path: Path) -> None:
    config, note = load_sim_config(parse(), {MAC_KEY_ENV: MAC_KEY})
    assert config.mac_key_hex == MAC_KEY and note == f"link MAC key check value {KCV} from ${MAC_KEY_ENV}"
    config, note = load_sim_config(parse(), {})
    assert config.mac_key_hex == "" and note == "links not MACed"


def test_bad_keys_are_refused_without_echoing_them(tmp_path: Path) -> None:
    bad = "0123456789ABCDEFFEDCBA987654321G"  # not hex: the message must not carry it
    message = refused([], {MAC_KEY_ENV: bad})
    assert (
        message == f"switch acquirer sim: the key from ${MAC_KEY_ENV} is not hex text" and bad not in message
    )
    assert "must be 16 bytes (32 hex digits)" in refused([], {MAC_KEY_ENV: MAC_KEY[:16]})
    path = key_file(tmp_path, 0o600, text=MAC_KEY + "\n" + "x" * 5000)
    assert "is not ASCII text" in refused(["--mac-key-file", str(path)])
    assert "cannot read MAC key file" in refused(["--mac-key-file", str(tmp_path / "missing")])
    assert "is not a regular file" in refused(["--mac-key-file", str(tmp_path)])


def test_config_file_holding_the_key_must_be_private(tmp_path: Path) -> None:
    cfg = key_file(tmp_path, 0o644, text=f'name = "alpha"\nmac_key_hex = "{MAC_KEY}"\n', name="sim.toml")
    message = refused(["--config", str(cfg)])
    assert "config file holding mac_key_hex" in message and "chmod 600 it" in message
    cfg.chmod(0o600)
    config, note = load_sim_config(parse("--config", str(cfg)), {})
    assert config.mac_key_hex == MAC_KEY and note.endswith(f"from mac_key_hex of {cfg}")
    # a config without a key may be readable by anyone
    plain = key_file(tmp_path, 0o644, text='name = "beta"\n', name="plain.toml")
    assert load_sim_config(parse("--config", str(plain)), {})[0].mac_key_hex == ""


@trio_test
async def test_simulator_process_macs_with_the_key_from_its_file(tmp_path: Path) -> None:
    path = key_file(tmp_path, 0o600)
    env = {k: v for k, v in os.environ.items() if k != MAC_KEY_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "switch", "acquirer", "sim", "--port", "0", "--mac-key-file", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert "listening on" in line, line
        client = await Client.connect(int(line.rsplit(":", 1)[1]), MAC_KEY)
        try:  # Client.receive asserts the answer's MAC verifies under MAC_KEY
            answer = await client.request({"t": "0800", "7": "1122334455", "11": "000001", "70": "001"})
            assert answer["t"] == "0810" and answer["39"] == "00"
        finally:
            await client.aclose()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"link MAC key check value {KCV} from --mac-key-file {path}" in err
    assert MAC_KEY not in err.upper() and MAC_KEY not in line.upper()


# --- `switch terminal ...`: the terminal master key, the same way ------------------------------------

TMK = "239E9176D6080DAE1F57CDF449465204"


def test_terminal_master_key_from_a_private_file_or_the_environment(tmp_path: Path, capsys) -> None:
    from switch.commands.terminal import MASTER_KEY_ENV, master_key_hex

    def args(*argv: str):
        return build_parser().parse_args(
            ["terminal", "purchase", "--port", "1", "--pan", "4111111111111111", "--amount", "1", *argv]
        )

    with pytest.raises(SystemExit) as exc:
        args("--master-key", TMK)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--master-key is refused" in err and TMK not in err
    path = key_file(tmp_path, 0o644, text=TMK + "\n", name="tmk.key")
    with pytest.raises(ValueError, match=r"accessible by group or others \(mode 0644\); chmod 600 it"):
        master_key_hex(args("--master-key-file", str(path)), {})
    path.chmod(0o600)
    assert master_key_hex(args("--master-key-file", str(path)), {MASTER_KEY_ENV: "00" * 16}) == TMK
    assert master_key_hex(args(), {MASTER_KEY_ENV: TMK.lower()}) == TMK
    assert master_key_hex(args(), {}) == ""
    with pytest.raises(ValueError) as bad:
        master_key_hex(args(), {MASTER_KEY_ENV: TMK[:-1] + "Z"})
    assert str(bad.value) == f"the key from ${MASTER_KEY_ENV} is not hex text"

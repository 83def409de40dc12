"""`switch terminal` takes a card the way it takes a key: from a private file or standard input, never
from the command line, where `ps`, /proc/*/cmdline and shell history see it. A card file (TOML, mode
0600) or `--card-file -` gives the PAN, expiry and PIN block; `--pan -` the PAN alone; `--pan` with a
number takes only the public test cards; `--pin-block HEX` is refused by name. No refusal or error
shows the PAN (at most masked) or the PIN block."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from switch.cli import build_parser, main
from switch.commands.terminal import TEST_PANS, CardInputError, card_from_args

PAN = "4761739001010119"  # not a public test card: must not be taken from argv
PAN2 = "5413330089010434"
PIN_BLOCK = "0412AC89ABCDEF12"
SECRETS = (PAN, PAN[6:], PAN2, PAN2[6:], PIN_BLOCK, PIN_BLOCK.lower())
ROOT = Path(__file__).resolve().parents[2]


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} in {text!r}"


def card_file(tmp_path: Path, text: str, mode: int = 0o600, name: str = "card.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def stdin_of(text: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(text.encode()))


@pytest.fixture
def common(sim_port: int, tmp_path: Path) -> list[str]:
    return ["--port", str(sim_port), "--tid", "CARD0001", "--stan-file", str(tmp_path / "stan")]


def answer(capsys) -> dict:
    out, err = capsys.readouterr()
    assert_clean(out + err)
    return json.loads(out)


def test_purchase_with_the_card_from_a_private_file(common: list[str], tmp_path: Path, capsys) -> None:
    path = card_file(tmp_path, f'pan = "{PAN}"\nexpiry = "2812"\npin_block = "{PIN_BLOCK}"\n')
    assert main(["terminal", "purchase", "--amount", "12.34", "--card-file", str(path), *common]) == 0
    out = answer(capsys)
    assert out["approved"] and out["amount_minor"] == 1234 and out["pan"] == "476173******0119"
    # the original of a void comes the same way
    void = ["--card-file", str(path), "--rrn", out["rrn"], "--original-amount", "12.34"]
    assert main(["terminal", "void", *void, *common]) == 0
    assert answer(capsys)["approved"]


def test_purchase_with_the_card_file_on_standard_input(
    common: list[str], capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", stdin_of(f'pan = "{PAN}"\npin_block = "{PIN_BLOCK}"\n'))
    assert main(["terminal", "purchase", "--amount", "1.00", "--card-file", "-", *common]) == 0
    assert answer(capsys)["approved"]


def test_mix_takes_several_cards_from_the_file(common: list[str], tmp_path: Path, capsys) -> None:
    path = card_file(tmp_path, f'pan = ["{PAN}", "{PAN2}"]\n')
    argv = ["terminal", "mix", "--count", "20", "--concurrency", "2", "--card-file", str(path), *common]
    assert main(argv) == 0
    out = answer(capsys)
    assert out["errors"] == 0 and sum(out["by_kind_code"].values()) >= 20


def test_pan_from_standard_input_in_a_separate_process(sim_port: int, tmp_path: Path) -> None:
    argv = ["--port", str(sim_port), "--stan-file", str(tmp_path / "stan"), "--amount", "3.00"]
    proc = subprocess.run(
        [sys.executable, "-m", "switch", "terminal", "purchase", "--pan", "-", *argv],
        input=PAN + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc.stdout + proc.stderr)
    assert json.loads(proc.stdout)["approved"]


def test_public_test_cards_are_still_taken_on_the_command_line(common: list[str], capsys) -> None:
    assert main(["terminal", "purchase", "--amount", "1.00", "--pan", TEST_PANS[0], *common]) == 0
    assert json.loads(capsys.readouterr().out)["approved"]


def test_another_card_number_on_the_command_line_is_refused_unechoed(capsys) -> None:
    for kind, extra in (("purchase", ["--amount", "1"]), ("refund", ["--original-amount", "1"])):
        with pytest.raises(SystemExit) as exc:
            main(["terminal", kind, "--port", "1", "--pan", PAN, *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "shows in `ps` and shell history" in err
        assert "--card-file FILE (mode 0600), --card-file - or --pan -" in err
        assert_clean(err)


def test_a_card_number_typed_in_the_wrong_place_is_not_echoed_by_argparse(capsys) -> None:
    """argparse quotes what it could not place ("unrecognized arguments", "invalid choice"): those
    messages go out with card numbers masked, for every command."""
    for argv in (
        ["terminal", "purchase", "--port", "1", "--amount", "1", "--pan", "-", PAN],
        ["terminal", PAN],
        ["ledger", "verify", "--db", "x.db", PAN],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and ("unrecognized arguments" in err or "invalid choice" in err), err
        assert PAN[:6] + "******" + PAN[-4:] in err
        assert_clean(err)


def test_card_number_given_as_the_card_file_is_refused_unechoed(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["terminal", "purchase", "--port", "1", "--amount", "1", "--card-file", PAN])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --card-file: takes a file name or -, not a card number" in err
    assert_clean(err)


def test_pin_block_on_the_command_line_is_refused_unechoed(capsys) -> None:
    for value in (PIN_BLOCK, f"--pin-block={PIN_BLOCK}"):
        argv = ["--pin-block", value] if value == PIN_BLOCK else [value]
        with pytest.raises(SystemExit) as exc:
            main(["terminal", "purchase", "--port", "1", "--amount", "1", "--pan", "-", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "--pin-block is refused" in err
        assert "put pin_block in --card-file FILE (mode 0600) or --card-file - (standard input)" in err
        assert_clean(err)


def test_card_file_readable_by_group_or_others_is_refused(tmp_path: Path, capsys) -> None:
    for mode in (0o640, 0o604, 0o644, 0o660):
        path = card_file(tmp_path, f'pan = "{PAN}"\npin_block = "{PIN_BLOCK}"\n', mode)
        assert main(["terminal", "purchase", "--port", "1", "--amount", "1", "--card-file", str(path)]) == 1
        err = capsys.readouterr().err
        assert f"card file {path} is accessible by group or others (mode {mode:04o}); chmod 600 it" in err
        assert_clean(err)


BAD_CARD_FILES = {
    f'pan = "{PAN}"\ncvv = "123"\n': "holds a key other than pan, expiry, pin_block",
    f'{PAN} = "x"\npan = "{PAN}"\n': "holds a key other than pan, expiry, pin_block",
    f"pan = {PAN}\n": "Expected `str | array`, got `int` - at `$.pan`",
    f'pan = "{PAN}1234"\n': "the PAN from card file",
    f'pan = "{PAN[:8]} {PAN[8:]}"\n': "must be 12-19 digits",
    f'pan = ["{PAN}", "{PAN2}"]\n': "pan must be one PAN (a list only for mix)",
    f'pan = "{PAN}"\npin_block = "{PIN_BLOCK}0"\n': "the PIN block from card file",
    f'pan = "{PAN}"\npin_block = "{PIN_BLOCK[:-1]}G"\n': "must be 16 hex digits",
    f'pan = "{PAN}"\nexpiry = "2813"\n': "must be YYMM",
    f'pan = "{PAN}\n': "is not TOML (at line 1",
    f'pan = "{PAN}" {PIN_BLOCK}\n': "is not TOML (at line 1",
    f"{PAN}\n": "is not TOML",
    "expiry = '2812'\n": "Object missing required field `pan`",
}


@pytest.mark.parametrize("text", list(BAD_CARD_FILES), ids=range(len(BAD_CARD_FILES)))
def test_bad_card_file_is_refused_unechoed(text: str, tmp_path: Path, capsys) -> None:
    path = card_file(tmp_path, text)
    assert main(["terminal", "purchase", "--port", "1", "--amount", "1", "--card-file", str(path)]) == 1
    err = capsys.readouterr().err
    assert BAD_CARD_FILES[text] in err and err.startswith("switch terminal purchase: ")
    assert_clean(err)


def test_pan_from_standard_input_one_card_and_prompt_on_a_terminal() -> None:
    def args(*argv: str):
        return build_parser().parse_args(["terminal", *argv, "--port", "1"])

    purchase = args("purchase", "--amount", "1", "--pan", "-")
    assert card_from_args(purchase, stdin_of(f"  {PAN}\n\n")).pans == (PAN,)
    for text in (f"{PAN}\n{PAN2}\n", "", f"{PAN}x\n", "é" * 3, "1" * 5000):
        with pytest.raises(CardInputError) as exc:
            card_from_args(purchase, stdin_of(text))
        assert "--pan - (standard input)" in str(exc.value)
        assert_clean(str(exc.value))
    mix = args("mix", "--pan", "-", "--pan", TEST_PANS[0])
    assert card_from_args(mix, stdin_of(f"{PAN}\n{PAN2}\n")).pans == (PAN, PAN2, TEST_PANS[0])
    assert card_from_args(args("mix"), stdin_of("")).pans == (TEST_PANS[0],)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []
    card = card_from_args(purchase, Tty(), ask=lambda prompt: prompts.append(prompt) or PAN2)
    assert card.pans == (PAN2,) and prompts == ["PAN: "] and PAN2 not in repr(card)


def test_expiry_from_the_flag_or_the_file_not_both(tmp_path: Path) -> None:
    path = card_file(tmp_path, f'pan = "{PAN}"\nexpiry = "2812"\n')
    parse = build_parser().parse_args
    base = ["terminal", "purchase", "--port", "1", "--amount", "1"]
    assert card_from_args(parse([*base, "--card-file", str(path)]), stdin_of("")).expiry == "2812"
    assert card_from_args(parse([*base, "--pan", "-", "--expiry", "2901"]), stdin_of(PAN)).expiry == "2901"
    with pytest.raises(CardInputError, match="given twice"):
        card_from_args(parse([*base, "--card-file", str(path), "--expiry", "2901"]), stdin_of(""))


def test_help_says_how_to_pass_a_card(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["terminal", "purchase", "--help"])
    out = capsys.readouterr().out
    assert "--card-file FILE   a file of mode 0600 holding TOML" in out
    assert "--pan -            the PAN from standard input" in out and "--pin-block is refused" in out

"""urepa/cli.py: the typed flag validators and the flags that several entry points share, checked
through every entry point that takes them."""

from __future__ import annotations

import argparse
import signal

import pytest

import generate
import quickstart
import train
from preprocessing import prepare
from urepa import cli
from urepa.utils import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    InputError,
    ReportedError,
    RunStopped,
)

BOUNDS = [
    (cli.positive_int, "0", "must be a positive integer, got 0"),
    (cli.positive_int, "-3", "must be a positive integer, got -3"),
    (cli.nonnegative_int, "-1", "must be an integer >= 0, got -1"),
    (cli.positive_float, "0", "must be > 0, got 0"),
    (cli.nonnegative_float, "-0.5", "must be >= 0, got -0.5"),
    (cli.unit_interval, "1", "must be in [0, 1), got 1"),
    (cli.unit_interval, "-0.1", "must be in [0, 1), got -0.1"),
    (cli.unit_closed, "1.5", "must be in [0, 1], got 1.5"),
    (cli.positive_int, "2.5", "expected int, got '2.5'"),
    (cli.positive_float, "fast", "expected float, got 'fast'"),
]
FLOAT_VALIDATORS = [
    cli.positive_float,
    cli.nonnegative_float,
    cli.unit_interval,
    cli.unit_closed,
]


# --------------------------------------------------------------------------- validators


@pytest.mark.parametrize("validator, text, message", BOUNDS)
def test_validators_refuse_out_of_range_values_with_their_message(validator, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        validator(text)
    assert str(err.value) == message


@pytest.mark.parametrize("validator", FLOAT_VALIDATORS)
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "infinity"])
def test_float_validators_refuse_non_finite_values(validator, text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"must be a finite number, got {text}"):
        validator(text)


def test_validators_return_the_parsed_value():
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0
    assert cli.positive_float("1e-8") == 1e-8 and cli.nonnegative_float("0") == 0.0
    assert cli.unit_interval("0") == 0.0 and cli.unit_closed("1") == 1.0


def test_model_name_accepts_registry_names_and_bare_classes():
    assert cli.model_name("SiT↓-XL/2") == "SiTDown-XL/2"
    assert cli.model_name("SiTDown") == "SiTDown" and cli.model_name("SiT") == "SiT"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown model 'SiT-Q/2'"):
        cli.model_name("SiT-Q/2")


def test_json_object_accepts_objects_only():
    assert cli.json_object('{"hidden_size": 64}') == {"hidden_size": 64}
    with pytest.raises(argparse.ArgumentTypeError, match="expected a JSON object"):
        cli.json_object("[1]")
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        cli.json_object("{hidden_size: 64}")


# --------------------------------------------------------------------------- encoders


def test_encoder_list_and_weights():
    assert cli.encoder_list("none") == cli.encoder_list("NONE") == cli.encoder_list("None") == []
    both = ["dinov2-vit-b", "dinov2-vit-l_reg"]
    assert cli.encoder_list("dinov2-vit-b, dinov2-vit-l_reg") == both
    with pytest.raises(ValueError, match="unknown encoder 'clip-b'"):
        cli.encoder_list("clip-b")
    with pytest.raises(ValueError, match="lists an encoder twice"):
        cli.encoder_list("dinov2-vit-b,dinov2-vit-b")
    assert cli.encoder_weights(None, ["dinov2-vit-b"]) == [None]
    assert cli.encoder_weights("b.pth,l.pth", ["a", "b"]) == ["b.pth", "l.pth"]
    with pytest.raises(ValueError, match="--enc-weights needs one path per encoder"):
        cli.encoder_weights("b.pth", ["a", "b"])


# --------------------------------------------------------------------------- entry points

ENTRY_POINTS = {  # the flags each needs besides those tested
    "train": (train.parse_args, ["--data-dir", "d", "--exp-name", "x", "--proj-coeff", "0"]),
    "prepare": (prepare.parse_args, ["--source", "s", "--dest", "d"]),
}


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_enc_type_none_is_case_insensitive_everywhere(entry_point):
    parse, required = ENTRY_POINTS[entry_point]
    lower = parse([*required, "--enc-type", "none"])
    upper = parse([*required, "--enc-type", "NONE"])
    assert lower.encoders == upper.encoders == []


@pytest.mark.parametrize(
    "parse, purpose",
    [
        (train.parse_args, "decodes the previews"),
        (generate.parse_args, "decodes the samples"),
        (prepare.parse_args, "encodes the images"),
    ],
)
def test_vae_help_is_the_shared_text(parse, purpose, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: the text is not wrapped
    with pytest.raises(SystemExit):
        parse(["--help"])
    assert cli.vae_help(purpose) in capsys.readouterr().out
    assert "pixels" in cli.VAE_CHOICES and "tiny-random" in cli.VAE_CHOICES


@pytest.mark.parametrize("bad", [["--cfg-scale", "nan"], ["--cfg-scale", "inf"]])
def test_generate_refuses_a_non_finite_cfg_scale(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.parse_args(["--ckpt", "c.pt", "--sample-dir", "s", *bad])
    assert exit_info.value.code == 2
    assert "--cfg-scale: must be a finite number" in capsys.readouterr().err


# --------------------------------------------------------------------------- the error surface


def exit_of(main, argv, monkeypatch, capsys):
    """(exit code, stderr) of cli.run_main(main) run as `prog.py ARGV`."""
    monkeypatch.setattr("sys.argv", ["prog.py", *argv])
    ctrl_c = signal.getsignal(signal.SIGINT)  # run_main ends the process at a later Ctrl-C
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run_main(main)
    finally:
        signal.signal(signal.SIGINT, ctrl_c)
    return exit_info.value.code, capsys.readouterr().err


def fail(error):
    def main():
        raise error

    return main


def test_an_expected_failure_is_one_line_and_exit_code_1(monkeypatch, capsys):
    for error in [ReportedError("data/x is corrupt: re-run prepare.py"), InputError("bad"),
                  FileNotFoundError(2, "No such file or directory", "ckpt.pt")]:  # fmt: skip
        code, err = exit_of(fail(error), [], monkeypatch, capsys)
        assert code == EXIT_ERROR == 1
        assert err == f"prog.py: error: {error}\n" and "Traceback" not in err


def test_debug_shows_the_traceback_of_an_expected_failure(monkeypatch, capsys):
    code, err = exit_of(fail(ReportedError("bad input")), ["--debug"], monkeypatch, capsys)
    assert code == 1 and "Traceback" in err and err.endswith("prog.py: error: bad input\n")


def test_stopped_runs_interrupts_and_return_codes(monkeypatch, capsys):
    code, err = exit_of(fail(RunStopped("re-run to continue")), [], monkeypatch, capsys)
    assert code == EXIT_STOPPED == 75 and err == "prog.py: stopped: re-run to continue\n"
    code, err = exit_of(fail(KeyboardInterrupt()), [], monkeypatch, capsys)
    assert code == EXIT_INTERRUPTED == 130 and err == "prog.py: interrupted\n"
    assert exit_of(lambda: EXIT_STOPPED, [], monkeypatch, capsys)[0] == 75
    assert exit_of(lambda: {"a": "record"}, [], monkeypatch, capsys)[0] == 0


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog.py"])
    with pytest.raises(ZeroDivisionError):
        cli.run_main(lambda: 1 / 0)


@pytest.mark.parametrize(
    "parse, required",
    [
        (train.parse_args, ["--data-dir", "d", "--exp-name", "x"]),
        (generate.parse_args, ["--ckpt", "c.pt", "--sample-dir", "s"]),
        (prepare.parse_args, ["--source", "s", "--dest", "d"]),
        (quickstart.parse_args, []),
    ],
)
def test_every_entry_point_takes_debug(parse, required):
    assert parse([*required, "--debug"]).debug


@pytest.mark.parametrize(
    "parse", [train.parse_args, generate.parse_args, prepare.parse_args, quickstart.parse_args]
)
def test_help_never_says_default_none_or_a_default_twice(parse, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit):
        parse(["--help"])
    for line in capsys.readouterr().out.splitlines():
        assert "(default: None)" not in line and line.count("default") <= 1, line


class _Captured(Exception):
    """Raised by the parse_args spy: the parser is built, nothing is parsed."""


def parser_of(parse, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser an entry point's parse function builds."""

    def spy(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    with pytest.raises(_Captured) as caught:
        parse([])
    return caught.value.args[0]


def entry_point_parsers():
    import curves
    import sample
    from analysis.__main__ import parse_args as analysis_args

    return {
        "train.py": train.parse_args,
        "generate.py": generate.parse_args,
        "quickstart.py": quickstart.parse_args,
        "curves.py": curves.parse_args,
        "preprocessing/prepare.py": prepare.parse_args,
        "python -m analysis": analysis_args,
        "sample.py": sample.parse_args,
    }


@pytest.mark.parametrize("program", list(entry_point_parsers()))
def test_every_flag_with_a_default_shows_it_in_the_help(program, monkeypatch):
    """A flag whose default is a value (0 included: it equals False) says it in --help, either
    in its own words or as argparse's "(default: X)"."""
    parser = parser_of(entry_point_parsers()[program], monkeypatch)
    formatter = parser._get_formatter()
    silent = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.required:
            continue
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            continue  # a switch that is off, or a flag whose absence its help explains
        text = formatter._expand_help(action) if action.help else ""
        if "default" not in text:
            silent.append(f"{action.option_strings[0]} (default {action.default!r}): {text!r}")
    assert not silent, f"{program}: " + "; ".join(silent)

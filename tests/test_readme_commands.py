"""Every command the README and docs/*.md show, and every command the table scripts run,
parses with the real argument parsers: a renamed or removed flag fails here, not on a user's GPU
cluster."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

import curves
import generate
import quickstart
import sample
import share
import train
from analysis.__main__ import parse_args as analysis_args
from bench import compile_speed, data_speed, op_count, sample_speed, train_speed
from evaluations import clip_score, evaluator, make_reference
from preprocessing import prepare
from urepa.encoders import encoder_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
PARSERS: dict[str, Callable[[list[str]], Any]] = {
    "train.py": train.parse_args,
    "generate.py": generate.parse_args,
    "preprocessing/prepare.py": prepare.parse_args,
    "evaluations/evaluator.py": evaluator.parse_args,
    "evaluations/make_reference.py": make_reference.parse_args,
    "evaluations/clip_score.py": clip_score.parse_args,
    "quickstart.py": quickstart.parse_args,
    "sample.py": sample.parse_args,
    "curves.py": curves.parse_args,
    "share.py": share.parse_args,
    "bench.compile_speed": compile_speed.parse_args,
    "bench.op_count": op_count.parse_args,
    "bench.train_speed": train_speed.parse_args,
    "bench.sample_speed": sample_speed.parse_args,
    "bench.data_speed": data_speed.parse_args,
    "analysis": analysis_args,
}
TABLE2_ROWS = ("prepare", "vanilla", "mae-l", "dino-b", "mocov3-l", "jepa-h", "clip-l", "siglip-l",
               "dinov2-s", "dinov2-b", "dinov2-l", "dinov2-g", "depth12")  # fmt: skip
# The arguments of each table script that the README and the paper use.
SCRIPTS = {
    "scripts/prepare.sh": [[]],
    "scripts/table2.sh": [[r] for r in TABLE2_ROWS],
    "scripts/table3.sh": [
        [m] for m in ("sitdown-b", "sitdown-l", "sitdown-xl", "sit-b", "sit-l", "sit-xl")
    ],  # fmt: skip
    "scripts/table4.sh": [["200"], ["400"]],
    "scripts/table5.sh": [[str(k)] for k in (4, 8, 12, 16, 18, 20, 24, 28, 32)],
    "scripts/table6.sh": [["upsample"], ["pool"]],
    "scripts/table7.sh": [["after"], ["before"], ["within"]],
    "scripts/table8.sh": [["0"], ["2"], ["3"], ["4"]],
    "scripts/table9.sh": [["ordinary"], ["time-aware"]],
    "scripts/table10.sh": [["constant"], ["rise"], ["fall"], ["dip"]],
    "scripts/imagenet512.sh": [["prepare"], ["80"], ["100"], ["200"]],
    "scripts/table12.sh": [["prepare"], ["mmdit"], ["mmdit-repa"]],
}
# Variables the docs leave to the reader's environment.
SHELL_VALUES = {"NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"}
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*", flags=re.S)


def substitute(token: str, variables: dict[str, str]) -> str:
    """$NAME or ${NAME} in a word replaced by its value, where one is known."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), token)


def doc_commands(path: str) -> list[str]:
    """The commands of a Markdown file's bash blocks: continuation lines joined, comments dropped,
    and $NAME replaced by what an earlier line of the block assigned (or SHELL_VALUES)."""
    with open(os.path.join(REPO, path)) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    commands = []
    for block in blocks:
        variables = dict(SHELL_VALUES)
        for line in block.replace("\\\n", " ").splitlines():
            tokens = [substitute(t, variables) for t in shlex.split(line, comments=True)]
            if not tokens:
                continue
            words = tokens[1:] if tokens[0] == "export" else tokens
            if all(ASSIGNMENT.fullmatch(w) for w in words):  # NAME=value ...: remember them
                variables |= dict(w.split("=", 1) for w in words)
            commands.append(shlex.join(tokens))
    return commands


def readme_commands() -> list[str]:
    """The commands of the README and of every page in docs/."""
    return [command for path in DOCS for command in doc_commands(path)]


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """(leading NAME=value assignments, the command's words)."""
    tokens = shlex.split(command, comments=True)
    env = {}
    while tokens and ASSIGNMENT.fullmatch(tokens[0]):
        name, value = tokens.pop(0).split("=", 1)
        env[name] = value
    return env, tokens


def script_and_args(command: str) -> tuple[str, list[str]] | None:
    """(script, its arguments) of a command that runs one of PARSERS' scripts, else None."""
    tokens = split(command)[1]
    for i, token in enumerate(tokens):
        if token in PARSERS:
            return token, tokens[i + 1 :]
    return None


def dry_run(script: str, args: list[str], **variables: str) -> list[str]:
    env = {**os.environ, **variables, "DRY_RUN": "1"}
    result = subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def check(command: str) -> None:
    found = script_and_args(command)
    if found is not None:
        script, args = found
        PARSERS[script](args)  # argparse exits (SystemExit) on an unknown or invalid flag


def test_docs_are_found():
    assert "README.md" in DOCS and "docs/training.md" in DOCS, DOCS


@pytest.mark.parametrize("path", DOCS)
def test_doc_commands_parse(path):
    for command in doc_commands(path):
        check(command)


def test_readme_and_docs_show_many_commands():
    # Finding few would mean a parse bug in doc_commands, not a short page.
    assert len([c for c in doc_commands("README.md") if script_and_args(c)]) >= 4
    assert len([c for c in readme_commands() if script_and_args(c)]) >= 30


def test_readme_runs_only_known_programs():
    """Each command is a parsed script, a table script, a variable assignment, or one of a few
    known tools."""
    known = ("pip ", "python -m pytest", "python -m models.summary", "bash scripts/",
             "python scripts/gpu_hours.py", "bash bench/run_gpu.sh", "ruff", "mypy",
             "curl ", "git clone ", "git -C ",
             "python compare_with_repa.py")  # docs/differences-from-repa.md's script  # fmt: skip
    for command in readme_commands():
        words = [w for w in split(command)[1] if w != "export"]
        if not words or all(ASSIGNMENT.fullmatch(w) for w in words):
            continue
        assert script_and_args(command) or " ".join(words).startswith(known), command


def test_readme_table_scripts_exist_with_their_arguments():
    for command in readme_commands():
        env, tokens = split(command)
        if tokens[:1] == ["bash"] and tokens[1].startswith("scripts/"):
            assert tokens[1] in SCRIPTS, tokens[1]
            for line in dry_run(tokens[1], tokens[2:], **env):
                check(line)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_table_scripts_print_commands_that_parse(script):
    for args in SCRIPTS[script]:
        lines = dry_run(script, args)
        checked = [line for line in lines if script_and_args(line)]
        assert checked, lines
        for line in checked:
            check(line)


def test_table2_passes_a_weight_file_for_encoders_timm_has_no_weights_of():
    """Training and the analysis build the encoder: one without library weights (MoCo v3) needs
    --enc-weights in both, or the row stops at its first command."""
    for row in TABLE2_ROWS:
        for line in dry_run("scripts/table2.sh", [row]):
            found = script_and_args(line)
            if found is None or "--enc-type" not in found[1]:
                continue
            args = found[1]
            names = args[args.index("--enc-type") + 1].split(",")
            if any(n != "none" and not encoder_spec(n).library for n in names):
                assert "--enc-weights" in args, line


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_table_scripts_refuse_bad_arguments_with_their_usage(script):
    result = subprocess.run(["bash", script, "nonsense", "extra"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("usage: bash " + script)


@pytest.mark.parametrize("block", ["0", "37", "99"])
def test_table5_refuses_a_block_outside_its_usage(block):
    result = subprocess.run(["bash", "scripts/table5.sh", block], cwd=REPO, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "any block 1-36" in result.stderr


# Flags whose value is a folder (or, for sample.py, a file) that a command writes its outputs to.
OUTPUT_FLAGS = {"--output-dir", "--sample-dir", "--dest"}
OUTPUT_FLAGS_OF = {"quickstart.py": {"--out"}, "sample.py": {"--out"}}


def test_the_output_folders_the_docs_suggest_are_git_ignored():
    """Following the docs never leaves run outputs for `git status` to list."""
    outputs = set()
    for command in readme_commands():
        found = script_and_args(command)
        if found is None:
            continue
        script, args = found
        flags = OUTPUT_FLAGS | OUTPUT_FLAGS_OF.get(script, set())
        folder = "" if script == "sample.py" else "/a-file"  # a folder pattern needs a path in it
        outputs |= {args[i + 1] + folder for i, word in enumerate(args[:-1]) if word in flags}
    assert {"quickstart-fast/a-file", "samples/small-cpu.png"} <= outputs  # the parse found them
    result = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outputs)], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert set(result.stdout.split()) == outputs

"""The README and docs/ stay true to the tree: links, file paths, test names, flags and Python
snippets exist, and the tracked text speaks of the project only."""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import re
import subprocess

import pytest
from test_readme_commands import DOCS, PARSERS, REPO

PAGES = [*DOCS, "CONTRIBUTING.md"]
TEXT_SUFFIXES = (".md", ".py", ".sh", ".txt", ".toml", ".cfg", ".yaml", ".yml", ".json", ".ini")
# Words that belong to how the work was organised, not to the project. Written so that this file
# does not match itself.
FOREIGN = re.compile(r"\bissue\s+#?\d|KINDS\.md|\bwork[p]laces?\b")
# Flags of other programs that the pages mention (accelerate, torchrun, ruff; REPA's --legacy).
OTHER_FLAGS = {"--multi_gpu", "--num_processes", "--num_machines", "--machine_rank",
               "--main_process_ip", "--main_process_port", "--nproc_per_node", "--standalone",
               "--check", "--legacy"}  # fmt: skip
# Files that the pages name but that a run, or the reader, creates.
NOT_IN_THE_TREE = {"compare_with_repa.py"}


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def tracked_text_files() -> list[str]:
    """`git ls-files`' text files; outside a git checkout, the sources and docs on disk (run
    outputs such as exps/ or quickstart-out/ hold paths of the machine they ran on)."""
    result = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if result.returncode == 0:
        return [p for p in result.stdout.splitlines() if p.endswith(TEXT_SUFFIXES)]
    outputs = {"exps", "data", "samples", "results", "wandb", "quickstart-out", "quickstart-fast",
               "analysis-out"}  # fmt: skip
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in outputs and (d == ".ci" or not d.startswith("."))]
        files += [os.path.join(root, n) for n in names if n.endswith((".md", ".py", ".sh"))]
    return [os.path.relpath(f, REPO) for f in files]


def prose(path: str) -> str:
    """A page without its fenced blocks (commands, code and printed output)."""
    return re.sub(r"```.*?```", "", read(path), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", prose(path), flags=re.M)}


def test_tracked_text_speaks_of_the_project_only():
    found = []
    for path in tracked_text_files():
        for number, line in enumerate(read(path).splitlines(), 1):
            if FOREIGN.search(line):
                found.append(f"{path}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", PAGES)
def test_relative_links_and_anchors_exist(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(os.path.join(REPO, file)), f"{path}: {target}"
        if anchor:
            assert anchor in anchors(file), f"{path}: {target}"


@pytest.mark.parametrize("path", PAGES)
def test_named_files_exist(path):
    """Every `folder/path` in backticks under one of the tree's own folders, and every top-level
    `module.py` or `script.sh`, names something in the tree (run outputs such as `exps/` are
    under folders the tree does not have)."""
    top = set(os.listdir(REPO))
    for name in re.findall(r"`([\w./-]+)(?:::\w+)?`", read(path)):
        first, slash, _ = name.partition("/")
        ours = first in top if slash else name.endswith((".py", ".sh"))
        if ours and name not in NOT_IN_THE_TREE:
            assert os.path.exists(os.path.join(REPO, name)), f"{path}: `{name}`"


def functions_of(path: str) -> set[str]:
    tree = ast.parse(read(path))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("path", PAGES)
def test_named_tests_exist(path):
    for file, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", read(path)):
        assert os.path.exists(os.path.join(REPO, file)), f"{path}: {file}"
        assert name in functions_of(file), f"{path}: {file}::{name}"


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    """Every option string of the entry points' parsers (train.py's through the benches too)."""
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_known_args

    def record(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_known_args = record  # type: ignore[method-assign]
    try:
        for parse in PARSERS.values():
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
                contextlib.suppress(SystemExit),
            ):
                parse(["--help"])
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]
    return {flag for parser in with_subcommands(parsers) for flag in parser._option_string_actions}


def with_subcommands(parsers: list[argparse.ArgumentParser]) -> list[argparse.ArgumentParser]:
    """The parsers and those of their subcommands (`python share.py push ...`)."""
    found = list(parsers)
    for parser in found:  # grows as subcommands are found
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [sub for sub in action.choices.values() if sub not in found]
    return found


@pytest.mark.parametrize("path", PAGES)
def test_named_flags_exist(path, known_flags):
    assert "--data-dir" in known_flags and "--preset" in known_flags  # the parsers were found
    for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", read(path)):
        assert flag in known_flags | OTHER_FLAGS, f"{path}: {flag}"


@pytest.mark.parametrize("path", DOCS)
def test_python_snippets_compile(path):
    for number, block in enumerate(re.findall(r"```python\n(.*?)```", read(path), flags=re.S)):
        compile(block, f"{path}, Python block {number + 1}", "exec")


def test_readme_test_command_is_the_one_ci_runs():
    command = "python -m pytest -q"
    readme_blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), flags=re.S)
    assert any(block.strip() == command for block in readme_blocks)
    assert command in read(".ci/run").splitlines()


def test_license_is_mit():
    text = read("LICENSE")
    assert text.startswith("MIT License") and "Copyright (c)" in text

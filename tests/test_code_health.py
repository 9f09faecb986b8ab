"""The layout's rules, checked on the source: short functions, components that never import an
entry point, a standalone `evaluations/`, and projector options that are one config."""

from __future__ import annotations

import ast
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 60
# Entry points: run from the command line, import components, imported by nothing but tests,
# other entry points and bench/.
SCRIPTS = {"train", "generate", "quickstart", "preprocessing.prepare", "curves"}
# Components: what the entry points are built from.
COMPONENTS = [
    "urepa", "models", "loss.py", "samplers.py", "dataset.py", "preprocessing/sources.py",
]  # fmt: skip


def python_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return [path for path in listed if os.path.exists(os.path.join(REPO, path))]


def parse(path: str) -> ast.Module:
    with open(os.path.join(REPO, path)) as f:
        return ast.parse(f.read(), filename=path)


def is_argument_table(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function whose body only adds arguments (and argument groups) to a parser."""

    def adds_arguments(node: ast.AST) -> bool:
        call = node.value if isinstance(node, ast.Expr | ast.Assign) else None
        return (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr
            in ("add_argument", "add_argument_group", "add_mutually_exclusive_group")
        )

    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return bool(body) and all(adds_arguments(node) for node in body)


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_function_runs_past_a_screen():
    long = []
    for path in python_files():
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and not is_argument_table(node):
                    long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions longer than 60 lines:\n" + "\n".join(long)


def component_files() -> list[str]:
    files = []
    for entry in COMPONENTS:
        if entry.endswith(".py"):
            files.append(entry)
        else:
            files += [p for p in python_files() if p.startswith(entry + "/")]
    return files


@pytest.mark.parametrize("path", component_files())
def test_components_never_import_an_entry_point(path):
    assert not imported_modules(parse(path)) & SCRIPTS


def test_evaluations_stand_alone():
    """evaluations/ reads .npz files and needs nothing else of the repository."""
    top_level = {p.split("/")[0].removesuffix(".py") for p in python_files()} - {"evaluations"}
    for path in (p for p in python_files() if p.startswith("evaluations/")):
        found = {m.split(".")[0] for m in imported_modules(parse(path))}
        assert not found & top_level, f"{path} imports {found & top_level}"


def test_every_projector_option_is_a_flag_of_its_name():
    """A new projector option is a ProjectorConfig field, its use, and its flag: train.py
    hands every field that is a flag to the model by name."""
    from types import SimpleNamespace

    import torch

    import train
    from models import PROJECTOR_FIELDS

    tiny = '{"hidden_size": 16, "depths": [1, 1, 1], "num_heads": 2, "projector_dim": 16}'
    args = train.parse_args([
        "--data-dir", "d", "--exp-name", "x", "--model", "SiTDown", "--model-config", tiny,
        "--enc-type", "dinov2-vit-b", "--resolution", "64",
        "--projector-upsample", "within", "--projector-kernel", "nearest",
        "--align-resolution", "pool", "--time-aware-projector",
    ])  # fmt: skip
    assert set(train.PROJECTOR_FLAGS) == set(PROJECTOR_FIELDS) - {"projector_dim"}
    manifest = {"modalities": {"moments": {"shape": [8, 8, 8]}}}  # SD-VAE latents, 64 px
    model = train.create_model(
        args, SimpleNamespace(num_classes=4, manifest=manifest), {"moments": torch.empty(8, 8, 8)}
    )
    for name in PROJECTOR_FIELDS:
        assert model.model_kwargs[name] == getattr(args, name, 16), name


def test_the_tool_configuration_lists_no_modules_by_hand():
    """mypy checks every tracked module outside tests/ and ruff finds our modules itself: a new
    module needs no entry in pyproject.toml (hand-kept lists drift)."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)
    assert "known-first-party" not in config["tool"]["ruff"]["lint"].get("isort", {})
    mypy = config["tool"]["mypy"]
    excluded = [re.compile(pattern) for pattern in mypy["exclude"]]
    checked = {p for p in python_files() if not any(e.search(p) for e in excluded)}
    outside_tests = {p for p in python_files() if not p.startswith("tests/")}
    assert mypy["files"] == ["."] and checked == outside_tests

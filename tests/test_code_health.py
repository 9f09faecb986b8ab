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
SCRIPTS = {"train", "generate", "sample", "share", "quickstart", "curves", "preprocessing.prepare"}
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
    from urepa.model_setup import PROJECTOR_FLAGS, create_model
    from urepa.settings import ModelSettings

    tiny = '{"hidden_size": 16, "depths": [1, 1, 1], "num_heads": 2, "projector_dim": 16}'
    args = train.parse_args([
        "--data-dir", "d", "--exp-name", "x", "--model", "SiTDown", "--model-config", tiny,
        "--enc-type", "dinov2-vit-b", "--resolution", "64",
        "--projector-upsample", "within", "--projector-kernel", "nearest",
        "--align-resolution", "pool", "--time-aware-projector",
    ])  # fmt: skip
    assert set(PROJECTOR_FLAGS) == set(PROJECTOR_FIELDS) - {"projector_dim"}
    manifest = {"modalities": {"moments": {"shape": [8, 8, 8]}}}  # SD-VAE latents, 64 px
    args.encoders = ["dinov2-vit-b"]  # as train.py's checks set it
    data = SimpleNamespace(num_classes=4, manifest=manifest)
    settings = ModelSettings.from_flags(vars(args))
    model = create_model(settings, data, {"moments": torch.empty(8, 8, 8)})
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


#################################################################################
#                                The import graph                               #
#################################################################################

# Where our modules live: the root's, and these packages'.
PACKAGES = ("urepa", "models", "preprocessing", "analysis", "bench", "evaluations")


def module_name(path: str) -> str:
    """urepa/trainer.py -> urepa.trainer; models/__init__.py -> models."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def our_modules() -> dict[str, str]:
    """{module name: path} of every module of the repository but the tests and scripts."""
    return {
        module_name(path): path
        for path in python_files()
        if "/" not in path or path.split("/")[0] in PACKAGES
    }


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
    """The modules of ours that `path` imports anywhere: at the top, under TYPE_CHECKING, in a
    function. `from package import name` counts as `package.name` where that is a module."""
    found = set()
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {ours for name in found if (ours := owning_module(name, modules)) is not None}


def owning_module(name: str, modules: dict[str, str]) -> str | None:
    """The longest prefix of the dotted `name` that is one of our modules (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:end])) in modules:
            return prefix
    return None


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None: depth-first search, a module on the
    current path reached again closes a cycle."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    """No module imports itself through others: type-only and function-level imports count."""
    graph = import_graph()
    assert {"train", "urepa.trainer", "urepa.periodic_eval", "models"} <= set(graph)
    assert "urepa.checkpoints" in graph["urepa.trainer"]  # the imports are read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_cli_helpers_parse_flags():
    """The library takes settings (urepa/settings.py), never a flag namespace: no module of
    urepa/ but the CLI helpers imports argparse. checkpoints.py reads REPA's checkpoints, which
    pickle their args as an argparse.Namespace: it names that class and nothing else."""
    for path in (p for p in python_files() if p.startswith("urepa/")):
        tree = parse(path)
        if path == "urepa/cli.py" or "argparse" not in imported_modules(tree):
            continue
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "argparse"}  # fmt: skip
        assert path == "urepa/checkpoints.py" and used == {"Namespace"}, f"{path} uses argparse"


# What bench/ may take from an entry point: its flags, which the benchmarks pass through to run
# what train.py (generate.py) would run with them; nothing else.
ENTRY_POINT_FLAGS = {"train": {"parse_args", "take_from_dataset"}, "generate": {"parse_args"}}


@pytest.mark.parametrize("package", ["urepa", "bench"])
def test_the_library_and_the_benchmarks_import_no_entry_point(package):
    entry_points = SCRIPTS
    for path in (p for p in python_files() if p.startswith(package + "/")):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Import):
                found = {alias.name for alias in node.names} & entry_points
                allowed = package == "bench" and found <= set(ENTRY_POINT_FLAGS)
                assert not found or allowed, f"{path} imports {found}"
            elif isinstance(node, ast.ImportFrom) and node.module in entry_points:
                names = {alias.name for alias in node.names}
                allowed = package == "bench" and names <= ENTRY_POINT_FLAGS.get(node.module, set())
                assert allowed, f"{path} imports {names} from {node.module}"
        if package == "bench":
            for module, names in ENTRY_POINT_FLAGS.items():
                used = {node.attr for node in ast.walk(parse(path))
                        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id == module}  # fmt: skip
                assert used <= names, f"{path} uses {module}.{used - names}"

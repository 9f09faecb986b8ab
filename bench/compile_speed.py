"""Compilation and step times of one model's training step three ways: eager, each block
compiled (`speed.compile_model`'s default, regional compilation) and the whole model compiled.

    python -m bench.compile_speed --model SiTDown --batch-size 8
"""

from __future__ import annotations

import argparse

import torch

from cli import (
    DefaultsHelpFormatter,
    add_debug_arg,
    json_object,
    model_name,
    positive_int,
    run_main,
)
from models import build_model
from speed import COMPILE_SCOPES, time_training_compile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Compilation and step times of a model: eager, regional, whole-model."""
    parser = argparse.ArgumentParser(description=parse_args.__doc__,
                                     formatter_class=DefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--model", type=model_name, default="SiTDown",
                        help="registry or class name")  # fmt: skip
    parser.add_argument("--model-config", type=json_object, default={},
                        help="JSON object of constructor arguments")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps after the first")
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build_model(args.model, **{"num_classes": 10, "z_dims": [768], **args.model_config})
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    for scope in ("eager", *COMPILE_SCOPES):
        print(time_training_compile(model, scope, args.batch_size, args.steps), flush=True)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

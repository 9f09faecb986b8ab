"""Compilation and step times of one model's training step three ways: eager, each block
compiled (`speed.compile_model`'s default, regional compilation) and the whole model compiled.

    python -m bench.compile_speed --model SiTDown --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from models import build_model
from models.base import AlignedDiffusionTransformer
from urepa.cli import (
    DefaultsHelpFormatter,
    add_debug_arg,
    json_object,
    model_name,
    positive_int,
    run_main,
)
from urepa.speed import COMPILE_SCOPES, compile_model, report_compile_times


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


def time_training_compile(
    model: AlignedDiffusionTransformer, scope: str, batch_size: int, steps: int
) -> str:
    """Compile a copy of `model` with `scope` ("eager": none), run `steps` + 1 training steps
    (forward, backward) on random inputs, on the model's device (under bf16 autocast on a GPU):
    compilation and step times."""
    torch._dynamo.reset()
    run = model if scope == "eager" else compile_model(copy.deepcopy(model), scope)
    timer = report_compile_times(lambda _line: None)
    device = next(model.parameters()).device
    seconds = []
    for _ in range(steps + 1):
        x = torch.randn((batch_size, *model.latent_shape), device=device)
        t, y = torch.rand(batch_size, device=device), torch.randint(0, 10, (batch_size,))
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v, zs = run(x, t, y.to(device))
        (v.float().square().mean() + sum(z.float().mean() for z in zs)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    step_s = sorted(seconds[1:])[len(seconds[1:]) // 2]
    return (
        f"{scope:6s}: first step {seconds[0]:.1f} s ({timer.count} compilations, "
        f"{timer.total:.1f} s), then {1000 * step_s:.0f} ms/step (median of {steps})"
    )


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build_model(args.model, **{"num_classes": 10, "z_dims": [768], **args.model_config})
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    for scope in ("eager", *COMPILE_SCOPES):
        print(time_training_compile(model, scope, args.batch_size, args.steps), flush=True)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

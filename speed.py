"""How fast a model runs, never what it computes: torch.compile for training and sampling, the
weights cast to bf16 once for bf16 sampling, and CUDA graphs for the sampler's static shapes.

* Compilation (`compile_model`). By default each transformer block is compiled on its own
  ("regional" compilation, `scope="blocks"`): the blocks of a model are instances of one class
  with the same shapes, so they share one compiled graph, and compiling a model costs about what
  one block costs, whatever its depth (SiT↓ has three, one per stage). `scope="model"` compiles
  the whole forward as one graph instead: more fusion across block boundaries, a compilation time
  that grows with the depth. The graphs are static (`dynamic=False`): a new batch shape compiles
  a new graph (sampling's guided and unguided phases have two) and a repeated one compiles
  nothing. `tests/test_compile.py` checks that the models and the loss trace without a graph
  break and that repeated calls do not recompile.
* Compilation time is printed by `report_compile_times` as each graph is compiled (compilation
  is lazy: it happens in the first steps or batches).
* Sampling (`prepare_model_for_sampling`). For bf16 sampling the weights of the matmuls and
  convolutions, the layers autocast would cast on every call, are cast to bf16 once; everything
  else (label table, position table, the residual stream) stays as it was, and autocast still
  runs around the model, so the arithmetic is that of autocast without the per-call casts of the
  weights. CUDA graphs are torch.compile's "reduce-overhead" mode on the whole model: one graph
  recorded per batch shape (the guided and the unguided phase), the whole forward replayed at
  every step. Whole-model, not per block: CUDA-graph trees start a new generation at every call
  of a compiled function, which may overwrite the outputs of the previous one, and SiT↓ keeps
  its stage-1 outputs (skips) and the tapped tokens across many block calls.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from loss import SILoss
from run_log import LOGGER_NAME

COMPILE_SCOPES = ("blocks", "model")


def resolve_compile(flag: bool | None) -> bool:
    """--compile / --no-compile, or neither (None): compiled where CUDA is available."""
    return torch.cuda.is_available() if flag is None else flag


def compile_model(
    model: nn.Module, scope: str = "blocks", mode: str | None = None, backend: str = "inductor"
) -> nn.Module:
    """`model`, compiled. scope "blocks": each module of `model.blocks` compiled in place, the
    model itself returned (its state dict keeps its keys); "model": `torch.compile(model)`, a
    wrapper around it. `mode` and `backend` are torch.compile's (mode None: its default;
    "reduce-overhead": CUDA graphs). Copy a model before compiling it, not after: a deep copy of a
    compiled block runs eagerly (`nn.Module.__getstate__` drops the compiled forward)."""
    options: dict[str, Any] = {"dynamic": False, "mode": mode, "backend": backend}
    if scope == "model":
        return torch.compile(model, **options)  # type: ignore[return-value]
    if scope != "blocks":
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `blocks` to compile one by one")
    for block in blocks:
        block.compile(**options)
    return model


def compile_for_training(
    model: nn.Module, loss_fn: SILoss, args: argparse.Namespace
) -> tuple[nn.Module, SILoss]:
    """With --compile: the model's blocks compiled and the loss's element-wise part too, each
    compilation's time in the log; without: both as they are."""
    if not args.compile:
        return model, loss_fn
    report_compile_times(logging.getLogger(LOGGER_NAME).info)
    return compile_model(model), dataclasses.replace(loss_fn, compile=True)


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose linear and convolution layers hold `dtype` weights and biases:
    what autocast to `dtype` would cast on every call, cast once. The copy must still run under
    autocast, which casts the activations going into those layers."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            # new Parameters rather than `module.to(dtype)`, which cannot convert the fake
            # tensors that bench.op_count counts with
            for name, param in list(module.named_parameters(recurse=False)):
                cast = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                setattr(module, name, cast)
    return model


def prepare_model_for_sampling(
    model: nn.Module,
    precision: str,
    compile: bool,
    cuda_graphs: bool = False,
    bf16_weights: bool = True,
    scope: str = "blocks",
    backend: str = "inductor",
) -> nn.Module:
    """The model as the sampler calls it: with `precision` "bf16" and `bf16_weights`, a copy
    with bf16 matmul weights (`cast_matmul_weights`; call it under bf16 autocast); compiled
    with `compile` (a copy: `model` itself stays as it is): per `scope`, or with `cuda_graphs`
    as a whole in torch.compile's "reduce-overhead" mode (see the module's docstring)."""
    if precision == "bf16" and bf16_weights:
        model = cast_matmul_weights(model, torch.bfloat16)
    elif compile:
        model = copy.deepcopy(model)
    if not compile:
        return model
    if cuda_graphs:
        return compile_model(model, "model", "reduce-overhead", backend)
    return compile_model(model, scope, None, backend)


class CompileTimer:
    """Wall time of every torch.compile compilation (a new frame, a deferred backward graph, a
    CUDA-graph recording): `emit` is called with one line at the end of each."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit
        self.total = 0.0
        self.count = 0
        self.started: float | None = None

    def start(self, _args: object) -> None:
        self.started = time.perf_counter()

    def end(self, args: object) -> None:
        if self.started is None:
            return
        seconds, self.started = time.perf_counter() - self.started, None
        self.total += seconds
        self.count += 1
        trigger = getattr(getattr(args, "callback_trigger", None), "name", "compile").lower()
        self.emit(
            f"torch.compile: {trigger} {getattr(args, 'compile_id', '')} compiled in "
            f"{seconds:.1f} s ({self.count} so far, {self.total:.1f} s in all)"
        )


_TIMERS: list[CompileTimer] = []


def report_compile_times(emit: Callable[[str], None]) -> CompileTimer:
    """Call `emit` with a line after each compilation of this process (replacing the timer of an
    earlier call, so that a second run in the same process does not print twice)."""
    handler = torch._dynamo.callback_handler
    for old in _TIMERS:  # (torch._dynamo.reset() may have removed them already)
        if old.start in handler.start_callbacks:
            handler.remove_start_callback(old.start)
        if old.end in handler.end_callbacks:
            handler.remove_end_callback(old.end)
    _TIMERS.clear()
    timer = CompileTimer(emit)
    handler.register_start_callback(timer.start)
    handler.register_end_callback(timer.end)
    _TIMERS.append(timer)
    return timer

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

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.torch_version import TorchVersion

from loss import SILoss
from urepa.run_log import LOGGER_NAME
from urepa.utils import local_shard

COMPILE_SCOPES = ("blocks", "model")


# The first torch release whose inductor gives the eager gradients for these models and loss:
# torch 2.13's does not (docs/benchmarks.md, "Compiled = eager"); sampling runs no backward.
COMPILED_TRAINING_MIN_TORCH = "2.14"


def compiled_training_supported(version: str = torch.__version__) -> bool:
    return TorchVersion(version) >= COMPILED_TRAINING_MIN_TORCH


def resolve_compile(flag: bool | None, training: bool = False) -> bool:
    """--compile / --no-compile, or neither (None): compiled where CUDA is available. For
    training, --compile is refused on a torch whose compiled gradients are known to be wrong,
    and the default is off there."""
    if training and not compiled_training_supported():
        if flag:
            raise ValueError(
                f"--compile: torch {torch.__version__}'s inductor computes wrong gradients for "
                f"these models (see docs/benchmarks.md); install torch>="
                f"{COMPILED_TRAINING_MIN_TORCH} or train with --no-compile"
            )
        return False
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
    model: nn.Module, loss_fn: SILoss, compile: bool
) -> tuple[nn.Module, SILoss]:
    """With `compile` (--compile): the model's blocks compiled and the loss's element-wise part
    too, each compilation's time in the log; without: both as they are."""
    if not compile:
        return model, loss_fn
    report_compile_times(logging.getLogger(LOGGER_NAME).info)
    return compile_model(model), dataclasses.replace(loss_fn, compile=True)


#################################################################################
#                  Compiled = eager: the start-up gradient check                #
#################################################################################


@dataclasses.dataclass(frozen=True)
class GradientCheck:
    """The verdict of `check_compiled_gradients` for the parameter whose compiled gradient is
    farthest from the fp32 reference, relative to how far the eager gradient is."""

    parameter: str
    compiled_error: float  # |g_compiled - g_ref| / |g_ref|
    eager_error: float  # |g_eager - g_ref| / |g_ref|, the same parameter
    tolerance: float  # what the precision explains: 4 · eager_error + floor
    seconds: float
    passed: bool

    def line(self) -> str:
        verdict = "compiled = eager" if self.passed else "COMPILED GRADIENTS ARE WRONG"
        return (
            f"compile check: {verdict}; worst parameter {self.parameter}: compiled gradient "
            f"{self.compiled_error:.1e} from the fp32 eager reference, eager "
            f"{self.eager_error:.1e}, tolerance {self.tolerance:.1e} ({self.seconds:.1f} s)"
        )


# Relative gradient differences that reordered sums explain where eager is exact (fp32), and
# where both run in a low precision (bf16/fp16 autocast or TF32 matmuls).
CHECK_FLOOR = {"fp32": 1e-4, "low": 1e-3}
CHECK_FACTOR = 4.0  # the compiled gradient may be this many times farther than eager's


def check_compiled_gradients(
    model: nn.Module,
    loss_of: Callable[[], Tensor],
    autocast: Callable[[], AbstractContextManager[Any]],
    low_precision: bool,
) -> GradientCheck:
    """Does the compiled model (and loss) give the gradients the eager code gives? `loss_of()`
    runs the forward of one micro-batch (fixed draws) and returns the loss; `autocast()` is the
    training precision's context; `low_precision`: bf16/fp16 autocast or TF32 matmuls.

    Three backward passes of the same loss: the reference (eager, fp32, no TF32), eager in the
    training precision, compiled in the training precision (`torch.compiler.set_stance` runs the
    compiled regions eagerly, so it is the same model and the same weights). For each parameter,
    the compiled gradient must lie within `CHECK_FACTOR` times the eager gradient's distance
    from the reference, plus a floor for reordered sums. Zero-initialised weights (AdaLN-Zero's
    gates, the final layer) are filled with noise during the check and zeroed again after it:
    with them at zero, most gradients are exactly zero and the check would see nothing. The
    gradients are left cleared; nothing else changes. With several processes each runs the
    check; the differences are summed over them (shards add up, replicas scale alike)."""
    start = time.perf_counter()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with zero_weights_filled([p for _, p in named]):
        with torch.compiler.set_stance("force_eager"), exact_fp32():
            reference = gradients_of(loss_of, named, nullcontext)
        with torch.compiler.set_stance("force_eager"):
            eager_sq = squared_distances(gradients_of(loss_of, named, autocast), reference)
        compiled_sq = squared_distances(gradients_of(loss_of, named, autocast), reference)
    ref_sq = torch.stack([g.double().square().sum() for g in reference])
    sums = torch.stack([compiled_sq, eager_sq, ref_sq])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    compiled, eager, ref = sums.clamp_min(0).sqrt().cpu()
    scale = ref.clamp_min(torch.finfo(torch.float64).tiny)
    compiled, eager = compiled / scale, eager / scale
    tolerance = CHECK_FACTOR * eager + CHECK_FLOOR["low" if low_precision else "fp32"]
    worst = int((compiled / tolerance).argmax())
    return GradientCheck(
        parameter=named[worst][0],
        compiled_error=float(compiled[worst]),
        eager_error=float(eager[worst]),
        tolerance=float(tolerance[worst]),
        seconds=time.perf_counter() - start,
        passed=bool((compiled <= tolerance).all()),
    )


def gradients_of(
    loss_of: Callable[[], Tensor],
    named: list[tuple[str, nn.Parameter]],
    autocast: Callable[[], AbstractContextManager[Any]],
) -> list[Tensor]:
    """This process's gradient (its shard, when sharded) of every parameter, as fp32 copies;
    the parameters' `.grad` cleared again."""
    for _, p in named:
        p.grad = None
    with autocast():
        loss = loss_of()
    loss.backward()
    grads = []
    for _, p in named:
        if p.grad is None:  # a parameter the loss does not reach: its gradient is zero
            grads.append(torch.zeros_like(local_shard(p), dtype=torch.float32))
        else:
            grads.append(local_shard(p.grad).float())
        p.grad = None
    return grads


def squared_distances(grads: list[Tensor], reference: list[Tensor]) -> Tensor:
    """Σ (g - g_ref)² per parameter, in float64."""
    pairs = zip(grads, reference, strict=True)
    return torch.stack([(g.double() - r.double()).square().sum() for g, r in pairs])


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32, attention by a kernel that runs fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextmanager
def zero_weights_filled(params: list[nn.Parameter], std: float = 0.02) -> Iterator[None]:
    """Within the context, the parameters that are all zero hold N(0, std²) noise; after it,
    zeros again (exactly what they held)."""
    with torch.no_grad():
        filled = [local_shard(p) for p in params if not local_shard(p).any()]
        for i, tensor in enumerate(filled):
            generator = torch.Generator(tensor.device).manual_seed(i)
            tensor.normal_(0.0, std, generator=generator)
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor in filled:
                tensor.zero_()


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

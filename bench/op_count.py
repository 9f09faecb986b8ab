"""Operations, bytes and kernel launches of one training step and one sampler step, and the
step time they imply on an H100 SXM and an H200, a bound and an estimate (arithmetic from
counts, not a measurement; `bench.time_model` prices the kernels).

    python -m bench.op_count                       # SiT↓-XL/2 and SiT-XL/2: the markdown tables
    python -m bench.op_count --models SiTDown-XL/2 --batch-size 32 --sample-batch-size 64
    # any training flag applies to the training step, e.g. the REPA recipe for SiT-XL/2:
    python -m bench.op_count --models SiT-XL/2 --encoder-depth 8 --manifold-coeff 0

The step is train.py's own (`trainer.train_step`: U-REPA loss, backward, clipping, AdamW, EMA,
built by `trainer.create_trainer` from the flags), the sampler step is generate.py's
(`sampling.sample_batch`), both run on fake tensors (`FakeTensorMode`: shapes and dtypes, no
memory, no arithmetic) on the CPU, with a `TorchDispatchMode` recording every ATen operation.
Where the CPU would take another road than a GPU, the GPU's is taken: autocast runs CUDA's
float32 list (LayerNorm, softmax, pow, sum, ... in fp32), gradient clipping and the unfused
AdamW use their foreach kernels. Attention is the CPU's flash kernel (a GPU runs flash or
cuDNN: the same FLOPs, no score matrix in memory).

Counted per operation: FLOPs (matrix products, attention, convolutions: PyTorch's flop counter,
2 per multiply-add; every other operation: one per output element), bytes (operations other
than matrix products, attention and convolutions: every tensor read plus every tensor written,
each distinct view once; views, aliases and bare allocations free), kernel launches (one per
other operation; a multi-tensor `_foreach_*` / `_fused_*` operation launches as CUDA's
multi_tensor_apply does: a new launch per 320 chunks of 65,536 elements or per 110 / 64 / 48 /
36 / 30 tensors for 1 to 5 lists).

Kernels, per configuration (each priced twice, `bench.time_model`):
* eager: the operations as counted, one kernel each (bound and estimate alike).
* compiled: element-wise chains fused into regions. A region is a run of consecutive
  operations that are neither matrix products, attention, convolutions nor multi-tensor
  updates; it reads each tensor that comes from outside it once and writes only what is read
  after it (backward included) or outlives the step; one kernel. The bound fuses every maximal
  run, across block boundaries (an idealisation); the estimate fuses as the code compiles: only
  inside one compiled graph (each block's forward, its backward, the loss's objective; for
  sampling with CUDA graphs, the whole model), everything else one kernel per operation.
* update compiled (--compile-update): clipping, AdamW and the EMA as one fused region.
* sharded over 8 GPUs (--fsdp): the update moves 1/8 of its bytes; the estimate adds FSDP2's
  fp32 all-gather and reduce-scatter over NVLink and its copies in and out of their buffers.
MFU = images/s × 6 × forward MACs (Table 2's count, `models.summary`) ÷ peak, as `train_speed`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast
from unittest import mock

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from bench.time_model import (
    BOUND,
    ESTIMATE,
    GPUS,
    PARTS,
    Efficiency,
    Gpu,
    Kernel,
    Sharding,
    fsdp_copies,
    step_seconds,
)
from urepa.cli import positive_int, run_main

SHARDS = 8
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"}
# multi_tensor_apply (ATen's MultiTensorApply.cuh): chunk size, blocks and tensors per launch
CHUNK, CHUNKS_PER_LAUNCH, TENSORS_PER_LAUNCH = 65536, 320, (110, 64, 48, 36, 30)
# Ops that CUDA's autocast runs in float32 (the ones of its list that these models can reach)
CUDA_AUTOCAST_FP32 = {
    "layer_norm", "group_norm", "softmax", "log_softmax", "pow", "__pow__", "__rpow__", "exp",
    "log", "rsqrt", "reciprocal", "sum", "prod", "cumsum", "norm", "mse_loss",
    "cosine_similarity", "softplus", "expm1", "log1p", "acos", "asin", "cosh", "sinh", "tan",
    "__rtruediv__", "__rdiv__", "erfinv", "cdist", "dist", "renorm",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclass
class Op:
    """One ATen operation as run: what it computes, reads and writes."""

    name: str
    category: str  # matmul | attention | conv | update (multi-tensor) | other | return
    flops: int
    kernels: int
    reads: dict[int, int]  # storage -> bytes of its tensors read
    writes: dict[int, int]  # storage -> bytes written
    head_dim: int = 0  # attention: the size of a head
    graphs: dict[str, str] = field(default_factory=dict)  # scope -> compiled graph it runs in

    @property
    def bytes(self) -> int:
        return sum(self.reads.values()) + sum(self.writes.values())


def storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def tensor_bytes(tensors: list[Tensor]) -> dict[int, int]:
    """Bytes per storage: the sum over the distinct views of it (q, k and v of one projection
    are three reads; a tensor passed twice is one)."""
    views = {
        (storage_key(t), t.storage_offset(), tuple(t.shape), t.stride()): t.numel()
        * t.element_size()
        for t in tensors
    }
    out: dict[int, int] = {}
    for (key, *_), size in views.items():
        out[key] = out.get(key, 0) + size
    return out


def category(name: str) -> str:
    base = name.split(".")[0]
    if base in MATMUL_OPS:
        return "matmul"
    if "attention" in base:
        return "attention"
    if base.startswith(("convolution", "_convolution")):
        return "conv"
    if base.startswith(("_foreach_", "_fused_")):
        return "update"
    return "other"


def multi_tensor_launches(args: tuple[Any, ...]) -> int:
    """Kernel launches of a multi-tensor op: multi_tensor_apply's limits per launch."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor)]
    if not lists:
        return 1
    tensors = lists[0]
    chunks = sum(math.ceil(t.numel() / CHUNK) for t in tensors)
    per_launch = TENSORS_PER_LAUNCH[min(len(lists), len(TENSORS_PER_LAUNCH)) - 1]
    return max(math.ceil(len(tensors) / per_launch), math.ceil(chunks / CHUNKS_PER_LAUNCH), 1)


def op_flops(func: Any, cat: str, args: tuple, kwargs: dict, out: Any, outputs: list) -> int:
    name = func._overloadpacket.__name__
    if name == "_scaled_dot_product_flash_attention_for_cpu":  # (q, k, v, ...): as on a GPU
        return sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward":  # (dout, q, k, v, ...)
        return sdpa_backward_flop_count(*(a.shape for a in args[:4]))
    if cat in ("matmul", "attention", "conv"):
        counter = flop_registry.get(func._overloadpacket)
        return 0 if counter is None else int(counter(*args, **kwargs, out_val=out))
    return sum(t.numel() for t in outputs)


def mutated_tensors(func: Any, args: tuple, kwargs: dict) -> list[Tensor]:
    """The arguments an operation writes in place (`add_`'s self, `_foreach_lerp_`'s list).
    The fused AdamW writes its gradients only to unscale them (fp16's grad_scale)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        unscaled = arg.name == "grads" and kwargs.get("grad_scale") is None
        if arg.alias_info is not None and arg.alias_info.is_write and not unscaled:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            out += [t for t in tree_leaves(value) if isinstance(t, Tensor)]
    return out


class CompiledGraphs:
    """Which compiled graph each operation would run in, per scope of compilation ("blocks":
    what `--compile` compiles, each block and the loss's objective one by one; "model": the
    whole model, as CUDA graphs compile it for sampling). Every call of a compiled module or
    function is a graph of its own, and so is its backward pass: the autograd nodes its forward
    creates (a window of autograd's sequence numbers) run its backward operations."""

    def __init__(self) -> None:
        self.active: dict[str, tuple[str, int]] = {}  # scope -> (graph, first sequence number)
        self.windows: list[tuple[str, str, int, int]] = []  # (scope, graph, first, end)
        self.calls = 0

    def enter(self, scope: str) -> None:
        self.calls += 1
        self.active[scope] = (f"{scope} #{self.calls}", torch._C._autograd._get_sequence_nr())

    def exit(self, scope: str) -> None:
        graph, first = self.active.pop(scope)
        self.windows.append((scope, graph, first, torch._C._autograd._get_sequence_nr()))

    def current(self) -> dict[str, str]:
        """scope -> graph of the operation running now (forward, or backward of a graph's node)."""
        node = torch._C._current_autograd_node()
        if node is None:
            return {scope: graph for scope, (graph, _) in self.active.items()}
        seq = node._sequence_nr()
        return {scope: graph for scope, graph, first, end in self.windows if first <= seq < end}

    def track_modules(self, scope: str, modules: Iterable[nn.Module]) -> None:
        for module in modules:
            module.register_forward_pre_hook(lambda *_: self.enter(scope))
            module.register_forward_hook(lambda *_: self.exit(scope))

    def track_function(self, scope: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def tracked(*args: Any, **kwargs: Any) -> Any:
            self.enter(scope)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit(scope)

        return tracked


class OpCounter(TorchDispatchMode):
    """Records every ATen operation that reads or writes a tensor (views cost nothing)."""

    def __init__(self, graphs: CompiledGraphs | None = None) -> None:
        super().__init__()
        self.graphs = graphs
        self.ops: list[Op] = []
        # Holds the storages, so that no storage key is reused; never the tensors: an extra
        # reference would stop autograd from taking a gradient over without a copy.
        self.keep: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        name = str(func.name()).removeprefix("aten::")
        mutated = mutated_tensors(func, args, kwargs)
        if func.is_view or func.namespace == "prim" or name.split(".")[0] in ALLOCATIONS:
            return out  # no kernel, no traffic
        in_keys = {storage_key(t) for t in inputs}
        if not mutated and all(storage_key(t) in in_keys for t in outputs):
            return out  # an alias of an input made outside the view ops (`_unsafe_view`)
        cat = category(name)
        written = outputs + mutated
        kernels = multi_tensor_launches(args) if cat == "update" else 1
        flops = op_flops(func, cat, args, kwargs, out, outputs)
        head_dim = inputs[0].shape[-1] if cat == "attention" else 0
        graphs = self.graphs.current() if self.graphs is not None else {}
        self.ops.append(Op(name, cat, flops, kernels, tensor_bytes(inputs), tensor_bytes(written),
                           head_dim, graphs))  # fmt: skip
        self.keep += [t.untyped_storage() for t in inputs + outputs]
        return out


# --------------------------------------------------------------------------------------------
# Kernels: eager, fused as compiled, fused across the whole step
# --------------------------------------------------------------------------------------------

# How element-wise operations fuse: "eager" (none), "ideal" (every maximal run of them, across
# block boundaries: the bound), or a scope of CompiledGraphs ("blocks", "model": runs inside
# one compiled graph; operations outside every graph run eagerly)
FUSIONS = ("eager", "ideal", "blocks", "model")


def kernels(ops: list[Op], fusion: str = "eager") -> list[Kernel]:
    """The kernels that run `ops` under `fusion`. A fused region reads each tensor that comes
    from outside it once and writes only what is read after it or kept across steps."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    traffic = RegionTraffic(ops)
    out = []
    for start, end in regions(ops, fusion):
        first = ops[start]
        eager = fusion == "eager" or (fusion != "ideal" and fusion not in first.graphs)
        if first.category != "other" or (end - start == 1 and eager):
            out.append(op_kernel(first))
        else:
            flops = sum(op.flops for op in ops[start:end])
            out.append(Kernel("memory", flops, traffic.bytes(start, end)))
    return out


def op_kernel(op: Op) -> Kernel:
    """An operation as its own kernel(s)."""
    if op.category in ("other", "update"):
        return Kernel("memory", op.flops, op.bytes, op.kernels, update=op.category == "update")
    return Kernel(op.category, op.flops, op.bytes, op.kernels, head_dim=op.head_dim,
                  backward="backward" in op.name)  # fmt: skip


def regions(ops: list[Op], fusion: str) -> Iterator[tuple[int, int]]:
    """[start, end) of each kernel: a single operation, or a maximal run of fusable ('other')
    operations in one compiled graph of the scope `fusion` (any run, with "ideal")."""
    start = 0
    for i in range(1, len(ops) + 1):
        if i == len(ops) or not fusable(ops[i - 1], ops[i], fusion):
            if ops[start].category != "return":
                yield start, i
            start = i


def fusable(before: Op, after: Op, fusion: str) -> bool:
    if fusion == "eager" or before.category != "other" or after.category != "other":
        return False
    if fusion == "ideal":
        return True
    graph = before.graphs.get(fusion)
    return graph is not None and graph == after.graphs.get(fusion)


class RegionTraffic:
    """Bytes of a fused region of a step's operations: what it reads from outside, once, and
    what it writes that is read after it or outlives the step."""

    def __init__(self, ops: list[Op]):
        self.ops = ops
        produced = {key for op in ops for key in op.writes if key not in op.reads}
        self.persistent = {key for op in ops for key in op.reads} - produced
        self.last_read: dict[int, int] = {}
        for i, op in enumerate(ops):
            for key in op.reads:
                self.last_read[key] = i

    def bytes(self, start: int, end: int) -> int:
        inside: set[int] = set()
        reads: dict[int, int] = {}
        writes: dict[int, int] = {}
        for op in self.ops[start:end]:
            for key, size in op.reads.items():
                if key not in inside:
                    reads[key] = max(reads.get(key, 0), size)
            for key, size in op.writes.items():
                inside.add(key)
                if key in self.persistent or self.last_read.get(key, -1) >= end:
                    writes[key] = max(writes.get(key, 0), size)
        return sum(reads.values()) + sum(writes.values())


@dataclass
class Totals:
    """FLOPs by category, bytes of the memory-bound kernels, kernel launches."""

    flops: dict[str, int] = field(default_factory=dict)
    bytes: int = 0  # memory traffic of the memory-bound kernels
    update_bytes: int = 0  # the part of `bytes` spent by clipping, AdamW and the EMA
    kernels: int = 0


def totals(ks: list[Kernel], per: float = 1.0) -> Totals:
    """The sums over `ks`, divided by `per` (repeats of the step)."""
    t = Totals()
    for k in ks:
        cat = "other" if k.category == "memory" else k.category
        t.flops[cat] = t.flops.get(cat, 0) + k.flops
        t.kernels += k.launches
        if k.category == "memory":
            t.bytes += k.bytes
            t.update_bytes += k.bytes if k.update else 0
    return Totals({c: round(f / per) for c, f in t.flops.items()}, round(t.bytes / per),
                  round(t.update_bytes / per), round(t.kernels / per))  # fmt: skip


def eager_totals(ops: list[Op]) -> Totals:
    return totals(kernels(ops, "eager"))


def compiled_totals(ops: list[Op], fusion: str = "ideal") -> Totals:
    return totals(kernels(ops, fusion))


# --------------------------------------------------------------------------------------------
# Running the steps on fake tensors, as a GPU would run them
# --------------------------------------------------------------------------------------------


class CudaAutocastFp32(TorchFunctionMode):
    """CUDA autocast's float32 list on the CPU: under autocast, these functions get their
    half-precision inputs cast to float32 (CPU autocast leaves them in bf16)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CUDA_AUTOCAST_FP32 and torch.is_autocast_enabled("cpu"):
            args, kwargs = torch.utils._pytree.tree_map_only(
                Tensor, _to_fp32, (args, kwargs)
            )  # fmt: skip
        return func(*args, **kwargs)


def _to_fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


@contextmanager
def gpu_roads() -> Iterator[None]:
    """The GPU's roads on the CPU: CUDA's autocast float32 list, foreach clipping and AdamW,
    and modules left where they are (`.to(cpu)` of fake parameters would try to swap them)."""
    with (
        mock.patch("torch.nn.utils.clip_grad._has_foreach_support", lambda *a: True),
        mock.patch(
            "torch.optim.adam._default_to_fused_or_foreach", lambda *a, **k: (False, True)
        ),  # fmt: skip
        mock.patch("torch.nn.Module.to", lambda self, *a, **k: self),
        CudaAutocastFp32(),
    ):
        yield


@contextmanager
def fake_mode() -> Iterator[FakeTensorMode]:
    """Tensors made inside it are fake; real CPU tensors mixed with them act as constants.
    (Deep copies of fake modules, the EMA's, make PyTorch warn about their data pointers.)"""
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        yield mode


def count(fn: Callable[[], Any], graphs: CompiledGraphs | None = None) -> list[Op]:
    """The operations `fn` runs (each with the compiled graphs `graphs` puts it in), then a
    "return" marker that reads what `fn` returns (so the fusion model writes it)."""
    with OpCounter(graphs) as counter:
        out = fn()
    returned = tensor_bytes([t for t in tree_leaves(out) if isinstance(t, Tensor)])
    return [*counter.ops, Op("return", "return", 0, 0, returned, {})]


@dataclass
class TrainingCount:
    """One training step's operations (today's update path), the operations of the compiled
    update path (`fused_update`) on the same state, forward MACs, and the parameters (local)
    in all and outside the transformer blocks."""

    ops: list[Op]
    fused_update: list[Op]
    macs: int
    params: int
    params_outside_blocks: int


def training_ops(model: str, batch: int, train_argv: list[str], update: bool = True
                 ) -> TrainingCount:  # fmt: skip
    """The operations of one steady-state training step (the second), with the update as
    today's path runs it, each with the compiled graph `--compile` would run it in, and the
    compiled update path's operations on the same tensors. `update=False`: the first step, the
    compiled update and the MACs are skipped (the step's FLOPs are the same, in half the time)."""
    from bench.train_speed import build_trainer, forward_macs, synthetic_batch, train_args
    from urepa.trainer import to_device, train_step

    args = train_args(["--model", model, "--batch-size", str(batch), *train_argv], [])
    # the fusion model stands in for compilation (also on a GPU machine); the compiled update
    # is counted on its own below
    args.compile = args.compile_update = False
    graphs = CompiledGraphs()
    with fake_mode(), gpu_roads():
        trainer = build_trainer(args, 1000, tempfile.mkdtemp(prefix="op-count-"))
        # what --compile compiles (speed.compile_for_training): each block, the loss's objective
        graphs.track_modules("blocks", trainer.raw.get_submodule("blocks").children())
        loss_fn = trainer.loss_fn
        loss_fn._objective = graphs.track_function("blocks", loss_fn._objective)
        batch_cpu = synthetic_batch(trainer, 1000)
        micro = [to_device(batch_cpu, trainer.accelerator.device)]
        if update:
            train_step(trainer, micro)  # the first step creates AdamW's state
        ops = count(lambda: train_step(trainer, micro), graphs)
        fused = fused_update_ops(trainer) if update else []
    params = sum(p.numel() for p in trainer.model_params)
    in_blocks = sum(p.numel() for p in trainer.raw.get_submodule("blocks").parameters())
    macs = forward_macs(trainer.raw)[0] if update else 0
    return TrainingCount(ops, fused, macs, params, params - in_blocks)


def fused_update_ops(trainer: Any) -> list[Op]:
    """The compiled update path (`--compile-update`) on the trainer's state: the gradient norm
    (a foreach pass, as today), then `fused_update`'s multi-tensor operations, which
    torch.compile fuses: marked fusable ("other"), in one compiled graph."""
    from urepa.fused_update import fused_update
    from urepa.trainer import apply_fused_update, full, gradient_norm

    for p in trainer.raw.parameters():
        p.grad = torch.zeros_like(p)
    trainer.update_fn = fused_update
    ops = count(lambda: apply_fused_update(trainer, full(gradient_norm(trainer)), True))
    trainer.update_fn = None
    norm_done = False
    for op in ops:
        norm_done = norm_done or op.name.startswith("_foreach_norm")
        if norm_done and op.category == "update" and not op.name.startswith("_foreach_norm"):
            op.category = "other"
            op.graphs = {"blocks": "update"}
    return ops


def sampling_ops(
    model_name: str, batch: int, guided: bool, extra: list[str]
) -> tuple[list[Op], int]:
    """The operations of a 3-step SDE run (rows divide by 3), with or without guidance, and
    forward MACs. The weights are fake, the noise and time grid real (and small)."""
    from bench.sample_speed import parse_args
    from models import build_model
    from urepa import sampling
    from urepa.settings import SamplerSettings, SamplingSpeed

    bench, args = parse_args(["--model", model_name, "--per-proc-batch-size", str(batch),
                              "--num-steps", str(SAMPLER_STEPS), *extra])  # fmt: skip
    args.guidance_low, args.guidance_high = (0.0, 1.0) if guided else (0.0, 0.0)
    args.cfg_scale = args.cfg_scale if guided else 1.0
    device = torch.device("cpu")
    with fake_mode():
        model = build_model(bench.model, input_size=bench.resolution // 8, **bench.model_config)
        # as checkpoints.load_model_for_sampling gives it (eval mode, no gradients), then as
        # sampling.sampling_model prepares it, compilation aside (the fusion model stands in)
        model.eval().requires_grad_(False)
        args.compile = False  # the fusion model stands in for compilation
        speed = SamplingSpeed.from_flags(vars(args))
        sampler = sampling.sampling_model(model, args.precision, speed)
    graphs = CompiledGraphs()  # compiled per block (--no-cuda-graphs), or whole (CUDA graphs)
    module = cast(nn.Module, sampler)
    graphs.track_modules("blocks", module.get_submodule("blocks").children())
    graphs.track_modules("model", [module])
    settings = SamplerSettings.from_flags(vars(args))
    inputs = sampling.draw_inputs(list(range(batch)), settings, None, model.num_classes,
                                  model.latent_shape, pin=False)  # fmt: skip
    with gpu_roads():  # the sampler's own time grid stays real: it reads it on the host
        ops = count(lambda: sampling.sample_batch(sampler, inputs, settings, device), graphs)
    from models.summary import count_macs

    return ops, count_macs(model, model.latent_shape[-1])


# --------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------

CONFIGS = ("eager", "compiled", "compiled, update compiled (--compile-update)",
           f"compiled, update compiled, sharded over {SHARDS} GPUs (--fsdp)")  # fmt: skip
SAMPLING_CONFIGS = ("eager", "compiled per block (--no-cuda-graphs)",
                    "compiled whole, CUDA graphs (the default)")  # fmt: skip


@dataclass
class Config:
    """The kernels of one configuration as the bound prices them (element-wise work fused
    across the whole step) and as the estimate does (fused as compiled); FSDP's sharding."""

    bound: list[Kernel]
    estimate: list[Kernel]
    sharding: Sharding | None = None


def with_compiled_update(step: list[Kernel], fused: list[Kernel]) -> list[Kernel]:
    """`step` with today's update kernels (clipping, AdamW, EMA) replaced by the compiled
    update's: the gradient norm as counted, the rest one fused pass."""
    return [k for k in step if not k.update] + [replace(k, update=True) for k in fused]


def shard_update(ks: list[Kernel], shards: int) -> list[Kernel]:
    """Each process updates 1/shards of the parameters: the update moves 1/shards of its bytes."""
    return [replace(k, bytes=round(k.bytes / shards)) if k.update else k for k in ks]


def training_configs(c: TrainingCount) -> dict[str, Config]:
    """The rows of CONFIGS (the compiled update's two without `c.fused_update`)."""
    eager = kernels(c.ops, "eager")
    bound, estimate = kernels(c.ops, "ideal"), kernels(c.ops, "blocks")
    configs = {CONFIGS[0]: Config(eager, eager), CONFIGS[1]: Config(bound, estimate)}
    if c.fused_update:
        bound = with_compiled_update(bound, kernels(c.fused_update, "ideal"))
        estimate = with_compiled_update(estimate, kernels(c.fused_update, "blocks"))
        configs[CONFIGS[2]] = Config(bound, estimate)
        sharding = Sharding(SHARDS, c.params, c.params_outside_blocks)
        configs[CONFIGS[3]] = Config(shard_update(bound, SHARDS), shard_update(estimate, SHARDS)
                                     + [fsdp_copies(sharding)], sharding)  # fmt: skip
    return configs


def sampling_configs(ops: list[Op]) -> dict[str, Config]:
    eager = kernels(ops, "eager")
    ideal = kernels(ops, "ideal")
    return {SAMPLING_CONFIGS[0]: Config(eager, eager),
            SAMPLING_CONFIGS[1]: Config(ideal, kernels(ops, "blocks")),
            SAMPLING_CONFIGS[2]: Config(ideal, kernels(ops, "model"))}  # fmt: skip


def update_bytes_per_parameter(count: TrainingCount) -> dict[str, float]:
    """Bytes per parameter and step of the update path: today's (clipping's norm and scale,
    AdamW's kernel, the EMA, as counted) and the compiled update's (norm + one fused pass)."""
    update = [op for op in count.ops if op.category == "update"]
    # in train_step's order: the norm, the clipping's scale, AdamW's operations, the EMA's lerp
    names = ["gradient norm", "clipping (scale)"] + ["AdamW"] * (len(update) - 3) + ["EMA"]
    parts: dict[str, float] = {}
    for name, op in zip(names, update, strict=True):
        parts[name] = parts.get(name, 0) + op.bytes / count.params
    fused = compiled_totals(count.fused_update)
    parts["today's path, in all"] = sum(parts.values())
    parts["compiled update (--compile-update), in all"] = fused.bytes / count.params
    return parts


def update_table(results: dict[str, TrainingCount]) -> list[str]:
    models = list(results)
    per = {m: update_bytes_per_parameter(c) for m, c in results.items()}
    keys = list(dict.fromkeys(k for p in per.values() for k in p))
    lines = ["| update path, bytes per parameter and step | " + " | ".join(models) + " |",
             "|---|" + "---|" * len(models)]  # fmt: skip
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{per[m].get(key, 0):.1f}" for m in models) + " |")
    return lines


@dataclass
class Row:
    """One model's configurations, with what MFU needs: images per step, MACs per image,
    passes (6: forward and backward, 2: forward), and repeats of the step in the counts."""

    label: str
    configs: dict[str, Config]
    images: int
    macs: int
    passes: int
    per: int = 1


def header(title: str, columns: list[str]) -> list[str]:
    return [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]


def counts_table(title: str, rows: list[Row]) -> list[str]:
    columns = ["TFLOP matmul / attention / conv / other", "GB memory-bound ops: bound / estimate",
               "of which update", f"GB sent over NVLink per GPU ({SHARDS} GPUs)",
               "kernels (as compiled)"]  # fmt: skip
    lines = header(f"{title}: counts", columns)
    for row in rows:
        for name, config in row.configs.items():
            bound, est = totals(config.bound, row.per), totals(config.estimate, row.per)
            tf = {k: est.flops.get(k, 0) / 1e12 for k in ("matmul", "attention", "conv", "other")}
            sent = config.sharding.wire_bytes() / row.per if config.sharding else 0
            lines.append(
                f"| {row.label}: {name} | {tf['matmul']:.2f} / {tf['attention']:.2f} / "
                f"{tf['conv']:.3f} / {tf['other']:.3f} | {bound.bytes / 1e9:.3g} / "
                f"{est.bytes / 1e9:.3g} | {est.update_bytes / 1e9:.3g} | {sent / 1e9:.3g} | "
                f"{est.kernels:,} |"
            )
    return lines


def seconds(config: Config, gpu: Gpu, eff: Efficiency, per: int) -> dict[str, float]:
    ks = config.bound if eff is BOUND else config.estimate
    return {part: s / per for part, s in step_seconds(ks, gpu, eff, config.sharding).items()}


def time_table(title: str, rows: list[Row], digits: int) -> list[str]:
    """Step time (ms with `digits` decimals), images per second and MFU, per GPU: the bound,
    then the estimate."""
    columns = [f"{gpu.name}: {kind}" for gpu in GPUS for kind in ("bound", "estimate")]
    lines = header(f"{title}: ms, images/s, MFU", columns)
    for row in rows:
        for name, config in row.configs.items():
            cells = []
            for gpu in GPUS:
                for eff in (BOUND, ESTIMATE):
                    step = sum(seconds(config, gpu, eff, row.per).values())
                    rate = row.images / step
                    mfu = rate * row.passes * row.macs / gpu.peak_flops
                    cells.append(f"{step * 1e3:.{digits}f} ms, {rate:,.0f}, {mfu:.0%}")
            lines.append(f"| {row.label}: {name} | " + " | ".join(cells) + " |")
    return lines


def parts_table(title: str, rows: list[Row]) -> list[str]:
    """Where the estimate's time goes, per GPU: ms in each of PARTS (3 significant digits)."""
    lines = header(f"{title}: the estimate's ms, " + " / ".join(PARTS),
                   [gpu.name for gpu in GPUS])  # fmt: skip
    for row in rows:
        for name, config in row.configs.items():
            cells = [" / ".join(f"{s * 1e3:.3g}" for s in
                                seconds(config, gpu, ESTIMATE, row.per).values())
                     for gpu in GPUS]  # fmt: skip
            lines.append(f"| {row.label}: {name} | " + " | ".join(cells) + " |")
    return lines


def report(name: str, title: str, rows: list[Row], digits: int) -> dict[str, list[str]]:
    """The time table, the estimate's parts and the counts of `rows`, printed."""
    out = {f"{name} time": time_table(title, rows, digits),
           f"{name} parts": parts_table(title, rows),
           f"{name} counts": counts_table(title, rows)}  # fmt: skip
    print("\n\n".join("\n".join(table) for table in out.values()) + "\n")
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other flag is train.py's, for the training step (e.g. --encoder-depth).",
        allow_abbrev=False,
    )
    p.add_argument("--models", default="SiTDown-XL/2,SiT-XL/2", help="comma-separated")
    p.add_argument("--batch-size", type=positive_int, default=32, help="training, per GPU")
    p.add_argument("--sample-batch-size", type=positive_int, default=64, help="samples per GPU")
    p.add_argument("--model-config", default=None, help="JSON constructor arguments (all models)")
    p.add_argument("--no-sampling", action="store_true", help="count the training step only")
    return p.parse_known_args(argv)


SAMPLER_STEPS = 3  # the sampler runs 3 steps (2 stochastic, 1 last Euler); rows are per step


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    opts, train_argv = parse_args(argv)
    models = opts.models.split(",")
    config = ["--model-config", opts.model_config] if opts.model_config else []
    training = {m: training_ops(m, opts.batch_size, [*config, *train_argv]) for m in models}
    rows = [Row(m, training_configs(c), opts.batch_size, c.macs, 6) for m, c in training.items()]
    out = report("training", f"model, training step, batch {opts.batch_size}", rows, 0)
    out["update"] = update_table(training)
    print("\n".join(out["update"]) + "\n")
    if opts.no_sampling:
        return out
    rows = []
    for m in models:
        for guided in (False, True):
            images = opts.sample_batch_size * (2 if guided else 1)
            ops, macs = sampling_ops(m, opts.sample_batch_size, guided, config)
            label = f"{m}, {'guided' if guided else 'unguided'} ({images} images)"
            rows.append(Row(label, sampling_configs(ops), images, macs, 2, SAMPLER_STEPS))
    return out | report("sampling", "model, one SDE step", rows, 1)


if __name__ == "__main__":
    run_main(main)

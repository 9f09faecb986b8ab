"""Step time from kernel counts (`bench.op_count`), on an H100 SXM and an H200: a bound and an
estimate. Arithmetic, not a measurement; docs/benchmarks.md gives the sources of the figures.

* bound: every kernel at the data sheet's figures (matrix products, attention and
  convolutions at the dense bf16 peak, every other byte at the HBM bandwidth), one after the
  other, no launch overhead, collectives hidden; op_count pairs it with element-wise fusion
  across the whole step. A floor that no overlap of compute and memory lowers by more than half.
* estimate: each kernel at the fraction of those figures that published measurements reach
  (`ESTIMATE`), paired with fusion as the code compiles (inside each compiled block only).
  A matrix product or attention kernel takes the longer of its compute time and its memory
  time (a roofline): the AdaLN matmuls, with one row per image, read a weight matrix for very
  little arithmetic and are priced by their bytes. With FSDP, the all-gathers and
  reduce-scatters of the fp32 weights and gradients run over NVLink beside the compute.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

FP32 = 4  # bytes: FSDP2 gathers the fp32 weights and reduce-scatters fp32 gradients
# FlashAttention-2 (PyTorch's flash kernel) instantiates these head sizes; a head of 72 runs the
# 96 kernel with a quarter of its tile doing nothing
FLASH_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
# FSDP2's copies around each collective, per parameter: the gathered fp32 weights copied out of
# the all-gather buffer (read + write) and the fp32 gradients into the reduce-scatter's
FSDP_COPY_BYTES_PER_PARAM = 4 * FP32


@dataclass(frozen=True)
class Gpu:
    """NVIDIA's data-sheet figures (SXM form factors)."""

    name: str
    peak_flops: float  # dense bf16 tensor cores (the sheets print twice this, "with sparsity")
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per direction: half the sheets' 900 GB/s bidirectional


GPUS = (Gpu("H100 SXM", 989e12, 3.35e12, 450e9), Gpu("H200", 989e12, 4.8e12, 450e9))


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a GPU's figures that kernels reach, and how kernels are priced."""

    matmul: float
    attention_forward: float
    attention_backward: float
    memory: float
    nvlink: float
    roofline: bool  # matmuls and attention pay for their bytes too (the longer of the two)
    padded_heads: bool  # attention runs FLASH_HEAD_DIMS' kernel for its head size
    collectives: bool  # FSDP's all-gathers and reduce-scatters counted

    def attention(self, head_dim: int, backward: bool) -> float:
        share = self.attention_backward if backward else self.attention_forward
        if self.padded_heads and head_dim:
            kernel = FLASH_HEAD_DIMS[min(bisect.bisect_left(FLASH_HEAD_DIMS, head_dim),
                                         len(FLASH_HEAD_DIMS) - 1)]  # fmt: skip
            share *= min(1.0, head_dim / kernel)
        return share


BOUND = Efficiency(1.0, 1.0, 1.0, 1.0, 1.0, roofline=False, padded_heads=False,
                   collectives=False)  # fmt: skip
# docs/benchmarks.md, "Estimates from operation counts", says where each comes from
ESTIMATE = Efficiency(matmul=0.70, attention_forward=0.30, attention_backward=0.21, memory=0.85,
                      nvlink=0.80, roofline=True, padded_heads=True, collectives=True)  # fmt: skip


@dataclass
class Kernel:
    """One kernel launch group: a matrix product, attention or convolution, or a memory-bound
    kernel (one operation, or a fused region of them)."""

    category: str  # matmul | attention | conv | memory
    flops: int
    bytes: int
    launches: int = 1
    update: bool = False  # clipping, AdamW or the EMA
    head_dim: int = 0
    backward: bool = False


@dataclass(frozen=True)
class Sharding:
    """FSDP2 over `shards` GPUs: the parameters, and those outside the transformer blocks (the
    root unit, gathered before the first block and reduced after the last: nothing overlaps)."""

    shards: int
    params: int
    params_outside_blocks: int

    def wire_bytes(self) -> float:
        """Bytes each GPU sends (and receives) per step: all-gather + reduce-scatter, fp32."""
        return 2 * (self.shards - 1) / self.shards * FP32 * self.params


PARTS = ("matmuls", "memory-bound matmuls", "attention", "memory-bound ops", "collectives")


def kernel_seconds(k: Kernel, gpu: Gpu, eff: Efficiency) -> tuple[str, float]:
    """(part of PARTS, seconds) of one kernel."""
    memory = k.bytes / (gpu.hbm_bytes_per_s * eff.memory)
    if k.category == "memory":
        return "memory-bound ops", memory
    if k.category == "attention":
        compute = k.flops / (gpu.peak_flops * eff.attention(k.head_dim, k.backward))
        return "attention", max(compute, memory) if eff.roofline else compute
    compute = k.flops / (gpu.peak_flops * eff.matmul)
    if eff.roofline and memory > compute:
        return "memory-bound matmuls", memory
    return "matmuls", compute


def step_seconds(
    kernels: list[Kernel], gpu: Gpu, eff: Efficiency, sharding: Sharding | None = None
) -> dict[str, float]:
    """Seconds per part of PARTS. Collectives (`eff.collectives` and `sharding`): the root
    unit's in full, the blocks' beyond what the rest of the step hides."""
    parts = dict.fromkeys(PARTS, 0.0)
    for k in kernels:
        part, seconds = kernel_seconds(k, gpu, eff)
        parts[part] += seconds
    if sharding is not None and eff.collectives:
        wire = sharding.wire_bytes() / (gpu.nvlink_bytes_per_s * eff.nvlink)
        root = wire * sharding.params_outside_blocks / sharding.params
        parts["collectives"] = root + max(0.0, wire - root - sum(parts.values()))
    return parts


def fsdp_copies(sharding: Sharding) -> Kernel:
    """FSDP2's copies around its collectives, as one memory-bound kernel (estimate only)."""
    return Kernel("memory", 0, FSDP_COPY_BYTES_PER_PARAM * sharding.params)

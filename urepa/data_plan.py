"""The data plan: which samples, with which random draws, make up every micro-batch of a run.

Determinism: nothing in training draws from a global random number generator. What step s sees
is a function of (seed, s) alone:

* data order: epoch e is a permutation of the dataset seeded by (seed, e); step s takes the next
  `global_batch` indices of it (the incomplete tail of an epoch is dropped);
* per-step draws (training times t, interpolation noise, the VAE posterior sample, label dropout,
  and on a captioned dataset which of its captions each image is shown with):
  counter-based. Every number is a pure function of (seed, step, purpose, position of the sample
  in the global batch, element), so each process computes only its own slice, and the slice of
  positions [a, b) is bit for bit rows [a, b) of the whole global batch's draws (`StepDraws`).

Each process takes its fixed slice of the global batch, one slice per micro-batch. So one
process, N processes, any gradient accumulation, and a run resumed at any step all see exactly the
same samples with exactly the same randomness; only floating-point summation order differs.
`DRAWS_VERSION` names the draws: checkpoints record it, and a run is resumed only by code that
makes the same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from loss import time_from
from urepa.utils import hash_seed
from urepa.vae import sample_latents

# Purposes of derived seeds, so that no two streams of random numbers ever coincide.
SEED_EPOCH, SEED_STEP, SEED_PREVIEW = 0, 1, 2
# The per-step draws of `StepDraws`; version 1 drew the whole global batch from one CPU
# torch.Generator per step (checkpoints without a "draws" entry).
DRAWS_VERSION = 2


def derive_seed(seed: int, purpose: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed for (run seed, purpose, index)."""
    return hash_seed(seed, purpose, index) >> 1


@dataclass(frozen=True)
class BatchPlan:
    """Global batch `global_batch` split over `num_processes` × `accumulation` micro-batches.

    Process r's micro-batch m of a step holds positions [(r·A + m)·b, (r·A + m + 1)·b) of the
    step's global batch, b = global_batch / (num_processes · A).
    """

    dataset_size: int
    global_batch: int
    accumulation: int = 1
    num_processes: int = 1
    process_index: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        parts = self.num_processes * self.accumulation
        if self.global_batch % parts:
            raise ValueError(
                f"--batch-size {self.global_batch} is the global batch: it must be divisible by "
                f"processes ({self.num_processes}) × --gradient-accumulation-steps "
                f"({self.accumulation}) = {parts}"
            )
        if self.dataset_size < self.global_batch:
            raise ValueError(
                f"the dataset has {self.dataset_size} samples, fewer than one global batch "
                f"({self.global_batch})"
            )

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.num_processes * self.accumulation)

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def epoch_permutation(self, epoch: int) -> Tensor:
        """(dataset_size,) int64: the order of epoch `epoch`."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_EPOCH, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def global_indices(self, step: int, permutation: Tensor | None = None) -> Tensor:
        """(global_batch,) dataset indices of step `step` (0-indexed)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        perm = self.epoch_permutation(epoch) if permutation is None else permutation
        return perm[j * self.global_batch : (j + 1) * self.global_batch]

    def local_slice(self, micro: int) -> slice:
        """Positions of this process's micro-batch `micro` within the global batch."""
        start = (self.process_index * self.accumulation + micro) * self.micro_batch
        return slice(start, start + self.micro_batch)


#################################################################################
#                          Counter-based random numbers                          #
#################################################################################
# SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", 2014): word
# n of the stream with state s is mix64(s + n·γ), γ the odd golden-ratio increment; it passes
# BigCrush. Each sample has its own stream, started at mix64(key + position·γ) with `key` a hash
# of (seed, step, purpose): a counter-based generator that torch's int64 operations evaluate for
# a whole batch at once, on any process, with no state. int64 products and sums wrap modulo 2^64
# like the unsigned arithmetic of the original; torch's `>>` is arithmetic, so shifts are masked.


def _int64(word: int) -> int:
    """A 64-bit unsigned word as the int64 with the same bits."""
    return word - (1 << 64) if word >= 1 << 63 else word


GAMMA = _int64(0x9E3779B97F4A7C15)
MIX_MULTIPLIERS = (_int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB))
UNIT_24 = 2.0**-24  # float32 uniforms are multiples of 2^-24 in [0, 1), as torch.rand's on CPU

# Purposes of the per-step streams (non-zero: SeedSequence ignores trailing zeros of its input).
DRAW_TIME, DRAW_NOISE, DRAW_POSTERIOR, DRAW_DROP, DRAW_CAPTION = 1, 2, 3, 4, 5


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """z >>> bits, the logical shift of int64 words."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's output function, a bijection of 64-bit words, element-wise on int64."""
    z = z ^ _shift_right(z, 30)
    z *= MIX_MULTIPLIERS[0]
    z ^= _shift_right(z, 27)
    z *= MIX_MULTIPLIERS[1]
    z ^= _shift_right(z, 31)
    return z


def stream_key(seed: int, step: int, purpose: int) -> int:
    """The int64 key of step `step`'s draws for `purpose` (one of the DRAW_* constants)."""
    return _int64(hash_seed(seed, SEED_STEP, step, purpose))


def random_words(key: int, positions: Tensor, count: int) -> Tensor:
    """(len(positions), count) int64 random words: words 1..count of each position's stream."""
    starts = mix64(positions.to(torch.int64) * GAMMA + key)  # (n,)
    return mix64(starts[:, None] + torch.arange(1, count + 1) * GAMMA)


def uniforms(words: Tensor) -> Tensor:
    """float32 U[0, 1) from the low 24 bits of each word, shaped like `words`."""
    return (words & 0xFFFFFF).float() * UNIT_24


def normals(words: Tensor, count: int) -> Tensor:
    """(n, count) float32 N(0, 1) from (n, ⌈count / 2⌉) words, two per word by Box–Muller: the top
    24 bits give the radius, the low 24 the angle. Cosines fill each row's first half, sines the
    second. As with torch.randn on the CPU, |z| < 5.8 (24-bit uniforms)."""
    radius = torch.sqrt(-2 * torch.log1p(_shift_right(words, 40).float() * -UNIT_24))
    angle = uniforms(words) * (2 * math.pi)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :count]


@dataclass(frozen=True)
class StepDraws:
    """How the per-step random draws are made (the loss's time distribution, label dropout)."""

    weighting: str = "uniform"
    path_type: str = "linear"
    cfg_prob: float = 0.1

    def draw(
        self, seed: int, step: int, n: int, latent_shape: tuple[int, ...], start: int = 0
    ) -> dict[str, Tensor]:
        """Draws for positions [start, start + n) of step `step`'s global batch: t (n,), noise
        and eps (n, *latent_shape), drop (n,) bool. A row depends on (seed, step, its position)
        alone, never on n or start; no generator's state is read or changed."""
        positions = torch.arange(start, start + n)
        numel = math.prod(latent_shape)

        def words(purpose: int, count: int) -> Tensor:
            return random_words(stream_key(seed, step, purpose), positions, count)

        time_words = words(DRAW_TIME, 1)
        z = uniforms(time_words[:, 0]) if self.weighting == "uniform" else normals(time_words, 1)
        return {
            "t": time_from(z.view(n), self.weighting, self.path_type),
            # x_t = α x + σ noise
            "noise": normals(words(DRAW_NOISE, (numel + 1) // 2), numel).view(n, *latent_shape),
            # the VAE posterior sample x = mean + std · eps
            "eps": normals(words(DRAW_POSTERIOR, (numel + 1) // 2), numel).view(n, *latent_shape),
            "drop": uniforms(words(DRAW_DROP, 1)[:, 0]) < self.cfg_prob,  # label dropout for CFG
        }


def caption_choice(seed: int, step: int, positions: Tensor, counts: Tensor) -> Tensor:
    """(n,) int64: which of its `counts` (n,) captions each image at `positions` of step `step`'s
    global batch is shown with, uniformly, from its own DRAW_CAPTION stream: floor(u · count)."""
    u = uniforms(random_words(stream_key(seed, step, DRAW_CAPTION), positions, 1)[:, 0])
    return torch.minimum((u.double() * counts).long(), counts - 1)


def caption_contexts(
    dataset: Any, seed: int, step: int, indices: Tensor, start: int, drop: Tensor
) -> Tensor:
    """(b, L, D) float16 text features of dataset samples `indices` at positions [start, start +
    b) of step `step`: one caption drawn per image (`caption_choice`); where `drop` (the step's
    label-dropout draws), the empty caption's features instead, the null condition of
    classifier-free guidance (U-ViT's and REPA's caption dropout)."""
    positions = torch.arange(start, start + len(indices))
    choice = caption_choice(seed, step, positions, dataset.caption_counts(indices))
    contexts = dataset.read_contexts(indices, choice)  # (b, L, D)
    return torch.where(drop[:, None, None], dataset.empty_context, contexts)


def draws_mismatch(saved: dict[str, Any]) -> str | None:
    """Why a checkpoint whose data position is `saved` cannot continue its run exactly with
    this code's draws (None: it can)."""
    version = saved.get("draws", 1)
    if version == DRAWS_VERSION:
        return None
    return (
        f"cannot resume: the checkpoint's steps were drawn by version {version} of the per-step "
        f"random draws, this code makes version {DRAWS_VERSION}, so the run would not continue "
        "as it began; finish it with the code that wrote it, or start a new run with another "
        "--exp-name"
    )


def read_samples(dataset: Dataset, indices: Tensor, pin_memory: bool) -> dict[str, Any]:
    """Samples `indices` of `dataset`, stacked: with the dataset's own batched reader where it
    has one (LatentDataset.read_batch), else one sample at a time (small in-memory datasets)."""
    read_batch = getattr(dataset, "read_batch", None)
    if read_batch is not None:
        return read_batch(indices, pin_memory)
    samples = [dataset[int(i)] for i in indices]
    batch = {
        "moments": torch.stack([s["moments"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "features": [torch.stack(f) for f in zip(*(s["features"] for s in samples), strict=True)],
    }
    if "pixels" in samples[0]:
        batch["pixels"] = torch.stack([s["pixels"] for s in samples])
    return batch


class TrainingBatches(Dataset):
    """Item k is this process's micro-batch k % A of step k // A, as a dict:

    x (b, C, h, w) latents, y (b,) labels, t (b,), noise (b, C, h, w), drop (b,) bool,
    context (b, L, D) fp16 caption features after dropout (a captioned dataset only),
    features [(b, T, D) fp16 per encoder], pixels (b, 3, H, W) uint8 (online-encoder mode),
    indices (b,) dataset indices, step (int).

    Read it with `DataLoader(batches, batch_size=None, sampler=range(start·A, stop·A))`: workers
    load the samples and make the draws ahead of the loop; resuming at step s is `start = s`.
    Samples are read in one batch (into shared memory in a worker, so that handing them over
    copies nothing; into pinned memory without workers if `pin_memory`), and only this
    micro-batch's draws are made.
    """

    def __init__(
        self, dataset: Dataset, plan: BatchPlan, draws: StepDraws, pin_memory: bool = False
    ):
        self.dataset = dataset
        self.plan = plan
        self.draws = draws
        self.pin_memory = pin_memory
        self._permutation: tuple[int, Tensor] | None = None  # (epoch, order), cached per worker

    def _indices(self, step: int) -> Tensor:
        epoch = step // self.plan.steps_per_epoch
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, self.plan.epoch_permutation(epoch))
        return self.plan.global_indices(step, self._permutation[1])

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, micro = divmod(k, self.plan.accumulation)
        local = self.plan.local_slice(micro)
        # a copy: handing the batch over moves its tensors into shared memory, in a background
        # thread, while this worker reads the next batch with the epoch's order
        indices = self._indices(step)[local].clone()
        samples = read_samples(self.dataset, indices, self.pin_memory)
        moments = samples["moments"].float()  # (b, 2C, h, w)
        latent_shape = (moments.shape[1] // 2, *moments.shape[2:])
        draws = self.draws.draw(self.plan.seed, step, len(indices), latent_shape, local.start)
        batch: dict[str, Any] = {
            "x": sample_latents(moments, noise=draws["eps"]),
            "y": samples["label"],
            "t": draws["t"],
            "noise": draws["noise"],
            "drop": draws["drop"],
            "features": samples["features"],
            "indices": indices,
            "step": step,
        }
        if "pixels" in samples:
            batch["pixels"] = samples["pixels"]
        if getattr(self.dataset, "captioned", False):
            batch["context"] = caption_contexts(
                self.dataset, self.plan.seed, step, indices, local.start, draws["drop"]
            )
        return batch

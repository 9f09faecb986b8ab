"""The data plan: which samples, with which random draws, make up every micro-batch of a run.

Determinism: nothing in training draws from a global random number generator. What step s sees
is a function of (seed, s) alone:

* data order: epoch e is a permutation of the dataset seeded by (seed, e); step s takes the next
  `global_batch` indices of it (the incomplete tail of an epoch is dropped);
* per-step draws (training times t, interpolation noise, the VAE posterior sample, label dropout):
  drawn for the whole global batch from a CPU generator seeded by (seed, s), on every process.

Each process then takes its fixed slice of the global batch, one slice per micro-batch. So one
process, N processes, any gradient accumulation, and a run resumed at any step all see exactly the
same samples with exactly the same randomness; only floating-point summation order differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from frozen import sample_latents
from loss import sample_time
from utils import hash_seed

# Purposes of derived seeds, so that no two streams of random numbers ever coincide.
SEED_EPOCH, SEED_STEP, SEED_PREVIEW = 0, 1, 2


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


@dataclass(frozen=True)
class StepDraws:
    """How the per-step random draws are made (the loss's time distribution, label dropout)."""

    weighting: str = "uniform"
    path_type: str = "linear"
    cfg_prob: float = 0.1

    def draw(
        self, seed: int, step: int, n: int, latent_shape: tuple[int, ...]
    ) -> dict[str, Tensor]:
        """Draws for a whole global batch of n: t (n,), noise and eps (n, *latent_shape), drop
        (n,) bool. From a CPU generator of their own: the global generator is left untouched."""
        gen = torch.Generator().manual_seed(derive_seed(seed, SEED_STEP, step))
        t = sample_time(n, self.weighting, self.path_type, generator=gen)
        noise = torch.randn(n, *latent_shape, generator=gen)  # x_t = α x + σ noise
        eps = torch.randn(n, *latent_shape, generator=gen)  # VAE posterior, x = mean + std · eps
        drop = torch.rand(n, generator=gen) < self.cfg_prob  # label dropout for CFG
        return {"t": t, "noise": noise, "eps": eps, "drop": drop}


class TrainingBatches(Dataset):
    """Item k is this process's micro-batch k % A of step k // A, as a dict:

    x (b, C, h, w) latents, y (b,) labels, t (b,), noise (b, C, h, w), drop (b,) bool,
    features [(b, T, D) fp16 per encoder], pixels (b, 3, H, W) uint8 (online-encoder mode),
    indices (b,) dataset indices, step (int).

    Read it with `DataLoader(batches, batch_size=None, sampler=range(start·A, stop·A))`: workers
    load the samples and make the draws ahead of the loop; resuming at step s is `start = s`.
    """

    def __init__(self, dataset: Dataset, plan: BatchPlan, draws: StepDraws):
        self.dataset = dataset
        self.plan = plan
        self.draws = draws
        self._permutation: tuple[int, Tensor] | None = None  # (epoch, order), cached per worker

    def _indices(self, step: int) -> Tensor:
        epoch = step // self.plan.steps_per_epoch
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, self.plan.epoch_permutation(epoch))
        return self.plan.global_indices(step, self._permutation[1])

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, micro = divmod(k, self.plan.accumulation)
        local = self.plan.local_slice(micro)
        indices = self._indices(step)[local]
        samples = [self.dataset[int(i)] for i in indices]
        moments = torch.stack([s["moments"] for s in samples]).float()  # (b, 2C, h, w)
        draws = self.draws.draw(
            self.plan.seed,
            step,
            self.plan.global_batch,
            (moments.shape[1] // 2, *moments.shape[2:]),
        )
        batch: dict[str, Any] = {
            # ε is drawn for the whole global batch, then sliced: independent of the process count
            "x": sample_latents(moments, noise=draws["eps"][local]),
            "y": torch.stack([s["label"] for s in samples]),
            "t": draws["t"][local],
            "noise": draws["noise"][local],
            "drop": draws["drop"][local],
            "features": [
                torch.stack(f) for f in zip(*(s["features"] for s in samples), strict=True)
            ],
            "indices": indices,
            "step": step,
        }
        if "pixels" in samples[0]:
            batch["pixels"] = torch.stack([s["pixels"] for s in samples])
        return batch

"""The parts of `train.py` that are not the loop itself: the deterministic data plan, the EMA,
metric accumulation without host syncs, run logs, stop signals, a run's checkpoint files and
whether a checkpoint may be resumed.

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

import json
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from frozen import sample_latents
from loss import sample_time

# Purposes of derived seeds, so that no two streams of random numbers ever coincide.
SEED_EPOCH, SEED_STEP, SEED_PREVIEW = 0, 1, 2


def derive_seed(seed: int, purpose: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed for (run seed, purpose, index), via numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, purpose, index]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------
# The data plan: which samples and random draws make up each micro-batch of each process
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# EMA and metrics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema_params: list[Tensor], model_params: list[Tensor], decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · θ for every tensor at once (one foreach kernel)."""
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


class MetricMeans:
    """Sums 0-dim device tensors step by step without reading them (no host sync); `pop`
    averages them over the interval and over processes with one collective and one read."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def pop(self, mean_over_processes: Callable[[Tensor], Tensor]) -> dict[str, float]:
        if not self.count:
            return {}
        names = list(self.sums)  # the same order on every process
        totals = mean_over_processes(torch.stack([self.sums[n] for n in names])).tolist()
        means = {n: total / self.count for n, total in zip(names, totals, strict=True)}
        self.sums, self.count = {}, 0
        return means


# Dense bf16/fp16 tensor-core peak per GPU (TFLOP/s), for the MFU estimate; --peak-tflops
# overrides. TF32 runs at half of it; plain fp32 is not estimated.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(
    device: torch.device, mixed_precision: str, allow_tf32: bool, override_tflops: float | None
) -> float | None:
    """Peak FLOP/s of one device for the MFU estimate, or None when unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if tflops is None or (mixed_precision == "no" and not allow_tf32):
        return None
    return tflops * 1e12 / (2 if mixed_precision == "no" else 1)


# --------------------------------------------------------------------------------------------
# Run logs: plain text on the main process, metrics as JSON lines, optional trackers
# --------------------------------------------------------------------------------------------


def create_logger(is_main: bool) -> logging.Logger:
    """Main process: INFO to stdout (and a file, `add_log_file`). Others: warnings to stderr."""
    logger = logging.getLogger("u-repa.train")
    close_logger(logger)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    add_handler(logger, logging.StreamHandler(sys.stdout if is_main else sys.stderr))
    return logger


def add_log_file(logger: logging.Logger, path: str) -> None:
    add_handler(logger, logging.FileHandler(path))


def add_handler(logger: logging.Logger, handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_metrics(step: int, metrics: dict[str, float]) -> str:
    """One log line: `step 1000 | total 0.5123 | velocity 0.4012 | ...`."""
    parts = [f"step {step}"]
    for name, value in metrics.items():
        if isinstance(value, float) and not value.is_integer():
            parts.append(f"{name} {value:.4g}")
        else:
            parts.append(f"{name} {value}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# Stop requests (Ctrl-C, SIGTERM from a scheduler)
# --------------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop then finishes its step, saves a checkpoint and exits.
    A second SIGINT interrupts at once.

    With several processes a signal may reach them at different steps, so the flag is combined
    by an all-reduce (max) over a CPU (gloo) group after every step: all processes stop after the
    same step, and the check never waits for the GPU.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @staticmethod
    def ignore_in_worker(worker_id: int) -> None:
        """DataLoader `worker_init_fn`: a scheduler signals the whole process group, and a
        worker killed mid-step would crash the loop before it saves; the workers ignore the
        signals and end with the main process."""
        for sig in StopRequest.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def __call__(self) -> bool:
        """Whether any process has been asked to stop (a collective when distributed)."""
        if self._group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


# --------------------------------------------------------------------------------------------
# Checkpoint files of a run, and whether a checkpoint may be resumed by this run
# --------------------------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """A problem with a run's setup or state, reported as a message without a traceback."""


CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")  # checkpoints/0050000.pt; temporary files differ

# Flags that may change when a run is resumed: where things are, how the run reports, and how
# the global batch is computed (accumulation, like the process count, leaves the samples and
# draws of every step as they were). Any other difference is refused.
RESUMABLE_CHANGES = frozenset(
    {
        "max_train_steps", "checkpointing_steps", "keep_last", "milestone_every",
        "sampling_steps", "preview_images", "log_every", "report_to", "num_workers",
        "data_dir", "output_dir", "exp_name", "resume", "dry_run", "compile", "peak_tflops",
        "fused_optimizer", "sdpa_backend",
        "vae", "enc_weights", "on_nonfinite", "gradient_accumulation_steps",
    }
)  # fmt: skip


def list_checkpoints(run_dir: str) -> dict[int, str]:
    """{step: path} of the run's complete checkpoints, in step order."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found = {int(m[1]): os.path.join(folder, n) for n in names if (m := CHECKPOINT_NAME.match(n))}
    return dict(sorted(found.items()))


def prune_checkpoints(run_dir: str, keep_last: int, milestone_every: int) -> list[str]:
    """Delete the checkpoints (and EMA exports) that are neither among the last `keep_last`
    nor milestones."""
    checkpoints = list_checkpoints(run_dir)
    keep = set(list(checkpoints)[-keep_last:])
    keep |= {s for s in checkpoints if milestone_every and s % milestone_every == 0}
    removed = []
    for step, path in checkpoints.items():
        if step not in keep:
            for doomed in (path, ema_export_path(path)):
                if os.path.exists(doomed):
                    os.remove(doomed)
                    removed.append(doomed)
    return removed


def ema_export_path(checkpoint_path: str) -> str:
    """checkpoints/0400000.pt -> checkpoints/0400000-ema.safetensors"""
    return checkpoint_path.removesuffix(".pt") + "-ema.safetensors"


def _differences(old: dict[str, Any], new: dict[str, Any], name: Callable[[str], str]) -> list[str]:
    def same(a: Any, b: Any) -> bool:  # lists and tuples alike, as JSON
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(
            b, sort_keys=True, default=str
        )

    return [
        f"{name(key)}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now"
        for key in sorted(set(old) | set(new))
        if not same(old.get(key), new.get(key))
    ]


def check_resumable(
    ckpt: dict[str, Any],
    model_name: str,
    model_kwargs: dict[str, Any],
    args: dict[str, Any],
    dataset_size: int,
) -> None:
    """Refuse a checkpoint of another model, objective or data order, listing every difference."""
    diffs = _differences({"model": ckpt["model_name"]}, {"model": model_name}, str)
    diffs += _differences(ckpt["model_kwargs"], model_kwargs, lambda k: f"model argument {k}")
    old_args = {k: v for k, v in ckpt["args"].items() if k not in RESUMABLE_CHANGES}
    new_args = {k: v for k, v in args.items() if k not in RESUMABLE_CHANGES}
    diffs += _differences(old_args, new_args, lambda k: "--" + k.replace("_", "-"))
    if ckpt["data"]["dataset_size"] != dataset_size:
        diffs.append(
            f"dataset size: {ckpt['data']['dataset_size']} in the checkpoint, "
            f"{dataset_size} now (the data order would differ)"
        )
    if diffs:
        raise TrainingError(
            "cannot resume: the checkpoint was trained with a different setup:\n  "
            + "\n  ".join(diffs)
            + "\nRun the checkpoint's own command (its flags are in the run's args.json), or "
            "start a new run with another --exp-name."
        )


# --------------------------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------------------------


def grid_image(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> one (rows·H, cols·W, 3) uint8 grid, near-square."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    grid[:n] = pixels
    grid = grid.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return grid.numpy()

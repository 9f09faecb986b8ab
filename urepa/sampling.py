"""What sampling for FID needs, shared by `generate.py` and the evaluation during training
(`periodic_eval.py`): the sampler presets, each sample's seeded labels and noise, one batch through
the ODE or SDE sampler, and the pixels of decoded images.

Sample i's label, initial noise and SDE noise come from its own generator, seeded with a hash of
(global seed, i): its image depends on (seed, i) alone, not on the number of processes, the batch
it lands in or its place there (see `generate.py`'s docstring for the full contract).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np
import torch

from models.base import AlignedDiffusionTransformer
from samplers import (
    AlignedModel,
    VelocityOnly,
    draw_noise_stream,
    euler_maruyama_sampler,
    euler_sampler,
)
from urepa.captions import CaptionFeatures, ContextTable
from urepa.settings import SamplerSettings, SamplingSpeed
from urepa.speed import prepare_model_for_sampling
from urepa.utils import InputError, hash_seed

PIXELS = "trunc(clamp(255*(x+1)/2, 0, 255))"
# How sample i's generator is seeded; recorded in the settings, so that a folder sampled under
# another seeding rule is refused rather than mixed.
SAMPLE_SEED = "hash_seed(global_seed, index)"


def set_precision(precision: str) -> None:
    """--precision's matmul settings: TF32 on but for fp32 (bf16 runs its fp32 leftovers in TF32
    too)."""
    allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def balanced_labels(num_samples: int, num_classes: int, global_seed: int) -> torch.Tensor:
    """(N,) labels with exactly N / num_classes of each class, in an order fixed by the seed."""
    if num_samples % num_classes:
        raise InputError(
            f"--label-sampling balanced needs --num-fid-samples ({num_samples}) divisible by the "
            f"number of classes ({num_classes})"
        )
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(global_seed))
    return perm % num_classes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> (N, H, W, 3) uint8 (REPA's truncation, see generate.py)."""
    images = torch.clamp(255.0 * ((images + 1) / 2.0), 0, 255)
    return images.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


@dataclass
class BatchInputs:
    """The random inputs of one batch, on the CPU (pinned when sampling on a GPU)."""

    indices: list[int]  # the samples; rows past len(indices) are padding
    y: torch.Tensor  # (B,) labels
    z: torch.Tensor  # (B, C, h, w) initial noise
    noises: torch.Tensor | list[torch.Generator] | None  # SDE: (K, B, C, h, w) or generators


def draw_inputs(
    indices: list[int],
    settings: SamplerSettings,
    labels: torch.Tensor | None,
    num_classes: int,
    shape: tuple[int, int, int],
    pin: bool = False,
) -> BatchInputs:
    """Labels, initial noise and SDE noise of samples `indices`, each from the sample's own
    generator, in that order. `labels` is the balanced table, or None for random labels.

    A short batch is padded to --per-proc-batch-size with throw-away rows: every batch then has
    one shape, so the kernels (which libraries choose per shape, and which round differently)
    are the same for every image, whichever process, batch or resumed run draws it.
    """
    seeds = [hash_seed(settings.global_seed, i) for i in indices]
    seeds += [0] * (settings.per_proc_batch_size - len(indices))  # padding rows
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    # Every sample draws a random label first, balanced or not, so that its noise stream is the
    # same in both modes.
    y = torch.stack([torch.randint(num_classes, (), generator=g) for g in generators])
    if labels is not None:
        y[: len(indices)] = labels[indices]
    z = torch.stack([torch.randn(shape, generator=g) for g in generators])  # (B, C, h, w)
    noises: torch.Tensor | list[torch.Generator] | None = None
    if settings.mode == "sde":
        noises = (
            draw_noise_stream(generators, settings.num_steps - 1, shape)  # (K, B, C, h, w)
            if settings.predraw_noise
            else generators
        )
    if pin:  # page-locked, so that the copies to the GPU do not wait for it
        y, z = y.pin_memory(), z.pin_memory()
        noises = noises.pin_memory() if isinstance(noises, torch.Tensor) else noises
    return BatchInputs(indices, y, z, noises)


@torch.no_grad()
def sample_batch(
    model: AlignedModel, inputs: BatchInputs, settings: SamplerSettings, device: torch.device
) -> torch.Tensor:
    """(B, C, h, w) float64 latents of one batch (padding rows included)."""
    noises = inputs.noises
    if isinstance(noises, torch.Tensor):
        noises = noises.to(device, non_blocking=True)
    sampler_kwargs: dict[str, Any] = {
        "model": VelocityOnly(model),  # the projector heads are not needed to sample
        "latents": inputs.z.to(device, non_blocking=True),
        "y": inputs.y.to(device, non_blocking=True),
        "num_steps": settings.num_steps,
        "cfg_scale": settings.cfg_scale,
        "guidance_low": settings.guidance_low,
        "guidance_high": settings.guidance_high,
        "path_type": settings.path_type,
    }
    bf16 = settings.precision == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if settings.mode == "sde":
            return euler_maruyama_sampler(**sampler_kwargs, noises=noises)
        return euler_sampler(**sampler_kwargs, heun=settings.heun)


def sampling_model(
    model: AlignedDiffusionTransformer, precision: str, speed: SamplingSpeed
) -> AlignedModel:
    """The model as sampling calls it (`speed.prepare_model_for_sampling`): bf16 weights cast
    once (--precision bf16 --bf16-weights), compiled (--compile), CUDA graphs (--cuda-graphs,
    on a GPU); guided and unguided steps have two batch shapes, hence two static graphs."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    prepared = prepare_model_for_sampling(
        model, precision, speed.compile, speed.cuda_graphs and on_gpu, speed.bf16_weights
    )
    return cast(AlignedModel, prepared)


def captioned_batch(
    model: AlignedModel, inputs: BatchInputs, captions: CaptionFeatures, device: torch.device
) -> tuple[AlignedModel, BatchInputs]:
    """The model and inputs of a text-to-image batch: row k is conditioned on sample k's
    caption (padding rows on the empty one), guided by the empty caption (`ContextTable`)."""
    contexts, empty = captions(inputs.indices)
    padding = len(inputs.z) - len(contexts)
    contexts = torch.cat([contexts, empty.expand(padding, *empty.shape).to(contexts)])
    table = ContextTable(model, contexts.to(device, torch.float32), empty.to(device))
    y = torch.arange(len(inputs.z))
    return cast(AlignedModel, table), BatchInputs(inputs.indices, y, inputs.z, inputs.noises)


def generate_latents(
    model: AlignedModel,
    latent_shape: tuple[int, int, int],
    todo: list[int],
    settings: SamplerSettings,
    labels: torch.Tensor | None,
    device: torch.device,
    captions: CaptionFeatures | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, float64 latents) of `todo` in batches of --per-proc-batch-size. A background
    thread draws each batch's inputs while the previous batch samples. With `captions`, the
    model is conditioned on each sample's caption instead of a label."""
    size = settings.per_proc_batch_size
    batches = [todo[start : start + size] for start in range(0, len(todo), size)]
    draw = partial(
        draw_inputs,
        settings=settings,
        labels=labels,
        num_classes=1 if captions is not None else model.num_classes,
        shape=latent_shape,
        pin=device.type == "cuda",
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(draw, batch) for batch in batches[:1]]
        for k, indices in enumerate(batches):
            inputs = pending.pop().result()
            if k + 1 < len(batches):
                pending.append(pool.submit(draw, batches[k + 1]))
            if captions is None:
                yield indices, sample_batch(model, inputs, settings, device)
            else:
                batch_model, inputs = captioned_batch(model, inputs, captions, device)
                yield indices, sample_batch(batch_model, inputs, settings, device)

"""What the analysis measures on: globally pooled hidden states of chosen blocks at chosen times,
the pooled encoder features of the same images, and the projector-vs-encoder token metrics.

Sample i's latent (the VAE posterior draw) and its noise come from a generator seeded with
hash_seed(seed, i) alone, and every time t reuses that same noise: the features do not depend on
the number of processes or the batch size, and the times differ only in t. Each process takes
every W-th sample (`indices[rank::world]`); `gather_rows` puts the rows back in order on every
process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from analysis.metrics import manifold_distance, token_similarity
from dataset import LatentDataset
from models.base import AlignedDiffusionTransformer
from urepa.encoders import RepresentationEncoder
from urepa.interpolant import interpolate
from urepa.utils import hash_seed
from urepa.vae import sample_latents

Key = tuple[int, float]  # (block, t)


@dataclass
class Features:
    """Per-sample results of one pass over a list of samples (rows in the order of `indices`).

    hidden[(block, t)]: (N, C) pooled hidden states; encoder[name]: (N, D) pooled encoder
    features; token_cos[(t, name)], manifold[(t, name)]: (N,) per-image metrics of the projector
    head aligned to encoder `name`."""

    labels: Tensor
    hidden: dict[Key, Tensor] = field(default_factory=dict)
    encoder: dict[str, Tensor] = field(default_factory=dict)
    token_cos: dict[tuple[float, str], Tensor] = field(default_factory=dict)
    manifold: dict[tuple[float, str], Tensor] = field(default_factory=dict)


@contextmanager
def block_outputs(
    model: AlignedDiffusionTransformer,
    blocks: list[int],
    store: dict[int, Tensor],
    keep: Callable[[Tensor], Tensor],
) -> Iterator[None]:
    """While active, every forward writes keep(block k's output) to store[k] (k 1-indexed).
    Forward hooks: the model's code is untouched."""

    def hook(k: int) -> Callable[[nn.Module, object, Tensor], None]:
        def save(module: nn.Module, inputs: object, output: Tensor) -> None:
            store[k] = keep(output)

        return save

    trunk = cast(nn.ModuleList, model.blocks)
    handles = [trunk[k - 1].register_forward_hook(hook(k)) for k in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pooled_block_outputs(
    model: AlignedDiffusionTransformer, blocks: list[int], store: dict[int, Tensor]
) -> AbstractContextManager[None]:
    """`block_outputs` keeping the token mean, (N, T, C) -> (N, C) float32."""
    return block_outputs(model, blocks, store, lambda output: output.float().mean(dim=1))


def draw_noise(indices: Tensor, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """(latent eps, interpolant noise), each (B, *shape), from each sample's own generator."""
    generators = [torch.Generator().manual_seed(hash_seed(seed, int(i))) for i in indices]
    eps = torch.stack([torch.randn(shape, generator=g) for g in generators])
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return eps, noise


@dataclass
class Extraction:
    """How to run the model over the data: which blocks and times, which encoder targets
    (`encoders[name]` runs online on stored pixels; None reads the stored features), which
    projector head aligns to which encoder (`heads[name]` = head index)."""

    blocks: list[int]
    timesteps: list[float]
    encoders: dict[str, RepresentationEncoder | None]
    heads: dict[str, int]
    stored: list[str] = field(default_factory=list)  # the dataset's encoders, in its order
    seed: int = 0
    batch_size: int = 64
    condition: str = "null"  # "null": the unconditional class; "label": the image's class
    path_type: str = "linear"
    manifold_mode: str = "token"
    precision: str = "fp32"


def encoder_tokens(
    batch: list[dict], names: list[str], ex: Extraction, device: torch.device
) -> dict[str, Tensor]:
    """Each encoder's (B, T, D) float32 tokens of a batch: stored, or computed from the pixels."""
    tokens = {}
    for name in names:
        encoder = ex.encoders[name]
        if encoder is None:
            k = ex.stored.index(name)
            tokens[name] = torch.stack([s["features"][k] for s in batch]).to(device).float()
        else:
            pixels = torch.stack([s["pixels"] for s in batch]).to(device)
            tokens[name] = encoder(pixels).float()
    return tokens


@torch.no_grad()
def extract_batch(
    model: AlignedDiffusionTransformer,
    batch: list[dict],
    indices: Tensor,
    ex: Extraction,
    names: list[str],
    device: torch.device,
) -> dict[str, Tensor]:
    """One batch -> flat {"kind/key": (B, ...) CPU tensor} (see `Features`)."""
    moments = torch.stack([s["moments"] for s in batch])  # (B, 2C, h, w)
    eps, noise = draw_noise(indices, (moments.shape[1] // 2, *moments.shape[2:]), ex.seed)
    x = sample_latents(moments, noise=eps).to(device)
    noise = noise.to(device)
    labels = torch.stack([s["label"] for s in batch])
    y = model.null_labels(len(batch), device) if ex.condition == "null" else labels.to(device)
    targets = encoder_tokens(batch, names, ex, device)
    out = {f"encoder/{n}": z.mean(dim=1).cpu() for n, z in targets.items()}
    out["labels"] = labels
    store: dict[int, Tensor] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ex.precision == "bf16")
    with pooled_block_outputs(model, ex.blocks, store), autocast:
        for t in ex.timesteps:
            t_vec = torch.full((len(batch),), t, device=device)
            x_t, _ = interpolate(x, noise, t_vec, ex.path_type)
            _, zs = model(x_t, t_vec, y, return_zs=bool(ex.heads))
            for k in ex.blocks:
                out[f"hidden/{k}/{t}"] = store[k].cpu()
            for name, head in ex.heads.items():
                target = model.align_targets([targets[name]])[0]
                out[f"token_cos/{t}/{name}"] = token_similarity(target, zs[head]).cpu()
                out[f"manifold/{t}/{name}"] = manifold_distance(
                    target, zs[head], ex.manifold_mode
                ).cpu()
    return out


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count (0, 1 without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def extract(
    model: AlignedDiffusionTransformer,
    dataset: LatentDataset,
    indices: Tensor,
    ex: Extraction,
    device: torch.device,
    desc: str,
) -> Features:
    """Run the model over `indices` of the dataset, split over the processes, gathered on all."""
    rank, world = rank_and_world()
    mine = indices[rank::world]
    names = list(ex.encoders)
    parts: dict[str, list[Tensor]] = {}
    progress = tqdm(total=len(indices), desc=desc, unit="img", disable=rank != 0)
    for chunk in mine.split(ex.batch_size):
        batch = [dataset[int(i)] for i in chunk]
        for key, value in extract_batch(model, batch, chunk, ex, names, device).items():
            parts.setdefault(key, []).append(value)
        progress.update(len(chunk) * world)
    progress.close()
    flat = {
        key: gather_rows(torch.cat(values), len(indices), device) for key, values in parts.items()
    }
    return unflatten(flat)


def unflatten(flat: dict[str, Tensor]) -> Features:
    feats = Features(labels=flat.pop("labels"))
    for key, value in flat.items():
        kind, *rest = key.split("/")
        if kind == "hidden":
            feats.hidden[(int(rest[0]), float(rest[1]))] = value
        elif kind == "encoder":
            feats.encoder[rest[0]] = value
        else:
            getattr(feats, kind)[(float(rest[0]), rest[1])] = value
    return feats


def gather_rows(local: Tensor, total: int, device: torch.device) -> Tensor:
    """Rows of all processes, back in the order of the samples: process r holds samples r,
    r + W, r + 2W, ... (`indices[rank::world]`). Returns a (total, ...) CPU tensor everywhere."""
    _, world = rank_and_world()
    if world == 1:
        return local
    per_rank = -(-total // world)  # ceil
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = padded.to(comm_device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    # (W, per_rank, ...) -> (per_rank, W, ...): row j of rank r is sample j * W + r
    rows = torch.stack(gathered, dim=1).flatten(0, 1)
    return rows[:total].cpu()

"""Representation analysis of diffusion checkpoints (REPA §3 and appendix C; U-REPA Fig. 3).

    torchrun --nproc_per_node=8 -m analysis --ckpt exps/run/checkpoints/0400000.pt \
        --data-dir data/imagenet256 --val-data-dir data/imagenet256-val \
        --layers 4,8,12,16,20,24,28 --timesteps 0,0.25,0.5,0.75 --output-dir analysis-out/run

For each checkpoint (ours or REPA's SiT), block and time t: the linear-probing top-1 of the
pooled hidden states and their CKNNA to each encoder's pooled features; for each t, the mean
token cosine similarity of the projector output to the encoder features and the manifold
distance. Writes `results.json` and the plots (`analysis.plots`) to --output-dir. With
--pca-maps K, also REPA Fig. 38's feature maps of K images (`analysis.pca`), the checkpoints side
by side; --no-metrics draws only those.
Also runs as `python -m analysis ...` in one process (CPU or one GPU). docs/analysis.md has it all.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from analysis.features import Extraction, Features, draw_noise, extract, rank_and_world
from analysis.metrics import cknna, linear_probe, prepare_features
from analysis.pca import Maps, feature_maps, write_pca_figures
from analysis.plots import write_plots
from dataset import LatentDataset, stored_encoders
from loss import MANIFOLD_MODES, PATH_TYPES
from models.base import AlignedDiffusionTransformer
from urepa.cli import (
    DefaultsHelpFormatter,
    add_debug_arg,
    encoder_list,
    encoder_weights,
    model_name,
    nonnegative_int,
    parse_checked,
    positive_float,
    positive_int,
    run_main,
    unit_closed,
)
from urepa.encoders import encoder_dim, load_encoder
from urepa.hub import load_pretrained
from urepa.shards import load_manifest
from urepa.utils import InputError, close_distributed, init_distributed, write_json
from urepa.vae import sample_latents


# fmt: off
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", formatter_class=DefaultsHelpFormatter,
        description="Linear probing, CKNNA and projector alignment of diffusion checkpoints.")
    g = parser.add_argument_group("model")
    g.add_argument("--ckpt", nargs="+", required=True,
                   help="checkpoint(s): our .pt, .safetensors export or checkpoint folder, "
                        "REPA's SiT .pt, a release or a Hub repository ORG/NAME[@REVISION]; "
                        "several (e.g. a run's checkpoints/*.pt) plot the metrics over training")
    g.add_argument("--model", type=model_name, default=None,
                   help="only for a REPA checkpoint whose SiT variant cannot be inferred")
    g.add_argument("--layers", default="tap",
                   help="blocks (1-indexed) whose pooled output is analysed: a comma list, "
                        "'tap' (the alignment block) or 'all'")
    g.add_argument("--timesteps", default="0.5",
                   help="comma list of times t in [0, 1] (t = 1 is pure noise)")
    g.add_argument("--condition", choices=["null", "label"], default="null",
                   help="class input of the model: null (unconditional, so the label cannot "
                        "leak into the probed features) or each image's label")
    g.add_argument("--path-type", choices=PATH_TYPES, default=None,
                   help="interpolant; default: the checkpoint's, else linear")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the model's precision: fp32, or bf16 autocast")
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", required=True,
                   help="dataset written by preprocessing/prepare.py: trains the linear probe")
    d.add_argument("--val-data-dir", default=None,
                   help="dataset of held-out images (e.g. ImageNet val): the probe's test set "
                        "and CKNNA's samples; default: --num-samples held out of --data-dir")
    d.add_argument("--num-samples", type=positive_int, default=10_000,
                   help="evaluation images, drawn at random (REPA: 10,000 for CKNNA)")
    d.add_argument("--probe-train-samples", type=nonnegative_int, default=0,
                   help="images that train the probe, drawn at random (0: all the others)")
    d.add_argument("--enc-type", default=None,
                   help="encoder(s) to compare with, comma-separated; default: the checkpoint's, "
                        "else (none recorded or trained without) dinov2-vit-b. Stored features "
                        "are used; else they are computed from the stored pixels")
    d.add_argument("--enc-weights", default=None,
                   help="local weight file of each encoder computed from pixels, comma-separated")
    d.add_argument("--batch-size", type=positive_int, default=64, help="images per process")
    d.add_argument("--seed", type=nonnegative_int, default=0,
                   help="sample selection and each image's latent and noise draws")
    add_metric_args(parser.add_argument_group("metrics"))
    p = parser.add_argument_group("feature-map PCA (REPA Fig. 38)")
    p.add_argument("--pca-maps", type=nonnegative_int, default=0, metavar="K",
                   help="for the first K evaluation images: each block's (--layers) first three "
                        "principal components as RGB on its token grid, per t and checkpoint, "
                        "one figure per image (pca_maps-<i>.png, arrays in pca_maps.npz)")
    o = parser.add_argument_group("output")
    o.add_argument("--output-dir", required=True, help="results.json and the plots go here")
    add_debug_arg(o)
    return parse_checked(parser, argv, validate_args)


def add_metric_args(m: Any) -> None:
    """Linear probing, CKNNA and the projector metrics."""
    m.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="probing, CKNNA and the projector metrics; --no-metrics with --pca-maps "
                        "draws only the feature maps")
    m.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="linear probing (needs labels; the slow part on big sets)")
    m.add_argument("--probe-epochs", type=positive_int, default=90,
                   help="passes of the linear probe over its training split (REPA's 90)")
    m.add_argument("--probe-batch-size", type=positive_int, default=16_384,
                   help="the linear probe's batch (REPA's 16384)")
    m.add_argument("--probe-lr", type=positive_float, default=1e-3,
                   help="Adam's initial learning rate, decayed to 0 by a cosine")
    m.add_argument("--topk", type=positive_int, default=10, help="CKNNA's k")
    m.add_argument("--outlier-quantile", type=unit_closed, default=0.95,
                   help="CKNNA's features are clipped at this quantile of |x| (Huh et al.'s "
                        "pipeline; 1: no clipping), then L2-normalised")
    m.add_argument("--manifold-mode", choices=MANIFOLD_MODES, default="token",
                   help="as train.py's; sample and batch compare each image with the others of "
                        "its batch, so they depend on --batch-size and the process count")
# fmt: on


def validate_args(args: argparse.Namespace) -> None:
    try:
        args.timesteps = sorted({float(t) for t in args.timesteps.split(",")})
    except ValueError:
        raise ValueError(f"--timesteps must be numbers, got {args.timesteps!r}") from None
    if not all(0 <= t <= 1 for t in args.timesteps):
        raise ValueError("--timesteps must lie in [0, 1]")
    if args.layers not in ("tap", "all") and not re.fullmatch(r"\d+(,\d+)*", args.layers):
        raise ValueError(f"--layers must be 'tap', 'all' or block numbers, got {args.layers!r}")
    if args.enc_type is not None:
        encoder_weights(args.enc_weights, encoder_list(args.enc_type))
    if not args.metrics and not args.pca_maps:
        raise ValueError("--no-metrics leaves nothing to do: add --pca-maps K")
    if args.pca_maps > args.num_samples:
        raise ValueError(f"--pca-maps {args.pca_maps} exceeds --num-samples {args.num_samples}")
    if args.metrics and not 2 <= args.topk < args.num_samples:
        raise ValueError(
            f"--topk must be >= 2 and below --num-samples ({args.num_samples}): CKNNA keeps "
            "each sample's k nearest neighbours among the others"
        )


def checkpoint_step(path: str, position: int) -> int:
    """The training step in a checkpoint's file name (0400000.pt, 0400000-ema.safetensors), else
    the checkpoint's position on the command line."""
    digits = re.match(r"(\d+)", os.path.basename(path))
    return int(digits.group(1)) if digits else position


def blocks_of(model: AlignedDiffusionTransformer, layers: str) -> list[int]:
    if layers == "tap":
        return [model.encoder_depth]
    if layers == "all":
        return list(range(1, model.depth + 1))
    blocks = sorted({int(k) for k in layers.split(",")})
    if not all(1 <= k <= model.depth for k in blocks):
        raise InputError(f"--layers {layers}: this model has blocks 1..{model.depth}")
    return blocks


def encoder_names(args: argparse.Namespace, model: AlignedDiffusionTransformer) -> list[str]:
    """--enc-type, else the checkpoint's encoders, else (none recorded, or a run trained without
    alignment) DINOv2-B, as REPA compares its unaligned SiT with DINOv2."""
    trained = str(model.checkpoint_args.get("enc_type") or "none")
    enc_type = args.enc_type or ("dinov2-vit-b" if trained.lower() == "none" else trained)
    try:
        return encoder_list(enc_type)
    except ValueError as err:
        raise InputError(f"--enc-type {enc_type}: {err}") from None


def projector_heads(model: AlignedDiffusionTransformer, names: list[str]) -> dict[str, int]:
    """Which projector head predicts which analysed encoder: by the encoder list the checkpoint
    was trained with, else by feature dimension where that is unambiguous."""
    trained = model.checkpoint_args.get("enc_type")
    heads = {}
    if trained:
        trained_names = [n.strip() for n in str(trained).split(",")]
        heads = {n: trained_names.index(n) for n in names if n in trained_names}
    else:
        for k, dim in enumerate(model.z_dims):
            matching = [n for n in names if encoder_dim(n) == dim]
            if len(matching) == 1:
                heads[matching[0]] = k
    return {n: k for n, k in heads.items() if k < len(model.z_dims)}


def open_dataset(path: str, names: list[str]) -> LatentDataset:
    """A prepared dataset with the stored features of `names`, and its pixels if some encoder
    has no stored features there (it then runs on the pixels)."""
    stored = stored_encoders(load_manifest(path))
    use = [n for n in names if n in stored]
    return LatentDataset(path, encoders=use, pixels=len(use) < len(names))


@dataclass
class Sets:
    """The probe's training images and the evaluation images (the probe's test set, CKNNA's
    samples and the projector metrics' images): datasets and their chosen indices."""

    train: LatentDataset
    train_idx: torch.Tensor
    val: LatentDataset
    val_idx: torch.Tensor


def open_sets(args: argparse.Namespace, names: list[str]) -> Sets:
    """--val-data-dir, or a seeded random split of --data-dir (the first --num-samples of a
    random order are held out)."""
    train = open_dataset(args.data_dir, names)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=generator)
    if args.val_data_dir:
        val = open_dataset(args.val_data_dir, names)
        if args.num_samples > len(val):
            raise InputError(f"--num-samples {args.num_samples}: {args.val_data_dir} holds "
                             f"only {len(val)} images")  # fmt: skip
        val_idx = torch.randperm(len(val), generator=generator)[: args.num_samples]
        train_idx = order
    else:
        val = train
        if args.num_samples > len(train) - 2:
            raise InputError(f"--num-samples {args.num_samples} leaves too few probe-training "
                             f"images of the {len(train)} in {args.data_dir}: lower it or give "
                             "--val-data-dir")  # fmt: skip
        val_idx, train_idx = order[: args.num_samples], order[args.num_samples :]
    if args.probe_train_samples:
        train_idx = train_idx[: args.probe_train_samples]
    return Sets(train, train_idx, val, val_idx)


#################################################################################
#                                    Analysis                                   #
#################################################################################

Record = dict[str, Any]


def extraction(
    args: argparse.Namespace,
    model: AlignedDiffusionTransformer,
    dataset: LatentDataset,
    online: dict[str, Any],
    heads: dict[str, int],
) -> Extraction:
    """How to run `model` over `dataset`: stored features where it has them, else `online`'s."""
    return Extraction(
        blocks=blocks_of(model, args.layers),
        timesteps=args.timesteps,
        encoders={n: None if n in dataset.encoders else online[n] for n in args.encoders},
        heads=heads,
        stored=list(dataset.encoders),
        seed=args.seed,
        batch_size=args.batch_size,
        condition=args.condition,
        path_type=args.path_type or model.checkpoint_args.get("path_type", "linear"),
        manifold_mode=args.manifold_mode,
        precision=args.precision,
    )


def metric_jobs(val: Features, train: Features | None, with_encoders: bool) -> list[tuple]:
    """Every (metric, block, t, encoder) to compute; block and t are None for an encoder's own
    probe (REPA Fig. 2a's reference line), computed for the first checkpoint only."""
    jobs: list[tuple] = []
    for block, t in val.hidden:
        if train is not None:
            jobs.append(("probe_top1", block, t, None))
        jobs += [("cknna", block, t, name) for name in val.encoder]
    if train is not None and with_encoders:
        jobs += [("probe_top1", None, None, name) for name in val.encoder]
    return jobs


def run_job(
    job: tuple, val: Features, train: Features | None, args: argparse.Namespace, device: Any
) -> float:
    metric, block, t, name = job
    if metric == "cknna":
        hidden = prepare_features(val.hidden[(block, t)].to(device), args.outlier_quantile)
        target = prepare_features(val.encoder[name].to(device), args.outlier_quantile)
        return cknna(hidden, target, args.topk)
    assert train is not None
    key = (block, t)
    train_x = train.hidden[key] if name is None else train.encoder[name]
    val_x = val.hidden[key] if name is None else val.encoder[name]
    return linear_probe(
        train_x.to(device), train.labels, val_x, val.labels, args.num_classes,
        args.probe_epochs, args.probe_batch_size, args.probe_lr, args.seed,
    )  # fmt: skip


def shared_jobs(jobs: list[tuple], run: Any, desc: str = "metrics") -> list[float]:
    """run(job) for every job, the jobs split over the processes; every process gets all.
    The main process shows its share's progress (each probe trains for --probe-epochs)."""
    rank, world = rank_and_world()
    share = [(i, job) for i, job in enumerate(jobs) if i % world == rank]
    progress = tqdm(share, desc=desc, unit="metric", disable=rank != 0)
    mine = {i: run(job) for i, job in progress}
    if world == 1:
        return [mine[i] for i in range(len(jobs))]
    parts: list[dict[int, float]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    merged = {i: v for part in parts for i, v in part.items()}
    return [merged[i] for i in range(len(jobs))]


def analyse_checkpoint(
    args: argparse.Namespace, path: str, position: int, sets: Sets, online: dict, device: Any
) -> list[Record]:
    """Every metric of one checkpoint, as flat records (see docs/analysis.md)."""
    model = load_pretrained(path, device, args.model)
    heads = projector_heads(model, args.encoders)
    name = os.path.basename(path)
    ex = extraction(args, model, sets.val, online, heads)
    val = extract(model, sets.val, sets.val_idx, ex, device, f"{name} eval")
    train = None
    if args.probe:
        ex = extraction(args, model, sets.train, online, {})
        if position > 0:  # the encoders' own probes are computed once, with the first checkpoint
            ex.encoders = {}
        train = extract(model, sets.train, sets.train_idx, ex, device, f"{name} probe")
    jobs = metric_jobs(val, train, with_encoders=position == 0)
    values = shared_jobs(
        jobs, lambda job: run_job(job, val, train, args, device), f"{name} metrics"
    )
    step = checkpoint_step(path, position)
    base = {"ckpt": path, "step": step, "model": model.model_name}
    records = [
        {**base, "metric": metric, "layer": block, "t": t, "encoder": name, "value": value}
        for (metric, block, t, name), value in zip(jobs, values, strict=True)
    ]
    layer = model.encoder_depth  # the projector's tap
    for kind, per_image in (("token_cos_sim", val.token_cos), ("manifold_distance", val.manifold)):
        for (t, name), values_t in per_image.items():
            records.append({**base, "metric": kind, "layer": layer, "t": t, "encoder": name,
                            "value": float(values_t.mean())})  # fmt: skip
    del model
    return records


def cknna_note(records: list[Record], num_samples: int) -> str | None:
    """Why a CKNNA above 1 is no error, with this run's largest value; None without CKNNA."""
    values = [r["value"] for r in records if r["metric"] == "cknna"]
    if not values:
        return None
    return (
        f"note: CKNNA (largest here {max(values):.3f}, on {num_samples} images) is a ratio of "
        "unbiased HSIC estimates over different neighbour masks, not a correlation: it can "
        "exceed 1, the more so the fewer the images (REPA measures 10,000)"
    )


def checkpoint_labels(paths: list[str]) -> list[str]:
    """A short name per checkpoint for the figures: its file name, unless two share it (two
    runs' 0400000.pt), then its path."""
    names = [os.path.basename(p) for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def pca_of_checkpoints(args: argparse.Namespace, sets: Sets, device: Any) -> dict[str, Maps]:
    """The PCA maps of the first --pca-maps evaluation images for every checkpoint, from the
    same latents and noise (the per-image draws of the metrics)."""
    indices = sets.val_idx[: args.pca_maps]
    batch = [sets.val[int(i)] for i in indices]
    moments = torch.stack([s["moments"] for s in batch])  # (K, 2C, h, w)
    eps, noise = draw_noise(indices, (moments.shape[1] // 2, *moments.shape[2:]), args.seed)
    x, noise = sample_latents(moments, noise=eps).to(device), noise.to(device)
    maps = {}
    for label, path in zip(checkpoint_labels(args.ckpt), args.ckpt, strict=True):
        model = load_pretrained(path, device, args.model)
        labels = torch.stack([s["label"] for s in batch]).to(device)
        y = model.null_labels(len(batch), device) if args.condition == "null" else labels
        path_type = args.path_type or model.checkpoint_args.get("path_type", "linear")
        blocks = blocks_of(model, args.layers)
        maps[label] = feature_maps(model, x, noise, y, args.timesteps, blocks, path_type)
        del model
    return maps


def main(args: argparse.Namespace) -> None:
    rank, world, device = init_distributed()
    first = load_pretrained(args.ckpt[0], "cpu", args.model)
    args.encoders = encoder_names(args, first) if args.metrics else []
    args.num_classes = first.num_classes
    del first
    sets = open_sets(args, args.encoders)
    if min(len(sets.val_idx), len(sets.train_idx)) < world:
        raise InputError(f"too few images for {world} processes: give each at least one")
    weights = encoder_weights(args.enc_weights, args.encoders)
    online = {
        name: load_encoder(name, sets.val.resolution, path, device)
        for name, path in zip(args.encoders, weights, strict=True)
        if name not in sets.val.encoders or name not in sets.train.encoders
    }
    records: list[Record] = []
    for position, path in enumerate(args.ckpt if args.metrics else []):
        records += analyse_checkpoint(args, path, position, sets, online, device)
    maps = pca_of_checkpoints(args, sets, device) if args.pca_maps and rank == 0 else {}
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "debug"}
        settings.update(eval_images=len(sets.val_idx), probe_train_images=len(sets.train_idx))
        note = cknna_note(records, len(sets.val_idx))
        settings["cknna_note"] = note
        write_json(os.path.join(args.output_dir, "results.json"),
                   {"settings": settings, "records": records})  # fmt: skip
        print(f"drawing the plots in {args.output_dir}", flush=True)
        figures = write_plots(records, args.output_dir) if records else []
        if maps:
            blocks = sorted({k for m in maps.values() for (_, k) in m})
            figures += write_pca_figures(maps, blocks, args.timesteps, args.output_dir)
        for written in figures:
            print(f"wrote {written}", flush=True)
        print(f"wrote {os.path.join(args.output_dir, 'results.json')}")
        if note:
            print(note)
    close_distributed()


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

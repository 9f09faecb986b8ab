"""Prepare a training set: centre-cropped images -> SD-VAE moments, DINOv2 features, labels.

    torchrun --nproc_per_node=8 preprocessing/prepare.py \\
        --source imagenet/train --dest data/imagenet256 --vae ema --enc-type dinov2-vit-b

Runs data-parallel (each process encodes a disjoint set of shards; `python preprocessing/
prepare.py ...` is one process), decodes images in DataLoader workers and writes the format
defined in `shards.py`. Re-running the same command resumes: completed shards are skipped, and
the manifest is written once every shard is complete.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shlex
import sys
from datetime import timedelta
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import shards
from frozen import (
    ENCODER_STANDIN,
    ENCODERS,
    VAE_IDS,
    VAE_SCALE,
    encoder_dim,
    latent_geometry,
    load_encoder,
    load_vae,
    parse_encoder_list,
)
from preprocessing.sources import (
    CroppedImages,
    ImageSource,
    SourceError,
    collate_cropped,
    exit_with_parent,
)

logger = logging.getLogger("prepare")

# One barrier waits for the slowest rank to finish all its shards: allow a long wait.
BARRIER_TIMEOUT = timedelta(hours=48)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--source",
        required=True,
        help="ImageFolder directory (one sub-folder per class) or a .zip of one",
    )
    p.add_argument("--dest", required=True, help="output dataset directory")
    p.add_argument(
        "--labels",
        default=None,
        help="labels file instead of class folders: JSON {relative path: label} or\n"
        "text lines 'relative/path label'; unlisted images are excluded",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="centre-crop size in pixels (256 or 512; any multiple of 16)",
    )
    p.add_argument(
        "--vae",
        default="ema",
        help=f"SD-VAE: {' / '.join(VAE_IDS)} ({', '.join(VAE_IDS.values())}), a local\n"
        "diffusers folder, 'pixels' (identity: pixel space, the quickstart's stand-in)\n"
        "or 'tiny-random' (test stand-in)",
    )
    p.add_argument(
        "--moments-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="storage dtype of the VAE posterior [mean, std]",
    )
    p.add_argument(
        "--enc-type",
        default="dinov2-vit-b",
        help="comma-separated DINOv2 encoders: dinov2-vit-{s,b,l,g}, optionally with _reg\n"
        "(e.g. dinov2-vit-b,dinov2-vit-l_reg); 'none' stores no features;\n"
        f"{ENCODER_STANDIN} is the test stand-in",
    )
    p.add_argument(
        "--enc-weights",
        default=None,
        help="comma-separated local weight files, one per --enc-type entry",
    )
    p.add_argument(
        "--save-pixels",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also store the cropped pixels (online-encoder mode, previews)",
    )
    p.add_argument(
        "--pixel-format",
        choices=["png", "npy"],
        default="png",
        help="png: lossless, smaller, one PNG decode per read; npy: raw uint8, fastest",
    )
    p.add_argument("--shard-size", type=int, default=10000, help="source images per shard")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per encoder batch, per process"
    )
    p.add_argument("--num-workers", type=int, default=8, help="decoding workers per process")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the source, check --dest, print the plan; load and write nothing",
    )
    args = p.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 16:
        p.error("--resolution must be a positive multiple of 16 (VAE factor 8, DINOv2 patch 14)")
    if args.shard_size <= 0 or args.batch_size <= 0 or args.num_workers < 0:
        p.error("--shard-size and --batch-size must be positive, --num-workers non-negative")
    try:
        args.encoders = [] if args.enc_type == "none" else parse_encoder_list(args.enc_type)
    except ValueError as err:
        p.error(str(err))
    if len(set(args.encoders)) != len(args.encoders):
        p.error("--enc-type lists an encoder twice")
    args.enc_weights_list = args.enc_weights.split(",") if args.enc_weights else []
    if args.enc_weights_list and len(args.enc_weights_list) != len(args.encoders):
        p.error("--enc-weights needs one path per --enc-type entry")
    return args


#################################################################################
#                              Settings and layout                              #
#################################################################################


def build_modalities(args: argparse.Namespace) -> list[shards.Modality]:
    """What every shard stores, with per-sample shapes derived from the settings alone."""
    r = args.resolution
    grid = r // 16  # DINOv2 sees 224 px per 256 (14-pixel patches): 16×16 tokens at 256 px
    vae_model = VAE_IDS.get(args.vae, args.vae)
    channels, factor = latent_geometry(args.vae)
    modalities = [
        shards.Modality("labels", "int64", ()),
        shards.Modality(
            "moments",
            args.moments_dtype,
            (2 * channels, r // factor, r // factor),
            info=(("model", vae_model), ("layout", "[mean, std] on dim 0"), ("scale", VAE_SCALE)),
        ),
    ]
    for name in args.encoders:
        timm_name = ENCODERS[name].timm_name if name in ENCODERS else name
        info = (("encoder", name), ("model", timm_name), ("input_size", 224 * r // 256))
        modalities.append(
            shards.Modality(
                f"features-{name}", "float16", (grid * grid, encoder_dim(name)), info=info
            )
        )
    if args.save_pixels:
        modalities.append(shards.Modality("pixels", "uint8", (3, r, r), args.pixel_format))
    return modalities


def build_settings(args: argparse.Namespace, source: ImageSource) -> dict[str, Any]:
    """Everything that decides the bytes written. A re-run must match it exactly."""
    return {
        "format_version": shards.FORMAT_VERSION,
        "resolution": args.resolution,
        "crop": "adm-center",
        "vae": args.vae,
        "moments_dtype": args.moments_dtype,
        "encoders": args.encoders,
        "features_dtype": "float16",
        "pixels": args.pixel_format if args.save_pixels else None,
        "shard_size": args.shard_size,
        "labels": "labels-file" if args.labels else "class-folders",
        "num_files": len(source),
        "files_sha256": source.fingerprint(),
    }


def command_line(args: argparse.Namespace) -> str:
    """The single-process command that (re)builds this dataset, for error messages."""
    flags = [
        "--source",
        args.source,
        "--dest",
        args.dest,
        "--resolution",
        str(args.resolution),
        "--vae",
        args.vae,
        "--enc-type",
        args.enc_type,
        "--shard-size",
        str(args.shard_size),
        "--moments-dtype",
        args.moments_dtype,
    ]
    if args.labels:
        flags += ["--labels", args.labels]
    if args.save_pixels:
        flags += ["--save-pixels", "--pixel-format", args.pixel_format]
    return " ".join([shards.PREPARE, *map(shlex.quote, flags)])


def check_destination(dest: str, settings: dict[str, Any]) -> bool:
    """True if `dest` already holds (part of) this dataset, False if it is new; an error if it
    holds something else."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise SystemExit(f"--dest {dest!r} exists and is not a directory")
    path = os.path.join(dest, shards.SETTINGS)
    if not os.path.exists(path):
        if os.path.isdir(dest) and os.listdir(dest):
            raise SystemExit(
                f"--dest {dest!r} is not empty and has no {shards.SETTINGS}: it was "
                "not made by this script. Choose a new or empty directory."
            )
        return False
    differences = shards.settings_mismatch(shards.read_json(path)["settings"], settings)
    if differences:
        raise SystemExit(
            f"--dest {dest!r} was built with other settings:\n  "
            + "\n  ".join(differences)
            + f"\nUse a new --dest, re-run with the original settings to resume, or delete "
            f"{dest!r} to rebuild it."
        )
    return True


def shard_ranges(num_files: int, shard_size: int) -> list[range]:
    return [range(a, min(a + shard_size, num_files)) for a in range(0, num_files, shard_size)]


#################################################################################
#                                    Encoding                                   #
#################################################################################


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Ranks only synchronise at two barriers, so gloo serves on
    GPUs and CPUs alike; each rank computes on the GPU of its local rank when there is one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[Any, list[Any]]:
    vae = load_vae(args.vae, device=device)
    channels, factor = latent_geometry(args.vae)
    if (vae.latent_channels, vae.downsample_factor) != (channels, factor):
        raise SystemExit(
            f"--vae {args.vae!r} is not SD-VAE shaped ({channels} latent channels, factor {factor})"
        )
    weights = args.enc_weights_list or [None] * len(args.encoders)
    encoders = [
        load_encoder(name, args.resolution, weights=w, device=device)
        for name, w in zip(args.encoders, weights, strict=True)
    ]
    for enc in encoders:  # the shard shapes were derived from the settings alone
        if enc.grid_size != args.resolution // 16:
            raise SystemExit(
                f"{enc.name} gives a {enc.grid_size}² token grid at "
                f"{args.resolution} px, expected {args.resolution // 16}²"
            )
    return vae, encoders


@torch.no_grad()
def encode_batch(
    batch: dict[str, Any],
    labels: np.ndarray,
    vae: Any,
    encoders: list[Any],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """One decoded batch -> the rows of every modality (NumPy, storage dtypes)."""
    x = batch["pixels"].to(device, non_blocking=True)  # (B, 3, R, R) uint8
    rows: dict[str, Any] = {
        "labels": labels[batch["index"]],
        "moments": vae.encode_moments(x).cpu().numpy().astype(args.moments_dtype),  # (B, 8, h, w)
    }
    for enc in encoders:
        rows[f"features-{enc.name}"] = enc(x).half().cpu().numpy()  # (B, T, D)
    if args.save_pixels:
        rows["pixels"] = batch["png"] if args.pixel_format == "png" else batch["pixels"].numpy()
    return rows


def encode_shards(
    args: argparse.Namespace,
    source: ImageSource,
    todo: list[int],
    modalities: list[shards.Modality],
    device: torch.device,
    show_progress: bool,
) -> None:
    """Encode and publish the shards `todo`, one after another, through one DataLoader."""
    ranges = shard_ranges(len(source), args.shard_size)
    vae, encoders = load_models(args, device)
    # batches never straddle shards, so each shard is a run of consecutive batches
    batches = [
        list(ranges[s][k : k + args.batch_size])
        for s in todo
        for k in range(0, len(ranges[s]), args.batch_size)
    ]
    images = CroppedImages(
        source, args.resolution, png=args.save_pixels and args.pixel_format == "png"
    )
    loader = DataLoader(
        images,
        batch_sampler=batches,
        num_workers=args.num_workers,
        collate_fn=collate_cropped,
        worker_init_fn=exit_with_parent,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.num_workers else None,
    )
    total = sum(len(ranges[s]) for s in todo)
    bar = tqdm(total=total, unit="img", disable=not show_progress, dynamic_ncols=True)
    writer: shards.ShardWriter | None = None
    queue = iter(todo)
    try:
        for batch in loader:
            if writer is None:
                s = next(queue)
                writer = shards.ShardWriter(args.dest, s, modalities, len(ranges[s]))
            for i, reason in batch["failed"]:
                logger.warning("excluded %s: %s", source.path(i), reason)
                writer.exclude(source.path(i), reason)
            if batch["index"]:
                rows = encode_batch(batch, source.labels, vae, encoders, args, device)
                writer.add(rows, [source.path(i) for i in batch["index"]])
            bar.update(len(batch["index"]) + len(batch["failed"]))
            if writer.seen == writer.capacity:
                writer.publish()
                writer = None
    finally:
        if writer is not None:  # interrupted: leave no temporary files behind if we can
            writer.abort()
        bar.close()


#################################################################################
#                                      Main                                     #
#################################################################################


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build (or finish) the dataset; returns the manifest on rank 0, None elsewhere."""
    rank, world, device = setup_distributed()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    try:
        source = ImageSource(args.source, args.labels)
    except SourceError as err:
        raise SystemExit(str(err)) from None
    settings = build_settings(args, source)
    modalities = build_modalities(args)
    ranges = shard_ranges(len(source), args.shard_size)
    resuming = check_destination(args.dest, settings)
    pending = [
        s
        for s in range(len(ranges))
        if not resuming or shards.completed_shard(args.dest, s, modalities) is None
    ]
    if args.dry_run:
        if rank == 0:
            print_plan(args, source, modalities, ranges, pending, world)
        return None
    # every rank has checked --dest and listed `pending` before anything is written there
    barrier()
    if rank == 0:
        os.makedirs(args.dest, exist_ok=True)
        for stale in glob.glob(os.path.join(args.dest, "*.json.tmp*")):  # a killed JSON write
            os.remove(stale)
        record = {"settings": settings, "command": command_line(args)}
        shards.write_json_atomic(os.path.join(args.dest, shards.SETTINGS), record)
        if pending and os.path.exists(os.path.join(args.dest, shards.MANIFEST)):
            os.remove(os.path.join(args.dest, shards.MANIFEST))  # stale until every shard is back
    mine = pending[rank::world]
    logger.info(
        "%d images, %d shards, %d to do, %d on this rank (%s)",
        len(source),
        len(ranges),
        len(pending),
        len(mine),
        device,
    )
    if mine:
        encode_shards(args, source, mine, modalities, device, show_progress=rank == 0)
    barrier()  # every shard is published
    manifest = None
    if rank == 0:
        manifest = finalize(args, source, settings, modalities, len(ranges))
    if dist.is_initialized():
        dist.destroy_process_group()
    return manifest


def finalize(
    args: argparse.Namespace,
    source: ImageSource,
    settings: dict[str, Any],
    modalities: list[shards.Modality],
    num_shards: int,
) -> dict[str, Any]:
    """Gather the shard sidecars into the manifest (rank 0, after every rank has finished)."""
    header = {
        "source": args.source,
        "command": command_line(args),
        "settings": settings,
        "resolution": args.resolution,
        "num_classes": source.num_classes,
        "classes": source.classes,
        "excluded": [{"path": p, "reason": "not in the --labels file"} for p in source.unlabelled],
    }
    manifest = shards.write_manifest(args.dest, modalities, num_shards, header)
    logger.info(
        "wrote %s: %d samples, %d excluded",
        os.path.join(args.dest, shards.MANIFEST),
        manifest["num_samples"],
        len(manifest["excluded"]),
    )
    return manifest


def print_plan(
    args: argparse.Namespace,
    source: ImageSource,
    modalities: list[shards.Modality],
    ranges: list[range],
    pending: list[int],
    world: int,
) -> None:
    """--dry-run: what would be done, and the disk it needs."""
    print(
        f"source: {args.source}: {len(source)} images, {source.num_classes} classes"
        + (f", {len(source.unlabelled)} not in --labels" if source.unlabelled else "")
    )
    print(
        f"dest:   {args.dest}: {len(ranges)} shards of {args.shard_size}, "
        f"{len(pending)} to encode over {world} process(es)"
    )
    for m in modalities:
        per_sample = int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
        note = " (raw size; PNG is smaller)" if m.encoding == "png" else ""
        print(
            f"  {m.name:<28} {m.dtype:<8} {m.shape!s:<18} "
            f"{per_sample * len(source) / 2**30:9.2f} GiB{note}"
        )


if __name__ == "__main__":
    main(parse_args())

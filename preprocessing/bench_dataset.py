"""Read throughput of `dataset.LatentDataset` through a shuffled DataLoader, as training reads it.

    python preprocessing/bench_dataset.py --data-dir data/imagenet256 --batch-size 256 \\
        --num-workers 8 --encoders dinov2-vit-b
    python preprocessing/bench_dataset.py --synthetic 8000 --batch-size 256 --num-workers 2

`--synthetic N` first writes N random samples of ImageNet-256 shapes (fp32 moments 8×32×32,
DINOv2-B fp16 features 256×768) to a temporary directory. Freshly written data sits in the page
cache, so that figure is the in-memory ceiling; on a real dataset larger than RAM the disk decides.
The design target is ≥ 6,000 samples/s per 8-GPU node (≈ 4× what SiT↓-XL/2 training consumes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.utils.data import DataLoader

import shards
from dataset import LatentDataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="a dataset written by preprocessing/prepare.py")
    source.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="benchmark N random samples of ImageNet-256 shapes",
    )
    p.add_argument(
        "--synthetic-pixels",
        choices=["none", "png", "npy"],
        default="none",
        help="also store pixels in the synthetic dataset",
    )
    p.add_argument(
        "--encoders",
        default=None,
        help="comma-separated encoders to read (default: every stored one; '' none)",
    )
    p.add_argument("--pixels", action="store_true", help="also read pixels")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="timed batches (after 5 warm-up ones)")
    return p.parse_args(argv)


IMAGENET_CLASSES = 1000  # the synthetic data mimics ImageNet 256's shapes and label range


def write_synthetic(root: str, n: int, pixels: str, shard_size: int = 2000) -> None:
    """N random samples of real shapes, written through the same ShardWriter as prepare.py."""
    rng = np.random.default_rng(0)
    modalities = [
        shards.Modality("labels", "int64", ()),
        shards.Modality("moments", "float32", (8, 32, 32)),
        shards.Modality("features-dinov2-vit-b", "float16", (256, 768)),
    ]
    if pixels != "none":
        modalities.append(shards.Modality("pixels", "uint8", (3, 256, 256), pixels))
    ramp = np.linspace(0, 200, 256, dtype=np.float32)
    starts = list(range(0, n, shard_size))
    for s, a in enumerate(starts):
        k = min(shard_size, n - a)
        writer = shards.ShardWriter(root, s, modalities, k)
        for b in range(0, k, 250):
            m = min(250, k - b)
            rows = {
                "labels": rng.integers(0, IMAGENET_CLASSES, m),
                "moments": rng.standard_normal((m, 8, 32, 32), dtype=np.float32),
                "features-dinov2-vit-b": rng.standard_normal(
                    (m, 256, 768), dtype=np.float32
                ).astype(np.float16),
            }
            if pixels != "none":  # smooth images with noise: compress roughly like photographs
                noise = rng.integers(0, 40, (m, 256, 256, 3), dtype=np.uint8)
                images = (ramp[None, :, None, None] + noise).astype(np.uint8)  # (m, H, W, 3)
                rows["pixels"] = (
                    [shards.encode_png(x) for x in images]
                    if pixels == "png"
                    else images.transpose(0, 3, 1, 2)
                )
            writer.add(rows, [f"synthetic/{a + b + j}" for j in range(m)])
        writer.publish()
    header = {"resolution": 256, "num_classes": IMAGENET_CLASSES, "settings": {"synthetic": n}}
    shards.write_manifest(root, modalities, len(starts), header)


def benchmark(ds: LatentDataset, batch_size: int, num_workers: int, batches: int) -> float:
    """Samples per second over `batches` shuffled batches, after a warm-up."""
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    warmup, done = 5, 0
    start = time.perf_counter()
    while done < warmup + batches:
        for _ in loader:
            done += 1
            if done == warmup:
                start = time.perf_counter()
            if done == warmup + batches:
                break
    return batches * batch_size / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> None:
    encoders = None if args.encoders is None else [e for e in args.encoders.split(",") if e]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = args.data_dir
        if root is None:
            root = tmp
            t = time.perf_counter()
            write_synthetic(root, args.synthetic, args.synthetic_pixels)
            print(f"wrote {args.synthetic} synthetic samples in {time.perf_counter() - t:.1f} s")
        ds = LatentDataset(root, encoders=encoders, pixels=args.pixels)
        rate = benchmark(ds, args.batch_size, args.num_workers, args.batches)
    print(
        f"data={args.data_dir or f'synthetic:{args.synthetic}'} samples={len(ds)} "
        f"encoders={ds.encoders} pixels={args.pixels} batch_size={args.batch_size} "
        f"num_workers={args.num_workers} cpus={os.cpu_count()}"
    )
    print(f"{rate:.0f} samples/s")


if __name__ == "__main__":
    main(parse_args())

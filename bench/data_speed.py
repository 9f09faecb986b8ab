"""Data-loading speed against what training consumes: one process's loader, two ways.

    # a preprocessed dataset, 8 GPUs × 4 workers, against a measured training rate per GPU
    python -m bench.data_speed --data-dir data/imagenet256 --train-images-per-sec 130
    # synthetic data of ImageNet-256 shapes (written first; then read from the page cache)
    python -m bench.data_speed --synthetic 4000 --train-images-per-sec 130
    # CPU smoke
    python -m bench.data_speed --synthetic 64 --global-batch 16 --processes 2 --batches 3

`--synthetic N` first writes N random samples of ImageNet-256 shapes (fp32 moments 8×32×32,
DINOv2-B fp16 features 256×768) to a temporary folder through prepare.py's shard writer, in as
many shards as ImageNet's (so a micro-batch of 32 reads from about 28 shards). Freshly
written data sits in the page cache, so that figure is the in-memory ceiling; on a real dataset
larger than RAM the disk decides.

Two readers, each one training process's share of the global batch (--global-batch /
--processes samples per step) with --num-workers workers:

* `LatentDataset` through a shuffled DataLoader (`latent_dataset_rate`), as a plain PyTorch
  training loop would read it;
* `TrainingBatches` through `trainer.training_loader`: what train.py reads, including the
  per-step draws (times, noise, VAE posterior sample, label dropout) of its own samples, read
  with one fancy index per shard into shared memory.

Wall-clock rates depend on what else the machine runs; so this also prints the CPU time of one
micro-batch of `TrainingBatches` in one thread (what a worker spends on it; samples per second
per core), and the CPU time of three ways to make a micro-batch's draws: counter-based (this
code), a seeded torch.Generator per sample (a Python loop over the batch), and the whole global
batch from one generator (as before, on every process).

The ratio is samples/s of the loader over --train-images-per-sec, the images/s of one GPU in
training (bench/train_speed.py prints it); docs/benchmarks.md sets the target at ≥ 4. Each of
the node's training processes has its own loader; this measures one, on a machine whose other
cores are idle, so on a node the CPU cores per process bound it too (cpu_count is printed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import train
from bench.common import report, write_json
from dataset import LatentDataset
from urepa import shards
from urepa.cli import (
    encoder_list,
    nonnegative_int,
    parse_checked,
    positive_float,
    positive_int,
    run_main,
)
from urepa.data_plan import SEED_STEP, BatchPlan, StepDraws, TrainingBatches, derive_seed
from urepa.settings import TrainSettings
from urepa.trainer import training_loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="a dataset written by preprocessing/prepare.py")
    source.add_argument(
        "--synthetic",
        type=positive_int,
        metavar="N",
        help="write N random samples of ImageNet-256 shapes to a temporary folder",
    )
    parser.add_argument(
        "--enc-type",
        "--encoders",
        dest="encoders",
        default="dinov2-vit-b",
        help="stored encoder features to read, comma-separated, as train.py's --enc-type "
        "('' or none: no features)",
    )
    parser.add_argument(
        "--pixels",
        choices=["none", "png", "npy"],
        default="none",
        help="also read the stored pixels (online-encoder mode); with --synthetic, store them "
        "in this format",
    )
    parser.add_argument("--global-batch", type=positive_int, default=256)
    parser.add_argument(
        "--processes", type=positive_int, default=8, help="training processes sharing it"
    )
    parser.add_argument(
        "--num-workers", type=nonnegative_int, default=4, help="loader workers per process"
    )
    parser.add_argument(
        "--batches", type=positive_int, default=30, help="timed batches (after 5 warm-up)"
    )
    parser.add_argument(
        "--train-images-per-sec",
        type=positive_float,
        default=None,
        help="images/s of one GPU in training, for the ratio",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parse_checked(parser, argv, parse_encoders)


def parse_encoders(bench: argparse.Namespace) -> None:
    """--enc-type -> the list of names (ValueError on an unknown one, a usage error)."""
    bench.encoders = encoder_list(bench.encoders) if bench.encoders else []


IMAGENET_CLASSES = 1000  # the synthetic data mimics ImageNet 256's shapes and label range


IMAGENET_SHARDS = 129  # ImageNet's 1,281,167 training images in prepare.py's shards of 10,000


def write_synthetic(root: str, n: int, pixels: str, shard_size: int | None = None) -> None:
    """N random samples of real shapes, written through the same ShardWriter as prepare.py. By
    default in as many shards as ImageNet's, so that a micro-batch reads from as many shards as
    it would there (the loader makes one read per shard and modality)."""
    shard_size = shard_size or -(-n // IMAGENET_SHARDS)
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
    for shard, first in enumerate(starts):
        size = min(shard_size, n - first)
        writer = shards.ShardWriter(root, shard, modalities, size)
        for offset in range(0, size, 250):
            m = min(250, size - offset)
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
            writer.add(rows, [f"synthetic/{first + offset + j}" for j in range(m)])
        writer.publish()
    header = {"resolution": 256, "num_classes": IMAGENET_CLASSES, "settings": {"synthetic": n}}
    shards.write_manifest(root, modalities, len(starts), header)


def latent_dataset_rate(
    dataset: LatentDataset, batch_size: int, num_workers: int, batches: int
) -> float:
    """Samples per second of `dataset` over `batches` shuffled batches, after a warm-up."""
    loader = DataLoader(
        dataset,
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


def training_batches_rate(
    dataset: LatentDataset, bench: argparse.Namespace, encoders: list[str]
) -> float:
    """Samples/s of process 0's micro-batches through train.py's loader."""
    args = train.parse_args([
        "--data-dir", "unused", "--exp-name", "bench", "--batch-size", str(bench.global_batch),
        "--num-workers", str(bench.num_workers), "--max-train-steps", str(10**9),
        "--enc-type", ",".join(encoders) or "none", *([] if encoders else ["--proj-coeff", "0"]),
    ])  # fmt: skip
    plan = BatchPlan(len(dataset), bench.global_batch, 1, bench.processes, 0, args.seed)
    settings = TrainSettings.from_flags(vars(args))
    loader = iter(training_loader(settings, dataset, plan, 0, pin_memory=False))
    warmup = 5
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(bench.batches):
        next(loader)
    return bench.batches * plan.micro_batch / (time.perf_counter() - start)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded, as in a DataLoader worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_seconds(work: Callable[[int], Any], repeats: int) -> float:
    """CPU seconds of this process per call of work(k), k = 1..repeats, after work(0)."""
    with one_thread():
        work(0)
        start = time.process_time()
        for k in range(1, repeats + 1):
            work(k)
        return (time.process_time() - start) / repeats


def draw_times(micro: int, global_batch: int, repeats: int = 10) -> dict[str, float]:
    """CPU ms per micro-batch of `micro` samples (ImageNet-256 latents) for three ways to make
    the per-step draws of its samples, the second micro-batch of a global batch."""
    shape = (4, 32, 32)
    draws = StepDraws()

    def per_sample(step: int) -> None:  # one generator per sample, in a loop over the batch
        for position in range(micro, 2 * micro):
            seed = derive_seed(0, SEED_STEP, step * global_batch + position)
            generator = torch.Generator().manual_seed(seed)
            torch.rand(2, generator=generator)  # t and the dropout decision
            torch.randn(2, *shape, generator=generator)  # noise and the posterior sample

    def whole_batch(step: int) -> None:  # the earlier draws: the global batch, then a slice
        generator = torch.Generator().manual_seed(derive_seed(0, SEED_STEP, step))
        torch.rand(global_batch, generator=generator)
        torch.randn(2, global_batch, *shape, generator=generator)
        torch.rand(global_batch, generator=generator)

    ways = {
        "counter_based": lambda step: draws.draw(0, step, micro, shape, start=micro),
        "per_sample_generators": per_sample,
        "whole_global_batch": whole_batch,
    }
    return {name: 1e3 * cpu_seconds(way, repeats) for name, way in ways.items()}


def training_batches_cpu(dataset: LatentDataset, plan: BatchPlan, batches: int) -> float:
    """CPU seconds per sample of TrainingBatches in one thread, in this process: what a loader
    worker spends (the hand-over to the training process aside)."""
    items = TrainingBatches(dataset, plan, StepDraws())
    return cpu_seconds(items.__getitem__, batches) / plan.micro_batch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    bench = parse_args(argv)
    encoders = bench.encoders
    micro = bench.global_batch // bench.processes
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = bench.data_dir or tmp
        if bench.data_dir is None:
            start = time.perf_counter()
            write_synthetic(root, bench.synthetic, bench.pixels)
            print(
                f"wrote {bench.synthetic} synthetic samples in {time.perf_counter() - start:.1f} s"
            )
        dataset = LatentDataset(root, encoders=encoders, pixels=bench.pixels != "none")
        latent_rate = latent_dataset_rate(dataset, micro, bench.num_workers, bench.batches)
        training_rate = training_batches_rate(dataset, bench, encoders)
        plan = BatchPlan(len(dataset), bench.global_batch, 1, bench.processes, 0)
        cpu_per_sample = training_batches_cpu(dataset, plan, bench.batches)
    draw_ms = draw_times(micro, bench.global_batch)
    result: dict[str, Any] = {
        "data": bench.data_dir or f"synthetic:{bench.synthetic}",
        "samples": len(dataset),
        "encoders": encoders,
        "micro_batch": micro,
        "num_workers": bench.num_workers,
        "cpu_count": os.cpu_count(),
        "latent_dataset_samples_per_sec": latent_rate,
        "training_batches_samples_per_sec": training_rate,
        "training_batches_cpu_ms_per_sample": 1e3 * cpu_per_sample,
        "draws_cpu_ms_per_micro_batch": draw_ms,
        "train_images_per_sec": bench.train_images_per_sec,
    }
    rows: dict[str, Any] = {
        "data": f"{result['data']} ({len(dataset)} samples, features {encoders or 'none'}, "
        f"pixels {bench.pixels})",
        "loader": f"one process: batches of {micro} (global {bench.global_batch} over "
        f"{bench.processes}), {bench.num_workers} workers, {os.cpu_count()} CPUs",
        "latent_dataset_samples_per_sec": f"{latent_rate:.0f} (LatentDataset, shuffled DataLoader)",
        "training_batches_samples_per_sec": f"{training_rate:.0f} (trainer.training_loader)",
        "training_batches_cpu_per_sample": f"{1e3 * cpu_per_sample:.3f} ms of one core "
        f"(one thread, as a worker): {1 / cpu_per_sample:.0f} samples/s per core",
        "draws_cpu_ms_per_micro_batch": f"{draw_ms['counter_based']:.2f} counter-based (this "
        f"code), {draw_ms['per_sample_generators']:.2f} a generator per sample (a Python loop), "
        f"{draw_ms['whole_global_batch']:.2f} the whole global batch (before)",
    }
    if bench.train_images_per_sec:
        for key in ("latent_dataset", "training_batches"):
            ratio = result[f"{key}_samples_per_sec"] / bench.train_images_per_sec
            result[f"{key}_ratio"] = ratio
            rows[f"{key}_ratio"] = f"{ratio:.1f}x what one GPU consumes at " \
                f"{bench.train_images_per_sec:g} images/s"  # fmt: skip
    else:
        rows["ratio"] = "n/a (pass --train-images-per-sec, from bench/train_speed.py)"
    report("data loading", rows)
    write_json(bench.json, result)
    return result


if __name__ == "__main__":
    run_main(main)

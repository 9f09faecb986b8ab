"""Data-loading speed against what training consumes: one process's loader, two ways.

    # a preprocessed dataset, 8 GPUs × 4 workers, against a measured training rate per GPU
    python -m bench.data_speed --data-dir data/imagenet256 --train-images-per-sec 130
    # synthetic data of ImageNet-256 shapes (written first; then read from the page cache)
    python -m bench.data_speed --synthetic 4000 --train-images-per-sec 130
    # CPU smoke
    python -m bench.data_speed --synthetic 64 --global-batch 16 --processes 2 --batches 3

Two readers, each one training process's share of the global batch (--global-batch /
--processes samples per step) with --num-workers workers:

* `LatentDataset` through a shuffled DataLoader: preprocessing/bench_dataset.py's `benchmark`;
* `TrainingBatches` through `trainer.training_loader`: what train.py reads, including the
  per-step draws (times, noise, VAE posterior sample, label dropout) made for the whole global
  batch.

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
from typing import Any

import train
from bench.common import report, write_json
from data_plan import BatchPlan
from dataset import LatentDataset
from preprocessing.bench_dataset import benchmark, write_synthetic
from trainer import training_loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="a dataset written by preprocessing/prepare.py")
    source.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="write N random samples of ImageNet-256 shapes to a temporary folder",
    )
    parser.add_argument(
        "--encoders",
        default="dinov2-vit-b",
        help="stored encoder features to read, comma-separated ('' for none)",
    )
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--processes", type=int, default=8, help="training processes sharing it")
    parser.add_argument("--num-workers", type=int, default=4, help="loader workers per process")
    parser.add_argument("--batches", type=int, default=30, help="timed batches (after 5 warm-up)")
    parser.add_argument(
        "--train-images-per-sec",
        type=float,
        default=None,
        help="images/s of one GPU in training, for the ratio",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)  # fmt: skip


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
    loader = iter(training_loader(args, dataset, plan, 0, pin_memory=False))
    warmup = 5
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(bench.batches):
        next(loader)
    return bench.batches * plan.micro_batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    bench = parse_args(argv)
    encoders = [e for e in bench.encoders.split(",") if e]
    micro = bench.global_batch // bench.processes
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = bench.data_dir or tmp
        if bench.data_dir is None:
            start = time.perf_counter()
            write_synthetic(root, bench.synthetic, "none")
            print(
                f"wrote {bench.synthetic} synthetic samples in {time.perf_counter() - start:.1f} s"
            )
        dataset = LatentDataset(root, encoders=encoders)
        latent_rate = benchmark(dataset, micro, bench.num_workers, bench.batches)
        training_rate = training_batches_rate(dataset, bench, encoders)
    result: dict[str, Any] = {
        "data": bench.data_dir or f"synthetic:{bench.synthetic}",
        "samples": len(dataset),
        "encoders": encoders,
        "micro_batch": micro,
        "num_workers": bench.num_workers,
        "cpu_count": os.cpu_count(),
        "latent_dataset_samples_per_sec": latent_rate,
        "training_batches_samples_per_sec": training_rate,
        "train_images_per_sec": bench.train_images_per_sec,
    }
    rows: dict[str, Any] = {
        "data": f"{result['data']} ({len(dataset)} samples, features {encoders or 'none'})",
        "loader": f"one process: batches of {micro} (global {bench.global_batch} over "
        f"{bench.processes}), {bench.num_workers} workers, {os.cpu_count()} CPUs",
        "latent_dataset_samples_per_sec": f"{latent_rate:.0f} (preprocessing/bench_dataset.py)",
        "training_batches_samples_per_sec": f"{training_rate:.0f} (trainer.training_loader)",
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
    main()

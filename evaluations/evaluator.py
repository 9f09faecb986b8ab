"""ADM's FID, sFID, Inception Score, precision and recall, without TensorFlow.

    python evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz --json metrics.json

Both files hold uint8 N×H×W×3 images as `arr_0`; the reference also holds its statistics
(`mu`, `sigma`, `mu_s`, `sigma_s`; build one with `make_reference.py`). The conventions are those
of OpenAI's guided-diffusion `evaluations/evaluator.py`; see `inception.py` and `metrics.py`.
Both files are checked (`inputs.py`) before the network is loaded; a failure is one line, exit 1.
`--fd-dinov2` adds FD-DINOv2 (`dinov2.py`), against the reference's `mu_dinov2, sigma_dinov2`
(`make_reference.py --fd-dinov2`) or, where it has none, its `arr_0` images.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python evaluations/evaluator.py`: find the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluations.arrays import ImageArray, open_image_array
from evaluations.commands import add_debug_arg, run_main
from evaluations.dinov2 import (
    DinoV2Features,
    add_dinov2_args,
    dinov2_from_args,
    dinov2_statistics,
)
from evaluations.inception import (
    Features,
    InceptionFeatures,
    TinyInceptionForTests,
    add_inception_args,
    extract_features,
    inception_from_args,
    tf32_disabled,
)
from evaluations.inputs import (
    ReferenceStatistics,
    check_images,
    check_output_folder,
    load_dinov2_statistics,
    load_reference_statistics,
)
from evaluations.metrics import (
    frechet_distance,
    inception_score,
    precision_recall,
)

PAPER_NUM_SAMPLES = 50_000  # what published FIDs use; FID is biased upwards with fewer
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BLOCK_SIZE = 10_000


def check_inputs(ref_path: str | Path, sample_path: str | Path) -> ReferenceStatistics:
    """The reference's statistics, once every array of both files is checked (`inputs.py`)."""
    ref_stats = load_reference_statistics(ref_path)
    for path in (ref_path, sample_path):
        check_images(path, PR_NEIGHBOURS + 1, f"precision/recall with k={PR_NEIGHBOURS}")
    return ref_stats


def check_sample_count(samples: ImageArray) -> None:
    """Warn when there are fewer samples than the 50K that published FIDs use."""
    if len(samples) < PAPER_NUM_SAMPLES:
        warnings.warn(
            f"{samples.path} holds {len(samples)} samples, fewer than {PAPER_NUM_SAMPLES}: FID and "
            "sFID are biased upwards with fewer samples (the bias shrinks roughly like 1/N), so "
            "these numbers are not comparable with 50K-sample numbers in papers",
            stacklevel=2,
        )


def check_resolutions(ref: ImageArray, samples: ImageArray) -> None:
    """Warn when the samples' H×W differ from the reference images'."""
    if ref.shape[1:3] != samples.shape[1:3]:
        warnings.warn(
            f"samples are {samples.shape[1]}×{samples.shape[2]} but the reference images "
            f"are {ref.shape[1]}×{ref.shape[2]}: is this the right reference?",
            stacklevel=2,
        )


def evaluate(
    ref_stats: ReferenceStatistics,
    ref_path: str | Path,
    sample_path: str | Path,
    net: InceptionFeatures,
    *,
    batch_size: int = 64,
    dinov2: DinoV2Features | None = None,
) -> dict[str, float]:
    """The five metrics (and FD-DINOv2 with `dinov2`) and `num_samples` of `sample_path` against
    `ref_path`, whose statistics `check_inputs` returned."""
    with (
        tf32_disabled(),
        open_image_array(ref_path) as ref_images,
        open_image_array(sample_path) as samples,
    ):
        check_sample_count(samples)
        check_resolutions(ref_images, samples)
        ref = extract_features(
            net, ref_images.batches(batch_size), len(ref_images), desc="reference"
        )
        sample = extract_features(net, samples.batches(batch_size), len(samples), desc="samples")
        # extract_features keeps the pool features by default (keep_pool=True).
        assert ref.pool is not None
        metrics = metrics_from_features(ref_stats, ref.pool, sample, net)
    if dinov2 is not None:
        metrics["fd_dinov2"] = fd_dinov2(ref_path, sample_path, dinov2, batch_size)
    return metrics


def metrics_from_features(
    ref_stats: ReferenceStatistics,
    ref_pool: np.ndarray,
    sample: Features,
    net: InceptionFeatures | TinyInceptionForTests,
) -> dict[str, float]:
    """ADM's five metrics from the samples' features (pool features kept) and the reference's
    statistics and (N, 2048) pool features; shared with the evaluation during training."""
    assert sample.pool is not None, "precision/recall and IS need the samples' pool features"
    with tf32_disabled():
        probs = net.class_probabilities(torch.from_numpy(sample.pool).to(net.device))
        precision, recall = precision_recall(
            ref_pool, sample.pool, k=PR_NEIGHBOURS, block_size=PR_BLOCK_SIZE, device=net.device
        )
    return {
        "inception_score": inception_score(probs.cpu().numpy(), IS_SPLIT_SIZE),
        "fid": frechet_distance(sample.mu, sample.sigma, ref_stats.mu, ref_stats.sigma),
        "sfid": frechet_distance(sample.mu_s, sample.sigma_s, ref_stats.mu_s, ref_stats.sigma_s),
        "precision": precision,
        "recall": recall,
        "num_samples": len(sample.pool),
    }


def reference_dinov2_statistics(
    ref_path: str | Path, net: DinoV2Features, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's stored DINOv2 statistics, else those of its `arr_0` images (ADM's
    reference batches store none: their 10K images stand in for the full training set)."""
    stored = load_dinov2_statistics(ref_path, net.feature_dim)
    if stored is not None:
        return stored
    warnings.warn(
        f"{ref_path} holds no DINOv2 statistics: FD-DINOv2 is measured against its arr_0 images "
        "only (build the reference with make_reference.py --fd-dinov2 for all of them)",
        stacklevel=2,
    )
    return array_dinov2_statistics(ref_path, net, batch_size, "reference")


def array_dinov2_statistics(
    path: str | Path, net: DinoV2Features, batch_size: int, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """DINOv2 mean and covariance of the `arr_0` images of an .npz (or .npy) file."""
    with open_image_array(path) as images:
        return dinov2_statistics(net, images.batches(batch_size), len(images), desc)


def fd_dinov2(
    ref_path: str | Path, sample_path: str | Path, net: DinoV2Features, batch_size: int
) -> float:
    """FD-DINOv2 of `sample_path` against `ref_path` (the samples first, as FID's order); both
    sets' features in full float32."""
    with tf32_disabled():
        mu_ref, sigma_ref = reference_dinov2_statistics(ref_path, net, batch_size)
        mu, sigma = array_dinov2_statistics(sample_path, net, batch_size, "samples")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "ref_batch", help="reference .npz: arr_0 images and mu, sigma, mu_s, sigma_s"
    )
    parser.add_argument("sample_batch", help=".npz (or .npy) of uint8 N×H×W×3 samples in arr_0")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")
    add_inception_args(parser)
    add_dinov2_args(parser)
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    ref_stats = check_inputs(args.ref_batch, args.sample_batch)  # before the network loads
    if args.json:
        check_output_folder(args.json, "--json")
    net = inception_from_args(args)
    dinov2 = dinov2_from_args(args, net.device)
    metrics = evaluate(
        ref_stats, args.ref_batch, args.sample_batch, net, batch_size=args.batch_size,
        dinov2=dinov2,
    )  # fmt: skip
    for name, label in [
        ("inception_score", "Inception Score"),
        ("fid", "FID"),
        ("sfid", "sFID"),
        ("precision", "Precision"),
        ("recall", "Recall"),
        ("fd_dinov2", "FD-DINOv2"),
    ]:
        if name in metrics:
            print(f"{label}: {metrics[name]}")
    if args.json:
        record = {**metrics, "ref_batch": args.ref_batch, "sample_batch": args.sample_batch}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    run_main(main)

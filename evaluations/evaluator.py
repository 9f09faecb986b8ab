"""ADM's FID, sFID, Inception Score, precision and recall, without TensorFlow.

    python evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz --json metrics.json

Both files hold uint8 N×H×W×3 images as `arr_0`; the reference also holds its statistics
(`mu`, `sigma`, `mu_s`, `sigma_s`; build one with `make_reference.py`). The conventions are those
of OpenAI's guided-diffusion `evaluations/evaluator.py`; see `inception.py` and `metrics.py`.
Both files are checked (`inputs.py`) before the network is loaded; a failure is one line, exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python evaluations/evaluator.py`: find the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluations.arrays import ImageArray, open_image_array
from evaluations.commands import add_debug_arg, run_main
from evaluations.inception import (
    InceptionFeatures,
    add_inception_args,
    extract_features,
    inception_from_args,
    tf32_disabled,
)
from evaluations.inputs import (
    ReferenceStatistics,
    check_images,
    check_output_folder,
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
) -> dict[str, float]:
    """The five metrics and `num_samples` of `sample_path` against `ref_path`, whose statistics
    `check_inputs` returned."""
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
        assert ref.pool is not None and sample.pool is not None
        probs = net.class_probabilities(torch.from_numpy(sample.pool).to(net.device)).cpu().numpy()
        precision, recall = precision_recall(
            ref.pool, sample.pool, k=PR_NEIGHBOURS, block_size=PR_BLOCK_SIZE, device=net.device
        )
    return {
        "inception_score": inception_score(probs, IS_SPLIT_SIZE),
        "fid": frechet_distance(sample.mu, sample.sigma, ref_stats.mu, ref_stats.sigma),
        "sfid": frechet_distance(sample.mu_s, sample.sigma_s, ref_stats.mu_s, ref_stats.sigma_s),
        "precision": precision,
        "recall": recall,
        "num_samples": len(sample.pool),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "ref_batch", help="reference .npz: arr_0 images and mu, sigma, mu_s, sigma_s"
    )
    parser.add_argument("sample_batch", help=".npz (or .npy) of uint8 N×H×W×3 samples in arr_0")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")
    add_inception_args(parser)
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    ref_stats = check_inputs(args.ref_batch, args.sample_batch)  # before the network loads
    if args.json:
        check_output_folder(args.json, "--json")
    net = inception_from_args(args)
    metrics = evaluate(
        ref_stats, args.ref_batch, args.sample_batch, net, batch_size=args.batch_size
    )
    for name, label in [
        ("inception_score", "Inception Score"),
        ("fid", "FID"),
        ("sfid", "sFID"),
        ("precision", "Precision"),
        ("recall", "Recall"),
    ]:
        print(f"{label}: {metrics[name]}")
    if args.json:
        record = {**metrics, "ref_batch": args.ref_batch, "sample_batch": args.sample_batch}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    run_main(main)

"""Build an ADM-style reference batch, for datasets other than ImageNet.

    python evaluations/make_reference.py --source DIR_OR_NPZ --out ref.npz --resolution 256

The output has the layout of ADM's VIRTUAL_imagenet256_labeled.npz: `mu, sigma` (pool features)
and `mu_s, sigma_s` (sFID features) over every source image, and `arr_0`, a seeded random subset of
10K of them (uint8 N×H×W×3, in source order) for precision/recall; with `--fd-dinov2`, also
`mu_dinov2, sigma_dinov2`, the DINOv2 statistics of every source image (for FD-DINOv2). Images in
a folder are centre-cropped to the resolution as ADM prepares ImageNet; an `.npz`'s `arr_0` is
used as it is. The source and the output folder are checked before the network is loaded; a
failure is one line, exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as `python evaluations/make_reference.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluations.arrays import open_image_array
from evaluations.commands import (
    InputError,
    add_debug_arg,
    nonnegative_int,
    positive_int,
    run_main,
)
from evaluations.dinov2 import (
    DinoV2Features,
    add_dinov2_args,
    dinov2_from_args,
    dinov2_statistics,
)
from evaluations.inception import (
    InceptionFeatures,
    add_inception_args,
    extract_features,
    inception_from_args,
    tf32_disabled,
)
from evaluations.inputs import DINOV2_KEYS, check_images, check_output_folder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
MIN_IMAGES = 2  # for a covariance


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: box-halve while ≥ 2× too big, bicubic-scale the short side, crop.

    `image` is RGB; the result is uint8 (size, size, 3).
    """
    while min(image.size) >= 2 * size:  # box steps first: a cheap, alias-free large reduction
        width, height = image.size
        image = image.resize((width // 2, height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    width, height = image.size
    image = image.resize(
        (round(width * scale), round(height * scale)), resample=Image.Resampling.BICUBIC
    )
    pixels = np.asarray(image)  # (H, W, 3), short side == size
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def list_images(folder: str | Path) -> list[Path]:
    """Image files anywhere below `folder`, in a fixed (sorted) order; at least MIN_IMAGES."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < MIN_IMAGES:
        raise InputError(
            f"{len(files)} images ({', '.join(sorted(IMAGE_SUFFIXES))}) below {folder}; "
            f"the statistics need at least {MIN_IMAGES}"
        )
    return files


def check_source(source: str | Path) -> None:
    """A folder with images, or an `.npz`/`.npy` of uint8 N×H×W×3 images in [0, 255]."""
    if Path(source).is_dir():
        list_images(source)
    else:
        check_images(source, MIN_IMAGES, "a covariance")


class ImageFolder(torch.utils.data.Dataset[np.ndarray]):
    """Centre-cropped uint8 (size, size, 3) RGB images from a list of files."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        with Image.open(self.files[index]) as image:
            return center_crop(image.convert("RGB"), self.size)


@contextmanager
def open_source(
    source: str | Path, resolution: int, batch_size: int, workers: int
) -> Iterator[tuple[Iterable[np.ndarray], int]]:
    """uint8 (B, H, W, 3) batches from a folder or an `.npz`, and how many images there are."""
    if Path(source).is_dir():
        files = list_images(source)
        loader = torch.utils.data.DataLoader(
            ImageFolder(files, resolution), batch_size, num_workers=workers, collate_fn=np.stack
        )
        yield loader, len(files)
    else:
        with open_image_array(source) as array:
            yield array.batches(batch_size), len(array)


def collect_subset(
    batches: Iterable[np.ndarray], keep: np.ndarray, kept: list[np.ndarray]
) -> Iterator[np.ndarray]:
    """Pass the batches on, copying the images at the sorted indices `keep` into `kept`."""
    start = 0
    for batch in batches:
        first, last = np.searchsorted(keep, [start, start + len(batch)])
        kept.append(batch[keep[first:last] - start])
        start += len(batch)
        yield batch


def make_reference(
    source: str | Path,
    out: str | Path,
    net: InceptionFeatures,
    *,
    resolution: int = 256,
    subset_size: int = 10_000,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    dinov2: DinoV2Features | None = None,
) -> int:
    """Write `out` (statistics of all images in `source`, a random subset; with `dinov2` also
    `mu_dinov2, sigma_dinov2` of all images, in a second pass); return the count."""
    kept: list[np.ndarray] = []
    with tf32_disabled(), open_source(source, resolution, batch_size, workers) as (batches, count):
        keep = np.sort(
            np.random.default_rng(seed).choice(count, min(subset_size, count), replace=False)
        )
        features = extract_features(
            net, collect_subset(batches, keep, kept), count, keep_pool=False, desc="reference"
        )
    extra: dict[str, Any] = {}
    if dinov2 is not None:
        with open_source(source, resolution, batch_size, workers) as (batches, count):
            extra = dict(zip(DINOV2_KEYS, dinov2_statistics(dinov2, batches, count), strict=True))
    # Uncompressed, so that the evaluator can memory-map arr_0; written whole, then moved in place.
    partial = Path(f"{out}.partial")
    with open(partial, "wb") as f:
        np.savez(
            f,
            arr_0=np.concatenate(kept),
            mu=features.mu,
            sigma=features.sigma,
            mu_s=features.mu_s,
            sigma_s=features.sigma_s,
            **extra,
        )
    os.replace(partial, out)
    return count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        required=True,
        help="folder of images (searched recursively) or .npz with uint8 arr_0",
    )
    parser.add_argument("--out", required=True, help="reference .npz to write")
    parser.add_argument(
        "--resolution",
        type=positive_int,
        default=256,
        help="centre-crop size for folder images (an .npz is used as it is)",
    )
    parser.add_argument(
        "--subset-size",
        type=positive_int,
        default=10_000,
        help="images kept as arr_0 for precision/recall (ADM: 10000)",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the subset choice")
    parser.add_argument(
        "--workers", type=nonnegative_int, default=4, help="image-decoding processes (folders)"
    )
    add_inception_args(parser)
    add_dinov2_args(parser)
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_source(args.source)  # before the network loads
    check_output_folder(args.out, "--out")
    net = inception_from_args(args)
    count = make_reference(
        args.source,
        args.out,
        net,
        resolution=args.resolution,
        subset_size=args.subset_size,
        seed=args.seed,
        batch_size=args.batch_size,
        workers=args.workers,
        dinov2=dinov2_from_args(args, net.device),
    )
    print(
        f"wrote {args.out}: statistics of {count} images, "
        f"{min(count, args.subset_size)} of them as arr_0"
    )


if __name__ == "__main__":
    run_main(main)

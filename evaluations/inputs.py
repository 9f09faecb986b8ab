"""Every array the commands read, checked before any network is loaded.

A reference `.npz` holds ADM's statistics (`mu`, `sigma` of the 2048 pool features; `mu_s`,
`sigma_s` of the 2023 sFID features) and images (`arr_0`); a samples file holds images. The metrics
trust these numbers, and broken ones do not fail by themselves: a NaN mean prints `FID: nan`, a NaN
covariance can keep `scipy.linalg.sqrtm` busy for many minutes. So each statistic must be present,
floating point, of ADM's size and finite, and each covariance symmetric; each image array uint8
N×H×W×3 in [0, 255], with as many images as the metrics need. A failed check is one line naming
the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluations.arrays import CORRUPT_FILE_ERRORS, open_image_array, reading
from evaluations.commands import InputError
from evaluations.inception import POOL_DIM, SPATIAL_DIM
from evaluations.metrics import check_finite

# The statistics of ADM's reference batches and their shapes: pool (FID) and spatial (sFID).
STATISTICS = {
    "mu": (POOL_DIM,),
    "sigma": (POOL_DIM, POOL_DIM),
    "mu_s": (SPATIAL_DIM,),
    "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
}
DINOV2_KEYS = ("mu_dinov2", "sigma_dinov2")  # FD-DINOv2's reference statistics, when present
# np.cov's result is symmetric up to rounding (about 1e-16 of its largest entry); a matrix off by
# more than this fraction of its largest entry is not a covariance.
SYMMETRY_TOLERANCE = 1e-6
# Images read before the network loads, to check the pixel range.
PEEK_IMAGES = 16
REBUILD = "rebuild it with make_reference.py, or download ADM's reference batch again"


@dataclass
class ReferenceStatistics:
    """A reference's float64 Gaussian statistics of the pool and the sFID features."""

    mu: np.ndarray  # (2048,) pool features
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray  # (2023,) sFID features
    sigma_s: np.ndarray  # (2023, 2023)


def load_reference_statistics(
    path: str | Path, pool_dim: int = POOL_DIM, spatial_dim: int = SPATIAL_DIM
) -> ReferenceStatistics:
    """The reference's `mu, sigma, mu_s, sigma_s` as float64, each checked (module docstring);
    other feature sizes than ADM's are those of the tests' stand-in network."""
    sizes = {"mu": (pool_dim,), "sigma": (pool_dim, pool_dim), "mu_s": (spatial_dim,),
             "sigma_s": (spatial_dim, spatial_dim)}  # fmt: skip
    with reading(path):
        ref = np.load(path)
    if not isinstance(ref, np.lib.npyio.NpzFile):
        raise InputError(f"{path} holds one array, not a reference batch (.npz); {REBUILD}")
    with ref:
        missing = [key for key in STATISTICS if key not in ref.files]
        if missing:
            raise InputError(
                f"{path} has no reference statistics {missing} (it holds {ref.files}). Use ADM's "
                "reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or build one with "
                "`python evaluations/make_reference.py --source IMAGES --out ref.npz`"
            )
        return ReferenceStatistics(
            **{key: read_statistic(ref, path, key, sizes[key]) for key in STATISTICS}
        )


def read_statistic(
    ref: np.lib.npyio.NpzFile,
    path: str | Path,
    key: str,
    expected: tuple[int, ...],
) -> np.ndarray:
    """`ref[key]` as float64, checked: floating point, of shape `expected`, finite, symmetric
    if 2-D."""
    try:
        value = ref[key]
    except CORRUPT_FILE_ERRORS as err:  # also an object array, which would need pickle
        raise InputError(f"{path}: cannot read {key} ({err}); {REBUILD}") from err
    if not np.issubdtype(value.dtype, np.floating):
        raise InputError(
            f"{path}: {key} has dtype {value.dtype}, but statistics are real floating-point "
            f"numbers (ADM's are float64); {REBUILD}"
        )
    if value.shape != expected:
        raise InputError(
            f"{path}: {key} has shape {value.shape}, expected {expected}; "
            "was it made with another feature extractor (e.g. pytorch-fid)?"
        )
    check_finite(value, f"{path}: {key}", REBUILD)
    value = value.astype(np.float64)
    if value.ndim == 2:
        asymmetry, largest = np.abs(value - value.T).max(), np.abs(value).max()
        if asymmetry > SYMMETRY_TOLERANCE * largest:
            raise InputError(
                f"{path}: {key} is not symmetric (|{key} - {key}ᵀ| up to {asymmetry:.3g}, "
                f"entries up to {largest:.3g}), so it is not a covariance; {REBUILD}"
            )
    return value


def check_images(path: str | Path, min_images: int, needed_by: str) -> None:
    """`path`'s `arr_0`: uint8 N×H×W×3 (from its header), at least `min_images` of them (which
    `needed_by` needs), and pixels in [0, 255] in the first few."""
    with open_image_array(path) as images:
        if len(images) < min_images:
            raise InputError(
                f"{path} holds {len(images)} images, fewer than the {min_images} that "
                f"{needed_by} needs"
            )
        next(images.batches(PEEK_IMAGES))


def check_output_folder(path: str | Path, flag: str) -> None:
    """Refuse an output file whose folder does not exist, before hours of work are spent."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: the folder {folder} does not exist; create it first")


def load_dinov2_statistics(
    path: str | Path, feature_dim: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference's DINOv2 `mu_dinov2, sigma_dinov2` (make_reference.py --fd-dinov2 writes
    them), checked; None if it has none (ADM's reference batches have none)."""
    with reading(path), np.load(path) as ref:
        if DINOV2_KEYS[0] not in ref.files:
            return None
        mu, sigma = DINOV2_KEYS
        return (
            read_statistic(ref, path, mu, (feature_dim,)),
            read_statistic(ref, path, sigma, (feature_dim, feature_dim)),
        )

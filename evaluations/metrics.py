"""FID/sFID, Inception Score and improved precision/recall, computed the way ADM's evaluator does.

Each function states the ADM convention it follows; the evaluator, not these functions, decides
which features they see (see `inception.py`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg, special

from evaluations.commands import InputError


class GaussianAccumulator:
    """Running mean and unbiased covariance of feature rows, accumulated in float64.

    ADM computes `np.mean(x, 0)` and `np.cov(x, rowvar=False)` on float32 features. np.cov works
    in float64, and the covariance here matches it to float64 rounding. The mean does not match
    np.mean's: on float32 rows np.mean sums in float32, row after row, which at 50K images is off
    from the exact mean by about 2e-6 relative (up to 1e-5), while the mean here is float64. FID
    therefore differs from ADM's around the sixth decimal: by 4e-6 to 1e-5 at FID 8.2 on
    synthetic 50K x 2048 features, far below FID's sampling noise.

    Streaming lets a reference be built from more images than fit in memory as features. The rows
    are shifted by the first batch's mean before summing so that E[xxᵀ] − μμᵀ does not cancel.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # (D,)
        self.total: torch.Tensor | None = None  # (D,) sum of shifted rows
        self.outer: torch.Tensor | None = None  # (D, D) sum of shifted outer products

    def update(self, rows: torch.Tensor) -> None:
        """Add a (B, D) batch of feature rows."""
        rows = rows.to(torch.float64)
        if self.shift is None:
            self.shift = rows.mean(0)
            self.total = torch.zeros_like(self.shift)
            self.outer = torch.zeros(
                rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device
            )
        # The three are set together above, so after the first batch none of them is None.
        assert self.total is not None and self.outer is not None
        centred = rows - self.shift
        self.count += len(rows)
        self.total += centred.sum(0)
        self.outer += centred.T @ centred

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(D,) mean and (D, D) unbiased covariance, as float64 numpy arrays."""
        if self.count < 2:
            raise InputError(f"a covariance needs at least 2 images, got {self.count}")
        # A count of 2 or more means update() has run and set all three.
        assert self.shift is not None and self.total is not None and self.outer is not None
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return (self.shift + mean).cpu().numpy(), cov.cpu().numpy()


def check_finite(value: np.ndarray, what: str, advice: str) -> None:
    """Refuse NaN and infinite entries: they would make a metric NaN, or hang sqrtm."""
    bad = np.size(value) - np.count_nonzero(np.isfinite(value))
    if bad:
        raise InputError(f"{what} holds {bad} NaN or infinite values; {advice}")


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), with ADM's `scipy.linalg.sqrtm` and its retry.

    `mu1`, `mu2` are (D,) means, `sigma1`, `sigma2` (D, D) covariances.

    ADM passes the samples as (mu1, sigma1) and the reference as (mu2, sigma2); sqrtm(Σ₁Σ₂) is not
    symmetric in the two, and swapping them changes the last digits, so keep that order.

    Refuses rather than return NaN or hang: non-finite statistics (a NaN covariance has kept
    sqrtm busy for 16 minutes), a product that overflows, and a square root that is still not
    finite after ADM's retry (where ADM returns NaN). Finite, valid input gets ADM's numerics.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(
            f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        check_finite(value, f"FID: {name}", "check the images and features it was computed from")
    diff = mu1 - mu2
    covmean = _sqrtm(_finite_product(sigma1, sigma2))
    if not np.isfinite(covmean).all():
        # A (nearly) singular product, e.g. fewer images than feature dimensions: ADM then adds
        # eps to both diagonals.
        warnings.warn(
            f"FID: singular product of covariances; adding {eps} to their diagonals", stacklevel=2
        )
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():  # where ADM returned NaN
        raise InputError(
            f"FID: sqrtm(sigma1 @ sigma2) is not finite even with {eps} added to the diagonals; "
            "the covariances are degenerate (too few images, or all alike?)"
        )
    if np.iscomplexobj(covmean):
        # Rounding leaves a tiny imaginary part; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise InputError(
                f"FID: imaginary component {np.abs(covmean.imag).max():.3g} in "
                "sqrtm(sigma1 @ sigma2); are both covariances valid?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _finite_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
        product = sigma1 @ sigma2
    if not np.isfinite(product).all():
        raise InputError(
            f"FID: sigma1 @ sigma2 overflows (entries up to {np.abs(sigma1).max():.3g} and "
            f"{np.abs(sigma2).max():.3g}); these are not covariances of Inception features"
        )
    return product


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # Recent SciPy warns for singular input; the finiteness checks are the real test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """exp E[KL(p(y|x) ‖ p(y))], averaged over contiguous splits of `split_size` rows (ADM).

    `probs` is (N, classes). No shuffling: rows are split in file order, the last split keeps the
    remainder. Exactly-zero probabilities count as 0·log 0 = 0 (softmax outputs never are).
    """
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]  # (S, classes)
        marginal = part.mean(0, keepdims=True)  # (1, classes)
        kl = special.xlogy(part, part) - special.xlogy(part, marginal)  # (S, classes)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _round_to_half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _squared_distances_fp16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's float16 distances: ‖u‖² − 2u·v + ‖v‖², every step rounded to float16.

    Computed in float32 with explicit rounding, which is what a GPU's float16 matmul does
    (float32 accumulation), and is fast and identical on a CPU, where float16 matmuls are slow.
    Anything beyond float16's range becomes inf, as in TensorFlow.
    """
    u, v = _round_to_half(u), _round_to_half(v)
    norm_u = _round_to_half(_round_to_half(u * u).sum(1))  # (Nu,)
    norm_v = _round_to_half(_round_to_half(v * v).sum(1))  # (Nv,)
    twice_dot = _round_to_half(2 * _round_to_half(u @ v.T))  # (Nu, Nv)
    partial = _round_to_half(norm_u[:, None] - twice_dot)
    return _round_to_half(partial + norm_v[None, :]).clamp_min(0)


def _squared_distances_fp32(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u, norm_v = (u * u).sum(1), (v * v).sum(1)
    return (norm_u[:, None] - 2 * (u @ v.T) + norm_v[None, :]).clamp_min(0)


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(Nu, Nv) squared Euclidean distances between float32 rows, as ADM's `DistanceBlock`.

    ADM computes each block in float16 and recomputes it in float32 only if a value is not finite;
    precision and recall depend on that rounding at the ≤ boundaries, so it is kept.
    """
    distances = _squared_distances_fp16(u, v)
    if torch.isfinite(distances).all():
        return distances
    return _squared_distances_fp32(u, v)


def _blocks(rows: torch.Tensor, block_size: int) -> list[tuple[int, torch.Tensor]]:
    return [(start, rows[start : start + block_size]) for start in range(0, len(rows), block_size)]


def knn_radii(features: torch.Tensor, k: int = 3, block_size: int = 10_000) -> torch.Tensor:
    """(N,) squared distance from each row to its k-th nearest neighbour (itself excluded).

    As in ADM the row itself sits at index 0 of the sorted distances, so this is entry k.
    Only the k + 1 smallest distances per row are kept while the columns go by in blocks.
    """
    if len(features) <= k:
        raise InputError(
            f"precision/recall with k={k} needs more than {k} images, got {len(features)}"
        )
    radii = torch.empty(len(features), device=features.device)
    for start, rows in _blocks(features, block_size):
        nearest = features.new_empty(len(rows), 0)  # (B, ≤ k+1) smallest so far
        for _, cols in _blocks(features, block_size):
            candidates = torch.cat([nearest, squared_distances(rows, cols)], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[start : start + len(rows)] = nearest[:, k]
    return radii


def precision_recall(
    ref: np.ndarray | torch.Tensor,
    samples: np.ndarray | torch.Tensor,
    *,
    k: int = 3,
    block_size: int = 10_000,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them.

    Precision: the fraction of samples within the k-NN ball (squared radius, `≤`) of some
    reference feature; recall: the fraction of reference features within the ball of some sample.
    `ref` is (N₁, D), `samples` (N₂, D); pairs are compared in blocks of `block_size`.
    """
    ref = torch.as_tensor(ref, dtype=torch.float32, device=device)
    samples = torch.as_tensor(samples, dtype=torch.float32, device=device)
    ref_radii, sample_radii = knn_radii(ref, k, block_size), knn_radii(samples, k, block_size)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for i, ref_rows in _blocks(ref, block_size):
        ref_slice = slice(i, i + len(ref_rows))
        for j, sample_rows in _blocks(samples, block_size):
            sample_slice = slice(j, j + len(sample_rows))
            distances = squared_distances(ref_rows, sample_rows)  # (B₁, B₂)
            ref_covered[ref_slice] |= (distances <= sample_radii[None, sample_slice]).any(1)
            sample_covered[sample_slice] |= (distances <= ref_radii[ref_slice, None]).any(0)
    return sample_covered.double().mean().item(), ref_covered.double().mean().item()

"""The U-REPA training objective (U-REPA paper, Eqs. 1-5; REPA paper, Eq. 4 for the interpolant).

    L = L_velocity + lambda(t) * (L_REPA + w * L_ML)                                    (Eq. 5)

Conventions: t = 1 is pure noise (`x_t = alpha_t * x + sigma_t * eps`), the model predicts the
velocity `d x_t / dt`, and every alignment feature is a `(N, T, D)` tensor: N images, T tokens, D
channels. Several encoders are passed as lists with one tensor per encoder (D may differ between
encoders) and their terms are averaged, as REPA does.

Everything that is a similarity (normalisation, cosine, similarity matrices) runs in at least fp32
with autocast switched off locally: fp16 overflows on ||z||^2 of large features (NaN losses are a
known complaint about REPA's loss under mixed precision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from urepa.interpolant import PATH_TYPES, interpolate

WEIGHTINGS = ("uniform", "lognormal", "lognormal-edm")
MANIFOLD_MODES = ("token", "sample", "batch")

# One tensor (N, T, D) for a single encoder, or one per encoder.
Features = Tensor | Sequence[Tensor]

_NORM_EPS = 1e-6  # cosine of a (near-)zero vector is 0 instead of NaN


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------
# Time sampling
# --------------------------------------------------------------------------------------------


# (mean, std) of log(sigma_t / alpha_t) for each log-normal weighting. "lognormal" is REPA's: its
# loss draws log sigma ~ N(0, 1) (median t = 0.5 on either path); "lognormal-edm" takes EDM's
# P_mean = -1.2 and P_std = 1.2, which move the median t to sigmoid(-1.2) = 0.23 on the linear path.
LOGNORMAL_PARAMS: dict[str, tuple[float, float]] = {
    "lognormal": (0.0, 1.0),
    "lognormal-edm": (-1.2, 1.2),
}


def sample_time(
    n: int,
    weighting: str = "uniform",
    path_type: str = "linear",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw n training times t in [0, 1]: (n,).

    uniform: t ~ U(0, 1).
    lognormal, lognormal-edm: the noise-to-signal ratio sigma_t / alpha_t is log-normal,
    log(ratio) ~ N(mean, std^2) with (mean, std) from LOGNORMAL_PARAMS, and t is the time with
    that ratio, as in REPA's loss: for the linear path ratio = t / (1 - t), so
    t = ratio / (1 + ratio) = sigmoid(log ratio), a logit-normal (SD3's, with REPA's (0, 1));
    for the cosine path ratio = tan(pi t / 2), so t = (2 / pi) * atan(ratio).
    """
    draw = torch.rand if weighting == "uniform" else torch.randn
    return time_from(draw(n, device=device, dtype=dtype, generator=generator), weighting, path_type)


def time_from(z: Tensor, weighting: str = "uniform", path_type: str = "linear") -> Tensor:
    """`sample_time`'s times from given standard draws z: uniform on [0, 1) for "uniform",
    standard normal for the log-normal weightings. Shaped like z."""
    if weighting == "uniform":
        return z
    if weighting in LOGNORMAL_PARAMS:
        mean, std = LOGNORMAL_PARAMS[weighting]
        log_ratio = z * std + mean
        if path_type == "linear":  # ratio / (1 + ratio), without overflow; not torch.sigmoid,
            # whose CPU kernel rounds a tensor's last elements differently from the others
            return 1 / (1 + torch.exp(-log_ratio))
        if path_type == "cosine":
            return torch.atan(log_ratio.exp()) * (2 / math.pi)
        raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


# --------------------------------------------------------------------------------------------
# lambda(t) schedules (appendix, Table 10). t = 1 is noise. Each is multiplied by proj_coeff.
# --------------------------------------------------------------------------------------------


def _constant(t: Tensor) -> Tensor:
    """constant: 1 (the paper's default)."""
    return torch.ones_like(t)


def _rise(t: Tensor) -> Tensor:
    """max(1, t + 0.5): 1 up to t = 0.5, then rising to 1.5 at pure noise."""
    return torch.clamp(t + 0.5, min=1.0)


def _fall(t: Tensor) -> Tensor:
    """max(1, -t + 1.5): 1.5 at clean data, falling to 1 at t = 0.5, then 1."""
    return torch.clamp(-t + 1.5, min=1.0)


def _dip(t: Tensor) -> Tensor:
    """min(1, max(-2t + 1.5, 2t - 0.5)): 1 outside [0.25, 0.75], a V down to 0.5 at t = 0.5."""
    return torch.clamp(torch.maximum(-2 * t + 1.5, 2 * t - 0.5), max=1.0)


LAMBDA_SCHEDULES: dict[str, Callable[[Tensor], Tensor]] = {
    "constant": _constant,
    "rise": _rise,
    "fall": _fall,
    "dip": _dip,
}


# --------------------------------------------------------------------------------------------
# Alignment terms on (N, T, D) features
# --------------------------------------------------------------------------------------------


def _fp32(x: Tensor) -> Tensor:
    """x in at least fp32: fp16/bf16 go up to fp32, float64 stays float64 (for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _unit(z: Tensor) -> Tensor:
    """Unit vectors along the last dim, in at least fp32."""
    return F.normalize(_fp32(z), dim=-1, eps=_NORM_EPS)


def _no_autocast(x: Tensor) -> torch.autocast:
    """Switch autocast off on x's device, so that matmuls of fp32 unit vectors stay fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _encoder_pairs(zs: Features, zs_tilde: Features) -> list[tuple[Tensor, Tensor]]:
    """Pair encoder targets with predictions, checking that each pair has the same shape."""
    zs = [zs] if isinstance(zs, Tensor) else list(zs)
    zs_tilde = [zs_tilde] if isinstance(zs_tilde, Tensor) else list(zs_tilde)
    if len(zs) != len(zs_tilde) or not zs:
        raise ValueError(
            f"need one prediction per encoder: {len(zs)} targets, {len(zs_tilde)} predictions"
        )
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        if z.ndim != 3 or z.shape != z_tilde.shape:
            raise ValueError(
                f"features must be (N, T, D) and match: target {tuple(z.shape)}, "
                f"prediction {tuple(z_tilde.shape)}"
            )
    return list(zip(zs, zs_tilde, strict=True))


def repa_loss_per_sample(zs: Features, zs_tilde: Features) -> Tensor:
    """Eq. 1 per image: minus the mean token cosine similarity, averaged over encoders: (N,).

    zs: encoder targets y_* (N, T, D_k) per encoder; zs_tilde: projected model features
    h_phi(h_t), same shapes.
    """
    pairs = _encoder_pairs(zs, zs_tilde)
    per_encoder = []
    with _no_autocast(pairs[0][0]):
        for z, z_tilde in pairs:
            cos = (_unit(z) * _unit(z_tilde)).sum(dim=-1)  # (N, T)
            per_encoder.append(-cos.mean(dim=1))
    return torch.stack(per_encoder).mean(dim=0)


def repa_loss(zs: Features, zs_tilde: Features) -> Tensor:
    """Eq. 1: -mean over encoders, images and tokens of cos(y_*, h_phi(h_t)): a 0-dim tensor."""
    return repa_loss_per_sample(zs, zs_tilde).mean()


def _row_sq_diff(target_rows: Tensor, target: Tensor, pred_rows: Tensor, pred: Tensor) -> Tensor:
    """Mean over columns of the squared difference of two cosine-similarity matrices: (B, R).

    target_rows (B, R, Dy) are some rows of target (B, M, Dy); likewise pred_rows of pred
    (B, M, Dh). All are unit vectors, so target_rows @ target^T is the (B, R, M) block of the
    M x M similarity matrix (Eq. 4).
    """
    sim_target = target_rows @ target.transpose(1, 2)  # (B, R, M)
    sim_pred = pred_rows @ pred.transpose(1, 2)  # (B, R, M)
    return (sim_target - sim_pred).square().mean(dim=-1)


def _gram_sq_diff(target: Tensor, pred: Tensor, chunk_size: int) -> Tensor:
    """Per-row mean squared difference of the M x M similarity matrices of target and pred: (B, M).

    target: (B, M, Dy), pred: (B, M, Dh), unit rows. Rows are processed in blocks of chunk_size,
    each block under activation checkpointing, so neither the forward nor the saved-for-backward
    memory ever holds more than a (B, chunk_size, M) block of the similarity matrices.
    """
    num_rows = target.shape[1]
    if num_rows <= chunk_size:
        return _row_sq_diff(target, target, pred, pred)
    # A loop over row blocks, not over images or tokens: each block is one batched matmul.
    blocks = [
        checkpoint(
            _row_sq_diff,
            target[:, start : start + chunk_size],
            target,
            pred[:, start : start + chunk_size],
            pred,
            use_reentrant=False,
        )
        for start in range(0, num_rows, chunk_size)
    ]
    return torch.cat(blocks, dim=1)


def _manifold_one_encoder(z: Tensor, z_tilde: Tensor, mode: str, chunk_size: int) -> Tensor:
    """Eqs. 3-4 for one encoder, per image: (N, T, D) x 2 -> (N,)."""
    num_images, num_tokens, _ = z.shape
    target, pred = _unit(z), _unit(z_tilde)  # y_* and h_phi(h_t) of Eq. 4, unit length
    if mode == "token":
        # N matrices T x T: tokens i, j of the same image.
        rows = _gram_sq_diff(target, pred, chunk_size)  # (N, T)
    elif mode == "sample":
        # T matrices N x N: images i, j at the same token position; image n owns row n.
        rows = _gram_sq_diff(target.transpose(0, 1), pred.transpose(0, 1), chunk_size).T
    elif mode == "batch":
        # One (N T) x (N T) matrix over every token of the local batch; image n owns its T rows.
        all_tokens = (1, num_images * num_tokens, -1)
        rows = _gram_sq_diff(target.reshape(all_tokens), pred.reshape(all_tokens), chunk_size)
        rows = rows.view(num_images, num_tokens)
    else:
        raise ValueError(f"manifold mode must be one of {MANIFOLD_MODES}, got {mode!r}")
    return rows.mean(dim=1)  # (N,)


def manifold_loss_per_sample(
    zs: Features, zs_tilde: Features, mode: str = "token", chunk_size: int = 1024
) -> Tensor:
    """Manifold loss L_ML (Eqs. 3-4) per image, averaged over encoders: (N,).

    d = (cos(y_i, y_j) - cos(h_i, h_j))^2 for pairs (i, j) of feature vectors, averaged over all
    pairs (the diagonal contributes 0). Eq. 3 prints a minus sign in front of the expectation;
    d is a squared distance, so the term is minimised here, without that sign.

    mode picks the pairs:
      token  (default) each image's T x T matrix of its own tokens (Eq. 4 read literally).
             Image n's value is the mean over its T^2 entries.
      sample at each token position the N x N matrix over the images of the batch. The matrix
             is symmetric; image n owns row n of every one of the T matrices, and its value is
             the mean over those T * N entries.
      batch  one (N T) x (N T) matrix over all tokens of the local batch. Image n owns the T
             rows of its tokens, and its value is the mean over those T * N T entries.
    In every mode the mean of the per-image values is the mean over all entries, and a
    per-image weight lambda(t_n) scales image n's rows: a pair (i, j) of different images is
    weighted by the average of their two weights.

    Cost (multiply-adds, forward): token 2 N T^2 D, sample 2 T N^2 D, batch 2 (N T)^2 D;
    backward plus the checkpoint's recomputation bring the total to about 3 times that. Batch
    mode at N = 32, T = 256 (N T = 8192), D = 768 is 0.1 TMAC forward, 0.3 TMAC in all: under
    3 % of the multiply-adds of an SiT-XL/2 training step on the same 32 images (about 11 TMAC),
    but in fp32 rather than bf16, so expect a larger share of the step time (an estimate; not
    timed on a GPU). Memory: one full (N T)^2 matrix takes 256 MiB in fp32 and autograd would
    keep one per term; instead rows go in blocks of chunk_size under activation checkpointing,
    so the transient memory is about 4 * chunk_size * N T * 4 B (128 MiB at chunk_size = 1024)
    and only the (N T, D) unit features are kept for the backward pass.
    """
    pairs = _encoder_pairs(zs, zs_tilde)
    per_encoder = []
    with _no_autocast(pairs[0][0]):
        for z, z_tilde in pairs:
            per_encoder.append(_manifold_one_encoder(z, z_tilde, mode, chunk_size))
    return torch.stack(per_encoder).mean(dim=0)


def manifold_loss(
    zs: Features, zs_tilde: Features, mode: str = "token", chunk_size: int = 1024
) -> Tensor:
    """Manifold loss L_ML (Eqs. 3-4), mean over encoders and images: a 0-dim tensor."""
    return manifold_loss_per_sample(zs, zs_tilde, mode, chunk_size).mean()


# --------------------------------------------------------------------------------------------
# The full objective (Eq. 5)
# --------------------------------------------------------------------------------------------


@dataclass
class SILoss:
    """U-REPA objective (Eq. 5): L = L_velocity + proj_coeff * lambda(t) * (L_REPA + w * L_ML).

    Named after REPA's SILoss; unlike it, a call returns a dict of named 0-dim tensors.

    path_type: interpolant, "linear" or "cosine" (t = 1 is noise).
    weighting: time sampling, "uniform", "lognormal" (REPA's) or "lognormal-edm" (EDM's values);
        see `sample_time`.
    proj_coeff: lambda of Eqs. 2 and 5 (REPA's --proj-coeff). 0 switches off and skips both
        alignment terms (the plain SiT objective).
    manifold_coeff: w of Eq. 5 (Table 8's best, 3). 0 switches off and skips the manifold term.
    manifold_mode: which similarity matrices L_ML compares: "token", "sample" or "batch".
    lambda_schedule: name in LAMBDA_SCHEDULES (Table 10), applied per image, times proj_coeff.
    chunk_size: rows per block of the similarity matrices (matters in batch mode).
    compile: torch.compile the element-wise part that follows the model (`objective`), which
        fuses its normalisations, similarities and means into a few kernels; the model is
        compiled on its own (`speed.compile_model`).
    """

    path_type: str = "linear"
    weighting: str = "uniform"
    proj_coeff: float = 0.5
    manifold_coeff: float = 3.0
    manifold_mode: str = "token"
    lambda_schedule: str = "constant"
    chunk_size: int = 1024
    compile: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        for name, value, choices in [
            ("path_type", self.path_type, PATH_TYPES),
            ("weighting", self.weighting, WEIGHTINGS),
            ("manifold_mode", self.manifold_mode, MANIFOLD_MODES),
            ("lambda_schedule", self.lambda_schedule, tuple(LAMBDA_SCHEDULES)),
        ]:
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.proj_coeff < 0 or self.manifold_coeff < 0 or self.chunk_size < 1:
            raise ValueError("proj_coeff and manifold_coeff must be >= 0, chunk_size >= 1")
        self._objective = (
            torch.compile(self.objective, dynamic=False) if self.compile else self.objective
        )

    def __call__(
        self,
        model: Callable[..., tuple[Tensor, list[Tensor]]],
        x: Tensor,
        y: Tensor,
        zs: Sequence[Tensor] = (),
        t: Tensor | None = None,
        noise: Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """One evaluation of Eq. 5 on a batch; no host synchronisation.

        model: `model(x_t, t, y) -> (v, zs_tilde)`, zs_tilde one (N, T_k, D_k) per encoder.
        x: scaled latents (N, C, H, W). y: class labels (N,), passed through untouched: label
        dropout for classifier-free guidance happens in the model's label embedder, only there.
        zs: encoder targets, one (N, T_k, D_k) per encoder. t (N,) and noise (like x) are drawn
        here unless given (tests, exact reproducibility). model_kwargs go to the model as keyword
        arguments (e.g. `force_drop_ids`, the training loop's label-dropout decisions).
        Returns 0-dim tensors: "velocity", "repa", "manifold" (unweighted batch means),
        "total" (the loss to minimise) and "cos_sim" (mean token cosine similarity, detached).
        """
        if t is None:
            t = self.draw_times(x)
        if noise is None:
            noise = torch.randn_like(x)
        x_t, v_target = interpolate(x, noise, t, self.path_type)
        v_pred, zs_tilde = model(x_t, t, y, **(model_kwargs or {}))
        return self._objective(t, v_pred, v_target, zs, zs_tilde)

    def objective(
        self, t: Tensor, v_pred: Tensor, v_target: Tensor, zs: Features, zs_tilde: Features
    ) -> dict[str, Tensor]:
        """Eq. 5 from the model's outputs: the named terms that `__call__` returns."""
        velocity = mean_flat((_fp32(v_pred) - _fp32(v_target)).square())  # (N,) REPA Eq. 4
        repa, manifold = self.alignment_terms(zs, zs_tilde, velocity.new_zeros(t.shape[0]))
        total = velocity
        if self.proj_coeff > 0:  # Eq. 5, per image
            total = velocity + self.alignment_weight(t) * (repa + self.manifold_coeff * manifold)
        return {
            "velocity": velocity.mean(),
            "repa": repa.mean(),
            "manifold": manifold.mean(),
            "total": total.mean(),
            "cos_sim": 0 - repa.detach().mean(),  # Fig. 3's metric (0 - x: no "-0" when off)
        }

    def draw_times(self, x: Tensor) -> Tensor:
        """Training times for the batch x: (N,), on x's device, in at least fp32."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return sample_time(x.shape[0], self.weighting, self.path_type, x.device, dtype)

    def alignment_terms(
        self, zs: Features, zs_tilde: Features, zero: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-image L_REPA (Eq. 1) and L_ML (Eqs. 3-4): (N,) each.

        A term whose weight is 0 is `zero` (N,) and is not computed at all.
        """
        if self.proj_coeff == 0:
            return zero, zero
        repa = repa_loss_per_sample(zs, zs_tilde)
        if self.manifold_coeff == 0:
            return repa, zero
        return repa, manifold_loss_per_sample(zs, zs_tilde, self.manifold_mode, self.chunk_size)

    def alignment_weight(self, t: Tensor) -> Tensor:
        """lambda(t) of Eq. 5 per image: proj_coeff times the Table 10 schedule, (N,)."""
        return self.proj_coeff * LAMBDA_SCHEDULES[self.lambda_schedule](_fp32(t))

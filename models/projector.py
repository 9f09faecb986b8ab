"""Projector heads that map diffusion-model tokens to a vision encoder's feature space.

REPA's head is a per-token 3-layer MLP, C -> 2048 -> 2048 -> D_enc. U-REPA (paper §3.3) taps the
U-Net's middle stage, whose 8×8 grid is coarser than the encoder's 16×16, and resamples:

* `upsample="after"`  (U-REPA default, Table 7 "upscale after MLP"): MLP on the coarse grid, then
  interpolate the D_enc-channel map to the encoder grid — cheapest, and best in Table 7;
* `upsample="before"` (Table 7 "upscale before MLP"): interpolate the C-channel map, then the MLP;
* `upsample="within"` (Table 7 "upscale in MLP"): the last linear layer emits s²·D_enc channels
  per coarse token, rearranged by pixel shuffle into an s× finer grid.

`kernel` picks the interpolation (bilinear by default, nearest selectable). With
`align_resolution="pool"` (Table 6 "U-Net / DINOv2↓") the head never resamples: the model keeps the
coarse grid and the *encoder* features are average-pooled onto it (`pool_tokens`).

`time_aware=True` (appendix Table 9) adds a SiLU -> Linear branch on the timestep embedding that
predicts a per-channel scale γ(t) and shift β(t), applied as (1 + γ)·h + β. It is zero-initialised,
so the head starts out identical to the plain one.

All of these options are one `ProjectorConfig`; each field is also the `train.py` flag of the same
name (`--projector-upsample`, ...) and a key of a checkpoint's `model_kwargs`, so a new option is
a field here, its use in `Projector`, and its flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.layers import grid_to_tokens, tokens_to_grid

UPSAMPLE_ORDERS = ("after", "before", "within")
UPSAMPLE_KERNELS = ("bilinear", "nearest")
ALIGN_RESOLUTIONS = ("upsample", "pool")


def resample_scale(tap_grid: int, encoder_grid: int) -> int:
    """Integer factor s = encoder_grid / tap_grid; it must be a power of two (1 = no resampling)."""
    scale, rest = divmod(encoder_grid, tap_grid)
    if rest or scale < 1 or scale & (scale - 1):
        raise ValueError(
            f"the alignment tap runs on a {tap_grid}×{tap_grid} grid, which does not divide the "
            f"encoder's {encoder_grid}×{encoder_grid} grid by a power of two; pick another "
            "encoder depth or encoder resolution"
        )
    return scale


def pool_tokens(z: Tensor, grid_size: int) -> Tensor:
    """Average-pool (N, G², D) encoder tokens onto a (N, g², D) grid, g dividing G (Table 6)."""
    source_grid = math.isqrt(z.shape[1])
    factor = resample_scale(grid_size, source_grid)
    if factor == 1:
        return z
    return grid_to_tokens(F.avg_pool2d(tokens_to_grid(z, source_grid), factor))


@dataclass(frozen=True)
class ProjectorConfig:
    """How the projector heads are built (U-REPA §3.3; REPA's head by default)."""

    projector_dim: int = 2048  # hidden width of the MLP (REPA's)
    projector_upsample: str = "after"  # Table 7: resample after the MLP, before it, or within it
    projector_kernel: str = "bilinear"  # interpolation kernel of the resampling
    align_resolution: str = "upsample"  # Table 6: upsample the model, or pool the encoder
    time_aware_projector: bool = False  # Table 9: (1 + γ(t))·h + β(t) on the output

    def __post_init__(self) -> None:
        for field, value, choices in (
            ("projector_upsample", self.projector_upsample, UPSAMPLE_ORDERS),
            ("projector_kernel", self.projector_kernel, UPSAMPLE_KERNELS),
            ("align_resolution", self.align_resolution, ALIGN_RESOLUTIONS),
        ):
            if value not in choices:
                raise ValueError(f"{field} must be one of {choices}, got {value!r}")


class Projector(nn.Sequential):
    """h_φ: per-token MLP (+ optional resampling and time modulation).

    Subclasses `nn.Sequential` so that the MLP's parameters are named `0`, `2`, `4` exactly like
    REPA's `build_mlp`, whose checkpoints therefore load unchanged. `scale` is the factor from the
    tapped grid to the grid of the predictions (1 with `align_resolution="pool"`).
    """

    def __init__(self, hidden_size: int, z_dim: int, scale: int, config: ProjectorConfig):
        within = config.projector_upsample == "within" and scale > 1
        width = config.projector_dim
        super().__init__(
            nn.Linear(hidden_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, z_dim * scale**2 if within else z_dim),
        )
        self.scale = scale
        self.upsample = config.projector_upsample
        self.kernel = config.projector_kernel
        self.z_dim = z_dim
        self.time_modulation = (
            nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * z_dim))
            if config.time_aware_projector
            else None
        )

    def mlp(self, x: Tensor) -> Tensor:
        for i in range(5):
            x = self[i](x)
        return x

    def interpolate(self, x: Tensor, grid_size: int) -> Tensor:
        """(N, g², D) -> (N, (s·g)², D) with the chosen kernel."""
        fmap = tokens_to_grid(x, grid_size)
        if self.kernel == "bilinear":
            fmap = F.interpolate(
                fmap, scale_factor=self.scale, mode="bilinear", align_corners=False
            )
        else:
            fmap = F.interpolate(fmap, scale_factor=self.scale, mode="nearest")
        return grid_to_tokens(fmap)

    # Sequential only lends the parameter names; the call takes the grid and timestep too.
    def forward(  # type: ignore[override]
        self, h: Tensor, grid_size: int, t_emb: Tensor | None = None
    ) -> Tensor:
        """h: (N, g², C) tapped tokens on a g×g grid; t_emb: (N, C) timestep embedding.

        Returns (N, (s·g)², D_enc) predictions on the encoder's grid.
        """
        if self.scale == 1:
            z = self.mlp(h)
        elif self.upsample == "after":
            z = self.interpolate(self.mlp(h), grid_size)
        elif self.upsample == "before":
            z = self.mlp(self.interpolate(h, grid_size))
        else:  # within: one coarse token emits an s×s patch of predictions
            z = self.mlp(h)  # (N, g², s²·D)
            z = F.pixel_shuffle(tokens_to_grid(z, grid_size), self.scale)
            z = grid_to_tokens(z)
        if self.time_modulation is not None:
            if t_emb is None:
                raise ValueError("a time-aware projector needs the timestep embedding")
            gamma, beta = self.time_modulation(t_emb).chunk(2, dim=-1)  # (N, D) each
            z = z * (1 + gamma.unsqueeze(1)) + beta.unsqueeze(1)
        return z

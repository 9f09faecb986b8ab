"""The interpolant between data and noise (REPA paper, Eq. 4; SiT): x_t = alpha_t x + sigma_t eps.

A leaf shared by the training objective (loss.py) and the samplers (samplers.py), so that neither
imports the other. t = 1 is pure noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PATH_TYPES = ("linear", "cosine")


def interpolant(t: Tensor, path_type: str = "linear") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) for `x_t = alpha_t x + sigma_t eps`.

    linear: alpha = 1 - t, sigma = t (SiT/REPA default). cosine: alpha = cos(pi t / 2),
    sigma = sin(pi t / 2). All four outputs have the shape of t.
    """
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
        return cos, sin, -half_pi * sin, half_pi * cos
    raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")


def interpolate(x: Tensor, noise: Tensor, t: Tensor, path_type: str) -> tuple[Tensor, Tensor]:
    """The model input x_t = alpha_t x + sigma_t eps and its target d x_t / dt (REPA Eq. 4).

    x, noise: (N, ...); t: (N,). Returns two tensors shaped like x.
    """
    alpha, sigma, d_alpha, d_sigma = (
        c.view(x.shape[0], *[1] * (x.ndim - 1)) for c in interpolant(t, path_type)
    )
    return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise

"""Feature-map PCA (REPA appendix L, Fig. 38): per block, the first three principal components
of one image's hidden tokens, shown as RGB on the block's token grid (DINOv2's visualisation).

For each image, time t and block k, the tokens X (T, C) of block k's output are centred over the
tokens, and their projections on the three leading right singular vectors (the scores U·S of
the SVD) become the red, green and blue channels, each min-max scaled to [0, 1] over the image's
tokens (a direction without variance beyond rounding stays 0). A principal direction has no
sign of its own: each is oriented so that its largest score (in absolute value) is positive
(scikit-learn's `svd_flip` convention), so a map does not change colour between runs. Tokens
are in raster order, so token r·g + c is grid cell (r, c); SiT↓'s middle stage runs on a grid
half as wide, shown at its own resolution.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from analysis.features import block_outputs
from loss import interpolate
from models.base import AlignedDiffusionTransformer

Maps = dict[tuple[float, int], np.ndarray]  # (t, block) -> (N, g, g, 3) RGB in [0, 1]


def principal_scores(tokens: Tensor, components: int = 3) -> Tensor:
    """(T, C) tokens -> (T, components) scores on the leading principal directions, fp32."""
    x = tokens.float() - tokens.float().mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    s = torch.where(s > 1e-5 * s[0], s, 0.0)  # a direction of rounding noise only: no colour
    scores = u[:, :components] * s[:components]  # (T, k)
    largest = scores.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(scores[largest, torch.arange(scores.shape[1])])
    return scores * torch.where(signs == 0, 1.0, signs)


def scores_to_rgb(scores: Tensor) -> Tensor:
    """(T, 3) scores -> (T, 3) in [0, 1], each channel min-max scaled over the tokens (a
    constant channel, e.g. fewer than three non-zero components, is 0)."""
    low = scores.min(dim=0, keepdim=True).values
    span = scores.max(dim=0, keepdim=True).values - low
    return (scores - low) / torch.where(span > 0, span, 1.0)


def rgb_grid(rgb: Tensor, grid_size: int) -> Tensor:
    """(T, 3) raster-order colours -> (g, g, 3) image of the token grid."""
    if rgb.shape[0] != grid_size * grid_size:
        raise ValueError(f"{rgb.shape[0]} tokens do not fill a {grid_size}×{grid_size} grid")
    return rgb.reshape(grid_size, grid_size, rgb.shape[1])


def pca_map(tokens: Tensor, grid_size: int) -> np.ndarray:
    """One image's (T, C) block output -> (g, g, 3) RGB map in [0, 1]."""
    return rgb_grid(scores_to_rgb(principal_scores(tokens)), grid_size).cpu().numpy()


@torch.no_grad()
def feature_maps(
    model: AlignedDiffusionTransformer,
    x: Tensor,
    noise: Tensor,
    y: Tensor,
    timesteps: list[float],
    blocks: list[int],
    path_type: str = "linear",
) -> Maps:
    """PCA maps of latents x (N, C, H, W) noised with `noise` to each t, for each block."""
    store: dict[int, Tensor] = {}
    maps: Maps = {}
    with block_outputs(model, blocks, store, lambda output: output.detach().float()):
        for t in timesteps:
            t_vec = torch.full((x.shape[0],), t, device=x.device)
            x_t, _ = interpolate(x, noise, t_vec, path_type)
            model(x_t, t_vec, y, return_zs=False)
            for k in blocks:
                grid = model.tap_grid(k)
                maps[(t, k)] = np.stack([pca_map(tokens, grid) for tokens in store[k]])
    return maps


def write_pca_figures(
    maps: dict[str, Maps], blocks: list[int], timesteps: list[float], out_dir: str
) -> list[str]:
    """One figure per image, `pca_maps-<i>.png`: a row per (checkpoint, t), a column per block;
    `maps` is {checkpoint label: Maps}. Also `pca_maps.npz` with every map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, t) for label in maps for t in timesteps]  # a missing block: a blank cell
    num_images = next(iter(next(iter(maps.values())).values())).shape[0]
    written = []
    for i in range(num_images):
        fig, axes = plt.subplots(
            len(rows), len(blocks), figsize=(1.3 * len(blocks) + 1.5, 1.3 * len(rows)),
            squeeze=False,
        )  # fmt: skip
        for r, (label, t) in enumerate(rows):
            for c, k in enumerate(blocks):
                ax = axes[r][c]
                if (t, k) in maps[label]:  # checkpoints of other depths have other blocks
                    ax.imshow(maps[label][(t, k)][i], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"block {k}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{label}\nt={t:g}", fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"pca_maps-{i}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    arrays = {
        f"{label}/t={t:g}/block={k}": m for label, ms in maps.items() for (t, k), m in ms.items()
    }
    np.savez_compressed(os.path.join(out_dir, "pca_maps.npz"), **arrays)  # type: ignore[arg-type]
    return [*written, os.path.join(out_dir, "pca_maps.npz")]

"""analysis/pca.py (REPA Fig. 38): principal scores against NumPy's SVD and a closed form, the
RGB mapping, the token-grid layout on SiT and SiT↓'s three stages, and `python -m analysis
--pca-maps` against a direct computation."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from test_analysis import run_dir  # noqa: F401 (a fixture: two tiny SiT↓ checkpoints)

from analysis.__main__ import main, parse_args
from analysis.features import draw_noise
from analysis.pca import feature_maps, pca_map, principal_scores, rgb_grid, scores_to_rgb
from dataset import LatentDataset
from loss import interpolate
from models import build_model
from urepa.checkpoints import load_model_for_sampling
from urepa.vae import sample_latents


def test_scores_match_numpys_svd_with_the_largest_score_positive():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) @ np.diag(np.linspace(3, 0.5, 12))
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, :3] * s[:3]
    expected *= np.sign(expected[np.abs(expected).argmax(axis=0), range(3)])
    ours = principal_scores(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    assert (ours[np.abs(ours).argmax(axis=0), range(3)] > 0).all()


def test_tokens_on_a_plane_give_its_two_coordinates_and_no_third_colour():
    """Closed form: x_i = m + 2·a_i·v1 + b_i·v2, a and b orthogonal, zero-mean, of equal norm:
    the scores are 2a and b (up to sign), and the third channel is 0."""
    a = torch.tensor([1.0, -1, 1, -1, 2, -2, 0, 0])
    b = torch.tensor([1.0, 1, -1, -1, 0, 0, 2, -2])
    v1 = torch.tensor([0.6, 0.8, 0.0, 0.0])
    v2 = torch.tensor([0.0, 0.0, 1.0, 0.0])
    x = torch.tensor([5.0, -3, 2, 7]) + 2 * a[:, None] * v1 + b[:, None] * v2
    scores = principal_scores(x)
    for column, coordinate in ((0, 2 * a), (1, b)):
        sign = torch.sign(scores[:, column] @ coordinate)
        torch.testing.assert_close(scores[:, column] * sign, coordinate, rtol=1e-5, atol=1e-5)
    rgb = scores_to_rgb(scores)
    assert rgb[:, 2].abs().max() == 0
    red = (scores[:, 0] - scores[:, 0].min()) / (scores[:, 0].max() - scores[:, 0].min())
    torch.testing.assert_close(rgb[:, 0], red)


def test_rgb_is_min_max_per_channel_and_a_constant_channel_is_zero():
    scores = torch.tensor([[1.0, -2.0, 3.0], [3.0, 2.0, 3.0], [2.0, 0.0, 3.0]])
    expected = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(scores_to_rgb(scores), expected)


def test_grid_is_raster_order():
    g = 3
    rgb = torch.arange(g * g * 3, dtype=torch.float32).reshape(g * g, 3)
    grid = rgb_grid(rgb, g)
    for r in range(g):
        for c in range(g):
            assert torch.equal(grid[r, c], rgb[r * g + c])
    with pytest.raises(ValueError, match="do not fill"):
        rgb_grid(rgb[:8], g)


def sit_block_outputs(model, x_t, t, y):
    """SiT's trunk written out: the output of every block, in order."""
    tokens = model.embed_tokens(x_t)
    c = model.t_embedder(t) + model.y_embedder(y, False)
    outputs = []
    for block in model.blocks:
        tokens = block(tokens, c)
        outputs.append(tokens)
    return outputs


def inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


@torch.no_grad()
def test_sit_maps_are_the_pca_of_each_blocks_output():
    torch.manual_seed(0)
    model = build_model("SiT", input_size=8, hidden_size=32, depth=3, num_heads=2,
                        num_classes=4, z_dims=[16], encoder_depth=2, projector_dim=8)  # fmt: skip
    model.eval()
    x, noise = inputs()
    y = model.null_labels(2)
    maps = feature_maps(model, x, noise, y, [0.3], [1, 3])
    t = torch.full((2,), 0.3)
    x_t, _ = interpolate(x, noise, t, "linear")
    outputs = sit_block_outputs(model, x_t, t, y)
    for k in (1, 3):
        assert maps[(0.3, k)].shape == (2, 4, 4, 3)
        for i in range(2):
            np.testing.assert_allclose(maps[(0.3, k)][i], pca_map(outputs[k - 1][i], 4), atol=1e-5)


@torch.no_grad()
def test_sit_down_maps_follow_each_stages_grid():
    torch.manual_seed(0)
    model = build_model("SiTDown", input_size=8, hidden_size=32, depths=(2, 1, 2), num_heads=2,
                        num_classes=4, z_dims=[16], projector_dim=8).eval()  # fmt: skip
    x, noise = inputs()
    maps = feature_maps(model, x, noise, model.null_labels(2), [0.5, 0.9], [1, 2, 3, 4, 5])
    sides = {k: maps[(0.5, k)].shape[1:3] for k in range(1, 6)}
    assert sides == {1: (4, 4), 2: (4, 4), 3: (2, 2), 4: (4, 4), 5: (4, 4)}
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps.values())
    assert not np.allclose(maps[(0.5, 1)], maps[(0.9, 1)])  # the time enters


def test_command_draws_the_maps_of_both_checkpoints_side_by_side(run_dir, data_dir, tmp_path):  # noqa: F811
    ckpts = [str(run_dir / "0000100.pt"), str(run_dir / "0000200.pt")]
    argv = ["--ckpt", *ckpts, "--data-dir", data_dir, "--output-dir", str(tmp_path),
            "--num-samples", "4", "--layers", "all", "--timesteps", "0.25,0.75",
            "--no-metrics", "--pca-maps", "2"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(parse_args(argv))
    assert (tmp_path / "pca_maps-0.png").exists() and (tmp_path / "pca_maps-1.png").exists()
    assert not (tmp_path / "per_layer.png").exists()  # --no-metrics: no metric plots
    arrays = np.load(tmp_path / "pca_maps.npz")
    assert len(arrays.files) == 2 * 2 * 3  # checkpoints × times × blocks
    # the same images, latents and noise as the metrics: the first 2 of the seeded order
    data = LatentDataset(data_dir)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:2]
    moments = torch.stack([data[int(i)]["moments"] for i in order])
    eps, noise = draw_noise(order, (4, *moments.shape[2:]), 0)
    model = load_model_for_sampling(ckpts[1], "cpu")
    direct = feature_maps(model, sample_latents(moments, noise=eps), noise,
                          model.null_labels(2), [0.75], [2])  # fmt: skip
    np.testing.assert_allclose(arrays["0000200.pt/t=0.75/block=2"], direct[(0.75, 2)], atol=1e-5)

"""Tests for loss.py: every term against a naive float64 loop written here, independently."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import loss
from loss import (
    LAMBDA_SCHEDULES,
    MANIFOLD_MODES,
    SILoss,
    manifold_loss,
    manifold_loss_per_sample,
    repa_loss,
    repa_loss_per_sample,
    sample_time,
)
from urepa.interpolant import interpolant

SHAPES = [(2, 3, 4), (3, 5, 2), (1, 4, 6), (4, 1, 3)]  # (N, T, D), including N = 1 and T = 1


# ------------------------------------------------------------------------------------------
# Independent references: plain loops over images and tokens, numpy float64
# ------------------------------------------------------------------------------------------


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def naive_repa(z, z_tilde) -> np.ndarray:
    """-mean_t cos(z[n, t], z_tilde[n, t]) for each image n: (N,)."""
    z, zt = np.asarray(z, np.float64), np.asarray(z_tilde, np.float64)
    n_img, n_tok, _ = z.shape
    return np.array(
        [-np.mean([_cos(z[n, i], zt[n, i]) for i in range(n_tok)]) for n in range(n_img)]
    )


def naive_manifold(z, z_tilde, mode: str) -> np.ndarray:
    """Per image n, the mean of (cos(y_a, y_b) - cos(h_a, h_b))^2 over the pairs n owns: (N,).

    token: a, b tokens of image n. sample: a = (n, p), b = (m, p) for every position p, image m.
    batch: a = (n, i) for every token i of n, b = (m, j) for every token of every image.
    """
    z, zt = np.asarray(z, np.float64), np.asarray(z_tilde, np.float64)
    n_img, n_tok, _ = z.shape

    def d(a, b):
        return (_cos(z[a], z[b]) - _cos(zt[a], zt[b])) ** 2

    out = []
    for n in range(n_img):
        if mode == "token":
            pairs = [((n, i), (n, j)) for i in range(n_tok) for j in range(n_tok)]
        elif mode == "sample":
            pairs = [((n, p), (m, p)) for p in range(n_tok) for m in range(n_img)]
        else:
            pairs = [
                ((n, i), (m, j)) for i in range(n_tok) for m in range(n_img) for j in range(n_tok)
            ]
        out.append(np.mean([d(a, b) for a, b in pairs]))
    return np.array(out)


def _features(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=g, dtype=dtype),
        torch.randn(shape, generator=g, dtype=dtype),
    )


# ------------------------------------------------------------------------------------------
# REPA term (Eq. 1) and manifold term (Eqs. 3-4) against the loops
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_repa_matches_naive(shape):
    z, zt = _features(shape, seed=1)
    ref = naive_repa(z, zt)
    np.testing.assert_allclose(repa_loss_per_sample(z, zt).numpy(), ref, rtol=1e-10, atol=1e-12)
    assert repa_loss(z, zt).item() == pytest.approx(ref.mean(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("chunk_size", [2, 1024])
@pytest.mark.parametrize("mode", MANIFOLD_MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_manifold_matches_naive(shape, mode, chunk_size):
    z, zt = _features(shape, seed=2)
    ref = naive_manifold(z, zt, mode)
    got = manifold_loss_per_sample(z, zt, mode, chunk_size=chunk_size)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    got_mean = manifold_loss(z, zt, mode, chunk_size=chunk_size).item()
    assert got_mean == pytest.approx(ref.mean(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("mode", MANIFOLD_MODES)
def test_two_encoders_with_different_dims_are_averaged(mode):
    z1, zt1 = _features((3, 4, 5), seed=3)
    z2, zt2 = _features((3, 4, 7), seed=4)
    repa_ref = (naive_repa(z1, zt1) + naive_repa(z2, zt2)) / 2
    ml_ref = (naive_manifold(z1, zt1, mode) + naive_manifold(z2, zt2, mode)) / 2
    np.testing.assert_allclose(
        repa_loss_per_sample([z1, z2], [zt1, zt2]).numpy(), repa_ref, rtol=1e-10
    )
    np.testing.assert_allclose(
        manifold_loss_per_sample([z1, z2], [zt1, zt2], mode).numpy(), ml_ref, rtol=1e-10
    )
    assert repa_loss([z1, z2], [zt1, zt2]).item() == pytest.approx(repa_ref.mean(), rel=1e-10)
    assert manifold_loss([z1, z2], [zt1, zt2], mode).item() == pytest.approx(
        ml_ref.mean(), rel=1e-10
    )


def test_mismatched_encoders_and_unknown_mode_raise():
    z, zt = _features((2, 3, 4), seed=5)
    with pytest.raises(ValueError):
        repa_loss([z, z], [zt])
    with pytest.raises(ValueError):
        manifold_loss(z, zt[:, :2], "token")
    with pytest.raises(ValueError):
        manifold_loss(z, zt, "tokens")
    with pytest.raises(ValueError):
        SILoss(lambda_schedule="linear")


@pytest.mark.parametrize("mode", MANIFOLD_MODES)
def test_manifold_zero_iff_equal_up_to_positive_token_scale(mode):
    z, other = _features((3, 4, 5), seed=6)
    scale = torch.rand(3, 4, 1, dtype=torch.float64) * 10 + 0.1  # positive, per token
    assert manifold_loss(z, z * scale, mode).item() == pytest.approx(0.0, abs=1e-12)
    assert manifold_loss(z, other, mode).item() > 1e-3
    # REPA's cosine is maximal (-1) for the same pairs.
    assert repa_loss(z, z * scale).item() == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize("chunk_size", [2, 1024])
@pytest.mark.parametrize("mode", MANIFOLD_MODES)
def test_manifold_gradcheck(mode, chunk_size):
    z, zt = _features((2, 3, 4), seed=7)
    z.requires_grad_(True)
    zt.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: manifold_loss_per_sample(a, b, mode, chunk_size=chunk_size), (z, zt)
    )
    assert torch.autograd.gradcheck(repa_loss_per_sample, (z, zt))


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_batch_mode_chunking_equals_unchunked(chunk_size):
    z, zt = _features((3, 5, 4), seed=8)
    zt.requires_grad_(True)
    full = manifold_loss_per_sample(z, zt, "batch", chunk_size=10**6)  # one block: no chunking
    (grad_full,) = torch.autograd.grad(full.sum(), zt)
    chunked = manifold_loss_per_sample(z, zt, "batch", chunk_size=chunk_size)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), zt)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# Mixed precision
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MANIFOLD_MODES)
def test_large_features_under_autocast_are_finite_and_fp32(dtype, mode):
    z, zt = (f.to(dtype) for f in _features((2, 16, 768), seed=9, dtype=torch.float32))
    z, zt = z * 1e4, zt * 1e4
    if dtype == torch.float16:  # the failure this guards against: ||z||^2 overflows fp16
        assert torch.isinf((z[0, 0] * z[0, 0]).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        repa, ml = repa_loss(z, zt), manifold_loss(z, zt, mode, chunk_size=8)
    assert repa.dtype == ml.dtype == torch.float32
    assert torch.isfinite(repa) and torch.isfinite(ml)
    # Same numbers as a float64 computation on the same (rounded) inputs.
    assert repa.item() == pytest.approx(repa_loss(z.double(), zt.double()).item(), abs=1e-5)
    assert ml.item() == pytest.approx(manifold_loss(z.double(), zt.double(), mode).item(), rel=1e-4)


# ------------------------------------------------------------------------------------------
# Interpolant, time sampling, lambda(t) schedules
# ------------------------------------------------------------------------------------------


def _x_t(x, noise, t, path_type):
    alpha, sigma, _, _ = interpolant(t, path_type)
    return alpha.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * noise


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_interpolant_endpoints_and_velocity_is_time_derivative(path_type):
    x, noise = _features((4, 2, 3, 3), seed=10)
    ones = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(_x_t(x, noise, 0 * ones, path_type), x)
    torch.testing.assert_close(_x_t(x, noise, ones, path_type), noise)

    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    h = 1e-6
    finite_diff = (_x_t(x, noise, t + h, path_type) - _x_t(x, noise, t - h, path_type)) / (2 * h)
    _, _, d_alpha, d_sigma = interpolant(t, path_type)
    target = d_alpha.view(-1, 1, 1, 1) * x + d_sigma.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(target, finite_diff, rtol=1e-7, atol=1e-7)
    if path_type == "linear":
        torch.testing.assert_close(target, noise - x)  # v = eps - x


# log(sigma_t / alpha_t) ~ N(mean, std^2): REPA's loss draws N(0, 1); EDM's P_mean, P_std.
LOGNORMAL = {"lognormal": (0.0, 1.0), "lognormal-edm": (-1.2, 1.2)}


def _time_of_log_ratio(log_ratio: float, path_type: str) -> float:
    """REPA's map from sigma = exp(log_ratio) to t: sigma / (1 + sigma), or (2 / pi) atan(sigma)."""
    ratio = math.exp(log_ratio)
    return ratio / (1 + ratio) if path_type == "linear" else 2 / math.pi * math.atan(ratio)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", list(LOGNORMAL))
def test_lognormal_times(weighting, path_type):
    torch.manual_seed(0)
    t = sample_time(20000, weighting, path_type).double()
    assert t.dtype == torch.float64 and ((t > 0) & (t < 1)).all()
    # The noise-to-signal ratio sigma_t / alpha_t is log-normal with the weighting's parameters.
    mean, std = LOGNORMAL[weighting]
    alpha, sigma, _, _ = interpolant(t, path_type)
    log_ratio = torch.log(sigma / alpha).numpy()
    assert stats.kstest(log_ratio, "norm", args=(mean, std)).pvalue > 1e-3
    # t is monotone in the ratio, so its quantiles are the images of the normal's quantiles.
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        expected = _time_of_log_ratio(mean + std * stats.norm.ppf(q), path_type)
        assert np.quantile(t.numpy(), q) == pytest.approx(expected, abs=0.01)
    if path_type == "linear":
        median = 0.5 if weighting == "lognormal" else 1 / (1 + math.exp(1.2))  # 0.23
        assert np.median(t.numpy()) == pytest.approx(median, abs=0.01)


def test_uniform_times():
    torch.manual_seed(0)
    t = sample_time(20000, "uniform")
    assert ((t >= 0) & (t < 1)).all()
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3


PRINTED = {  # appendix Table 10, as printed
    "constant": lambda t: 1.0,
    "rise": lambda t: max(1, t + 0.5),
    "fall": lambda t: max(1, -t + 1.5),
    "dip": lambda t: min(1, max(-2 * t + 1.5, 2 * t - 0.5)),
}


@pytest.mark.parametrize("name", sorted(LAMBDA_SCHEDULES))
def test_schedules_equal_printed_formulas(name):
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    got = LAMBDA_SCHEDULES[name](torch.tensor(ts, dtype=torch.float64))
    assert got.tolist() == pytest.approx([PRINTED[name](t) for t in ts], abs=1e-15)
    assert set(PRINTED) == set(LAMBDA_SCHEDULES)


# ------------------------------------------------------------------------------------------
# The full objective (Eq. 5) with a tiny stand-in model
# ------------------------------------------------------------------------------------------


class TinyModel(nn.Module):
    """model(x_t, t, y) -> (v like x, [(N, H*W, D_k) per encoder]); records its inputs."""

    def __init__(self, channels=4, z_dims=(6, 3), num_classes=10, feature_scale=1.0):
        super().__init__()
        self.v = nn.Conv2d(channels, channels, 1)
        self.t_embed = nn.Linear(1, channels)
        self.y_embed = nn.Embedding(num_classes + 1, channels)
        self.projectors = nn.ModuleList(nn.Linear(channels, d) for d in z_dims)
        self.feature_scale = feature_scale
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x, t, y))
        h = self.v(x) + (self.t_embed(t[:, None].to(x.dtype)) + self.y_embed(y))[:, :, None, None]
        tokens = h.flatten(2).transpose(1, 2)  # (N, H*W, C)
        return h, [p(tokens) * self.feature_scale for p in self.projectors]


def _batch(seed, n=3, channels=4, size=2, z_dims=(6, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    noise = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    zs = [torch.randn(n, size * size, d, generator=g, dtype=dtype) for d in z_dims]
    t = torch.tensor([0.1, 0.5, 0.8][:n], dtype=dtype)
    return x, noise, y, zs, t


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("mode", MANIFOLD_MODES)
@pytest.mark.parametrize("schedule", ["constant", "dip"])
def test_total_equals_equation_5_by_hand(path_type, mode, schedule):
    torch.manual_seed(0)
    model = TinyModel().double()
    x, noise, y, zs, t = _batch(seed=11)
    parts = SILoss(path_type=path_type, manifold_mode=mode, lambda_schedule=schedule)(
        model, x, y, zs, t=t, noise=noise
    )
    assert set(parts) == {"velocity", "repa", "manifold", "total", "cos_sim"}
    assert all(p.ndim == 0 for p in parts.values())

    # By hand, from the same t and noise.
    tt = t.view(-1, 1, 1, 1)
    if path_type == "linear":
        x_t, target = (1 - tt) * x + tt * noise, noise - x
    else:
        c, s = torch.cos(math.pi / 2 * tt), torch.sin(math.pi / 2 * tt)
        x_t, target = c * x + s * noise, math.pi / 2 * (c * noise - s * x)
    x_in, t_in, y_in = model.calls[0]
    torch.testing.assert_close(x_in, x_t)
    assert torch.equal(t_in, t) and torch.equal(y_in, y)  # labels reach the model untouched
    with torch.no_grad():
        v, zs_tilde = model(x_t, t, y)
    vel = ((v - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    zs_np = [z.numpy() for z in zs]
    zt_np = [z.numpy() for z in zs_tilde]
    repa = np.mean([naive_repa(a, b) for a, b in zip(zs_np, zt_np, strict=True)], axis=0)
    ml = np.mean([naive_manifold(a, b, mode) for a, b in zip(zs_np, zt_np, strict=True)], axis=0)
    lam = np.array([0.5 * PRINTED[schedule](ti) for ti in t.tolist()])
    total = np.mean(vel + lam * (repa + 3.0 * ml))

    assert parts["velocity"].item() == pytest.approx(vel.mean(), rel=1e-10)
    assert parts["repa"].item() == pytest.approx(repa.mean(), rel=1e-10)
    assert parts["manifold"].item() == pytest.approx(ml.mean(), rel=1e-10)
    assert parts["cos_sim"].item() == pytest.approx(-repa.mean(), rel=1e-10)
    assert parts["total"].item() == pytest.approx(total, rel=1e-10)


def _forbid(monkeypatch, name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} must not run when its weight is 0")

    monkeypatch.setattr(loss, name, boom)


def test_zero_proj_coeff_is_plain_velocity_loss_and_skips_alignment(monkeypatch):
    _forbid(monkeypatch, "repa_loss_per_sample")
    _forbid(monkeypatch, "manifold_loss_per_sample")
    x, noise, y, zs, t = _batch(seed=12)
    parts = SILoss(proj_coeff=0.0)(TinyModel().double(), x, y, zs, t=t, noise=noise)
    assert torch.equal(parts["total"], parts["velocity"])
    for name in ("repa", "manifold", "cos_sim"):
        assert parts[name].item() == 0.0


def test_zero_manifold_coeff_skips_manifold(monkeypatch):
    _forbid(monkeypatch, "manifold_loss_per_sample")
    x, noise, y, zs, t = _batch(seed=13)
    parts = SILoss(manifold_coeff=0.0)(TinyModel().double(), x, y, zs, t=t, noise=noise)
    assert parts["manifold"].item() == 0.0
    expected = parts["velocity"] + 0.5 * parts["repa"]
    torch.testing.assert_close(parts["total"], expected, rtol=1e-12, atol=1e-12)


def test_sampled_t_and_noise_train_end_to_end():
    model = TinyModel()
    x, _, y, zs, _ = _batch(seed=14, n=4, dtype=torch.float32)
    loss_fn = SILoss(weighting="lognormal", manifold_mode="batch", lambda_schedule="rise")
    torch.manual_seed(1)
    first = loss_fn(model, x, y, zs)
    torch.manual_seed(1)
    again = loss_fn(model, x, y, zs)
    assert torch.equal(first["total"], again["total"])  # t and noise come from torch's RNG
    first["total"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_full_loss_under_bf16_autocast_with_large_features():
    torch.manual_seed(0)
    model = TinyModel(feature_scale=1e4)
    x, _, y, zs, _ = _batch(seed=15, n=4, dtype=torch.float32)
    zs = [z.half() * 1e4 for z in zs]  # stored fp16 encoder features, large norms
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = SILoss(manifold_mode="batch", chunk_size=5)(model, x, y, zs)
    assert all(torch.isfinite(p) and p.dtype == torch.float32 for p in parts.values())
    parts["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_no_host_synchronisation_on_cuda():
    model = TinyModel().cuda()
    x, _, y, zs, _ = _batch(seed=16, n=4, dtype=torch.float32)
    x, y, zs = x.cuda(), y.cuda(), [z.cuda() for z in zs]
    loss_fn = SILoss(
        weighting="lognormal", manifold_mode="batch", chunk_size=5, lambda_schedule="dip"
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        parts = loss_fn(model, x, y, zs)
        parts["total"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(parts["total"]).item()

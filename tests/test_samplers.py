"""Samplers against closed forms: exact Gaussian velocity fields, guidance, per-sample SDE noise."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn as nn

from samplers import (
    VelocityOnly,
    draw_noise_stream,
    euler_maruyama_sampler,
    euler_sampler,
    get_score_from_velocity,
)

SHAPE = (2, 2, 2)  # (C, H, W) of the toy "latents"


class GaussianVelocity(nn.Module):
    """The exact velocity field of data x0 ~ N(mu, s²) (independent per dimension).

    Along x_t = α_t x0 + σ_t ε the marginal is N(α_t mu, α_t² s² + σ_t²), and the velocity that
    transports it is affine in x: v = α̇ mu + (α α̇ s² + σ σ̇) / var_t · (x - α_t mu).
    Labels are ignored; `num_classes` is there for guidance.
    """

    num_classes = 3

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, path_type: str = "linear"):
        super().__init__()
        self.mu, self.s, self.path_type = mu.double(), s.double(), path_type

    def coefficients(self, t: torch.Tensor):
        t = t.double().view(-1, 1, 1, 1)
        if self.path_type == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        a, b = torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)
        return a, b, -math.pi / 2 * b, math.pi / 2 * a

    def forward(self, x, t, y):
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
        mean = alpha * self.mu
        var = alpha**2 * self.s**2 + sigma**2
        v = d_alpha * self.mu + (alpha * d_alpha * self.s**2 + sigma * d_sigma) / var * (x - mean)
        return v.to(x.dtype), []


def gaussian(path_type="linear"):
    mu = torch.tensor([1.5, -0.5, 0.0, 2.0, -1.0, 0.3, 0.7, -2.0]).view(SHAPE)
    s = torch.tensor([0.5, 1.0, 0.6, 2.0, 0.8, 1.5, 0.7, 1.2]).view(SHAPE)
    return GaussianVelocity(mu, s, path_type), mu.double(), s.double()


def noise(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_from_velocity_is_the_gaussian_score(path_type):
    model, mu, s = gaussian(path_type)
    x, t = noise(5), torch.tensor([0.9, 0.5, 0.3, 0.1, 0.04], dtype=torch.float64)
    alpha, sigma, _, _ = model.coefficients(t)
    exact = -(x - alpha * mu) / (alpha**2 * s**2 + sigma**2)
    v = model(x, t, None)[0]
    torch.testing.assert_close(get_score_from_velocity(v, x, t, path_type), exact)


def flow_map_error(model, x1, num_steps, heun):
    """Max |ODE endpoint - exact flow map|; the flow map of a Gaussian is affine:
    x_0 = mu + s · x_1."""
    y = torch.zeros(x1.shape[0], dtype=torch.long)
    out = euler_sampler(model, x1, y, num_steps=num_steps, heun=heun, path_type=model.path_type)
    assert out.dtype == torch.float64
    return (out - (model.mu + model.s * x1)).abs().max()


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_heun_ode_matches_the_exact_flow_map(path_type):
    model, _, _ = gaussian(path_type)
    x1 = noise(64)
    errors = [flow_map_error(model, x1, n, heun=True) for n in (100, 200)]
    assert errors[1] < 3e-4
    assert 3.6 < errors[0] / errors[1] < 4.4  # second order


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_euler_ode_converges_at_first_order(path_type):
    model, _, _ = gaussian(path_type)
    x1 = noise(64)
    errors = [flow_map_error(model, x1, n, heun=False) for n in (100, 200)]
    assert errors[1] < 0.04
    assert 1.8 < errors[0] / errors[1] < 2.2


def euler_maruyama_moments(model, num_steps):
    """Mean and std of the Euler-Maruyama sampler's output, in closed form.

    For Gaussian data the drift d = v - t·score is affine in x, so each step
    x' = x + dt·d(x, t) + sqrt(2t·|dt|)·ε maps N(m, q) to N(a·m + b, a²·q + 2t·|dt|), with
    d = A + B·x: a = 1 + dt·B, b = dt·A. The last step (0.04 -> 0) adds no noise.
    """
    t_steps = torch.cat([torch.linspace(1, 0.04, num_steps, dtype=torch.float64), torch.zeros(1)])
    mean, var = torch.zeros_like(model.mu), torch.ones_like(model.mu)
    for i, (t, t_next) in enumerate(pairwise(t_steps)):
        dt = t_next - t
        alpha, sigma, d_alpha, d_sigma = (c.view(()) for c in model.coefficients(t.view(1)))
        var_t = alpha**2 * model.s**2 + sigma**2
        slope = (alpha * d_alpha * model.s**2 + sigma * d_sigma) / var_t  # v = A + B x
        B = slope + t / var_t  # score = -(x - alpha mu) / var_t, weighted by w/2 = t
        A = d_alpha * model.mu - slope * alpha * model.mu - t * alpha * model.mu / var_t
        a, b = 1 + dt * B, dt * A
        mean, var = a * mean + b, a**2 * var
        if i < num_steps - 1:
            var = var + 2 * t * dt.abs()
    return mean, var.sqrt()


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_turns_noise_into_the_gaussian(path_type):
    model, mu, s = gaussian(path_type)
    n = 16000
    torch.manual_seed(0)
    out = euler_maruyama_sampler(
        model, noise(n, seed=1), torch.zeros(n, dtype=torch.long), num_steps=250,
        path_type=path_type,
    )  # fmt: skip
    # 1. The sampler is exactly the Euler-Maruyama scheme: Monte-Carlo moments within four
    #    standard errors of the scheme's moments in closed form.
    mean, std = euler_maruyama_moments(model, 250)
    assert ((out.mean(0) - mean).abs() < 4 * std / n**0.5).all()
    assert ((out.std(0) - std).abs() < 4 * std / (2 * n) ** 0.5).all()
    # 2. The scheme reaches the data distribution: 250 steps (and the last, deterministic step
    #    from t = 0.04, which removes the remaining noise and so narrows the result slightly)
    #    leave the std within 1.5 % of s and the mean within 1 % of |mu| + s.
    assert ((mean - mu).abs() < 0.01 * (mu.abs() + s)).all()
    assert ((std / s - 1).abs() < 0.015).all()
    # 3. Hence, directly: the samples have mean mu and std s.
    assert ((out.mean(0) - mu).abs() < 0.01 * (mu.abs() + s) + 4 * s / n**0.5).all()
    assert ((out.std(0) / s - 1).abs() < 0.015 + 4 / (2 * n) ** 0.5).all()


def test_sde_accepts_a_noise_tensor_and_a_callable():
    model, _, _ = gaussian()
    x1, y = noise(3), torch.zeros(3, dtype=torch.long)
    eps = torch.randn(9, 3, *SHAPE, generator=torch.Generator().manual_seed(2))
    a = euler_maruyama_sampler(model, x1, y, num_steps=10, noises=eps)
    b = euler_maruyama_sampler(model, x1, y, num_steps=10, noises=lambda i: eps[i])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_steps - 1"):
        euler_maruyama_sampler(model, x1, y, num_steps=11, noises=eps)


def test_sde_per_sample_noise_is_independent_of_batch_composition():
    model, _, _ = gaussian()
    x1, y = noise(6), torch.zeros(6, dtype=torch.long)

    def generators(indices):
        return [torch.Generator().manual_seed(100 + i) for i in indices]

    kwargs = dict(num_steps=20, cfg_scale=1.5, guidance_high=0.7)
    whole = euler_maruyama_sampler(model, x1, y, noises=generators(range(6)), **kwargs)
    order = [4, 0, 2]  # another batch, another order
    part = euler_maruyama_sampler(model, x1[order], y[order], noises=generators(order), **kwargs)
    torch.testing.assert_close(part, whole[order], rtol=0, atol=0)


class LabelledLinear(nn.Module):
    """v = a·x + b[y] (null class included): a spy that records (batch size, t) of each call."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.b = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=torch.float64)  # index 3: null class
        self.calls: list[tuple[int, float]] = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0])))
        return -0.3 * x + self.b[y].view(-1, 1, 1, 1), []


def test_guidance_scale_one_equals_no_guidance_and_runs_undoubled():
    model = LabelledLinear()
    x1, y = noise(4), torch.tensor([0, 1, 2, 1])
    plain = euler_sampler(model, x1, y, num_steps=8)
    guided = euler_sampler(model, x1, y, num_steps=8, cfg_scale=1.0, guidance_high=0.7)
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)
    assert {size for size, _ in model.calls} == {4}


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_guidance_only_inside_the_interval_with_undoubled_batch_outside(sampler):
    model = LabelledLinear()
    x1, y = noise(4), torch.tensor([0, 1, 2, 1])
    sampler(model, x1, y, num_steps=10, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)
    assert len(model.calls) == 10
    for size, t in model.calls:
        assert size == (8 if t <= 0.7 else 4), (size, t)


def test_guided_step_is_uncond_plus_scale_times_difference():
    # One Euler step from t = 1 to 0: x0 = x1 - v, with v = v_u + s (v_c - v_u).
    model = LabelledLinear()
    x1, y = noise(4), torch.tensor([0, 1, 2, 1])
    out = euler_sampler(model, x1, y, num_steps=1, cfg_scale=2.5)
    v_c = -0.3 * x1 + model.b[y].view(-1, 1, 1, 1)
    v_u = -0.3 * x1 + model.b[3]
    torch.testing.assert_close(out, x1 - (v_u + 2.5 * (v_c - v_u)))


def test_heun_corrector_and_step_counts():
    model = LabelledLinear()
    x1, y = noise(2), torch.tensor([0, 1])
    euler_sampler(model, x1, y, num_steps=5, heun=True)
    assert len(model.calls) == 2 * 5 - 1  # no corrector on the last step (t_next = 0)
    model.calls.clear()
    euler_maruyama_sampler(model, x1, y, num_steps=5)
    times = [t for _, t in model.calls]
    torch.testing.assert_close(torch.tensor(times), torch.linspace(1, 0.04, 5).float())


# --------------------------------------------------------------------------- pre-drawn SDE noise


@pytest.mark.parametrize("shape", [(4, 32, 32), (4, 8, 8), (2, 2, 2), (3, 5, 5)])
def test_noise_stream_is_the_step_by_step_draws(shape):
    """One (K, *shape) draw per generator equals K draws of `shape` (blocks of 16 normals on the
    CPU; other sizes take the step-by-step path): samples keep their noise bit for bit."""
    seeds = [11, 12, 13]
    stream = draw_noise_stream([torch.Generator().manual_seed(s) for s in seeds], 5, shape)
    assert stream.shape == (5, 3, *shape) and stream.dtype == torch.float32
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for step in range(5):
        expected = torch.stack([torch.randn(shape, generator=g) for g in generators])
        assert torch.equal(stream[step], expected)


def test_sde_with_a_noise_stream_equals_per_sample_generators():
    model, _, _ = gaussian()
    x1, y = noise(4).float(), torch.zeros(4, dtype=torch.long)
    kwargs = dict(num_steps=6, cfg_scale=1.5, guidance_high=0.7)
    stepwise = euler_maruyama_sampler(
        model, x1, y, noises=[torch.Generator().manual_seed(s) for s in range(4)], **kwargs
    )
    stream = draw_noise_stream([torch.Generator().manual_seed(s) for s in range(4)], 5, SHAPE)
    assert torch.equal(euler_maruyama_sampler(model, x1, y, noises=stream, **kwargs), stepwise)


class HeadedGaussian(GaussianVelocity):
    """The Gaussian field with a projector-like output that `return_zs=False` drops."""

    def forward(self, x, t, y, return_zs=True):
        v, _ = super().forward(x, t, y)
        return v, [x.flatten(1)] if return_zs else []


def test_velocity_only_samples_the_same():
    mu, s = gaussian()[1:]
    model = HeadedGaussian(mu.float(), s.float())
    x1, y = noise(3).float(), torch.zeros(3, dtype=torch.long)
    for sampler in (euler_sampler, euler_maruyama_sampler):
        torch.manual_seed(0)
        plain = sampler(model, x1, y, num_steps=5, cfg_scale=2.0)
        torch.manual_seed(0)
        assert torch.equal(sampler(VelocityOnly(model), x1, y, num_steps=5, cfg_scale=2.0), plain)

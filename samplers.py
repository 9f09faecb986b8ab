"""ODE and SDE samplers for velocity-predicting diffusion transformers (REPA's `samplers.py`).

Same function names, signatures and numerics as REPA's, so that a REPA user gets the same samples
from the same velocity field:

* `euler_sampler`: Euler (or Heun) on the probability-flow ODE, t on linspace(1, 0, steps + 1).
* `euler_maruyama_sampler`: Euler-Maruyama on the reverse SDE, t on linspace(1, 0.04, steps),
  then one last deterministic step from 0.04 to 0 that returns the mean (no noise). Diffusion
  w(t) = 2t and drift v - w(t)/2 · score, the score computed from the velocity. REPA's paper
  writes w_t = σ_t; its released sampler, which produced its numbers, uses 2t: we follow the code.

Conventions (SiT/REPA, as `loss.py`): t = 1 is noise, x_t = α_t x + σ_t ε, the model returns
(v, zs) with v = d x_t / dt, and the null class for guidance is `model.num_classes`.

The sampler state lives in float64 (as REPA); the model is called in the dtype of `latents`
(and under whatever autocast the caller has entered). The result is float64.

Classifier-free guidance, v = v_u + s (v_c - v_u), runs only while guidance_low <= t <=
guidance_high; outside that interval the model sees the un-doubled batch. As in REPA, the caller
passes N latents and labels and the sampler doubles them to 2N (conditional, null) only inside
the interval. Differences from REPA: guidance is applied for any scale != 1 (REPA: only > 1), the
null class is `model.num_classes` (REPA: 1000), and the SDE noise can be supplied per sample
(`noises`) so that each image depends on its own seed only, whatever batch it is drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, Protocol

import torch
from torch import Tensor

from urepa.interpolant import interpolant


class VelocityModel(Protocol):
    """What the samplers need of a model: `model(x, t, y) -> (v, zs)` and its null class index."""

    num_classes: int

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]: ...


class AlignedModel(Protocol):
    """A model with projector heads that it can skip: `model(x, t, y, return_zs=False)`."""

    num_classes: int

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, *, return_zs: bool = ...) -> Any: ...


class VelocityOnly:
    """`model` as the samplers call it, without its projector heads: sampling uses v only, so
    `model(x, t, y, return_zs=False)` (models/base.py) skips their work and returns the same v."""

    def __init__(self, model: AlignedModel):
        self.model = model
        self.num_classes = model.num_classes

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.model(x, t, y, return_zs=False)


# What `euler_maruyama_sampler(noises=...)` accepts: None (the global RNG, REPA's behaviour), a
# (num_steps - 1, N, C, H, W) tensor, a callable step -> (N, C, H, W), or one torch.Generator per
# sample (each draws its sample's noise, step after step).
NoiseSpec = Tensor | Callable[[int], Tensor] | Sequence[torch.Generator] | None


def get_score_from_velocity(vt: Tensor, xt: Tensor, t: Tensor, path_type: str = "linear") -> Tensor:
    """Score ∇ log p_t(x) from the velocity: s = (α/α̇ · v - x) / (σ² - α/α̇ · σ̇ · σ).

    vt, xt: (N, ...); t: (N,) or a 0-dim tensor.
    """
    t = t.reshape(-1, *[1] * (xt.ndim - 1)) if t.ndim else t  # (N, 1, ..., 1)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    reverse_alpha_ratio = alpha / d_alpha
    var = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * vt - xt) / var


def compute_diffusion(t_cur: Tensor) -> Tensor:
    """Diffusion coefficient w(t) = 2t of REPA's released SDE sampler."""
    return 2 * t_cur


def guidance_active(t: Tensor | float, cfg_scale: float, low: float, high: float) -> bool:
    """True when classifier-free guidance applies at time t (the interval is closed)."""
    return cfg_scale != 1.0 and low <= float(t) <= high


def model_velocity(
    model: VelocityModel, x: Tensor, t: Tensor | float, y: Tensor, guided: bool, dtype: torch.dtype
) -> Tensor:
    """v(x, t | y) in float64: (N, ...), or, when `guided`, (2N, ...) with the conditional half
    first and the null-class half second (one forward for both).

    x: (N, ...) float64 state; y: (N,) labels. The model runs in `dtype`.
    """
    if guided:
        x = torch.cat([x, x], dim=0)  # (2N, ...)
        y = torch.cat([y, torch.full_like(y, model.num_classes)], dim=0)  # conditional, null
    t_in = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
    return model(x.to(dtype), t_in.to(dtype), y=y)[0].to(torch.float64)


def apply_guidance(out: Tensor, cfg_scale: float, guided: bool) -> Tensor:
    """(2N, ...) [conditional; null] -> (N, ...) u + s (c - u); unguided (N, ...) unchanged."""
    if not guided:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def euler_sampler(
    model: VelocityModel,
    latents: Tensor,
    y: Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",  # unused: the ODE needs only v; kept for REPA's signature
) -> Tensor:
    """Probability-flow ODE from t = 1 (latents ~ N(0, I)) to t = 0, Euler or Heun steps.

    latents: (N, C, H, W) noise, in the dtype the model should run in; y: (N,) labels.
    Returns (N, C, H, W) float64 samples. Heun skips its correction on the last step (t = 0),
    as REPA's does, so it costs 2·num_steps - 1 model evaluations.
    """
    model_dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(pairwise(t_steps)):
        x_cur = x_next
        guided = guidance_active(t_cur, cfg_scale, guidance_low, guidance_high)
        d_cur = model_velocity(model, x_cur, t_cur, y, guided, model_dtype)
        d_cur = apply_guidance(d_cur, cfg_scale, guided)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            # The corrector at t_next keeps the guidance decision made at t_cur (REPA's choice).
            d_prime = model_velocity(model, x_next, t_next, y, guided, model_dtype)
            d_prime = apply_guidance(d_prime, cfg_scale, guided)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def sde_noise_source(noises: NoiseSpec, x: Tensor, num_draws: int) -> Callable[[int], Tensor]:
    """Normalise `noises` (see NoiseSpec) to a function: step i -> ε_i like x (float64)."""
    if noises is None:
        return lambda i: torch.randn_like(x)
    if isinstance(noises, Tensor):
        expected = (num_draws, *x.shape)
        if tuple(noises.shape) != expected:
            raise ValueError(
                f"noises must have shape (num_steps - 1, N, C, H, W) = {expected}: one draw per "
                f"stochastic step (the last step is deterministic); got {tuple(noises.shape)}"
            )
        return lambda i: noises[i].to(x)
    if callable(noises):
        return lambda i: noises(i).to(x)
    generators = list(noises)
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per sample: {x.shape[0]}, got {len(generators)}")

    def per_sample(i: int) -> Tensor:
        # Each sample's stream advances by exactly one (C, H, W) draw per step, so its noise is
        # the same whichever batch it is sampled in.
        draws = [
            torch.randn(x.shape[1:], generator=gen, device=gen.device, dtype=torch.float32)
            for gen in generators
        ]
        return torch.stack(draws).to(x)

    return per_sample


# PyTorch's CPU normal sampler turns consecutive uniforms into normals in blocks of 16 values,
# so one draw of (K, *shape) equals K consecutive draws of `shape` when prod(shape) is a multiple
# of 16 (tests/test_samplers.py checks it). Other shapes are drawn step by step.
_NORMAL_BLOCK = 16


def draw_noise_stream(
    generators: Sequence[torch.Generator], num_draws: int, shape: Sequence[int]
) -> Tensor:
    """Each sample's whole SDE noise stream at once: (num_draws, N, *shape) float32.

    Bit for bit what `euler_maruyama_sampler(noises=generators)` draws step by step (one `shape`
    per step from each generator), so it can be passed as `noises` instead: then the sampler does
    no per-step Python loop over the batch and no per-step host-to-device copy.
    """
    shape = tuple(shape)
    if math.prod(shape) % _NORMAL_BLOCK == 0:
        draws = [
            torch.randn((num_draws, *shape), generator=gen, device=gen.device, dtype=torch.float32)
            for gen in generators
        ]  # N × (K, *shape)
    else:
        draws = [
            torch.stack(
                [
                    torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
                    for _ in range(num_draws)
                ]
            )
            for gen in generators
        ]
    return torch.stack(draws, dim=1)  # (K, N, *shape)


@torch.no_grad()
def euler_maruyama_sampler(
    model: VelocityModel,
    latents: Tensor,
    y: Tensor,
    num_steps: int = 20,
    heun: bool = False,  # unused: Euler-Maruyama only; kept for REPA's signature
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    noises: NoiseSpec = None,
) -> Tensor:
    """Reverse SDE dx = [v - w(t)/2 · s] dt + sqrt(w(t)) dW̄ from t = 1 to 0.04, then the mean.

    latents: (N, C, H, W) noise, in the dtype the model should run in; y: (N,) labels.
    num_steps model evaluations: num_steps - 1 stochastic steps on linspace(1, 0.04, num_steps)
    and a last deterministic Euler step to t = 0. Guidance is applied to the drift, as REPA
    does (the drift is affine in v, so this is the drift of the guided v up to rounding).
    Returns (N, C, H, W) float64 samples.
    """
    model_dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    x_next = latents.to(torch.float64)
    noise = sde_noise_source(noises, x_next, num_steps - 1)

    def drift(x: Tensor, t: Tensor) -> Tensor:
        guided = guidance_active(t, cfg_scale, guidance_low, guidance_high)
        velocity = model_velocity(model, x, t, y, guided, model_dtype)  # (N or 2N, ...)
        x = torch.cat([x, x], dim=0) if guided else x
        score = get_score_from_velocity(velocity, x, t, path_type)
        return apply_guidance(velocity - 0.5 * compute_diffusion(t) * score, cfg_scale, guided)

    for i, (t_cur, t_next) in enumerate(pairwise(t_steps[:-1])):
        dt = t_next - t_cur  # negative: time runs backwards
        x_cur = x_next
        deps = noise(i) * torch.sqrt(torch.abs(dt))
        x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(compute_diffusion(t_cur)) * deps

    # Last step, 0.04 -> 0: the mean of the Euler-Maruyama update, no noise (REPA).
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)

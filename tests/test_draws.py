"""The per-step draws of urepa/data_plan.py: a counter-based generator (SplitMix64, int64 tensors).

Checked against a pure-Python SplitMix64 and its published outputs, for slices that equal the
slice of the whole global batch bit for bit, and for their statistics: moments, distribution
(Kolmogorov–Smirnov distance) and independence across elements, positions, steps, purposes and
seeds. The draws are fixed by their seeds, so the tolerances (about 5 standard errors, or the
KS distance of a 0.1 % test) either pass or fail, always the same way.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from urepa.data_plan import (
    DRAWS_VERSION,
    GAMMA,
    StepDraws,
    draws_mismatch,
    mix64,
    normals,
    random_words,
    stream_key,
    uniforms,
)

WORD = (1 << 64) - 1


def splitmix64(state: int, count: int) -> list[int]:
    """SplitMix64 in Python integers (Steele, Lea & Flood 2014): the reference."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & WORD
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & WORD
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & WORD
        out.append(z ^ (z >> 31))
    return out


def unsigned(t: Tensor) -> list[int]:
    return [v & WORD for v in t.tolist()]


def test_mix64_is_splitmix64():
    # SplitMix64's published outputs for the state 1234567
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423,
                4593380528125082431, 16408922859458223821]  # fmt: skip
    assert splitmix64(1234567, 5) == expected
    states = torch.tensor([1234567]) + torch.arange(1, 6) * GAMMA
    assert unsigned(mix64(states)) == expected
    # words of several streams, with keys and positions whose int64 sums overflow
    for key in (0, 2**63 - 1, -(2**63), -12345):
        positions = torch.tensor([0, 1, 7, 2**31 + 5])
        got = random_words(key, positions, 4)
        for p, row in zip(positions.tolist(), got, strict=True):
            start = splitmix64((key + (p - 1) * 0x9E3779B97F4A7C15) & WORD, 1)[0]
            assert unsigned(row) == splitmix64(start, 4), (key, p)


def test_uniforms_and_normals_are_their_formulas():
    words = random_words(stream_key(0, 0, 1), torch.arange(3), 5)  # (3, 5)
    u = uniforms(words)
    z = normals(words, 9)  # 10 normals per row, the last one dropped
    assert z.shape == (3, 9)
    for i, row in enumerate(words.tolist()):
        for j, w in enumerate(row):
            w &= WORD
            low, high = w & 0xFFFFFF, w >> 40
            assert u[i, j].item() == low / 2**24  # exact
            radius = math.sqrt(-2 * math.log1p(-high / 2**24))
            angle = 2 * math.pi * low / 2**24
            assert z[i, j].item() == pytest.approx(radius * math.cos(angle), abs=2e-6)
            if 5 + j < 9:
                assert z[i, 5 + j].item() == pytest.approx(radius * math.sin(angle), abs=2e-6)


@pytest.mark.parametrize(
    "weighting, shape", [("uniform", (4, 8, 8)), ("lognormal", (3, 3, 3))]
)  # an odd number of elements leaves one normal of each row's last word unused
def test_a_slice_is_the_slice_of_the_global_draw(weighting, shape):
    draws = StepDraws(weighting, "linear", cfg_prob=0.3)
    whole = draws.draw(seed=3, step=11, n=48, latent_shape=shape)
    for start, n in [(0, 48), (0, 6), (6, 6), (40, 8), (13, 1)]:
        part = draws.draw(seed=3, step=11, n=n, latent_shape=shape, start=start)
        for key, value in whole.items():
            assert torch.equal(part[key], value[start : start + n]), (start, n, key)
    assert not torch.equal(whole["noise"], draws.draw(3, 12, 48, shape)["noise"])
    assert not torch.equal(whole["noise"], draws.draw(4, 11, 48, shape)["noise"])


@pytest.mark.parametrize("threads", [1, 3])
def test_the_functions_of_the_draws_round_an_element_alike_in_any_tensor(threads):
    """Slices equal the whole draw only if torch's CPU kernels give an element the same bits
    wherever it sits, in a tensor of any length, with any number of threads (a kernel's
    vectorised and scalar paths agree). True of the functions the draws use; not of
    torch.sigmoid, which `loss.time_from` therefore avoids."""
    x = torch.rand(70001, generator=torch.Generator().manual_seed(0)) * 4 - 2  # > 2 grains
    functions = {  # each on arguments in its domain
        "log1p": lambda v: torch.log1p(v.abs() * -0.49),
        "sqrt": lambda v: torch.sqrt(v.abs()),
        **{f.__name__: f for f in (torch.cos, torch.sin, torch.exp, torch.atan)},
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, f in functions.items():
            whole = f(x)
            for start, n in [(0, 1), (5, 3), (7, 31), (3, 33), (11, 100), (1, 40001)]:
                assert torch.equal(f(x[start : start + n]), whole[start : start + n]), (name, n)
    finally:
        torch.set_num_threads(before)


def normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def ks_distance(sample: Tensor, cdf) -> float:
    """Kolmogorov–Smirnov distance of a sample from a distribution function."""
    x = sample.double().sort().values
    n = len(x)
    f = cdf(x)
    return max(
        (torch.arange(1, n + 1) / n - f).max().item(), (f - torch.arange(n) / n).max().item()
    )


def ks_bound(n: int) -> float:
    return 1.95 / math.sqrt(n)  # exceeded with probability 0.001


def assert_uncorrelated(a: Tensor, b: Tensor, what: str) -> None:
    a, b = a.double().flatten(), b.double().flatten()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(len(a)), (what, r)


def test_normals_have_the_standard_normal_distribution():
    d = StepDraws().draw(seed=0, step=1, n=64, latent_shape=(4, 32, 32))
    for key in ("noise", "eps"):
        z = d[key].double().flatten()  # 262,144 values
        n = len(z)
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
        assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)  # skewness
        assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis
        assert ks_distance(z, normal_cdf) < ks_bound(n)
        tail = (z.abs() > 3).double().mean().item()  # 0.0027
        assert abs(tail - 0.0027) < 5 * math.sqrt(0.0027 / n)


def test_times_and_label_dropout_have_their_distributions():
    n = 40000
    d = StepDraws("uniform", cfg_prob=0.1).draw(seed=0, step=2, n=n, latent_shape=(1,))
    t = d["t"].double()
    assert d["t"].dtype == torch.float32 and t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(t.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    assert ks_distance(t, lambda x: x) < ks_bound(n)
    assert abs(d["drop"].double().mean().item() - 0.1) < 5 * math.sqrt(0.09 / n)
    # lognormal: logit(t) ~ N(0, 1) on the linear path; lognormal-edm: N(-1.2, 1.2²)
    for weighting, mean, std in [("lognormal", 0.0, 1.0), ("lognormal-edm", -1.2, 1.2)]:
        t = StepDraws(weighting).draw(seed=0, step=2, n=n, latent_shape=(1,))["t"].double()
        z = (torch.logit(t) - mean) / std
        assert ks_distance(z, normal_cdf) < ks_bound(n), weighting


def test_draws_are_independent_across_elements_positions_steps_purposes_and_seeds():
    def draw(seed: int = 0, step: int = 0) -> dict[str, Tensor]:
        return StepDraws().draw(seed, step, n=64, latent_shape=(4, 16, 16))

    base = draw()
    z = base["noise"].flatten(1)  # (64, 1024): cosines in columns :512, their sines after
    assert_uncorrelated(z[:, :-1], z[:, 1:], "neighbouring elements")
    assert_uncorrelated(z[:, :512], z[:, 512:], "the two normals of one word")
    assert_uncorrelated(z[:, :512] ** 2, z[:, 512:] ** 2, "their squares (a shared radius)")
    assert_uncorrelated(z[:-1], z[1:], "neighbouring positions")
    assert_uncorrelated(base["noise"], base["eps"], "noise and posterior sample")
    assert_uncorrelated(base["noise"], draw(step=1)["noise"], "neighbouring steps")
    assert_uncorrelated(base["noise"], draw(seed=1)["noise"], "neighbouring seeds")
    # t and dropout of a position: separate purposes
    many = StepDraws(cfg_prob=0.5).draw(0, 0, n=40000, latent_shape=(1,))
    assert_uncorrelated(many["t"], many["drop"].double(), "time and label dropout")
    assert_uncorrelated(many["t"][:-1], many["t"][1:], "times of neighbouring positions")
    # every bit of the raw words is a fair coin (a wrong shift or mask would fix some)
    words = random_words(stream_key(0, 0, 2), torch.arange(64), 256).flatten()
    bits = torch.stack([(words >> b) & 1 for b in range(64)]).double().mean(dim=1)
    assert ((bits - 0.5).abs() < 5 * 0.5 / math.sqrt(len(words))).all(), bits


def test_checkpoints_of_other_draws_cannot_resume():
    assert draws_mismatch({"step": 4, "draws": DRAWS_VERSION}) is None
    message = draws_mismatch({"step": 4})  # written before checkpoints recorded the draws
    assert message is not None and "version 1" in message and "\n" not in message

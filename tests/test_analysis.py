"""analysis/: CKNNA against float64 loops written from its definition (and the cases the
definition decides), linear probing against what separable and random labels must give, the
projector metrics against direct formulas, and `python -m analysis` end to end on a tiny SiT↓ and
the toy dataset of conftest.py (1 and 2 processes)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.__main__ import (
    checkpoint_step,
    encoder_names,
    main,
    parse_args,
    projector_heads,
)
from analysis.features import draw_noise
from analysis.metrics import (
    cknna,
    linear_probe,
    manifold_distance,
    prepare_features,
    token_similarity,
)
from dataset import LatentDataset
from models import build_model
from urepa.checkpoints import checkpoint_state, load_model_for_sampling, save_checkpoint
from urepa.encoders import ENCODER_STANDIN
from urepa.vae import sample_latents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------
# CKNNA from its definition, in float64 Python loops
# --------------------------------------------------------------------------------------------


def naive_knn(gram: list[list[float]], i: int, k: int) -> set[int]:
    """Row i's k largest off-diagonal entries (k nearest neighbours by inner product)."""
    others = sorted((j for j in range(len(gram)) if j != i), key=lambda j: -gram[i][j])
    return set(others[:k])


def naive_hsic(K: list[list[float]], L: list[list[float]]) -> float:
    """Song et al. (2012) Eq. 5 with explicit sums: K~, L~ have a zero diagonal,
    [sum_ij K~_ij L~_ji + sum K~ sum L~ / ((m-1)(m-2)) - 2/(m-2) sum_ijq K~_ij L~_jq] / (m(m-3))."""
    m = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(m)] for i in range(m)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(m)] for i in range(m)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(m) for j in range(m))
    total = sum(map(sum, Kt)) * sum(map(sum, Lt)) / ((m - 1) * (m - 2))
    paths = sum(Kt[i][j] * Lt[j][q] for i in range(m) for j in range(m) for q in range(m))
    return (trace + total - 2 * paths / (m - 2)) / (m * (m - 3))


def naive_cknna(a: np.ndarray, b: np.ndarray, k: int, eps: float = 1e-6) -> float:
    """alpha(i, j) = [j in knn_K(i) and j in knn_L(i)]; HSIC of the kernels masked by alpha."""
    m = len(a)
    K = [[float(np.dot(a[i], a[j])) for j in range(m)] for i in range(m)]
    L = [[float(np.dot(b[i], b[j])) for j in range(m)] for i in range(m)]
    nk = [naive_knn(K, i, k) for i in range(m)]
    nl = [naive_knn(L, i, k) for i in range(m)]

    def masked(G: list[list[float]], keep: list[set[int]]) -> list[list[float]]:
        return [[G[i][j] if j in keep[i] else 0.0 for j in range(m)] for i in range(m)]

    both = [nk[i] & nl[i] for i in range(m)]
    kl = naive_hsic(masked(K, both), masked(L, both))
    kk = naive_hsic(masked(K, nk), masked(K, nk))
    ll = naive_hsic(masked(L, nl), masked(L, nl))
    return kl / (np.sqrt(kk * ll) + eps)


def unbiased_cka_ustatistic(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA with HSIC as the U-statistic over distinct quadruples (Song et al. 2012, Eq. 4
    and Theorem 2): h = K_ij L_ij + K_ij L_qr - 2 K_ij L_iq."""
    m = len(a)
    K, L = a @ a.T, b @ b.T

    def hsic(P: np.ndarray, Q: np.ndarray) -> float:
        total, count = 0.0, 0
        for i in range(m):
            for j in range(m):
                for q in range(m):
                    for r in range(m):
                        if len({i, j, q, r}) == 4:
                            total += P[i, j] * Q[i, j] + P[i, j] * Q[q, r] - 2 * P[i, j] * Q[i, q]
                            count += 1
        return total / count

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def related_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 6, generator=g)
    b = torch.tanh(a @ torch.randn(6, 5, generator=g)) + 0.7 * torch.randn(n, 5, generator=g)
    return a, b


@pytest.mark.parametrize("k", [2, 5, 11])
def test_cknna_matches_the_definition(k):
    a, b = related_features(24, seed=k)
    expected = naive_cknna(a.double().numpy(), b.double().numpy(), k)
    assert cknna(a.double(), b.double(), topk=k) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert cknna(a, b, topk=k) == pytest.approx(expected, rel=1e-4, abs=1e-6)  # fp32 input


def test_cknna_with_every_neighbour_is_unbiased_cka():
    a, b = related_features(8, seed=3)
    expected = unbiased_cka_ustatistic(a.double().numpy(), b.double().numpy())
    assert cknna(a.double(), b.double(), topk=7, eps=0) == pytest.approx(expected, rel=1e-10)


def test_cknna_known_cases():
    a, b = related_features(40, seed=1)
    a, b = a.double(), b.double()
    assert cknna(a, a, eps=0) == pytest.approx(1.0, abs=1e-12)
    assert cknna(a, a * 5 + 0, eps=0) == pytest.approx(1.0, abs=1e-12)  # a scaled copy
    value = cknna(a, b, eps=0)
    assert 0.05 < value < 1  # related, not identical
    rotation = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    perm = torch.randperm(40)
    assert cknna(a @ rotation, b, eps=0) == pytest.approx(value, rel=1e-9)  # K = A A^T
    assert cknna(a * 3, b / 2, eps=0) == pytest.approx(value, rel=1e-9)  # scale-free ratio
    assert cknna(a[perm], b[perm], eps=0) == pytest.approx(value, rel=1e-9)  # sample order
    # Not symmetric in (a, b): the masked kernels are not symmetric matrices, and the estimator's
    # 1'K~L~1 term then depends on their order (as in the reference code).
    assert cknna(b, a, eps=0) == pytest.approx(value, rel=0.1)
    unrelated = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert abs(cknna(a, unrelated, eps=0)) < value / 2


@pytest.mark.parametrize(
    "a, b, k",
    [((8, 3), (7, 3), 2), ((8, 3), (8, 3), 1), ((8, 3), (8, 3), 8), ((8,), (8,), 2)],
)
def test_cknna_refuses_bad_input(a, b, k):
    with pytest.raises(ValueError):
        cknna(torch.randn(a), torch.randn(b), topk=k)


def test_prepare_features_clips_then_normalises():
    x = torch.randn(30, 50, generator=torch.Generator().manual_seed(0)) ** 3
    q = np.mean([np.quantile(np.abs(row), 0.95) for row in x.double().numpy()])
    clipped = np.clip(x.double().numpy(), -q, q)
    expected = clipped / np.linalg.norm(clipped, axis=1, keepdims=True)
    np.testing.assert_allclose(prepare_features(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prepare_features(x, 1).numpy(), F.normalize(x).numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Linear probing
# --------------------------------------------------------------------------------------------


def test_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(1600) % 4
    x = means[y] + torch.randn(1600, 16, generator=g) + 10  # offset: the batch norm removes it
    acc = linear_probe(x[:800], y[:800], x[800:], y[800:], 4, epochs=20, batch_size=400)
    assert acc == 1.0


def test_probe_trains_when_the_last_batch_would_hold_one_sample():
    """801 training samples in batches of 400: the batch norm cannot train on a batch of one, so
    that sample joins the batch before."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(1601) % 4
    x = means[y] + torch.randn(1601, 16, generator=g)
    acc = linear_probe(x[:801], y[:801], x[801:], y[801:], 4, epochs=20, batch_size=400)
    assert acc == 1.0


def test_probe_on_random_labels_is_at_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6000, 32, generator=g)
    y = torch.randint(4, (6000,), generator=g)
    acc = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], 4, epochs=10, batch_size=1000)
    assert abs(acc - 0.25) < 0.04  # 4000 test images: std of chance is 0.007


# --------------------------------------------------------------------------------------------
# Projector metrics (loss.py's terms)
# --------------------------------------------------------------------------------------------


def test_token_similarity_and_manifold_distance():
    g = torch.Generator().manual_seed(2)
    z, h = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    cos = F.cosine_similarity(z, h, dim=-1).mean(dim=1)
    torch.testing.assert_close(token_similarity(z, h), cos)
    zn, hn = F.normalize(z, dim=-1), F.normalize(h, dim=-1)
    gram_diff = (zn @ zn.transpose(1, 2) - hn @ hn.transpose(1, 2)).square().mean(dim=(1, 2))
    torch.testing.assert_close(manifold_distance(z, h), gram_diff)
    torch.testing.assert_close(manifold_distance(z, 2 * z), torch.zeros(3), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# python -m analysis, end to end
# --------------------------------------------------------------------------------------------

TINY_KWARGS = dict(input_size=8, hidden_size=32, depths=(1, 1, 1), num_heads=2, num_classes=4,
                   z_dims=[32], projector_dim=16)  # fmt: skip
ARGS = {"path_type": "linear", "enc_type": ENCODER_STANDIN}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two checkpoints of a tiny SiT↓ (random weights) whose head aligns to the stand-in."""
    folder = tmp_path_factory.mktemp("analysis-run")
    for step in (100, 200):
        torch.manual_seed(step)
        model = build_model("SiTDown", **TINY_KWARGS)
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        save_checkpoint(str(folder / f"{step:07d}.pt"), checkpoint_state(model, model, step, ARGS))
    return folder


def analysis_argv(run_dir, data_dir, out, *extra):
    return ["--ckpt", str(run_dir / "0000100.pt"), str(run_dir / "0000200.pt"),
            "--data-dir", data_dir, "--output-dir", str(out), "--num-samples", "12",
            "--layers", "all", "--timesteps", "0.25,0.75", "--batch-size", "5",
            "--probe-epochs", "2", "--probe-batch-size", "16", "--topk", "3", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def single(run_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis-out")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        main(parse_args(analysis_argv(run_dir, data_dir, out)))
    with open(out / "results.json") as f:
        return out, json.load(f), stdout.getvalue(), stderr.getvalue()


def find(records, **match):
    hits = [r for r in records if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, match
    return hits[0]["value"]


def test_command_writes_every_metric_and_plot(single):
    out, results, _, _ = single
    records = results["records"]
    # 2 checkpoints x 3 blocks x 2 times x (probe + cknna) + 2 x 2 times x (cos + manifold)
    # + the encoder's own probe
    assert len(records) == 2 * 3 * 2 * 2 + 2 * 2 * 2 + 1
    assert {r["step"] for r in records} == {100, 200}
    assert results["settings"]["eval_images"] == 12
    assert results["settings"]["probe_train_images"] == 20
    for name in ("per_layer.png", "per_timestep.png", "across_checkpoints.png"):
        assert os.path.getsize(out / name) > 1000
    assert all(0 <= r["value"] <= 1 for r in records if r["metric"] == "probe_top1")


def test_command_shows_the_progress_of_every_phase_and_why_cknna_may_exceed_1(single):
    _, results, stdout, stderr = single
    for phase in ("0000100.pt eval", "0000100.pt probe", "0000100.pt metrics",
                  "0000200.pt metrics"):  # fmt: skip
        assert phase in stderr  # tqdm bars: the features, then the probes and CKNNA
    assert "drawing the plots in" in stdout
    largest = max(r["value"] for r in results["records"] if r["metric"] == "cknna")
    note = results["settings"]["cknna_note"]
    assert f"largest here {largest:.3f}, on 12 images" in note and "can exceed 1" in note
    assert stdout.rstrip().endswith(note)


def test_command_metrics_match_a_direct_computation(single, run_dir, data_dir):
    """Block 2 (the tap) at t = 0.75 and step 200, recomputed without hooks or the command."""
    _, results, _, _ = single
    records, t = results["records"], 0.75
    model = load_model_for_sampling(str(run_dir / "0000200.pt"))
    data = LatentDataset(data_dir)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:12]
    samples = [data[int(i)] for i in order]
    moments = torch.stack([s["moments"] for s in samples])
    eps, noise = draw_noise(order, (4, 8, 8), seed=0)
    x_t = (1 - t) * sample_latents(moments, noise=eps) + t * noise
    tt = torch.full((12,), t)
    c = model.t_embedder(tt) + model.y_embedder(model.null_labels(12), False)
    _, tapped = model.forward_trunk(model.embed_tokens(x_t), c)
    target = torch.stack([s["features"][0] for s in samples]).float()  # (12, 16, 32)
    expected = cknna(prepare_features(tapped.mean(1)), prepare_features(target.mean(1)), topk=3)
    assert find(records, metric="cknna", step=200, layer=2, t=t) == pytest.approx(
        expected, abs=1e-5
    )
    _, zs = model(x_t, tt, model.null_labels(12))
    cos = F.cosine_similarity(zs[0], target, dim=-1).mean()
    assert find(records, metric="token_cos_sim", step=200, t=t) == pytest.approx(
        float(cos), abs=1e-5
    )


def test_two_processes_give_the_same_results(single, run_dir, data_dir, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "analysis", *analysis_argv(run_dir, data_dir, out)]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "results.json") as f:
        two = json.load(f)["records"]
    one = single[1]["records"]
    assert [{**r, "value": 0} for r in two] == [{**r, "value": 0} for r in one]
    np.testing.assert_allclose([r["value"] for r in two], [r["value"] for r in one], atol=1e-5)


def test_bad_flags_are_refused(run_dir, data_dir, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(analysis_argv(run_dir, data_dir, tmp_path, "--timesteps", "1.5"))
    with pytest.raises(SystemExit):
        parse_args(analysis_argv(run_dir, data_dir, tmp_path, "--layers", "first"))
    with pytest.raises(SystemExit):  # CKNNA needs k neighbours among the other samples
        parse_args(analysis_argv(run_dir, data_dir, tmp_path, "--num-samples", "3"))


def test_heads_match_encoders_by_training_list_or_dimension():
    model = build_model("SiTDown", **{**TINY_KWARGS, "z_dims": [32, 384]})
    model.checkpoint_args = {"enc_type": f"{ENCODER_STANDIN},dinov2-vit-s"}
    assert projector_heads(model, ["dinov2-vit-s", "dinov2-vit-b"]) == {"dinov2-vit-s": 1}
    model.checkpoint_args = {}  # REPA's bare state dicts record no encoder: match by width
    assert projector_heads(model, ["dinov2-vit-s", ENCODER_STANDIN]) == {
        "dinov2-vit-s": 1,
        ENCODER_STANDIN: 0,
    }
    assert projector_heads(model, ["dinov2-vit-b"]) == {}


def test_encoders_default_to_the_checkpoints_else_dinov2_b():
    """A run trained without alignment (--enc-type none) is compared with DINOv2-B, as one that
    records no encoder; --enc-type overrides both."""
    model = build_model("SiTDown", **TINY_KWARGS)
    default = argparse.Namespace(enc_type=None)
    for recorded, expected in [({"enc_type": "mae-vit-l"}, ["mae-vit-l"]),
                               ({"enc_type": "none"}, ["dinov2-vit-b"]),
                               ({}, ["dinov2-vit-b"])]:  # fmt: skip
        model.checkpoint_args = recorded
        assert encoder_names(default, model) == expected
    model.checkpoint_args = {"enc_type": "none"}
    assert encoder_names(argparse.Namespace(enc_type="none"), model) == []


def test_checkpoint_step_from_the_file_name():
    assert checkpoint_step("exps/run/checkpoints/0400000.pt", 3) == 400_000
    assert checkpoint_step("ckpts/0050000-ema.safetensors", 0) == 50_000
    assert checkpoint_step("SiT-XL-2.pt", 2) == 2

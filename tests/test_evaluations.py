"""evaluations/: ADM-compatible metrics checked against independent computations.

Everything runs on the CPU with random Inception weights (no download): the network's plumbing
(resize, taps, sizes, strict loading) is tested here, the metric formulas against closed forms
and brute force.
"""

import json
import os
import pickle
import stat
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluations import evaluator, inception, make_reference, metrics
from evaluations.arrays import open_image_array
from evaluations.commands import InputError
from evaluations.inception import (
    NUM_CLASSES,
    POOL_DIM,
    SPATIAL_DIM,
    InceptionFeatures,
    build_inception,
    random_state_dict,
    tf32_disabled,
)
from evaluations.metrics import (
    GaussianAccumulator,
    frechet_distance,
    inception_score,
    precision_recall,
    squared_distances,
)

ROOT = Path(__file__).resolve().parent.parent


# --- the network -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> InceptionFeatures:
    return build_inception(random_weights_for_tests=True)


def run_with_taps(net: InceptionFeatures, images: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs plus what enters the first conv and what leaves Mixed_6d's 1×1 branch."""
    taps = {}
    hooks = [
        net.net.Conv2d_1a_3x3.register_forward_pre_hook(
            lambda m, args: taps.update(conv_input=args[0].clone())
        ),
        net.net.Mixed_6d.branch1x1.register_forward_hook(
            lambda m, args, out: taps.update(branch=out.clone())
        ),
    ]
    try:
        with torch.inference_mode():
            pool, spatial = net(torch.from_numpy(images))
            probs = net.class_probabilities(pool)
    finally:
        for hook in hooks:
            hook.remove()
    outputs = {"pool": pool, "spatial": spatial, "probs": probs, **taps}
    return {name: value.numpy() for name, value in outputs.items()}


@pytest.fixture(scope="module")
def upsampled(net):
    images = np.random.default_rng(0).integers(0, 256, (2, 45, 61, 3), dtype=np.uint8)
    return images, run_with_taps(net, images)


@pytest.fixture(scope="module")
def downsampled(net):
    images = np.random.default_rng(1).integers(0, 256, (1, 331, 310, 3), dtype=np.uint8)
    return images, run_with_taps(net, images)


def tf1_resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 `resize_bilinear(align_corners=False)`: output pixel i samples input i·in/out.

    A transcription of TF1's kernel, in float32 as it computes (scale, positions and lerps).
    """

    def sample_points(out_size, in_size):
        scale = np.float32(in_size) / np.float32(out_size)
        src = np.arange(out_size, dtype=np.float32) * scale  # no half-pixel offset
        lower = np.floor(src).astype(int)
        upper = np.minimum(np.ceil(src).astype(int), in_size - 1)
        return lower, upper, src - np.floor(src)

    y0, y1, dy = sample_points(out_h, image.shape[0])
    x0, x1, dx = sample_points(out_w, image.shape[1])
    image = image.astype(np.float32)
    top = image[y0][:, x0] + (image[y0][:, x1] - image[y0][:, x0]) * dx[None, :, None]
    bottom = image[y1][:, x0] + (image[y1][:, x1] - image[y1][:, x0]) * dx[None, :, None]
    return top + (bottom - top) * dy[:, None, None]


def test_output_sizes(upsampled):
    _, out = upsampled
    assert out["pool"].shape == (2, POOL_DIM) == (2, 2048)
    assert out["spatial"].shape == (2, SPATIAL_DIM) == (2, 2023)
    assert out["probs"].shape == (2, NUM_CLASSES) == (2, 1008)
    np.testing.assert_allclose(out["probs"].sum(1), 1, rtol=1e-5)
    assert np.isfinite(out["pool"]).all() and out["pool"].std() > 0


@pytest.mark.parametrize("case", ["upsampled", "downsampled"])
def test_network_input_is_tf1_resize_then_scaled(case, request):
    images, out = request.getfixturevalue(case)
    expected = np.stack([tf1_resize_bilinear(image, 299, 299) for image in images])
    expected = (expected.transpose(0, 3, 1, 2) - 128) / 128  # (N, 3, 299, 299)
    np.testing.assert_allclose(out["conv_input"], expected, rtol=0, atol=1e-6)

    # ... and not PyTorch's half-pixel rule, which moves every sample point by half a pixel.
    half_pixel = F.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).double(),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    assert np.abs(out["conv_input"] - (half_pixel.numpy() - 128) / 128).max() > 0.05


def test_spatial_features_are_mixed_6_conv_flattened_h_w_c(upsampled):
    _, out = upsampled
    branch = out["branch"]  # (N, 192, 17, 17): Mixed_6d.branch1x1 after BN and ReLU
    assert branch.shape == (2, 192, 17, 17) and branch.min() >= 0
    expected = branch[:, :7].transpose(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC, flattened
    np.testing.assert_array_equal(out["spatial"], expected)
    assert not np.array_equal(out["spatial"], branch[:, :7].reshape(2, -1))  # not C, H, W


def test_saved_random_state_dict_loads_strictly(tmp_path):
    state_dict = random_state_dict(seed=1)
    path = tmp_path / "weights.pth"
    torch.save(state_dict, path)
    with pytest.warns(UserWarning, match="not the reference Inception weights"):
        loaded = build_inception(path)
    for key, value in loaded.net.state_dict().items():
        torch.testing.assert_close(value, state_dict[key], rtol=0, atol=0)

    missing = dict(state_dict)
    del missing["Mixed_6d.branch1x1.conv.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        InceptionFeatures(missing)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        InceptionFeatures({**state_dict, "AuxLogits.fc.weight": torch.zeros(1)})
    imagenet_head = {
        **state_dict,
        "fc.weight": torch.zeros(1000, 2048),
        "fc.bias": torch.zeros(1000),
    }
    with pytest.raises(RuntimeError, match="size mismatch"):
        InceptionFeatures(imagenet_head)


class NotATensor:
    pass


def test_weights_are_unpickled_safely(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": NotATensor()}, path)
    with pytest.warns(UserWarning), pytest.raises(pickle.UnpicklingError):
        build_inception(path)


def test_weight_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="download"):
        build_inception(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="not both"):
        build_inception(tmp_path / "absent.pth", random_weights_for_tests=True)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="--inception-weights PATH") as error:
        inception.fetch_weights()
    assert inception.WEIGHTS_URL in str(error.value)

    inception.default_weights_path().write_bytes(b"half a download")
    with pytest.raises(RuntimeError, match="delete it"):
        inception.fetch_weights()


def test_tf32_disabled_inside_and_restored():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("PyTorch < 2.9 has only the legacy allow_tf32 flags")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with tf32_disabled():
            assert matmul.fp32_precision == "ieee"
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


class PrecisionRecorder(torch.nn.Module):
    """DINOv2's interface on toy images: 3 pixel values as features; records the matmul
    precision at each call."""

    device, feature_dim = torch.device("cpu"), 3

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.backends.cuda.matmul.fp32_precision)
        return images.flatten(1)[:, :3].float()


def test_fd_dinov2_runs_reference_and_samples_without_tf32(tmp_path):
    """A reference without DINOv2 statistics has its images' computed: in full float32, as the
    samples' are, whatever TF32 setting the caller left on."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("PyTorch < 2.9 has only the legacy allow_tf32 flags")
    rng = np.random.default_rng(0)
    for name in ("ref", "samples"):
        np.savez(tmp_path / f"{name}.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), np.uint8))
    net, before = PrecisionRecorder(), matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with pytest.warns(UserWarning, match="no DINOv2 statistics"):
            evaluator.fd_dinov2(tmp_path / "ref.npz", tmp_path / "samples.npz", net, 4)  # type: ignore[arg-type]
    finally:
        matmul.fp32_precision = before
    assert net.seen == ["ieee"] * 4  # 2 batches each


# --- metrics: closed forms and brute force ---------------------------------------------------


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    actual = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert actual == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 8))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_frechet_distance_retries_with_offset_when_sqrtm_fails(monkeypatch):
    var1, var2, eps = np.array([1.0, 0.5]), np.array([2.0, 0.25]), 1e-6
    real_sqrtm, calls = metrics.linalg.sqrtm, []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", failing_once)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        actual = frechet_distance(np.zeros(2), np.diag(var1), np.zeros(2), np.diag(var2), eps)
    # ADM's retry: offset inside the square root only, the traces keep the raw covariances.
    expected = np.sum(var1 + var2 - 2 * np.sqrt((var1 + eps) * (var2 + eps)))
    assert actual == pytest.approx(expected, rel=1e-12)
    assert len(calls) == 2


@pytest.mark.parametrize("which", ["mu1", "sigma1", "mu2", "sigma2"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_frechet_distance_refuses_non_finite_statistics_at_once(which, bad):
    # A NaN covariance once kept scipy.linalg.sqrtm busy for 16 minutes; a NaN mean gave nan.
    stats = {"mu1": np.zeros(64), "sigma1": np.eye(64), "mu2": np.ones(64), "sigma2": np.eye(64)}
    stats[which] = stats[which].copy()
    stats[which].flat[5] = bad
    start = time.perf_counter()
    with pytest.raises(InputError, match=f"{which} holds 1 NaN or infinite"):
        frechet_distance(**stats)
    assert time.perf_counter() - start < 5


def test_frechet_distance_refuses_what_the_retry_cannot_fix(monkeypatch):
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda matrix: np.full_like(matrix, np.nan))
    with pytest.warns(UserWarning, match="adding"), pytest.raises(InputError, match="even with"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(InputError, match="overflows"):
        frechet_distance(np.zeros(2), np.eye(2) * 1e200, np.zeros(2), np.eye(2) * 1e200)


def test_inception_score_known_values():
    rng = np.random.default_rng(0)
    same = np.tile(rng.dirichlet(np.ones(10)), (30, 1))
    assert inception_score(same) == pytest.approx(1.0)
    k = 7
    one_hot = np.eye(k)[np.arange(70) % k]  # every class equally often
    assert inception_score(one_hot) == pytest.approx(k)


def test_inception_score_splits_are_contiguous():
    first_half_class_0 = np.eye(2)[np.repeat([0, 1], 10)]
    assert inception_score(first_half_class_0, split_size=10) == pytest.approx(1.0)
    assert inception_score(first_half_class_0, split_size=20) == pytest.approx(2.0)


def test_gaussian_accumulator_equals_numpy_mean_and_cov():
    rng = np.random.default_rng(0)
    rows = 1e3 + rng.normal(size=(57, 5)) @ rng.normal(size=(5, 5))  # a large offset
    accumulator = GaussianAccumulator()
    for start in range(0, 57, 10):
        accumulator.update(torch.from_numpy(rows[start : start + 10]).float())
    mean, cov = accumulator.mean_and_covariance()
    rows32 = rows.astype(np.float32).astype(np.float64)  # what the accumulator saw
    np.testing.assert_allclose(mean, rows32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(rows32, rowvar=False), rtol=1e-9, atol=1e-9)


def test_fid_from_streamed_statistics_is_adms_to_the_sixth_decimal():
    # ADM: np.mean of float32 features sums in float32; np.cov works in float64.
    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(8, 16)) / 3
    ref, samples = (
        np.maximum(rng.normal(size=(20000, 8)) @ mixing + shift, 0).astype(np.float32)
        for shift in (0.3, 0.35)
    )
    ref_stats = (np.mean(ref, axis=0), np.cov(ref, rowvar=False))
    accumulator = GaussianAccumulator()
    for start in range(0, len(samples), 1000):
        accumulator.update(torch.from_numpy(samples[start : start + 1000]))
    adm = frechet_distance(np.mean(samples, axis=0), np.cov(samples, rowvar=False), *ref_stats)
    streamed = frechet_distance(*accumulator.mean_and_covariance(), *ref_stats)
    assert streamed == pytest.approx(adm, abs=1e-5)


def brute_force_precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3):
    """Improved precision/recall by naive loops over exact integer distances."""

    def distance(a, b):
        return sum((int(x) - int(y)) ** 2 for x, y in zip(a, b, strict=True))

    def radii(points):  # sorted distances include the point itself, at index 0
        return [sorted(distance(p, q) for q in points)[k] for p in points]

    ref_radii, sample_radii = radii(ref), radii(samples)
    precision = np.mean(
        [any(distance(s, r) <= rad for r, rad in zip(ref, ref_radii, strict=True)) for s in samples]
    )
    recall = np.mean(
        [
            any(distance(r, s) <= rad for s, rad in zip(samples, sample_radii, strict=True))
            for r in ref
        ]
    )
    return precision, recall


def test_precision_recall_equals_brute_force():
    # Small integers keep every float16 step exact, so ties at `≤` are compared exactly too.
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 5, (40, 6))
    samples = rng.integers(1, 6, (33, 6))
    actual = precision_recall(ref, samples, block_size=7)  # several blocks each way
    assert actual == pytest.approx(brute_force_precision_recall(ref, samples), abs=0)


def test_precision_recall_collapsed_mode():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 20, (60, 4))
    jitter = np.zeros((45, 4), dtype=int)
    jitter[np.arange(45), np.arange(45) % 4] = rng.choice([-1, 1], 45)
    samples = ref[np.arange(45) % 3] + jitter  # all samples near three reference points
    precision, recall = precision_recall(ref, samples, block_size=16)
    assert (precision, recall) == pytest.approx(brute_force_precision_recall(ref, samples), abs=0)
    assert precision >= 0.9 and recall <= 0.1


def test_distances_fall_back_to_float32_beyond_float16_range():
    rng = np.random.default_rng(2)
    ref, samples = 300 * rng.integers(0, 5, (30, 6)), 300 * rng.integers(0, 5, (25, 6))
    exact = ((ref[:, None, :] - samples[None, :, :]) ** 2).sum(-1)  # up to 8.6e6 > 65504
    u, v = torch.tensor(ref, dtype=torch.float32), torch.tensor(samples, dtype=torch.float32)
    np.testing.assert_array_equal(squared_distances(u, v).numpy(), exact)
    assert precision_recall(ref, samples) == pytest.approx(
        brute_force_precision_recall(ref, samples), abs=0
    )


def test_distances_are_rounded_to_float16_like_adm():
    generator = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 64, generator=generator), torch.randn(30, 64, generator=generator)
    distances = squared_distances(u, v)
    exact = torch.cdist(u.double(), v.double()) ** 2
    torch.testing.assert_close(distances.double(), exact, rtol=5e-3, atol=0.2)
    assert torch.equal(distances, distances.half().float())  # every value is a float16


# --- reading image arrays --------------------------------------------------------------------


@pytest.mark.parametrize("save, mapped", [(np.savez, True), (np.savez_compressed, False)])
def test_npz_reads_back_identically(tmp_path, save, mapped):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    save(path, arr_0=images)  # as generate.py writes it
    with open_image_array(path) as array:
        assert array.memory_mapped == mapped and len(array) == 7
        batches = list(array.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npy_reads_back_identically(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "samples.npy", images)
    with open_image_array(tmp_path / "samples.npy") as array:
        np.testing.assert_array_equal(np.concatenate(list(array.batches(3))), images)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize(
    "array, message",
    [
        (
            np.linspace(-1, 1, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3),
            r"uint8.*\[-1, 1\]",
        ),
        (np.zeros((4, 3, 8, 8), dtype=np.uint8), "transpose"),
        (np.zeros((4, 8, 8), dtype=np.uint8), "N×H×W×3"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), "no images"),
    ],
)
def test_bad_image_arrays_are_refused_at_open(tmp_path, save, array, message):
    save(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(ValueError, match=message), open_image_array(tmp_path / "bad.npz"):
        pass


def test_images_in_zero_one_are_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", arr_0=np.ones((4, 8, 8, 3), dtype=np.uint8))
    with (
        open_image_array(tmp_path / "bad.npz") as array,
        pytest.raises(ValueError, match=r"\[0, 255\]"),
    ):
        next(array.batches(2))


def test_missing_array_is_named(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with (
        pytest.raises(ValueError, match=r"no array 'arr_0'.*\['images'\]"),
        open_image_array(tmp_path / "x.npz"),
    ):
        pass


def test_reference_without_statistics_is_refused(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="make_reference.py"):
        evaluator.load_reference_statistics(tmp_path / "ref.npz")
    np.savez(
        tmp_path / "ref.npz",
        mu=np.zeros(2048),
        sigma=np.eye(2048),
        mu_s=np.zeros(2048),
        sigma_s=np.eye(2048),
    )
    with pytest.raises(ValueError, match=r"mu_s has shape \(2048,\), expected \(2023,\)"):
        evaluator.load_reference_statistics(tmp_path / "ref.npz")


def valid_reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "arr_0": rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
        "mu": np.zeros(POOL_DIM),
        "sigma": np.eye(POOL_DIM),
        "mu_s": np.zeros(SPATIAL_DIM),
        "sigma_s": np.eye(SPATIAL_DIM),
    }


def no_network(args):
    raise AssertionError("the network was loaded before the inputs were checked")


def with_nan(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flat[7] = np.nan
    return array


def asymmetric(sigma: np.ndarray) -> np.ndarray:
    sigma = sigma.copy()
    sigma[0, 1] = 0.5
    return sigma


@pytest.mark.parametrize(
    "key, change, message",
    [
        ("mu", with_nan, r"ref\.npz: mu holds 1 NaN or infinite"),
        ("sigma", with_nan, r"ref\.npz: sigma holds 1 NaN or infinite"),
        ("sigma_s", lambda s: s[:, :-1], r"ref\.npz: sigma_s has shape \(2023, 2022\)"),
        ("mu", lambda m: m.astype(np.int64), r"ref\.npz: mu has dtype int64"),
        ("mu_s", lambda m: m.astype(np.complex128), r"ref\.npz: mu_s has dtype complex128"),
        ("sigma", asymmetric, r"ref\.npz: sigma is not symmetric"),
        ("mu", lambda m: np.array([m], dtype=object), r"ref\.npz: cannot read mu"),
        ("sigma_s", None, r"ref\.npz has no reference statistics \['sigma_s'\]"),
        ("arr_0", lambda a: a.astype(np.float32), r"ref\.npz: images have dtype float32"),
        ("arr_0", lambda a: a[:3], r"ref\.npz holds 3 images, fewer than the 4 that precision"),
    ],
    ids=[
        "nan-mu",
        "nan-sigma",
        "shape",
        "int",
        "complex",
        "asymmetric",
        "object",
        "missing",
        "float-images",
        "few",
    ],
)
def test_bad_reference_is_refused_before_the_network_loads(
    tmp_path, monkeypatch, key, change, message
):
    arrays = valid_reference()
    if change is None:
        del arrays[key]
    else:
        arrays[key] = change(arrays[key])
    np.savez(tmp_path / "ref.npz", **arrays)
    np.savez(tmp_path / "samples.npz", arr_0=valid_reference()["arr_0"])
    monkeypatch.setattr(evaluator, "inception_from_args", no_network)
    start = time.perf_counter()
    with pytest.raises(InputError, match=message) as refused:
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")])
    assert "\n" not in str(refused.value)
    assert time.perf_counter() - start < 10  # a NaN covariance never reaches sqrtm


@pytest.mark.parametrize(
    "samples, message",
    [
        ({"images": np.zeros((6, 16, 16, 3), np.uint8)}, r"samples\.npz has no array 'arr_0'"),
        ({"arr_0": np.ones((6, 16, 16, 3), np.uint8)}, r"samples\.npz: the first 6 images"),
        ({"arr_0": np.zeros((6, 3, 16, 16), np.uint8)}, r"samples\.npz: images are N×3×H×W"),
    ],
    ids=["missing", "zero-one", "nchw"],
)
def test_bad_samples_are_refused_before_the_network_loads(tmp_path, monkeypatch, samples, message):
    np.savez(tmp_path / "ref.npz", **valid_reference())
    np.savez(tmp_path / "samples.npz", **samples)
    monkeypatch.setattr(evaluator, "inception_from_args", no_network)
    with pytest.raises(InputError, match=message):
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")])


@pytest.mark.parametrize(
    "parse, flags",
    [
        (evaluator.parse_args, ["r.npz", "s.npz", "--batch-size", "0"]),
        (make_reference.parse_args, ["--source", "d", "--out", "r.npz", "--resolution", "0"]),
        (make_reference.parse_args, ["--source", "d", "--out", "r.npz", "--subset-size", "0"]),
        (make_reference.parse_args, ["--source", "d", "--out", "r.npz", "--workers", "-1"]),
        (make_reference.parse_args, ["--source", "d", "--out", "r.npz", "--seed", "-1"]),
    ],
)
def test_out_of_range_flags_are_usage_errors(parse, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(flags)
    assert exit_.value.code == 2 and "must be" in capsys.readouterr().err


# --- the commands ----------------------------------------------------------------------------


def test_center_crop_is_adm_rule():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    cropped = make_reference.center_crop(Image.fromarray(pixels), 64)  # no resampling needed
    np.testing.assert_array_equal(cropped, pixels[:, 16:80])
    large = Image.fromarray(np.zeros((300, 200, 3), dtype=np.uint8))  # box-halved, then bicubic
    assert make_reference.center_crop(large, 48).shape == (48, 48, 3)


def test_reference_then_evaluation_end_to_end(tmp_path, net):
    rng = np.random.default_rng(0)
    folder = tmp_path / "dataset" / "class_a"
    folder.mkdir(parents=True)
    sizes = [(40, 40), (48, 40), (40, 56), (64, 64), (40, 40), (44, 50)]
    for i, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    ref_path = tmp_path / "ref.npz"
    umask = os.umask(0o022)
    try:
        make_reference.main([
            "--source", str(tmp_path / "dataset"), "--out", str(ref_path), "--resolution", "32",
            "--subset-size", "5", "--workers", "0", "--device", "cpu", "--random-weights-for-tests",
        ])  # fmt: skip
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(ref_path).st_mode) == 0o644  # as any file open() writes

    with np.load(ref_path) as ref:
        assert ref["arr_0"].shape == (5, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
        mu = ref["mu"]
    crops = np.stack(
        [
            make_reference.center_crop(Image.open(p).convert("RGB"), 32)
            for p in make_reference.list_images(tmp_path / "dataset")
        ]
    )
    with torch.inference_mode():  # statistics cover all six images, not just the subset
        np.testing.assert_allclose(
            mu, net(torch.from_numpy(crops))[0].mean(0).numpy(), rtol=1e-5, atol=1e-5
        )

    sample_path, json_path = tmp_path / "samples.npz", tmp_path / "metrics.json"
    np.savez_compressed(sample_path, arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    with pytest.warns(UserWarning, match="fewer than 50000"):
        evaluator.main(
            [
                str(ref_path),
                str(sample_path),
                "--json",
                str(json_path),
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--random-weights-for-tests",
            ]
        )
    record = json.loads(json_path.read_text())
    names = ["inception_score", "fid", "sfid", "precision", "recall"]
    assert all(np.isfinite(record[name]) for name in names) and record["num_samples"] == 6
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1


@pytest.mark.parametrize(
    "command",
    [
        ["evaluations/evaluator.py"],
        ["-m", "evaluations.evaluator"],
        ["evaluations/make_reference.py"],
    ],
)
def test_commands_run_as_script_and_module(command):
    result = subprocess.run(
        [sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--inception-weights" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["evaluations/evaluator.py", "{bad}", "{bad}"],
        ["evaluations/make_reference.py", "--source", "{bad}", "--out", "{out}"],
    ],
    ids=["evaluator", "make_reference"],
)
def test_a_corrupt_npz_is_one_line_and_exit_code_1(tmp_path, command):
    bad = tmp_path / "cut.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    bad.write_bytes(bad.read_bytes()[:300])  # a copy cut short
    argv = [arg.format(bad=bad, out=tmp_path / "ref.npz") for arg in command]
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    program = Path(command[0]).name
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{program}: error: {bad}"), result.stderr

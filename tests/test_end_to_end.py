"""The whole pipeline on a CPU, as a newcomer meets it: `quickstart.py --fast` (toy data ->
preprocessing -> training -> checkpoints -> ODE and SDE sampling -> measurement -> figures), then,
from its outputs: an exact resume, generation in 2 processes (torchrun, gloo) and the evaluator.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import quickstart
import train
from dataset import LatentDataset
from evaluations import evaluator, make_reference
from urepa import toy_shapes
from urepa.checkpoints import load_checkpoint, load_model_for_sampling
from urepa.utils import EXIT_STOPPED, ReportedError, RunStopped
from urepa.vae import VAE_SCALE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = quickstart.FAST


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`python quickstart.py --fast --weights stand-in --device cpu`, in this process."""
    out = tmp_path_factory.mktemp("quickstart")
    AcceleratorState._reset_state(reset_partial_state=True)
    record = quickstart.main(
        ["--fast", "--out", str(out), "--weights", "stand-in", "--device", "cpu"]
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    return out, record


def checkpoint_path(root, step: int) -> str:
    name = f"{step:07d}.pt"
    return os.path.join(str(root), quickstart.EXP_NAME, "checkpoints", name)


# --------------------------------------------------------------------------------------------
# The toy dataset and its measurement
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_measurement_reads_every_fresh_image_right(size):
    labels = np.repeat(np.arange(toy_shapes.NUM_CLASSES), 10)
    images = np.stack([toy_shapes.draw(int(k), i, size, seed=5) for i, k in enumerate(labels)])
    result = toy_shapes.agreement(images, labels)
    assert result["class"] == result["shape"] == result["colour"] == 1.0


def test_measurement_sees_no_shape_and_wrong_classes():
    blank = np.full((32, 32, 3), 50, np.uint8)
    assert toy_shapes.measure(blank) == (None, None)
    red_circle = toy_shapes.draw(0, 0, 32)
    result = toy_shapes.agreement(np.stack([red_circle, red_circle]), np.array([0, 8]))
    assert result["correct"] == [True, False]  # class 8 is a red cross
    assert result["colour"] == 1.0 and result["shape"] == 0.5


CHANCE = {"class": 0.1, "shape": 0.2, "colour": 0.2}


def balanced(n_per_class: int) -> np.ndarray:
    return np.repeat(np.arange(toy_shapes.NUM_CLASSES), n_per_class)


@pytest.mark.parametrize("size", [32, 64])
def test_noise_shows_no_shape_and_scores_below_chance(size):
    """Uniform noise and Gaussian noise of several spreads: no sample shows a shape, so every
    score is 0 (uniform noise used to read as a green or purple square in every image)."""
    rng = np.random.default_rng(size)
    labels = balanced(4)
    uniform = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
    gaussians = [rng.normal(mean, spread, uniform.shape).clip(0, 255).astype(np.uint8)
                 for mean, spread in [(128, 30), (128, 60), (60, 40), (200, 50)]]  # fmt: skip
    for images in (uniform, *gaussians):
        result = toy_shapes.agreement(images, labels)
        assert result["no_shape"] == 1.0
        assert result["class"] == result["shape"] == result["colour"] == 0.0


@pytest.mark.parametrize("value", [0, 40, 128, 255])
def test_constant_images_show_no_shape(value):
    grey = np.full((toy_shapes.NUM_CLASSES, 32, 32, 3), value, np.uint8)
    palette = np.stack([np.full((32, 32, 3), rgb, np.uint8) for rgb in toy_shapes.PALETTE.values()])
    for images in (grey, np.concatenate([palette, palette])):
        result = toy_shapes.agreement(images, np.arange(toy_shapes.NUM_CLASSES))
        assert result["no_shape"] == 1.0 and result["class"] == 0.0


def test_class_shuffled_images_score_what_their_shuffle_leaves_right():
    """Real images under shuffled labels: each image still reads as its own class, so the
    agreement is exactly the fraction of labels the shuffle left in place (0.1 expected, i.e.
    chance), and 0 under a shift that moves every label."""
    labels = balanced(12)
    images = np.stack([toy_shapes.draw(int(k), i, 32, seed=3) for i, k in enumerate(labels)])
    shifted = (labels + 1) % toy_shapes.NUM_CLASSES
    assert toy_shapes.agreement(images, shifted)["class"] == 0.0
    shuffled = np.random.default_rng(0).permutation(labels)
    result = toy_shapes.agreement(images, shuffled)
    assert result["class"] == float(np.mean(shuffled == labels))
    assert result["class"] <= CHANCE["class"] + 0.055  # 120 labels: within 2 standard errors


def test_a_shape_on_a_noisy_background_or_filling_the_image_is_no_shape():
    circle = toy_shapes.draw(0, 0, 64)
    noisy = circle.astype(int) + np.random.default_rng(1).integers(-90, 91, circle.shape)
    assert toy_shapes.measure(noisy.clip(0, 255).astype(np.uint8)) == (None, None)
    full = np.full((64, 64, 3), 40, np.uint8)
    full[1:-1, 1:-1] = toy_shapes.PALETTE["red"]  # a red square filling the image
    assert toy_shapes.measure(full) == (None, None)
    half = np.full((64, 64, 3), 40, np.uint8)
    half[8:56, 34:] = toy_shapes.PALETTE["red"]  # a red block cut by the right edge
    assert toy_shapes.measure(half) == (None, None)
    assert toy_shapes.measure(circle) == ("circle", "red")


def test_classes_pair_every_shape_and_colour_twice():
    assert len(set(toy_shapes.CLASSES)) == toy_shapes.NUM_CLASSES == 10
    for shape in toy_shapes.SHAPES:
        assert sum(s == shape for s, _ in toy_shapes.CLASSES) == 2
    for colour in toy_shapes.COLOURS:
        assert sum(c == colour for _, c in toy_shapes.CLASSES) == 2
    names = [toy_shapes.folder_name(k) for k in range(10)]
    assert sorted(names) == names  # sorted folders give the labels


def test_drawing_is_deterministic():
    a, b = toy_shapes.draw(3, 7, 32, seed=1), toy_shapes.draw(3, 7, 32, seed=1)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, toy_shapes.draw(3, 8, 32, seed=1))


# --------------------------------------------------------------------------------------------
# quickstart.py --fast
# --------------------------------------------------------------------------------------------


def test_quickstart_writes_figures_metrics_and_checkpoints(quick):
    out, record = quick
    outputs = record["outputs"]
    with Image.open(outputs["samples"]) as grid:
        assert grid.mode == "RGB" and grid.height > toy_shapes.NUM_CLASSES * 64  # a row per class
    with Image.open(outputs["training_curve"]) as curve:
        assert curve.mode == "RGB" and curve.width > curve.height
    with open(outputs["metrics"]) as f:
        assert json.load(f) == json.loads(json.dumps(record))
    assert record["networks"]["stand_ins"] and not record["comparable_to_paper"]
    assert record["agreement_on_fresh_images"]["class"] == 1.0
    noise = record["agreement_on_noise"]  # the floor the summary shows beside the samplers
    assert noise["no_shape"] == 1.0 and noise["class"] == noise["shape"] == noise["colour"] == 0
    for result in record["agreement"].values():
        for key in ("class", "shape", "colour"):
            assert 0 <= result[key] <= 1
    assert math.isfinite(record["last_training_log"]["total"])
    assert record["last_training_log"]["step"] == CFG.steps
    # both checkpoints kept (the second is the final one), EMA exported at the end
    for step in (CFG.steps // 2, CFG.steps):
        assert load_checkpoint(checkpoint_path(out / "exps", step))["step"] == step
    assert os.path.exists(
        checkpoint_path(out / "exps", CFG.steps)[: -len(".pt")] + "-ema.safetensors"
    )


def test_preprocessed_data_is_pixel_space_at_half_resolution(quick):
    out, record = quick
    dataset = LatentDataset(str(out / "data"))
    assert len(dataset) == CFG.images_per_class * toy_shapes.NUM_CLASSES
    sample = dataset[0]
    mean, std = sample["moments"].chunk(2)
    assert mean.shape == (3, 32, 32) and (std == 0).all()
    path = os.path.join(str(out / "images"), toy_shapes.folder_name(0), "00000.png")
    with Image.open(path) as file:
        image = torch.from_numpy(np.asarray(file)).permute(2, 0, 1).float()  # (3, 64, 64)
    pooled = (image / 127.5 - 1).view(3, 32, 2, 32, 2).mean(dim=(2, 4))  # 2×2 blocks
    torch.testing.assert_close(mean * VAE_SCALE, pooled)
    # Every part of U-REPA runs: the 2×2 middle stage is upsampled to the encoder's 4×4 grid.
    model = load_model_for_sampling(record["outputs"]["checkpoint"])
    assert model.x_embedder.grid_size == 4 and model.tap_grid_size == 2
    assert model.encoder_grid == 4 and model.projectors[0].scale == 2


def test_resuming_from_the_middle_gives_the_same_weights(quick, tmp_path):
    out, _ = quick
    net = quickstart.pick_networks("stand-in")
    argv = quickstart.train_argv(str(out / "data"), str(tmp_path), net, CFG, cuda=False)
    argv[argv.index("--resume") + 1] = checkpoint_path(out / "exps", CFG.steps // 2)
    AcceleratorState._reset_state(reset_partial_state=True)
    with quickstart.environment(**quickstart.device_environment("cpu")):
        train.main(train.parse_args(argv))
    AcceleratorState._reset_state(reset_partial_state=True)
    straight = load_checkpoint(checkpoint_path(out / "exps", CFG.steps))
    resumed = load_checkpoint(checkpoint_path(tmp_path, CFG.steps))
    for key in ("model", "ema"):
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            assert torch.equal(straight[key][name], resumed[key][name]), (key, name)
    assert straight["data"] == resumed["data"]


def test_two_processes_generate_the_same_npz(quick, tmp_path):
    out, _ = quick
    n = CFG.samples_per_class * toy_shapes.NUM_CLASSES
    sample_dir = str(tmp_path / "two")
    argv = quickstart.generate_argv(checkpoint_path(out / "exps", CFG.steps), sample_dir,
                                    "ablation", n)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "generate.py", *argv]  # fmt: skip
    # CPU kernels split sums by thread count: keep this process's, as the quickstart ran here
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(f"{sample_dir}.npz") as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (n, 64, 64, 3)
    assert len([p for p in os.listdir(sample_dir) if p.endswith(".png")]) == n
    with open(f"{sample_dir}.npz", "rb") as f, open(out / "samples" / "ode-0000006.npz", "rb") as g:
        assert f.read() == g.read()  # the quickstart's one-process samples, byte for byte


@pytest.mark.filterwarnings("ignore:.*fewer than 50000")
def test_evaluator_gives_finite_metrics(quick, tmp_path):
    """evaluations/ on the quickstart's samples, with random Inception weights (offline)."""
    out, _ = quick
    with np.load(out / "samples" / "sde-0000006.npz") as f:
        samples = f["arr_0"]
    reference_images = np.stack([toy_shapes.draw(k, i, 64) for k in range(10) for i in range(2)])
    np.savez(tmp_path / "train.npz", arr_0=reference_images)
    ref = str(tmp_path / "ref.npz")
    offline = ["--random-weights-for-tests", "--device", "cpu", "--batch-size", "20"]
    make_reference.main(["--source", str(tmp_path / "train.npz"), "--out", ref, *offline])
    metrics = evaluator.main(
        [
            ref,
            str(out / "samples" / "sde-0000006.npz"),
            "--json",
            str(tmp_path / "m.json"),
            *offline,
        ]
    )
    assert metrics["num_samples"] == len(samples)
    for name in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert math.isfinite(metrics[name]), name
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == metrics["fid"]


def test_pretrained_path_geometry_with_sd_vae_shaped_stand_ins(tmp_path, monkeypatch):
    """The path taken when SD-VAE and DINOv2 load: 64 px, 8×8×4 latents, patch 2, a 2×2 middle
    stage upsampled to the encoder's 4×4 grid. Run with the tiny SD-VAE-shaped stand-in."""
    net = quickstart.Networks("tiny-random", "dinov2-vit-tiny-random")
    monkeypatch.setattr(quickstart, "pick_networks", lambda choice: net)
    AcceleratorState._reset_state(reset_partial_state=True)
    record = quickstart.main(["--fast", "--steps", "2", "--out", str(tmp_path), "--device", "cpu"])
    AcceleratorState._reset_state(reset_partial_state=True)
    model = load_model_for_sampling(record["outputs"]["checkpoint"])
    assert model.in_channels == 4 and model.patch_size == 2 and model.x_embedder.grid_size == 4
    assert model.tap_grid_size == 2 and model.encoder_grid == 4  # the projector upsamples ×2
    with np.load(tmp_path / "samples" / "sde-0000002.npz") as f:
        assert f["arr_0"].shape == (CFG.samples_per_class * 10, 64, 64, 3)


def test_fid_asked_for_without_weights_stops_before_any_work(tmp_path):
    """--fid (or --inception-weights) with no weights file is refused at once, not after the
    training; without either it is off on a CPU, and says so."""
    asked = quickstart.parse_args(["--fid", "--inception-weights", str(tmp_path / "none.pth")])
    with pytest.raises(ReportedError, match="--fid: no Inception weights.*none.pth not found"):
        quickstart.inception_weights(asked, "cpu")
    assert quickstart.inception_weights(quickstart.parse_args([]), "cpu") == (
        None, "off on a CPU; --fid computes it",
    )  # fmt: skip


def test_a_stop_is_one_line_naming_the_quickstarts_own_command(tmp_path, monkeypatch, capsys):
    """Ctrl-C in training: train.py reports nothing itself (no "--resume auto", which the
    quickstart does not take); the quickstart says, once, how to continue. Elsewhere (the
    preparation, the sampling) the same."""

    def stopped_training(args, stop_hint="continue with --resume auto"):
        assert stop_hint is None  # the quickstart reports the stop itself
        return EXIT_STOPPED

    monkeypatch.setattr(quickstart, "pick_networks", lambda choice: quickstart.Networks(
        "pixels-2x", "dinov2-vit-tiny-random"))  # fmt: skip
    monkeypatch.setattr(quickstart.prepare, "main", lambda args: None)
    monkeypatch.setattr(quickstart.train, "main", stopped_training)
    argv = ["--fast", "--out", str(tmp_path / "q"), "--device", "cpu"]
    with pytest.raises(RunStopped) as stop:
        quickstart.main(argv)
    command = f"python quickstart.py --fast --out {tmp_path / 'q'} --device cpu"
    assert str(stop.value) == (
        f"training stopped by a signal, its checkpoint saved: re-run {command} to continue"
    )

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(quickstart.prepare, "main", interrupted)
    with pytest.raises(RunStopped, match=f"^interrupted: re-run {command} to continue$"):
        quickstart.main(argv)

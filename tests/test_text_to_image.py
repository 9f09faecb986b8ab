"""Text-to-image on a toy caption set (the toy shapes in MS-COCO's layout, "a red circle"):
caption draws and dropout, MMDiT training with exact resume, sampling from captions with
guidance by the empty caption, FID and CLIP score."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from test_faults import kill_when, start
from test_train import TIMINGS, assert_states_equal, checkpoint, metrics, optimizer_tensors, run

import generate
import train
from dataset import LatentDataset
from evaluations.clip_score import (
    CLIP_STANDIN,
    clip_cosines,
    clip_pixels,
    clip_scores,
    standin_clip,
)
from evaluations.clip_score import main as clip_main
from evaluations.clip_score import parse_args as clip_args
from evaluations.evaluator import evaluate
from evaluations.inception import TinyInceptionForTests
from evaluations.inputs import load_reference_statistics
from evaluations.make_reference import make_reference
from preprocessing.prepare import main as prepare_main
from preprocessing.prepare import parse_args as prepare_args
from urepa import shards
from urepa.captions import ContextTable, caption_of_sample
from urepa.checkpoints import TrainingError
from urepa.data_plan import BatchPlan, StepDraws, TrainingBatches, caption_choice
from urepa.encoders import ENCODER_STANDIN
from urepa.periodic_eval import check_eval_captions, eval_captions
from urepa.prompts import recorded_text_encoder
from urepa.settings import EVAL_FILE, EvalSettings
from urepa.text_encoders import TEXT_ENCODER_STANDIN
from urepa.toy_shapes import NUM_CLASSES, toy_captions, write_caption_dataset
from urepa.utils import InputError

RES = 32  # 4×4 latents, 2×2 MMDiT tokens at patch 2
PER_CLASS = 2
TINY_MMDIT = json.dumps({"depth": 2, "projector_dim": 32})


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a busy machine, extra threads only wait on each other (a run takes
    several times longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory) -> tuple[str, str, str]:
    """The toy caption set, prepared: (image folder, captions file, dataset)."""
    root = tmp_path_factory.mktemp("toy-coco")
    images, captions = write_caption_dataset(str(root / "raw"), PER_CLASS, size=RES)
    dest = str(root / "data")
    flags = f"--vae tiny-random --enc-type {ENCODER_STANDIN} --resolution {RES} --batch-size 8"
    flags += f" --num-workers 0 --text-encoder {TEXT_ENCODER_STANDIN}"
    argv = ["--source", images, "--captions", captions, "--dest", dest, *flags.split()]
    prepare_main(prepare_args(argv))
    return images, captions, dest


def t2i_argv(data_dir: str, out, exp: str, *extra: str) -> list[str]:
    """A tiny MMDiT run: 8 images per step, 4 steps, checkpoints every 2."""
    return [
        "--data-dir", data_dir, "--output-dir", str(out), "--exp-name", exp,
        "--model", "MMDiT", "--model-config", TINY_MMDIT, "--encoder-depth", "1",
        "--enc-type", ENCODER_STANDIN,
        "--vae", "tiny-random", "--batch-size", "8", "--max-train-steps", "4",
        "--log-every", "2", "--checkpointing-steps", "2", "--sampling-steps", "0",
        "--num-workers", "0", "--mixed-precision", "no", *extra,
    ]  # fmt: skip


# With --resume auto, the same command starts a run and continues it; previews at step 4.
PREVIEWS = ("--resume", "auto", "--sampling-steps", "4", "--preview-images", "4")


@pytest.fixture(scope="module")
def straight(toy_coco, tmp_path_factory) -> tuple[str, dict]:
    """An uninterrupted 4-step MMDiT run: (output dir, its checkpoint of step 4)."""
    out = tmp_path_factory.mktemp("t2i-runs")
    run(*t2i_argv(toy_coco[2], out, "straight", *PREVIEWS))
    return str(out), checkpoint(out, "straight", 4)


def test_toy_captions_name_each_image_colour_and_shape(toy_coco):
    dataset = LatentDataset(toy_coco[2])
    texts = dataset.caption_texts()
    assert len(texts) == NUM_CLASSES * PER_CLASS
    expected = sorted(
        (f"{label}_{index:05d}.png", toy_captions(label, index))
        for label in range(NUM_CLASSES)
        for index in range(PER_CLASS)
    )
    assert texts == [captions for _, captions in expected]
    assert "a red circle" in texts[0]


def test_each_image_gets_one_drawn_caption_or_the_empty_one(toy_coco):
    """The context rows of a micro-batch, against an independent read of every caption's
    features: caption floor(u · count) of its image, or the empty caption where dropped; the
    same rows whichever process and micro-batch hold them."""
    dataset = LatentDataset(toy_coco[2])
    manifest = dataset.manifest
    reader = shards.ShardReader(toy_coco[2], manifest, [manifest["captions"]["modality"]])
    every = torch.from_numpy(reader.read_all(manifest["captions"]["modality"]))  # (N, K, L, D)
    counts = dataset.caption_counts(torch.arange(len(dataset)))
    draws = StepDraws(cfg_prob=0.3)
    whole = TrainingBatches(dataset, BatchPlan(len(dataset), 8, seed=3), draws)
    halves = [
        TrainingBatches(dataset, BatchPlan(len(dataset), 8, 1, 2, r, 3), draws) for r in (0, 1)
    ]
    chosen = torch.zeros_like(every[:, :, 0, 0], dtype=torch.bool)
    for step in range(40):
        batch = whole[step]
        idx, drop = batch["indices"], batch["drop"]
        choice = caption_choice(3, step, torch.arange(8), counts[idx])
        assert bool((choice < counts[idx]).all()) and bool((choice >= 0).all())
        expected = torch.where(drop[:, None, None], dataset.empty_context, every[idx, choice])
        assert torch.equal(batch["context"], expected)
        split = torch.cat([h[step]["context"] for h in halves])
        assert torch.equal(split, batch["context"])
        chosen[idx, choice] = True
    assert bool(chosen.sum(1).eq(counts).all())  # every caption of every image was drawn


def test_models_and_datasets_are_matched(toy_coco, data_dir, tmp_path):
    with pytest.raises(InputError, match="captioned"):
        run(*t2i_argv(data_dir, tmp_path, "mmdit-on-labels", "--resolution", "64"))
    with pytest.raises(InputError, match=r"captioned \(text-to-image\) dataset"):
        sit = '{"hidden_size": 32, "depth": 1, "num_heads": 2}'
        run(*t2i_argv(toy_coco[2], tmp_path, "sit", "--model", "SiT", "--model-config", sit))


def test_mmdit_killed_then_resumed_equals_a_straight_run_bitwise(
    toy_coco, straight, tmp_path, monkeypatch
):
    """train.py killed (SIGKILL, its whole process group) once checkpoint 2 is written, then the
    same command with --resume auto: model, EMA, optimiser and the losses after the resume are
    the straight run's (same captions, same draws)."""
    out, a = straight
    cmd = [sys.executable, "train.py", *t2i_argv(toy_coco[2], tmp_path, "killed", *PREVIEWS)]
    folder = tmp_path / "killed" / "checkpoints"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as this process (see `one_thread`)
    kill_when(start(cmd), lambda: os.path.exists(folder / "0000002.pt"))
    assert not os.path.exists(folder / "0000004.pt")  # interrupted between the checkpoints
    run(*t2i_argv(toy_coco[2], tmp_path, "killed", *PREVIEWS))  # the same command, resumed
    b = checkpoint(tmp_path, "killed", 4)
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    for x, y in zip(optimizer_tensors(a), optimizer_tensors(b), strict=True):
        assert torch.equal(x, y)
    assert [row["step"] for row in metrics(tmp_path, "killed")] == [2, 4]
    assert metrics(out, "straight")[1] | TIMINGS == metrics(tmp_path, "killed")[1] | TIMINGS
    before = checkpoint(out, "straight", 2)["model"]["context_embedder.weight"]
    assert not torch.equal(a["model"]["context_embedder.weight"], before)  # captions are read


def test_the_text_encoder_of_the_captions_is_found_for_sample_py(toy_coco, straight):
    """train.py records it in the run's flags; a checkpoint without it: its --data-dir's
    manifest; neither: a one-line refusal."""
    assert straight[1]["args"]["text_encoder"] == TEXT_ENCODER_STANDIN
    older = SimpleNamespace(checkpoint_args={"data_dir": toy_coco[2]})
    assert recorded_text_encoder(older) == TEXT_ENCODER_STANDIN
    with pytest.raises(InputError, match="names no text encoder and its dataset"):
        recorded_text_encoder(SimpleNamespace(checkpoint_args={"data_dir": "/nonexistent"}))


def test_context_table_guides_by_the_empty_caption():
    """Label k < n is caption k, label n the empty caption."""
    seen = []
    model = lambda x, t, context, **kw: seen.append(context) or (x, [])  # noqa: E731
    contexts, empty = torch.randn(3, 5, 4), torch.randn(5, 4)
    table = ContextTable(model, contexts, empty)
    assert table.num_classes == 3
    table(torch.zeros(4, 1), torch.zeros(4), torch.tensor([2, 0, 3, 3]))
    assert torch.equal(seen[0], torch.stack([contexts[2], contexts[0], empty, empty]))


def test_samples_take_images_then_their_next_captions_in_a_fixed_order():
    counts = torch.tensor([2, 1, 3])
    images, captions = caption_of_sample(torch.arange(9), counts)
    assert images.tolist() == [0, 1, 2] * 3
    assert captions.tolist() == [0, 0, 0, 1, 0, 1, 0, 0, 2]
    assert np.array_equal(caption_of_sample(torch.tensor([7]), counts)[1], [0])


def test_clip_score_is_the_cosine_of_each_pair_scaled():
    """Batched scores against one pair at a time through CLIP's own feature functions, and a
    caption that does not fit its image scores differently."""
    model, tokenizer = standin_clip()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "green ring on grey"]
    batched = clip_cosines(model, tokenizer, images, captions)
    assert np.array_equal(clip_scores(model, tokenizer, images, captions), 100 * batched.clip(0))
    for k in range(3):
        pixels = clip_pixels(images[k : k + 1], 32, torch.device("cpu"))
        tokens = tokenizer([captions[k]], return_tensors="pt")
        with torch.no_grad():  # CLIPModel's own forward: normalised image and text embeddings
            out = model(input_ids=tokens["input_ids"], pixel_values=pixels)
        expected = float((out.image_embeds * out.text_embeds).sum())
        assert batched[k] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert not np.allclose(batched, clip_cosines(model, tokenizer, images, captions[::-1]))


def test_caption_set_end_to_end_generate_from_captions_and_evaluate(toy_coco, straight, tmp_path):
    """prepare, train 4 steps (fixtures; killed and resumed: the test above) -> generate 6 images
    from the set's captions with guidance by the empty caption -> FID against the set's
    reference and CLIP score; the samples follow the captions' fixed order, whatever the batch
    size."""
    run_dir = os.path.join(straight[0], "straight")
    assert os.path.exists(os.path.join(run_dir, "samples", "0000004.png"))  # previews by caption
    ckpt = os.path.join(run_dir, "checkpoints", "0000004.pt")

    def sample(name: str, batch: int) -> str:
        generate.main(generate.parse_args([
            "--ckpt", ckpt, "--sample-dir", str(tmp_path / name), "--captions-from", toy_coco[2],
            "--mode", "ode", "--num-steps", "3", "--cfg-scale", "2.0", "--guidance-high", "0.7",
            "--num-fid-samples", "6", "--per-proc-batch-size", str(batch),
        ]))  # fmt: skip
        return str(tmp_path / f"{name}.npz")

    npz = sample("coco", 4)
    assert np.array_equal(np.load(npz)["arr_0"], np.load(sample("other-batch", 6))["arr_0"])
    captions = json.loads((tmp_path / "coco.captions.json").read_text())
    assert captions == [texts[0] for texts in LatentDataset(toy_coco[2]).caption_texts()[:6]]
    ref = str(tmp_path / "ref.npz")
    make_reference(toy_coco[0], ref, TinyInceptionForTests(), resolution=RES)
    net = TinyInceptionForTests()
    with pytest.warns(UserWarning, match="fewer than 50000"):
        metrics_ = evaluate(load_reference_statistics(ref, net.pool_dim, net.spatial_dim), ref,
                            npz, net)  # fmt: skip
    assert np.isfinite(metrics_["fid"]) and metrics_["fid"] > 0
    score = clip_main(clip_args([npz, "--clip", CLIP_STANDIN]))
    assert 0 <= score <= 100
    with pytest.raises(InputError, match="--captions-from"):
        generate.main(generate.parse_args(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "x"),
                                           "--num-fid-samples", "2"]))  # fmt: skip


# Evaluation during training of a text-to-image run: 6 samples (the first caption of each toy
# image's first 6) by the ablation preset with 3 steps, the stand-in Inception.
def eval_flags(data_dir: str, ref: str) -> list[str]:
    return ["--eval-every", "2", "--eval-samples", "6", "--eval-batch-size", "4",
            "--eval-preset", "ablation", "--eval-num-steps", "3", "--eval-ref", ref,
            "--eval-captions-from", data_dir, "--eval-standins-for-tests"]  # fmt: skip


def eval_rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, EVAL_FILE)) as f:
        return [json.loads(line) for line in f]


def test_evaluation_during_training_equals_generate_from_captions_then_the_evaluator(
    toy_coco, tmp_path
):
    """A run evaluated at step 2, then resumed to step 4: the row of step 2 is kept, not redone;
    step 4's metrics are those of generate.py --captions-from (same seed, preset, captions) on
    checkpoint 4's EMA, then the evaluator."""
    ref = str(tmp_path / "ref.npz")
    make_reference(toy_coco[0], ref, TinyInceptionForTests(), resolution=RES)
    flags = eval_flags(toy_coco[2], ref)
    run(*t2i_argv(toy_coco[2], tmp_path, "evaluated", *flags, "--max-train-steps", "2"))
    first = eval_rows(tmp_path / "evaluated")
    assert [row["step"] for row in first] == [2]
    run(*t2i_argv(toy_coco[2], tmp_path, "evaluated", *flags, "--resume", "auto"))
    rows = eval_rows(tmp_path / "evaluated")
    assert [row["step"] for row in rows] == [2, 4] and rows[0] == first[0]
    assert rows[1]["eval_captions"] == os.path.abspath(toy_coco[2])
    sample_dir = str(tmp_path / "samples")
    generate.main(generate.parse_args([
        "--ckpt", str(tmp_path / "evaluated" / "checkpoints" / "0000004.pt"),
        "--sample-dir", sample_dir, "--captions-from", toy_coco[2], "--preset", "ablation",
        "--num-steps", "3", "--num-fid-samples", "6", "--per-proc-batch-size", "4",
        "--global-seed", "0",
    ]))  # fmt: skip
    net = TinyInceptionForTests()
    stats = load_reference_statistics(ref, net.pool_dim, net.spatial_dim)
    with pytest.warns(UserWarning, match="fewer than 50000"):
        offline = evaluate(stats, ref, f"{sample_dir}.npz", net)
    assert rows[0]["fid"] != rows[1]["fid"]  # the EMA moved: the comparison can tell steps apart
    for key, value in offline.items():
        assert rows[1][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_evaluation_captions_are_required_for_text_to_image_and_refused_otherwise(
    toy_coco, tmp_path
):
    def settings(*extra: str) -> EvalSettings:
        argv = t2i_argv(toy_coco[2], tmp_path, "x", "--eval-ref", "ref.npz", *extra)
        return EvalSettings.from_flags(vars(train.parse_args(argv)))

    captions = ("--eval-captions-from", toy_coco[2])
    check_eval_captions(settings("--eval-every", "2", *captions), captioned=True)  # accepted
    with pytest.raises(TrainingError, match="needs --eval-captions-from DATA_DIR"):
        run(*t2i_argv(toy_coco[2], tmp_path, "no-captions", "--eval-every", "2",
                      "--eval-ref", "ref.npz"))  # fmt: skip
    with pytest.raises(TrainingError, match="--eval-captions-from is for --eval-every on a"):
        check_eval_captions(settings("--eval-every", "2", *captions), captioned=False)
    with pytest.raises(TrainingError, match="--eval-captions-from is for --eval-every on a"):
        check_eval_captions(settings(*captions), captioned=True)
    not_a_dataset = settings("--eval-every", "2", "--eval-captions-from", str(tmp_path))
    with pytest.raises(InputError, match="--eval-captions-from: "):
        eval_captions(not_a_dataset, SimpleNamespace(context_dim=8))
    with pytest.raises(InputError, match="--eval-captions-from .* 3-wide caption features"):
        eval_captions(settings("--eval-every", "2", *captions), SimpleNamespace(context_dim=3))

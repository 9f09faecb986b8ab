"""Evaluation during training (urepa/periodic_eval.py), FD-DINOv2 and the curves command, on a CPU.

A tiny SiT↓ trains on the toy dataset (conftest.py) and is evaluated every 2 steps against a
reference that evaluations/make_reference.py builds from the toy images, with the tiny stand-in
feature networks. Checked against independent computations: the offline path (generate.py, then
the evaluator) on the checkpoint's EMA; a run without evaluation (bit for bit); a run on 2
processes; a run killed during an evaluation and resumed; FD-DINOv2 by eigendecomposition.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import RES
from test_train import (
    argv,
    assert_states_equal,
    checkpoint,
    fresh_accelerate_state,  # noqa: F401 (autouse: each in-process run gets its Accelerator)
    metrics,
    optimizer_tensors,
    run,
)

import curves
import generate
import train
from evaluations.dinov2 import build_dinov2, dinov2_statistics
from evaluations.evaluator import evaluate
from evaluations.inception import TinyInceptionForTests
from evaluations.inputs import load_reference_statistics
from evaluations.make_reference import make_reference
from evaluations.metrics import frechet_distance
from samplers import euler_maruyama_sampler, euler_sampler
from urepa.checkpoints import TrainingError
from urepa.periodic_eval import forward_images_per_sample, gather_rows, read_done_steps
from urepa.settings import EVAL_FILE, eval_sampler
from urepa.utils import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMINGS = {"images_per_sec": 0, "sec_per_step": 0}
# Fields of an eval.jsonl row that are wall-clock figures (the metrics must agree, these not).
CLOCKS = {"eval_seconds": 0, "gpu_hours": 0}
SAMPLES = 8  # 2 per class of the toy set's 4
# 2 steps, each logged, and an EMA that moves within them, so that the evaluations differ.
RUN = ["--max-train-steps", "2", "--log-every", "1", "--ema-decay", "0.5"]
# The ablation preset's sampler (Euler ODE, cfg 1.8 on [0, 0.7]) with 4 steps instead of 50.
EVAL = ["--eval-every", "1", "--eval-samples", str(SAMPLES), "--eval-batch-size", "4",
        "--eval-preset", "ablation", "--eval-num-steps", "4", "--eval-fd-dinov2",
        "--eval-standins-for-tests"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(toy_images, tmp_path_factory) -> str:
    """The toy images' reference batch (stand-in networks), FD-DINOv2 statistics included."""
    out = str(tmp_path_factory.mktemp("eval-ref") / "ref.npz")
    dinov2 = build_dinov2(random_weights_for_tests=True)
    make_reference(toy_images, out, TinyInceptionForTests(), resolution=RES, dinov2=dinov2)
    return out


def eval_rows(out, exp: str) -> list[dict]:
    with open(out / exp / EVAL_FILE) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def evaluated(data_dir, reference, tmp_path_factory):
    """A 2-step run evaluated at steps 1 and 2: its output folder."""
    out = tmp_path_factory.mktemp("eval-runs")
    run(*argv(data_dir, out, "evaluated", *RUN, "--eval-ref", reference, *EVAL))
    return out


def test_evaluation_at_two_steps_leaves_training_bitwise_unchanged(data_dir, evaluated):
    rows = eval_rows(evaluated, "evaluated")
    assert [row["step"] for row in rows] == [1, 2]
    assert [row["images_seen"] for row in rows] == [8, 16]  # --batch-size 8
    for row in rows:
        for key in ("fid", "sfid", "inception_score", "precision", "recall", "fd_dinov2"):
            assert math.isfinite(row[key]), key
        assert row["num_samples"] == SAMPLES and row["gpu_hours"] > 0
    assert rows[0]["fid"] != rows[1]["fid"]  # the EMA moved between them
    run(*argv(data_dir, evaluated, "plain", *RUN))
    a, b = checkpoint(evaluated, "evaluated", 2), checkpoint(evaluated, "plain", 2)
    for key in ("model", "ema"):
        assert_states_equal(a[key], b[key])  # bit for bit
    for x, y in zip(optimizer_tensors(a), optimizer_tensors(b), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(metrics(evaluated, "evaluated"), metrics(evaluated, "plain"), strict=True):
        assert x | TIMINGS == y | TIMINGS  # the same losses and gradient norms at every step
    log = (evaluated / "evaluated" / "log.txt").read_text()
    assert "PMACs" in log and "FID-8 is not comparable with papers' FID-50K" in log


def test_online_metrics_equal_generate_then_the_evaluator(evaluated, reference, tmp_path):
    """The offline path on step 2's checkpoint: generate.py with the same seed, balanced labels
    and preset, then the evaluator's own functions, give the metrics the run logged."""
    ckpt = str(evaluated / "evaluated" / "checkpoints" / "0000002.pt")
    sample_dir = str(tmp_path / "samples")
    generate.main(generate.parse_args([
        "--ckpt", ckpt, "--sample-dir", sample_dir, "--vae", "tiny-random", "--preset", "ablation",
        "--num-steps", "4", "--num-fid-samples", str(SAMPLES), "--per-proc-batch-size", "4",
        "--label-sampling", "balanced", "--global-seed", "0",
    ]))  # fmt: skip
    net = TinyInceptionForTests()
    stats = load_reference_statistics(reference, net.pool_dim, net.spatial_dim)
    dinov2 = build_dinov2(random_weights_for_tests=True)
    with pytest.warns(UserWarning, match="fewer than 50000"):
        offline = evaluate(stats, reference, f"{sample_dir}.npz", net, dinov2=dinov2)
    online = eval_rows(evaluated, "evaluated")[1]
    for key, value in offline.items():
        assert online[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def kill_with_workers_when(torchrun: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """`kill -9` torchrun and its workers as soon as `ready()` holds. torchrun starts each
    worker in a session of its own, which a kill of torchrun's process group would miss."""
    deadline = time.time() + 300
    while not ready():
        assert torchrun.poll() is None, f"torchrun ended (code {torchrun.returncode}) unkilled"
        assert time.time() < deadline, "the moment of the kill never came"
        time.sleep(0.0005)
    listed = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True)
    for pid in [int(p) for p in listed.stdout.split()] + [torchrun.pid]:
        os.killpg(pid, signal.SIGKILL)  # each leads its own process group
    assert torchrun.wait(timeout=60) == -signal.SIGKILL


def test_two_processes_killed_in_an_evaluation_then_resumed_give_the_metrics_of_one(
    data_dir, reference, evaluated
):
    """2 gloo processes, killed during the last step's evaluation (after its checkpoint); the
    same command, on 1 process, evaluates that step before finding nothing left to train. The
    rows equal the 1-process run's up to float rounding (so do the weights: test_train), and a
    third run repeats nothing."""
    extra = ["--gradient-accumulation-steps", "2", *RUN, "--eval-ref", reference, *EVAL,
             "--resume", "auto"]  # fmt: skip
    flags = argv(data_dir, evaluated, "two", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *flags]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    log = evaluated / "two" / "log.txt"
    kill_with_workers_when(
        process, lambda: log.exists() and "evaluation at step 2:" in log.read_text()
    )
    assert [row["step"] for row in eval_rows(evaluated, "two")] == [1]
    run(*flags)
    one, two = eval_rows(evaluated, "evaluated"), eval_rows(evaluated, "two")
    assert [row["processes"] for row in two] == [2, 1]
    ignored = CLOCKS | {"processes": 0}
    for a, b in zip(one, two, strict=True):
        a, b = a | ignored, b | ignored
        assert a.keys() == b.keys()
        for key, value in a.items():
            close = pytest.approx(value, rel=1e-4, abs=1e-6) if isinstance(value, float) else value
            assert b[key] == close, key
    run(*flags)  # at step 2 with both evaluations done: nothing is repeated
    assert len(eval_rows(evaluated, "two")) == 2
    assert log.read_text().count("evaluation at step 2:") == 3  # announced, announced, done


class GlooAccelerator:
    """The part of an Accelerator that `gather_rows` uses, over torch.distributed."""

    def __init__(self) -> None:
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()
        self.is_main_process = self.process_index == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.num_processes)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)


def gather_batches_worker(rank: int, store: str, out: str) -> None:
    """10 rows in batches of 4 shared out batch by batch as the reference's images are: process 0
    holds batches 0 and 2 (6 rows), process 1 batch 1 (4 rows). Row i is (i, -i)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    indices = [i for k in range(rank, 3, 2) for i in range(4 * k, min(4 * k + 4, 10))]
    rows = torch.tensor([[i, -i] for i in indices], dtype=torch.float32)
    gathered = gather_rows(rows, indices, 10, GlooAccelerator())
    if rank == 0:
        np.save(out, gathered)
    dist.destroy_process_group()


def test_rows_shared_out_by_batch_come_back_in_sample_order(tmp_path):
    """Processes may hold more than ceil(total / processes) rows (the reference's images go out
    a batch at a time): every row still lands at its index on the main process."""
    out = str(tmp_path / "rows.npy")
    torch.multiprocessing.spawn(gather_batches_worker, (str(tmp_path / "store"), out), nprocs=2)
    expected = np.array([[i, -i] for i in range(10)], dtype=np.float32)
    np.testing.assert_array_equal(np.load(out), expected)


class Passthrough(torch.nn.Module):
    """A feature network whose features are its input rows (synthetic features)."""

    device = torch.device("cpu")

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def test_fd_dinov2_equals_an_eigendecomposition_on_synthetic_features():
    """FD = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, the square roots of symmetric
    matrices taken by eigendecomposition, against the statistics that FD-DINOv2 accumulates
    batch by batch and its Fréchet distance."""
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) + 1.0
    f2 = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) * 0.5
    net = Passthrough()
    mu1, sigma1 = dinov2_statistics(net, np.split(f1, 6), len(f1))  # type: ignore[arg-type]
    mu2, sigma2 = dinov2_statistics(net, np.split(f2, 6), len(f2))  # type: ignore[arg-type]
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    np.testing.assert_allclose(mu1, f1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma1, c1, rtol=1e-10, atol=1e-12)

    def sqrt_psd(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root, diff = sqrt_psd(c1), f1.mean(0) - f2.mean(0)
    expected = diff @ diff + np.trace(c1) + np.trace(c2) - 2 * np.trace(sqrt_psd(root @ c2 @ root))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-8)


def test_dinov2_preprocessing_is_bicubic_224_and_imagenet_normalisation():
    net = build_dinov2(random_weights_for_tests=True)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = net.vit.forward_features(x)[:, 0]
        torch.testing.assert_close(net(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "preset, heun", [("ablation", False), ("ablation", True), ("paper-main", False)]
)
def test_forward_count_of_the_cost_line_is_the_samplers(preset, heun):
    """The images the denoiser sees per sample, counted on a model the samplers call."""
    seen = []

    class Counting:
        num_classes = 3

        def __call__(self, x, t, y):
            seen.append(len(x))
            return torch.zeros_like(x), []

    args = eval_sampler(dict(eval_preset=preset, eval_num_steps=None, eval_batch_size=1,
                             mixed_precision="no", path_type="linear"))  # fmt: skip
    args = dataclasses.replace(args, heun=heun and args.mode == "ode")
    x, y = torch.zeros(1, 2, 2, 2), torch.zeros(1, dtype=torch.long)
    kwargs = dict(cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                  guidance_high=args.guidance_high)  # fmt: skip
    if args.mode == "ode":
        euler_sampler(Counting(), x, y, args.num_steps, heun=args.heun, **kwargs)
    else:
        euler_maruyama_sampler(Counting(), x, y, args.num_steps, **kwargs)
    assert forward_images_per_sample(args) == sum(seen)


def test_curves_plot_every_run_against_steps_images_and_gpu_hours(evaluated, tmp_path):
    other = tmp_path / "other"  # a second run: the first one's rows, other numbers
    other.mkdir()
    rows = [row | {"fid": row["fid"] + 1, "gpu_hours": 2 * row["gpu_hours"]}
            for row in eval_rows(evaluated, "evaluated")]  # fmt: skip
    (other / EVAL_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    runs = [str(evaluated / "evaluated"), str(other)]
    curves.main(
        curves.parse_args([*runs, "--metric", "fd_dinov2", "--out", str(tmp_path / "c.png")])
    )
    assert (tmp_path / "c.png").stat().st_size > 0
    fig = curves.curve_figure(curves.load_runs(runs, "fid"), "fid")
    expected = [eval_rows(evaluated, "evaluated"), rows]
    for ax, key in zip(fig.axes, ("step", "images_seen", "gpu_hours"), strict=True):
        for line, run_rows in zip(ax.get_lines(), expected, strict=True):
            np.testing.assert_array_equal(line.get_xdata(), [r[key] for r in run_rows])
            np.testing.assert_array_equal(line.get_ydata(), [r["fid"] for r in run_rows])
    with pytest.raises(InputError, match="no 'nonsense'"):
        curves.load_runs(runs, "nonsense")


def test_curves_plot_the_rows_that_hold_the_metric(tmp_path):
    """--eval-fd-dinov2 turned on at a resume: FD-DINOv2's curve starts at the first row that
    has it; a metric no row has is an error."""
    rows = [{"step": s, "fid": 10.0 - s, "num_samples": 8} for s in (1, 2, 3)]
    rows[2]["fd_dinov2"] = 50.0
    (tmp_path / EVAL_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert curves.load_runs([str(tmp_path)], "fid") == {str(tmp_path): rows}
    assert curves.load_runs([str(tmp_path)], "fd_dinov2") == {str(tmp_path): rows[2:]}
    with pytest.raises(InputError, match="no 'sfid'"):
        curves.load_runs([str(tmp_path)], "sfid")


def test_paper_tables_hold_the_scripts_numbers_and_ours_beside_them(tmp_path):
    for table, rows in curves.PAPER_TABLES.items():
        with open(os.path.join(REPO, "scripts", f"table{table}.sh")) as f:
            header = f.read().split("USAGE")[0]
        for row in rows:
            assert re.search(rf"\b({row.fid:.2f}|{row.fid:g})\b", header), (table, row)
    results, exps = tmp_path / "results", tmp_path / "exps"
    results.mkdir()
    (exps / "ablation-w2").mkdir(parents=True)
    (results / "sitdown-xl2-urepa-0100000-ablation.json").write_text(
        json.dumps({"fid": 5.7049, "num_samples": 50_000})
    )
    online = {"step": 100_000, "preset": "ablation", "sampler_steps": 50, "fid": 7.5,
              "num_samples": 10_000}  # fmt: skip
    cheaper = online | {"sampler_steps": 10, "fid": 9.0}  # another sampler: not this table's
    lines = [json.dumps(row) + "\n" for row in (cheaper, online)]
    (exps / "ablation-w2" / "eval.jsonl").write_text("".join(lines))
    out = tmp_path / "table8.md"
    curves.main(curves.parse_args(["--table", "8", "--results", str(results), "--exps",
                                   str(exps), "--out", str(out)]))  # fmt: skip
    lines = out.read_text().splitlines()
    assert lines[4].startswith("| w = 0 | 100,000 | ablation | 6.25 | not run |")
    assert lines[5].startswith("| w = 2 | 100,000 | ablation | 5.81 | 7.50 | FID-10000 online")
    assert lines[6].startswith("| w = 3 (default) | 100,000 | ablation | 5.72 | 5.70 | FID-50K")


def test_damaged_log_lines_are_skipped_then_repaired_by_a_resume(
    data_dir, evaluated, reference, tmp_path, capsys
):
    """A garbage line and a row cut short in eval.jsonl, garbage in metrics.jsonl: curves.py
    draws the readable rows and reports the damage once; a resume rewrites both files without
    the damaged lines instead of stopping."""
    shutil.copytree(evaluated / "evaluated", tmp_path / "damaged")
    eval_log, metrics_log = tmp_path / "damaged" / EVAL_FILE, tmp_path / "damaged" / "metrics.jsonl"
    good_eval, good_metrics = eval_log.read_text(), metrics_log.read_text()
    eval_log.write_text(good_eval.replace("\n", "\nnot json\n", 1) + '{"step": 3, "fi')
    metrics_log.write_text(good_metrics.replace("\n", '\n{"step": [1]}\n', 1) + "\x00\x00")
    runs = [str(tmp_path / "damaged"), str(tmp_path / "damaged")]  # the same file twice
    curves.main(curves.parse_args([*runs, "--out", str(tmp_path / "c.png")]))
    err = capsys.readouterr().err
    assert err.count("skipped 2 damaged line(s) (2, 4)") == 1, err
    fig = curves.curve_figure(curves.load_runs(runs[:1], "fid"), "fid")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2]
    run(*argv(data_dir, tmp_path, "damaged", *RUN, "--eval-ref", reference, *EVAL,
              "--resume", "auto"))  # fmt: skip
    assert eval_log.read_text() == good_eval and metrics_log.read_text() == good_metrics
    assert "skipped 2 damaged line(s) (2, 4)" in (tmp_path / "damaged" / "log.txt").read_text()


def test_an_impossible_evaluation_size_or_a_reference_of_another_size_is_refused(
    data_dir, toy_images, reference, tmp_path
):
    """Before the first step: --eval-samples beyond memory (a raw allocation error before), and
    a reference of 32-px images against 64-px samples (accepted without a word before)."""
    huge = [*EVAL[:2], "--eval-samples", "100000000000", *EVAL[4:]]
    with pytest.raises(InputError, match="--eval-samples 100000000000 needs at least .* memory"):
        run(*argv(data_dir, tmp_path, "huge", *RUN, "--eval-ref", reference, *huge))
    small = str(tmp_path / "ref32.npz")
    make_reference(toy_images, small, TinyInceptionForTests(), resolution=32)
    with pytest.raises(TrainingError, match="holds 32×32 images, the samples are 64×64"):
        run(*argv(data_dir, tmp_path, "small", *RUN, "--eval-ref", small, *EVAL))
    assert not (tmp_path / "huge").exists() and not (tmp_path / "small").exists()


def test_curves_refuse_an_unknown_figure_format_and_a_file_as_results(tmp_path):
    (tmp_path / EVAL_FILE).write_text(json.dumps({"step": 1, "fid": 3.0}) + "\n")
    with pytest.raises(InputError, match=r"--out .*x\.xyz: a figure is written as .*png"):
        curves.main(curves.parse_args([str(tmp_path), "--out", str(tmp_path / "x.xyz")]))
    not_a_folder = tmp_path / "results.json"
    not_a_folder.write_text("{}")
    with pytest.raises(InputError, match="--results .*results.json is not a folder"):
        curves.main(curves.parse_args(["--table", "5", "--results", str(not_a_folder),
                                       "--out", str(tmp_path / "t.md")]))  # fmt: skip
    nowhere = [str(tmp_path / "none"), "--exps", str(tmp_path / "none")]
    with pytest.raises(InputError, match="nothing to read the table from"):
        curves.main(curves.parse_args(["--table", "5", "--results", *nowhere,
                                       "--out", str(tmp_path / "t.md")]))  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    (results / "sitdown-xl2-urepa-0100000-ablation.json").write_text('{"fid": ')
    with pytest.raises(InputError, match="is not an evaluator result"):
        curves.main(curves.parse_args(["--table", "8", "--results", str(results),
                                       "--out", str(tmp_path / "t.md")]))  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-every", "2"], "--eval-every needs --eval-ref"),
        (["--eval-every", "2", "--eval-ref", "r.npz", "--cfg-prob", "0"],
         "--eval-preset ablation guides, but --cfg-prob 0 trains no null class"),
    ],
)  # fmt: skip
def test_eval_flag_errors_are_clear(extra, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data-dir", "d", "--exp-name", "x", *extra])
    assert message in capsys.readouterr().err


def test_a_missing_reference_stops_the_run_before_its_first_step(data_dir, tmp_path):
    missing = str(tmp_path / "nowhere.npz")
    with pytest.raises(TrainingError, match="--eval-ref: no file"):
        run(*argv(data_dir, tmp_path, "no-ref", "--eval-ref", missing, *EVAL))
    assert not (tmp_path / "no-ref").exists()  # nothing written: the same command can be rerun


def test_rows_of_other_settings_are_evaluated_again_and_plotted_apart(tmp_path):
    settings = {"preset": "ablation", "sampler_steps": 50, "num_samples": 10_000,
                "eval_ref": "/ref.npz"}  # fmt: skip
    rows = [{"step": 2, **settings}, {"step": 4, **settings, "sampler_steps": 4},
            {"step": 6, **settings, "eval_ref": "/other.npz"}]  # fmt: skip
    (tmp_path / EVAL_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_done_steps(str(tmp_path), settings) == {2}
    groups = curves.by_settings(str(tmp_path), rows)
    assert [[row["step"] for row in part] for _, part in groups] == [[2, 6], [4]]
    assert groups[1][0].endswith("(ablation, 4, 10000)")

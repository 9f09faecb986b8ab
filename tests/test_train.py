"""train.py and the training loop on a CPU: a tiny SiT↓ on a tiny dataset that
preprocessing/prepare.py writes with the stand-in VAE and encoder.

Runs are compared with each other (straight vs interrupted and resumed, 1 vs 2 processes,
accumulation vs a full batch, online vs precomputed encoder) and with independent computations
(the EMA formula, the label-dropout decisions, the data plan's partition of each global batch).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import RES
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import train
from models import build_model
from urepa import checkpoints, shards, trainer
from urepa.checkpoints import TrainingError, load_checkpoint, load_model_for_sampling
from urepa.data_plan import DRAWS_VERSION, BatchPlan, StepDraws, TrainingBatches
from urepa.encoders import ENCODER_STANDIN
from urepa.run_log import create_logger
from urepa.trainer import create_accelerator, update_ema
from urepa.utils import EXIT_STOPPED, write_json

TIMINGS = {"images_per_sec": 0, "sec_per_step": 0}  # wall-clock figures differ by run
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = json.dumps({"hidden_size": 32, "depths": [1, 2, 1], "num_heads": 2, "projector_dim": 32})


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator (mixed precision may differ)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def argv(data_dir: str, out: str, exp: str, *extra: str) -> list[str]:
    """A tiny run: 8 images per step, 4 steps, checkpoints every 2; `extra` overrides."""
    return [
        "--data-dir", data_dir, "--resolution", str(RES), "--output-dir", str(out),
        "--exp-name", exp, "--model", "SiTDown", "--model-config", TINY,
        "--enc-type", ENCODER_STANDIN, "--vae", "tiny-random", "--batch-size", "8",
        "--max-train-steps", "4", "--log-every", "2", "--checkpointing-steps", "2",
        "--sampling-steps", "0", "--num-workers", "0", "--mixed-precision", "no", *extra,
    ]  # fmt: skip


def run(*args: str) -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(train.parse_args(list(args)))


def torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """train.py in 2 CPU processes (gloo); accelerate needs ACCELERATE_USE_CPU to see them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *args]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def checkpoint(out, exp: str, step: int) -> dict:
    return load_checkpoint(os.path.join(str(out), exp, "checkpoints", f"{step:07d}.pt"))


def metrics(out, exp: str) -> list[dict]:
    with open(os.path.join(str(out), exp, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_states_equal(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def optimizer_tensors(ckpt: dict) -> list[torch.Tensor]:
    return [t for s in ckpt["opt"]["state"].values() for t in s.values()]


class ContractDataset(Dataset):
    """LatentDataset's contract in memory: sample i is a function of i alone."""

    num_classes, resolution = 5, 32

    def __init__(self, n: int = 24):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        return {
            "moments": torch.cat(
                [torch.randn(4, 4, 4, generator=g), torch.rand(4, 4, 4, generator=g) + 0.1]
            ),
            "label": torch.tensor(i % self.num_classes),
            "features": [torch.randn(4, 6, generator=g).half()],
            "pixels": torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
        }


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def test_defaults_are_the_paper_recipe(data_dir):
    args = train.parse_args(["--data-dir", data_dir, "--exp-name", "x"])
    assert (args.enc_type, args.resolution, args.vae) == (None, None, None)  # the dataset's
    imagenet = {"resolution": 256, "settings": {"vae": "ema"},
                "modalities": {"features-dinov2-vit-b": {}, "features-mae-vit-l": {}}}  # fmt: skip
    train.take_from_dataset(args, imagenet)
    assert (args.model, args.enc_type, args.encoder_mode) == (
        "SiTDown-XL/2", "dinov2-vit-b", "precomputed",
    )  # fmt: skip
    assert (args.resolution, args.vae) == (256, "ema")
    assert (args.proj_coeff, args.manifold_coeff, args.manifold_mode) == (0.5, 3.0, "token")
    assert (args.lambda_schedule, args.projector_upsample, args.projector_kernel) == (
        "constant", "after", "bilinear",
    )  # fmt: skip
    assert (args.align_resolution, args.time_aware_projector) == ("upsample", False)
    assert (args.batch_size, args.learning_rate, args.adam_beta1, args.adam_beta2) == (
        256, 1e-4, 0.9, 0.999,
    )  # fmt: skip
    assert (args.adam_weight_decay, args.adam_epsilon, args.max_grad_norm) == (0.0, 1e-8, 1.0)
    assert (args.ema_decay, args.cfg_prob, args.seed) == (0.9999, 0.1, 0)
    assert (args.max_train_steps, args.checkpointing_steps) == (400_000, 50_000)
    assert (args.path_type, args.weighting) == ("linear", "uniform")
    assert args.mixed_precision == train.resolve_precision("auto")  # see the test below
    # The default tap is the model's middle block: 18 of SiT↓-XL/2's 36 (Table 5).
    with torch.device("meta"):
        model = build_model(args.model, z_dims=[768])
    assert model.encoder_depth == 18


@pytest.mark.parametrize(
    "cuda, bf16, expected", [(False, False, "no"), (True, True, "bf16"), (True, False, "fp16")]
)
def test_auto_precision_is_bf16_where_the_gpu_has_it(cuda, bf16, expected, monkeypatch):
    """bf16 needs no loss scaler; fp16 (REPA's protocol) only on GPUs without bf16, or asked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert train.resolve_precision("auto") == expected
    assert train.resolve_precision("fp16") == "fp16" and train.resolve_precision("no") == "no"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--learning-rate", "-1"], "--learning-rate: must be > 0"),
        (["--cfg-prob", "1"], "--cfg-prob: must be in [0, 1)"),
        (["--manifold-mode", "pairs"], "--manifold-mode: invalid choice: 'pairs'"),
        (["--mixed-precision", "fp8"], "--mixed-precision: invalid choice"),
        (["--model", "SiT-Q/2"], "unknown model 'SiT-Q/2'"),
        (["--enc-type", "clip-b"], "unknown encoder 'clip-b'"),
        (["--enc-type", "none"], "--enc-type none trains without alignment: it needs --proj-coe"),
        (["--enc-type", "dinov2-vit-b", "--proj-coeff", "0"], "pass --enc-type none too"),
        (["--batch-size", "10", "--gradient-accumulation-steps", "3"], "not divisible by"),
        (["--model-config", "[1]"], "expected a JSON object"),
        (["--model-config", '{"encoder_depth": 3}'], "encoder_depth (set by --encoder-depth)"),
        (["--resume", "/no/such.pt"], "no checkpoint file '/no/such.pt'"),
        (["--fsdp", "on", "--mixed-precision", "fp16"], "--fsdp on does not work with --mixed-p"),
        (["--ema-every", "0"], "--ema-every: must be a positive integer, got 0"),
        (["--enc-weights", "w.pth"], "--enc-weights is read only with --encoder-mode online"),
        # --model-config's values are checked against the constructor's annotations
        (["--model", "SiTDown", "--model-config", '{"hidden_size": "64"}'],
         "--model-config: hidden_size must be int, got '64' (str)"),
        (["--model", "SiTDown", "--model-config", '{"depths": 2}'],
         "--model-config: depths must be tuple[int, int, int] | list[int], got 2 (int)"),
        (["--model-config", '{"projector_dim": 2.5}'],
         "--model-config: projector_dim must be int, got 2.5 (float)"),
        (["--model", "SiT", "--model-config", '{"mlp_ratio": true}'],
         "--model-config: mlp_ratio must be float, got True (bool)"),
        (["--model", "SiTDown", "--model-config", '{"hiden_size": 64}'],
         "--model-config: SiTDown takes no argument 'hiden_size' (it takes: "),
    ],
)  # fmt: skip
def test_flag_errors_are_clear(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--data-dir", "d", "--exp-name", "x", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_builds_everything_and_writes_nothing(data_dir, tmp_path, capsys):
    run(*argv(data_dir, tmp_path, "dry", "--dry-run", "--compile"))
    out = capsys.readouterr().out
    assert "compile True, fused AdamW True, compiled update False, attention auto" in out
    assert "update      whole on each process, EMA every 1 step(s)" in out
    assert "8 (global) = 1 processes × 1 accumulation steps × 8" in out
    assert "32 samples, 4 steps per epoch" in out
    assert not os.path.exists(tmp_path / "dry")


def test_dry_run_without_the_dataset_plans_from_the_flags(tmp_path, capsys):
    missing = str(tmp_path / "not-prepared-yet")
    run("--data-dir", missing, "--output-dir", str(tmp_path), "--exp-name", "plan", "--dry-run",
        "--milestone-every", "0")  # fmt: skip
    out = capsys.readouterr().out
    assert f"cannot be opened: no folder {missing} (--data-dir)" in out
    assert "SiTDown-XL/2: 960.5 M parameters" in out and "alignment tap after block 18" in out
    assert "the final one with an EMA export (no milestones)" in out
    assert not os.path.exists(tmp_path / "plan")


# --------------------------------------------------------------------------------------------
# The data plan
# --------------------------------------------------------------------------------------------


def test_plan_splits_each_global_batch_of_an_epoch_permutation():
    n, batch = 50, 12  # 4 steps per epoch, 2 samples dropped each epoch
    full = BatchPlan(n, batch, seed=3)
    for epoch in range(3):
        steps = range(epoch * 4, epoch * 4 + 4)
        seen = torch.cat([full.global_indices(s) for s in steps])
        assert len(set(seen.tolist())) == 48  # no repeats within an epoch
        assert torch.equal(seen, full.epoch_permutation(epoch)[:48])
    assert not torch.equal(full.epoch_permutation(0), full.epoch_permutation(1))
    for world, accumulation in [(2, 1), (3, 2), (1, 4), (6, 2)]:
        parts = [
            BatchPlan(n, batch, accumulation, world, rank, seed=3).local_slice(micro)
            for rank in range(world)
            for micro in range(accumulation)
        ]
        positions = [p for part in parts for p in range(part.start, part.stop)]
        assert positions == list(range(batch))  # every position once, each in one micro-batch
    with pytest.raises(ValueError, match=r"processes \(5\) × --gradient-accumulation-steps \(1\)"):
        BatchPlan(n, batch, 1, 5, 0)


def items(dataset, world: int, accumulation: int, start: int, stop: int, workers: int = 0):
    """Every process's micro-batches of steps [start, stop), concatenated per step."""
    draws = StepDraws("uniform", "linear", cfg_prob=0.5)
    per_rank = []
    for rank in range(world):
        plan = BatchPlan(len(dataset), 8, accumulation, world, rank, seed=7)
        loader = DataLoader(
            TrainingBatches(dataset, plan, draws),
            batch_size=None,
            sampler=range(start * accumulation, stop * accumulation),
            num_workers=workers,
        )
        per_rank.append(list(loader))
    steps = []
    for s in range(stop - start):
        parts = [b for rank in per_rank for b in rank[s * accumulation : (s + 1) * accumulation]]
        steps.append({
            k: torch.cat([p[k] for p in parts])
            for k in ("x", "y", "t", "noise", "drop", "indices", "pixels")
        } | {"features": torch.cat([p["features"][0] for p in parts])})  # fmt: skip
    return steps


def test_every_split_sees_the_same_samples_and_draws():
    dataset = ContractDataset()  # 3 steps per epoch: 6 steps cross an epoch boundary
    reference = items(dataset, 1, 1, 0, 6)
    for world, accumulation in [(2, 1), (1, 2), (2, 2), (4, 2)]:
        for got, want in zip(items(dataset, world, accumulation, 0, 6), reference, strict=True):
            for key in want:
                assert torch.equal(got[key], want[key]), (world, accumulation, key)
    # Resuming at step 4, with worker processes, continues the same sequence.
    for got, want in zip(items(dataset, 2, 1, 4, 6, workers=2), reference[4:], strict=True):
        assert all(torch.equal(got[key], want[key]) for key in want)
    # The latent is the posterior sample mean + std·eps, scaled; the labels and features are
    # the dataset's, in the plan's order.
    step0 = reference[0]
    samples = [dataset[int(i)] for i in step0["indices"]]
    assert torch.equal(step0["y"], torch.stack([s["label"] for s in samples]))
    assert torch.equal(step0["features"], torch.stack([s["features"][0] for s in samples]))
    assert 0 < step0["drop"].sum() < 8 and (step0["t"] >= 0).all() and (step0["t"] < 1).all()


def test_step_draws_leave_the_global_generator_alone():
    state = torch.get_rng_state()
    a = StepDraws().draw(seed=0, step=5, n=4, latent_shape=(4, 2, 2))
    assert torch.equal(torch.get_rng_state(), state)
    b = StepDraws().draw(seed=0, step=5, n=4, latent_shape=(4, 2, 2))
    c = StepDraws().draw(seed=0, step=6, n=4, latent_shape=(4, 2, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["noise"], c["noise"])


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def build_trainer(data_dir, tmp_path, *extra):
    args = train.parse_args(argv(data_dir, tmp_path, "direct", *extra))
    accelerator = create_accelerator(
        args.mixed_precision, args.report_to, args.allow_tf32, str(tmp_path / "direct")
    )
    tr, dataset = train.setup(args, accelerator, None, create_logger(True))
    draws = StepDraws(args.weighting, args.path_type, args.cfg_prob)
    return tr, args, TrainingBatches(dataset, tr.plan, draws)


def test_ema_update_is_its_formula():
    g = torch.Generator().manual_seed(0)
    ema = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    params = [
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(7, dtype=torch.float64),
    ]
    expected = [0.9999 * e + (1 - 0.9999) * p for e, p in zip(ema, params, strict=True)]
    update_ema(ema, params, 0.9999)
    for got, want in zip(ema, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_ema_in_the_loop_and_label_dropout_decided_once(data_dir, tmp_path):
    extra = ["--ema-decay", "0.75", "--cfg-prob", "0.5", "--learning-rate", "1e-2"]
    tr, args, batches = build_trainer(data_dir, tmp_path, *extra)
    initial = {k: v.clone() for k, v in tr.raw.state_dict().items()}
    seen: list[torch.Tensor] = []
    hook = tr.raw.y_embedder.embedding_table.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].clone())
    )
    batch = batches[0]
    tr.model.train()
    stats = trainer.train_step(tr, [batch])
    hook.remove()
    # The label table saw exactly the loop's decisions: dropped labels -> the null class.
    expected = torch.where(batch["drop"], tr.raw.num_classes, batch["y"])
    assert 0 < batch["drop"].sum() < len(batch["drop"])
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    # EMA after one step: 0.75·θ0 + 0.25·θ1 (θ moved by ~1e-2, far beyond the tolerance).
    for name, value in tr.ema.state_dict().items():
        want = 0.75 * initial[name] + 0.25 * tr.raw.state_dict()[name]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)
    assert set(stats) == {"velocity", "repa", "manifold", "total", "cos_sim", "grad_norm",
                          "nonfinite", "skipped"}  # fmt: skip


def test_loss_decreases_when_overfitting_a_fixed_batch(data_dir, tmp_path):
    tr, args, batches = build_trainer(data_dir, tmp_path, "--learning-rate", "2e-3")
    batch = batches[0]  # one fixed batch: same images, times, noise and label decisions

    def losses() -> dict[str, float]:
        with torch.no_grad():
            targets = trainer.alignment_targets(tr, batch)
            drop = {"force_drop_ids": batch["drop"]}
            out = tr.loss_fn(tr.model, batch["x"], batch["y"], targets, t=batch["t"],
                             noise=batch["noise"], model_kwargs=drop)  # fmt: skip
        return {k: v.item() for k, v in out.items()}

    tr.model.train()
    before = losses()
    for _ in range(60):
        trainer.train_step(tr, [batch])
    after = losses()
    assert after["total"] < 0.5 * before["total"], (before, after)
    assert after["velocity"] < 0.6 * before["velocity"]
    assert after["cos_sim"] > before["cos_sim"] + 0.05  # the projection turns to the targets


def test_bf16_autocast_step_runs(data_dir, tmp_path):
    run(*argv(data_dir, tmp_path, "bf16", "--mixed-precision", "bf16", "--max-train-steps", "2"))
    record = metrics(tmp_path, "bf16")[-1]
    assert np.isfinite(record["total"]) and record["step"] == 2


def test_fused_and_foreach_adamw_agree_and_a_run_resumes_across_the_flag(data_dir, tmp_path):
    run(*argv(data_dir, tmp_path, "fused"))  # the default
    run(*argv(data_dir, tmp_path, "foreach", "--no-fused-optimizer", "--max-train-steps", "2"))
    run(*argv(data_dir, tmp_path, "foreach", "--resume", "auto"))  # on with the fused kernel
    a, b = checkpoint(tmp_path, "fused", 4), checkpoint(tmp_path, "foreach", 4)
    assert a["opt"]["param_groups"][0]["fused"] and b["opt"]["param_groups"][0]["fused"]
    assert not checkpoint(tmp_path, "foreach", 2)["opt"]["param_groups"][0]["fused"]
    assert_states_equal(a["model"], b["model"], exact=False)
    for x, y in zip(optimizer_tensors(a), optimizer_tensors(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_overflow_is_skipped_and_reported_without_a_host_read(data_dir, tmp_path, fused):
    """accelerate makes no loss scaler on a CPU, so this gives the step one: an fp16 step whose
    gradients overflow leaves the weights as they were and is counted in `skipped`, with the
    fused AdamW (which skips inside its kernel) as with the foreach one."""
    from accelerate.optimizer import AcceleratedOptimizer

    args = train.parse_args(argv(data_dir, tmp_path, "fp16", "--fused-optimizer" if fused
                                 else "--no-fused-optimizer"))  # fmt: skip
    acc = create_accelerator(
        args.mixed_precision, args.report_to, args.allow_tf32, str(tmp_path / "fp16")
    )
    tr, dataset = train.setup(args, acc, None, create_logger(False))
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tr.optimizer = AcceleratedOptimizer(tr.optimizer.optimizer, scaler=acc.scaler)
    batches = trainer.batches_from(tr, dataset, 0)
    before = [p.detach().clone() for p in tr.model_params]
    stats = trainer.train_step(tr, [next(batches)])
    assert stats["skipped"].item() == 0 and acc.scaler.get_scale() == 2.0**10
    assert not all(torch.equal(p, q) for p, q in zip(before, tr.model_params, strict=True))
    batch = next(batches)
    batch["x"][0, 0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in tr.model_params]
    stats = trainer.train_step(tr, [batch])
    assert stats["skipped"].item() == 1 and acc.scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, q) for p, q in zip(before, tr.model_params, strict=True))


# --------------------------------------------------------------------------------------------
# Runs: resume, processes, accumulation, encoders
# --------------------------------------------------------------------------------------------


def test_exact_resume_is_bitwise(data_dir, tmp_path):
    common = ["--max-train-steps", "6", "--checkpointing-steps", "3", "--log-every", "3"]
    run(*argv(data_dir, tmp_path, "straight", *common))
    run(*argv(data_dir, tmp_path, "resumed", *common, "--max-train-steps", "3"))
    run(*argv(data_dir, tmp_path, "resumed", *common, "--resume", "auto", "--num-workers", "1"))
    a, b = checkpoint(tmp_path, "straight", 6), checkpoint(tmp_path, "resumed", 6)
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    for x, y in zip(optimizer_tensors(a), optimizer_tensors(b), strict=True):
        assert torch.equal(x, y)
    dataset_id = shards.dataset_identity(shards.load_manifest(data_dir))
    assert a["data"] == b["data"] == {"step": 6, "epoch": 1, "batch_in_epoch": 2,
                                      "dataset_size": 32, "dataset_id": dataset_id,
                                      "global_batch": 8, "seed": 0,
                                      "draws": DRAWS_VERSION}  # fmt: skip
    # The losses of steps 4-6 (after the resume) are the straight run's: same data, same draws.
    assert metrics(tmp_path, "straight")[1] | TIMINGS == metrics(tmp_path, "resumed")[1] | TIMINGS


def test_a_run_saved_by_the_first_release_is_not_resumed_with_other_draws(data_dir, tmp_path):
    """A u-repa/1 training checkpoint of step 2, written by earlier code on this very toy set
    (tests/fixtures/README.md), was trained with version 1 of the per-step draws: today's draws
    would not continue its run, so resuming it is refused in one line, before any work (it
    still loads for sampling: tests/test_checkpoints.py)."""
    fixture = os.path.join(REPO, "tests", "fixtures", "u-repa-1_sitdown-tiny.pt")
    tiny = '{"hidden_size": 16, "depths": [1, 1, 1], "num_heads": 2, "projector_dim": 16}'
    flags = [*argv(data_dir, tmp_path, "resumed", "--max-train-steps", "3")]
    flags[flags.index("--model-config") + 1] = tiny
    flags += ["--time-aware-projector", "--projector-upsample", "within", "--log-every", "1"]
    with pytest.raises(TrainingError, match="cannot resume") as err:
        run(*flags, "--resume", fixture)
    assert "version 1 of the per-step random draws" in str(err.value)
    assert "\n" not in str(err.value)
    assert not os.path.exists(os.path.join(str(tmp_path), "resumed", "checkpoints", "0000003.pt"))


def test_accumulation_equals_the_full_batch(data_dir, tmp_path):
    run(*argv(data_dir, tmp_path, "full"))
    run(*argv(data_dir, tmp_path, "accumulated", "--gradient-accumulation-steps", "2"))
    a, b = checkpoint(tmp_path, "full", 4), checkpoint(tmp_path, "accumulated", 4)
    assert_states_equal(a["model"], b["model"], exact=False)
    assert_states_equal(a["ema"], b["ema"], exact=False)


def test_two_processes_equal_one_process(data_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo) × 2 accumulation steps × 2 images = 1 process × 8."""
    run(*argv(data_dir, tmp_path, "one"))
    result = torchrun(argv(data_dir, tmp_path, "two", "--gradient-accumulation-steps", "2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = checkpoint(tmp_path, "one", 4), checkpoint(tmp_path, "two", 4)
    assert_states_equal(a["model"], b["model"], exact=False)
    assert_states_equal(a["ema"], b["ema"], exact=False)
    assert len(b["rng"]["processes"]) == 2
    # A 2-process checkpoint resumes on 1 process: the data plan does not depend on the count.
    run(*argv(data_dir, tmp_path, "two", "--resume", "auto", "--max-train-steps", "6"))
    run(*argv(data_dir, tmp_path, "one", "--resume", "auto", "--max-train-steps", "6"))
    a, b = checkpoint(tmp_path, "one", 6), checkpoint(tmp_path, "two", 6)
    assert_states_equal(a["model"], b["model"], exact=False)


def test_global_batch_must_divide_over_processes(data_dir, tmp_path):
    odd = ["--batch-size", "6", "--gradient-accumulation-steps", "2"]
    result = torchrun(argv(data_dir, tmp_path, "odd", *odd))
    assert result.returncode != 0
    assert "must be divisible by processes (2) × --gradient-accumulation-steps (2) = 4" in (
        result.stderr
    )


def test_online_encoder_matches_precomputed_features(data_dir, tmp_path):
    run(*argv(data_dir, tmp_path, "precomputed", "--max-train-steps", "2"))
    run(*argv(data_dir, tmp_path, "online", "--max-train-steps", "2", "--encoder-mode", "online"))
    a, b = checkpoint(tmp_path, "precomputed", 2), checkpoint(tmp_path, "online", 2)
    # Stored features are fp16 copies of what the online encoder computes in fp32.
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-3, atol=2e-5)
    cos = [m["cos_sim"] for m in metrics(tmp_path, "precomputed")]
    assert cos == pytest.approx([m["cos_sim"] for m in metrics(tmp_path, "online")], abs=1e-3)


# --------------------------------------------------------------------------------------------
# Checkpoints, logs, previews
# --------------------------------------------------------------------------------------------


def test_run_directory_checkpoints_logs_and_previews(data_dir, tmp_path):
    extra = ["--max-train-steps", "6", "--keep-last", "1", "--milestone-every", "4",
             "--sampling-steps", "3", "--preview-images", "4"]  # fmt: skip
    run(*argv(data_dir, tmp_path, "full-run", *extra))
    run_dir = tmp_path / "full-run"
    # Last 1 + milestones (4), each milestone and the final step with an EMA export.
    assert sorted(os.listdir(run_dir / "checkpoints")) == [
        "0000004-ema.safetensors", "0000004-ema.safetensors.sha256", "0000004.pt",
        "0000004.pt.sha256", "0000006-ema.safetensors", "0000006-ema.safetensors.sha256",
        "0000006.pt", "0000006.pt.sha256",
    ]  # fmt: skip
    ckpt = checkpoint(tmp_path, "full-run", 6)
    assert ckpt["format"] == "u-repa/2" and ckpt["step"] == 6
    assert ckpt["model_name"] == "SiTDown" and ckpt["model_kwargs"]["hidden_size"] == 32
    assert ckpt["args"] == json.loads((run_dir / "args.json").read_text())
    assert ckpt["scaler"] is None and len(ckpt["rng"]["processes"]) == 1
    # generate.py's loader rebuilds the EMA model from either file alone, with the training
    # flags it samples by (the path type).
    for name in ("0000006.pt", "0000006-ema.safetensors"):
        model = load_model_for_sampling(str(run_dir / "checkpoints" / name))
        assert_states_equal(model.state_dict(), ckpt["ema"])
        assert model.checkpoint_args == ckpt["args"]
    # Logs: every loss term, the cosine similarity, grad norm, lr and throughput per interval.
    records = metrics(tmp_path, "full-run")
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("total", "velocity", "repa", "manifold", "cos_sim", "grad_norm", "lr",
                "images_per_sec", "epoch", "skipped"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in records), key
    log = (run_dir / "log.txt").read_text()
    assert "step 6 | epoch 1.5 | velocity" in log and "saved checkpoint" in log
    # Previews: 4 images of 64 px in a 2×2 grid, every 3 steps.
    assert sorted(os.listdir(run_dir / "samples")) == ["0000003.png", "0000006.png"]
    assert Image.open(run_dir / "samples" / "0000006.png").size == (128, 128)


def test_existing_run_and_incompatible_resume_are_refused(data_dir, tmp_path):
    run(*argv(data_dir, tmp_path, "base", "--max-train-steps", "2"))
    with pytest.raises(TrainingError, match="already exists: pass --resume auto"):
        run(*argv(data_dir, tmp_path, "base", "--max-train-steps", "2"))
    other_model = json.dumps({**json.loads(TINY), "hidden_size": 64})
    with pytest.raises(TrainingError) as err:
        run(*argv(data_dir, tmp_path, "base", "--resume", "auto", "--learning-rate", "2e-4",
                  "--model-config", other_model))  # fmt: skip
    message = str(err.value)
    assert "cannot resume" in message
    assert "model argument hidden_size: 32 in the checkpoint, 64 now" in message
    assert "--learning-rate: 0.0001 in the checkpoint, 0.0002 now" in message
    assert "--max-train-steps" not in message  # may change on resume
    # Nothing was written: the checkpoint is as it was.
    assert checkpoint(tmp_path, "base", 2)["step"] == 2


def other_data_of_the_same_size(data_dir: str, dest: str) -> str:
    """A copy of the toy set with its labels rolled by one and its manifest updated to match:
    another dataset, of the same size, that opens like the original."""
    shutil.copytree(data_dir, dest)
    rel = os.path.join("shards", "labels-00000.npy")
    np.save(os.path.join(dest, rel), np.roll(np.load(os.path.join(dest, rel)), 1))
    manifest = shards.load_manifest(dest)
    manifest["shards"][0]["files"][rel]["sha256"] = shards.file_sha256(os.path.join(dest, rel))
    write_json(os.path.join(dest, "manifest.json"), manifest)
    return dest


def test_resume_checks_the_data_content_not_its_path(data_dir, tmp_path):
    run(*argv(data_dir, tmp_path, "base", "--max-train-steps", "2"))
    other = other_data_of_the_same_size(data_dir, str(tmp_path / "other"))
    with pytest.raises(TrainingError, match="cannot resume") as err:
        run(*argv(other, tmp_path, "base", "--resume", "auto"))
    assert "dataset content: " in str(err.value) and "another dataset" in str(err.value)
    # The same data at another path is the same dataset.
    moved = shutil.copytree(data_dir, tmp_path / "moved")
    run(*argv(str(moved), tmp_path, "base", "--resume", "auto"))
    first, last = checkpoint(tmp_path, "base", 2), checkpoint(tmp_path, "base", 4)
    assert first["data"]["dataset_id"] == last["data"]["dataset_id"]


def read_export(path) -> tuple[dict, dict]:
    """An EMA export's tensors and metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def assert_same_export(a, b, but: tuple[str, ...] = ()) -> None:
    """The same weights and metadata, but for the metadata keys `but`. (Safetensors writes the
    metadata in no fixed order, so equal exports need not be equal bytes.)"""
    (tensors_a, meta_a), (tensors_b, meta_b) = read_export(a), read_export(b)
    assert_states_equal(tensors_a, tensors_b)
    assert {k: v for k, v in meta_a.items() if k not in but} == {
        k: v for k, v in meta_b.items() if k not in but
    }


def test_lost_ema_exports_are_written_again_by_the_next_run(data_dir, tmp_path, monkeypatch):
    """A full disk or a kill between a checkpoint and its EMA export (milestones and the final
    step): the same command writes the export again, when it resumes and with nothing to do."""
    extra = ["--milestone-every", "2", "--keep-last", "1"]
    run(*argv(data_dir, tmp_path, "straight", *extra))
    original = checkpoints.export_ema_safetensors

    def disk_full_at_step_2(path, *args, **kwargs):
        if "0000002" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "export_ema_safetensors", disk_full_at_step_2)
    with pytest.raises(TrainingError, match="step 2"):
        run(*argv(data_dir, tmp_path, "lost", *extra, "--resume", "auto"))
    monkeypatch.undo()
    folder, straight = tmp_path / "lost" / "checkpoints", tmp_path / "straight" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000002.pt.sha256"]
    run(*argv(data_dir, tmp_path, "lost", *extra, "--resume", "auto"))  # resumes at step 2
    names = ["0000002-ema.safetensors", "0000004-ema.safetensors"]
    for name in names:  # the flags differ by --exp-name and --resume
        assert_same_export(folder / name, straight / name, but=("args",))
    for name in names:  # as a kill after the last checkpoint, before its export, leaves them
        os.rename(folder / name, tmp_path / name)
    run(*argv(data_dir, tmp_path, "lost", *extra, "--resume", "auto"))  # nothing to do
    for name in names:
        assert_same_export(folder / name, tmp_path / name)


def test_a_resume_removes_the_temporary_files_of_killed_saves(data_dir, tmp_path, capsys):
    run(*argv(data_dir, tmp_path, "tmp", "--max-train-steps", "2"))
    run_dir = tmp_path / "tmp"
    leftovers = [run_dir / "checkpoints" / ".0000004.pt.k2j3x9.tmp",
                 run_dir / "checkpoints" / ".0000004-ema.safetensors.8fa1q0.tmp",
                 run_dir / ".metrics.jsonl.0p2x7a.tmp"]  # fmt: skip
    for path in leftovers:
        path.write_bytes(b"the first bytes of a file whose write was killed")
    (run_dir / "checkpoints" / "notes.tmp").write_text("not ours: kept")
    capsys.readouterr()
    run(*argv(data_dir, tmp_path, "tmp", "--resume", "auto"))
    out = capsys.readouterr().out
    for path in leftovers:
        assert not path.exists() and f"removed {path}" in out
    assert (run_dir / "checkpoints" / "notes.tmp").exists()


def test_metrics_of_steps_run_again_after_a_kill_are_not_repeated(data_dir, tmp_path):
    run(*argv(data_dir, tmp_path, "rows", "--log-every", "1"))
    straight = metrics(tmp_path, "rows")
    # Killed after logging step 4 (and half of a next row), before the checkpoint of step 4.
    for name in ("0000004.pt", "0000004-ema.safetensors"):
        os.remove(tmp_path / "rows" / "checkpoints" / name)
    with open(tmp_path / "rows" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epo')
    run(*argv(data_dir, tmp_path, "rows", "--log-every", "1", "--resume", "auto"))
    resumed = metrics(tmp_path, "rows")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert a | TIMINGS == b | TIMINGS


def inject_nan_from_step(monkeypatch, first_bad_step: int) -> None:
    """Micro-batches of steps >= first_bad_step (1-indexed) carry a NaN latent."""
    original = TrainingBatches.__getitem__

    def getitem(self, k):
        batch = original(self, k)
        if batch["step"] + 1 >= first_bad_step:
            batch["x"][0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(TrainingBatches, "__getitem__", getitem)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    inject_nan_from_step(monkeypatch, 4)
    with pytest.raises(TrainingError, match="the loss was not finite at step 4") as err:
        run(*argv(data_dir, tmp_path, "nan", "--max-train-steps", "6", "--log-every", "10"))
    assert "0000002.pt" in str(err.value)
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == [
        "0000002.pt",
        "0000002.pt.sha256",
    ]


def test_nonfinite_steps_can_be_skipped(data_dir, tmp_path, monkeypatch):
    inject_nan_from_step(monkeypatch, 4)
    run(*argv(data_dir, tmp_path, "skip", "--max-train-steps", "6", "--checkpointing-steps", "3",
              "--log-every", "3", "--on-nonfinite", "skip"))  # fmt: skip
    a, b = checkpoint(tmp_path, "skip", 3), checkpoint(tmp_path, "skip", 6)
    assert_states_equal(a["model"], b["model"])  # steps 4-6 were skipped
    assert [m["skipped"] for m in metrics(tmp_path, "skip")] == [0.0, 1.0]


def test_failed_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    original = checkpoints.save_checkpoint

    def disk_full_at_step_4(path, state):
        if path.endswith("0000004.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, state)

    monkeypatch.setattr(checkpoints, "save_checkpoint", disk_full_at_step_4)
    with pytest.raises(TrainingError, match="could not write the checkpoint of step 4") as err:
        run(*argv(data_dir, tmp_path, "full-disk", "--max-train-steps", "6"))
    assert "No space left on device" in str(err.value) and "0000002.pt) is intact" in str(err.value)
    assert sorted(os.listdir(tmp_path / "full-disk" / "checkpoints")) == [
        "0000002.pt",
        "0000002.pt.sha256",
    ]
    assert checkpoint(tmp_path, "full-disk", 2)["step"] == 2


TORCH_SAVE_ON_A_FULL_DISK = (
    "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
    "data/12: file write failed"
)


def fail_the_save_of_step_4(monkeypatch, how: str) -> None:
    """The save of step 4 meets a full disk: too little free space seen before writing, or
    torch.save failing midway as it does (RuntimeError) or with the OS's ENOSPC."""
    if how == "little free space":
        real = shutil.disk_usage

        def disk_usage(path):
            usage = real(path)
            if os.path.exists(os.path.join(path, "0000002.pt")):
                return usage._replace(free=100_000)
            return usage

        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        return
    original = torch.save
    error = (RuntimeError(TORCH_SAVE_ON_A_FULL_DISK) if how == "RuntimeError"
             else OSError(errno.ENOSPC, "No space left on device"))  # fmt: skip

    def save(obj, f, *args, **kwargs):
        if ".0000004.pt." in str(f):
            with open(f, "wb") as out:
                out.write(b"the first bytes")
            raise error
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("how", ["little free space", "RuntimeError", "ENOSPC"])
def test_a_full_disk_says_what_was_kept_and_how_to_continue(data_dir, tmp_path, monkeypatch, how):
    fail_the_save_of_step_4(monkeypatch, how)
    with pytest.raises(TrainingError, match="the checkpoint of step 4") as err:
        run(*argv(data_dir, tmp_path, "full", "--max-train-steps", "6"))
    message = str(err.value)
    assert "0000002.pt) is intact" in message and "--resume auto" in message
    assert "\n" not in message
    if how == "little free space":
        assert re.search(r"needs [\d.]+ MiB, 0.1 MiB are free", message), message
    else:
        assert ("file write failed" if how == "RuntimeError" else "No space left") in message
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == [  # no .tmp
        "0000002.pt", "0000002.pt.sha256"
    ]  # fmt: skip


def test_a_full_disk_at_the_export_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              'StorageFull, message: "No space left on device" })')  # fmt: skip

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(TrainingError, match="the checkpoint of step 4 is saved") as err:
        run(*argv(data_dir, tmp_path, "export", "--milestone-every", "4"))
    assert "StorageFull" in str(err.value) and "--resume auto" in str(err.value)
    assert sorted(os.listdir(tmp_path / "export" / "checkpoints")) == [
        "0000002.pt", "0000002.pt.sha256", "0000004.pt", "0000004.pt.sha256"
    ]  # fmt: skip


def test_a_corrupt_checkpoint_is_one_line_and_exit_code_1(data_dir, tmp_path):
    corrupt = tmp_path / "0000002.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cmd = [sys.executable, "train.py", *argv(data_dir, tmp_path, "bad", "--resume", str(corrupt))]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"train.py: error: could not read {str(corrupt)!r}: the file is truncated, corrupt or not "
        "a PyTorch checkpoint"
    ]


def test_sigterm_saves_a_checkpoint_and_exits(data_dir, tmp_path):
    """A scheduler's SIGTERM to the whole process group, data-loading workers included."""
    cmd = [sys.executable, "train.py",
           *argv(data_dir, tmp_path, "term", "--max-train-steps", "100000", "--log-every", "1",
                 "--checkpointing-steps", "100000", "--num-workers", "2")]  # fmt: skip
    process = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    jsonl = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, process.stdout.read().decode()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == EXIT_STOPPED == 75, output  # a scheduler tells it from the end
    assert "stopped by a signal after step" in output
    steps = sorted(int(n[:7]) for n in os.listdir(tmp_path / "term" / "checkpoints")
                   if n.endswith(".pt"))  # fmt: skip
    assert len(steps) == 1 and steps[0] >= 2
    assert metrics(tmp_path, "term")[-1]["step"] == steps[0]

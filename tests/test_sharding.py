"""The update path: weights, gradients, AdamW state and EMA sharded over 2 CPU processes (FSDP2,
gloo) against one unsharded process, resuming across the two; the EMA every k steps against a
per-tensor loop; one autocast context per step against one per micro-batch.

Sharded and unsharded runs sum the gradients in another order, so they agree within float
rounding: rtol 1e-5, atol 1e-6 on every weight, EMA and AdamW tensor, with a learning rate of
1e-3 that moves the weights by ~1e-3 per step. A sharded run resumed from its own checkpoint is
the straight run bit for bit.
"""

from __future__ import annotations

import os

import torch
from test_train import (  # noqa: F401 (fresh_accelerate_state: an autouse fixture)
    argv,
    assert_states_equal,
    build_trainer,
    checkpoint,
    fresh_accelerate_state,
    optimizer_tensors,
    run,
    torchrun,
)
from torch.utils._python_dispatch import TorchDispatchMode

from urepa import trainer


def checkpoint_file(out, exp: str, step: int) -> str:
    return os.path.join(str(out), exp, "checkpoints", f"{step:07d}.pt")


def assert_runs_agree(a: dict, b: dict, exact: bool) -> None:
    """Weights, EMA and AdamW state of two checkpoints: bit for bit, or within float rounding."""
    assert_states_equal(a["model"], b["model"], exact=exact)
    assert_states_equal(a["ema"], b["ema"], exact=exact)
    for x, y in zip(optimizer_tensors(a), optimizer_tensors(b), strict=True):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def sharded(data_dir, out, exp: str, resume: str, *extra: str) -> None:
    """Steps up to 6 in 2 sharded processes × 2 accumulation steps × 2 images, from `resume`."""
    flags = argv(data_dir, out, exp, "--learning-rate", "1e-3", "--max-train-steps", "6",
                 "--gradient-accumulation-steps", "2", "--fsdp", "on",
                 "--resume", resume, *extra)  # fmt: skip
    result = torchrun(flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "update      sharded over the processes (FSDP2)" in result.stdout


def test_sharded_runs_equal_one_process_and_resume_across_process_counts(data_dir, tmp_path):
    lr = ["--learning-rate", "1e-3"]
    run(*argv(data_dir, tmp_path, "one", *lr))  # 1 process, unsharded: steps 1-4
    # 1 unsharded process -> 2 sharded processes: steps 3-6 from the checkpoint of step 2.
    sharded(data_dir, tmp_path, "two", checkpoint_file(tmp_path, "one", 2))
    a, b = checkpoint(tmp_path, "one", 4), checkpoint(tmp_path, "two", 4)
    assert_runs_agree(a, b, exact=False)
    assert len(b["rng"]["processes"]) == 2
    assert a["opt"]["param_groups"][0]["params"] == b["opt"]["param_groups"][0]["params"]
    # A sharded run resumed from its own checkpoint: the straight sharded run, bit for bit. Its
    # preview samples the sharded EMA on both processes.
    preview = ["--sampling-steps", "6", "--preview-images", "2"]
    sharded(data_dir, tmp_path, "again", checkpoint_file(tmp_path, "two", 4), *preview)
    assert os.listdir(tmp_path / "again" / "samples") == ["0000006.png"]
    assert_runs_agree(checkpoint(tmp_path, "two", 6), checkpoint(tmp_path, "again", 6), exact=True)
    # 2 sharded processes -> 1 unsharded process.
    run(*argv(data_dir, tmp_path, "back", *lr, "--max-train-steps", "6",
              "--resume", checkpoint_file(tmp_path, "two", 4)))  # fmt: skip
    assert_runs_agree(checkpoint(tmp_path, "two", 6), checkpoint(tmp_path, "back", 6), exact=False)


def test_compiled_sharded_training_equals_eager_unsharded_training(data_dir, tmp_path):
    """FSDP2 with the blocks and the loss compiled by inductor, in 2 processes, against one
    eager unsharded process, within the sharding tolerance; the start-up compile check runs
    once, on every process, before the first step, and passes."""
    flags = ["--learning-rate", "1e-3", "--max-train-steps", "2"]
    run(*argv(data_dir, tmp_path, "eager", *flags, "--no-compile"))
    result = torchrun(
        argv(data_dir, tmp_path, "compiled", *flags, "--fsdp", "on", "--compile"), timeout=1200
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "update      sharded over the processes (FSDP2)" in result.stdout
    assert result.stdout.count("compile check: compiled = eager") == 1  # the main process logs
    assert_runs_agree(checkpoint(tmp_path, "eager", 2), checkpoint(tmp_path, "compiled", 2),
                      exact=False)  # fmt: skip


def test_ema_every_k_steps_is_a_per_tensor_loop_with_decay_to_the_k(data_dir, tmp_path):
    decay, k = 0.8, 3
    tr, args, batches = build_trainer(data_dir, tmp_path, "--ema-decay", str(decay),
                                      "--ema-every", str(k), "--learning-rate", "1e-2")  # fmt: skip
    ema = [p.detach().clone().double() for p in tr.raw.parameters()]  # the EMA starts at θ0
    tr.model.train()
    for step in range(1, 8):  # updates after steps 3 and 6 only
        trainer.train_step(tr, [batches[step - 1]])
        tr.step = step
        if step % k == 0:
            for e, p in zip(ema, tr.raw.parameters(), strict=True):
                e.mul_(decay**k).add_(p.detach().double(), alpha=1 - decay**k)
    moved = max((e - p).abs().max().item() for e, p in zip(ema, tr.raw.parameters(), strict=True))
    assert moved > 1e-3  # the EMA lags the weights by far more than the tolerance
    for got, want in zip(tr.ema.parameters(), ema, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


class WeightCasts(TorchDispatchMode):
    """Records the casts of a model's matrix weights to bf16 (autocast's), by name."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.names = {p.data_ptr(): n for n, p in model.named_parameters() if p.dim() == 2}
        self.cast: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                and args[0].data_ptr() in self.names):  # fmt: skip
            self.cast.append(self.names[args[0].data_ptr()])
        return func(*args, **kwargs)


def step_with_autocast_per_micro_batch(tr, micro_batches) -> torch.Tensor:
    """The step as it was: autocast entered per micro-batch (its weight casts not shared),
    accelerate's clipping, AdamW. Returns the gradient norm."""
    acc = tr.accelerator
    for batch in micro_batches:
        with acc.autocast():
            targets = trainer.alignment_targets(tr, batch)
            losses = tr.loss_fn(tr.model, batch["x"], batch["y"], targets, t=batch["t"],
                                noise=batch["noise"],
                                model_kwargs={"force_drop_ids": batch["drop"]})  # fmt: skip
        acc.backward(losses["total"] / len(micro_batches))
    norm = acc.clip_grad_norm_(tr.model.parameters(), tr.settings.optimizer.max_grad_norm)
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return norm


def test_one_autocast_context_casts_each_weight_once_per_step_and_changes_nothing(
    data_dir, tmp_path
):
    extra = ("--mixed-precision", "bf16", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-2", "--max-grad-norm", "0.05")  # fmt: skip
    ours, _, batches = build_trainer(data_dir, tmp_path, *extra)
    reference, _, _ = build_trainer(data_dir, tmp_path, *extra)
    micro_batches = [batches[0], batches[1]]
    ours.model.train()
    reference.model.train()
    with WeightCasts(ours.raw) as once:
        stats = trainer.train_step(ours, micro_batches)
    with WeightCasts(reference.raw) as per_micro_batch:
        norm = step_with_autocast_per_micro_batch(reference, micro_batches)
    cast = set(once.cast)
    assert len(cast) > 20 and sorted(once.cast) == sorted(cast)  # each weight once per step
    assert sorted(per_micro_batch.cast) == sorted(2 * once.cast)  # each once per micro-batch
    assert torch.equal(stats["grad_norm"], norm) and norm > 0.05  # clipped
    for a, b in zip(ours.raw.parameters(), reference.raw.parameters(), strict=True):
        assert torch.equal(a, b)

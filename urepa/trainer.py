"""The training loop: the state a step needs (`Trainer`), one optimiser step, and the loop with
its logs, checkpoints, previews and stop signals.

`train.py` builds a `Trainer` from its flags (`create_trainer`) and runs `train`;
`bench/train_speed.py` times `train_step` on its own. What each step reads and draws is fixed by
`data_plan.py`; how a run is saved and resumed by `checkpoints.py`.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from loss import SILoss
from models.base import AlignedDiffusionTransformer
from samplers import VelocityOnly, euler_sampler
from urepa.captions import ContextTable
from urepa.checkpoints import (
    TrainingError,
    checkpoint_state,
    export_due,
    is_sharded,
    latest_checkpoint,
    restore_run_state,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)
from urepa.data_plan import (
    DRAWS_VERSION,
    SEED_PREVIEW,
    BatchPlan,
    StepDraws,
    TrainingBatches,
    derive_seed,
)
from urepa.encoders import RepresentationEncoder
from urepa.fused_update import UpdateFn, adamw_state, compile_update, hyperparameters
from urepa.run_log import (
    LOGGER_NAME,
    MetricMeans,
    StepRate,
    append_jsonl,
    format_metrics,
    grid_image,
    time_remaining,
    track_image,
)
from urepa.settings import OptimizerSettings, SpeedSettings, TrainSettings
from urepa.speed import GradientCheck, check_compiled_gradients, compile_for_training
from urepa.utils import local_shard

# What the loop calls after each step (`periodic_eval.PeriodicEvaluation.maybe_run`): evaluate
# at that step if due; returns the seconds spent, which do not count as training time.
Evaluation = Callable[[int], float]

PREVIEW_SAMPLING_STEPS = 50  # Euler steps of the preview sampler (REPA's)
PREVIEW_CFG_SCALE = 4.0  # classifier-free guidance of the previews (REPA's)


@dataclass
class Trainer:
    """What a training step, a checkpoint and a preview need."""

    settings: TrainSettings
    accelerator: Accelerator
    model: nn.Module  # as prepared: possibly compiled and DDP-wrapped
    ema: AlignedDiffusionTransformer  # eval mode, no gradients, never wrapped
    optimizer: torch.optim.Optimizer
    loss_fn: SILoss
    encoders: list[RepresentationEncoder]  # online mode: run in the loop; else []
    plan: BatchPlan
    step: int = 0
    dataset_id: str | None = None  # the content of the training data (None: unknown)
    # clipping + AdamW + EMA in one pass (fused_update.py), or None: clip, AdamW, EMA in turn
    update_fn: UpdateFn | None = None
    raw: AlignedDiffusionTransformer = field(init=False)  # the model, unwrapped

    def __post_init__(self) -> None:
        raw = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        assert isinstance(raw, AlignedDiffusionTransformer)
        self.raw = raw
        self.sharded = is_sharded(raw)
        self.bind_parameters()

    def bind_parameters(self) -> None:
        """The tensors the update path works on: each process's shard of every weight and of
        its EMA when sharded (FSDP2), the whole tensors otherwise. Called again after a
        checkpoint is loaded, which may give the sharded parameters new storage."""
        self.model_params: list[Tensor] = local_tensors(self.raw.parameters())
        self.ema_params: list[Tensor] = local_tensors(self.ema.parameters())


def create_accelerator(
    mixed_precision: str, report_to: str, allow_tf32: bool, run_dir: str
) -> Accelerator:
    """accelerate's Accelerator (--mixed-precision, the tracker of --report-to), refused where it
    does not see the processes that were launched; TF32 on or off (--allow-tf32)."""
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_dir=run_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise TrainingError(
            f"{launched} processes were launched but accelerate sees "
            f"{accelerator.num_processes}; without GPUs, set ACCELERATE_USE_CPU=1 (or use "
            "`accelerate launch --cpu`) so that the processes train together"
        )
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    return accelerator


def create_optimizer(settings: OptimizerSettings, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (REPA's protocol); --fused-optimizer picks PyTorch's fused kernel (CUDA and CPU),
    --no-fused-optimizer PyTorch's default (foreach on CUDA; `fused=False` would force its
    per-tensor loop)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
        fused=settings.fused_optimizer or None,
    )


def use_fsdp(speed: SpeedSettings, accelerator: Accelerator) -> bool:
    """--fsdp: `on` shards whenever several processes train; `auto` when several CUDA processes
    train without fp16 (whose loss scaler does not know shards); `off` never."""
    if accelerator.num_processes == 1 or speed.fsdp == "off":
        return False
    if speed.fsdp == "on":
        return True
    return accelerator.device.type == "cuda" and speed.mixed_precision != "fp16"


def shard(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool) -> None:
    """FSDP2 (`fully_shard`), in place: each process keeps 1/N of every weight (and of its
    gradient and AdamW state). Every transformer block is a unit, gathered as the model reaches
    it and reduce-scattered as its gradients are ready, so that both overlap with compute; the
    rest of the model is one more unit."""
    for block in model.get_submodule("blocks").children():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def create_trainer(
    settings: TrainSettings,
    accelerator: Accelerator,
    model: AlignedDiffusionTransformer,
    plan: BatchPlan,
    encoders: list[RepresentationEncoder],
    dataset_id: str | None = None,
) -> Trainer:
    """EMA, optimiser and objective for `model`, then compilation and accelerate's wrapping
    (DDP), or, with --fsdp, the sharding of model and EMA over the processes.
    `encoders`: the frozen encoders run in the loop (online mode), else []; `dataset_id`: the
    identity of the training data, recorded in checkpoints."""
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # starts equal to the model
    sharded = use_fsdp(settings.speed, accelerator)
    if sharded:  # the weights stay whole between the forward and the backward pass (no re-gather)
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        shard(model.to(accelerator.device), mesh, reshard_after_forward=False)
        shard(ema.to(accelerator.device), mesh, reshard_after_forward=True)
    optimizer = create_optimizer(settings.optimizer, model)  # after sharding: on its shards
    objective = settings.objective
    loss_fn = SILoss(
        path_type=objective.path_type,
        weighting=objective.weighting,
        proj_coeff=objective.proj_coeff,
        manifold_coeff=objective.manifold_coeff,
        manifold_mode=objective.manifold_mode,
        lambda_schedule=objective.lambda_schedule,
    )
    prepared, loss_fn = compile_for_training(model, loss_fn, settings.speed.compile)
    if sharded:  # accelerate would wrap the model in DDP: only the optimiser goes through it
        optimizer = accelerator.prepare(optimizer)
    else:
        prepared, optimizer = accelerator.prepare(prepared, optimizer)
        ema.to(accelerator.device)
    update_fn = compile_update() if settings.optimizer.compile_update else None
    return Trainer(settings, accelerator, prepared, ema, optimizer, loss_fn, encoders, plan,
                   dataset_id=dataset_id, update_fn=update_fn)  # fmt: skip


def local_tensors(params: Iterable[Tensor]) -> list[Tensor]:
    """This process's part of each tensor: the local shard of a sharded one (a view of its
    storage), the tensor itself otherwise."""
    return [local_shard(p) for p in params]


#################################################################################
#                                  One step                                     #
#################################################################################


def alignment_targets(trainer: Trainer, batch: dict[str, Any]) -> list[Tensor]:
    """Encoder features (N, T, D) per encoder, on the grid of the model's projections."""
    if trainer.encoders:  # online: run the frozen encoders on the stored pixels
        zs = [encoder(batch["pixels"]) for encoder in trainer.encoders]
    else:
        zs = [f.float() for f in batch["features"]]
    return trainer.raw.align_targets(zs)


def gradient_sync(trainer: Trainer, sync: bool) -> AbstractContextManager[Any]:
    """Whether the backward passes inside reduce the gradients over the processes: only the
    last micro-batch's does (DDP's all-reduce, FSDP's reduce-scatter)."""
    if sync:
        return nullcontext()
    if trainer.sharded:
        return fsdp_no_sync(trainer.raw)
    return trainer.accelerator.no_sync(trainer.model)


@contextmanager
def fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's `no_sync`: gradients accumulate whole, unreduced, and the
    weights stay gathered for the next micro-batch (no second all-gather in the step)."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)


def autocast_scopes(trainer: Trainer) -> tuple[AbstractContextManager[Any], Callable[[], Any]]:
    """(around the whole step, around each forward pass): where autocast is entered. Autocast
    keeps its low-precision copy of each weight until its outermost context exits, so one
    context around the step casts each weight once, not once per micro-batch (compiled blocks
    cast inside their graphs anyway). Sharded (FSDP2), each forward pass has its own: with the
    copy shared across micro-batches, FSDP2's gradients differed from DDP's (bf16, 2
    micro-batches: the gradient norm by 0.6 %)."""
    if trainer.sharded:
        return nullcontext(), trainer.accelerator.autocast
    return trainer.accelerator.autocast(), nullcontext


def accumulate_gradients(
    trainer: Trainer, micro_batches: list[dict[str, Any]]
) -> dict[str, Tensor]:
    """Forward and backward of every micro-batch; the loss terms averaged over them."""
    acc, count = trainer.accelerator, len(micro_batches)
    around_step, around_forward = autocast_scopes(trainer)
    means: dict[str, Tensor] = {}
    with around_step:
        for i, batch in enumerate(micro_batches):
            # Gradients are reduced once per step, in the last micro-batch's backward pass.
            with gradient_sync(trainer, i == count - 1):
                with around_forward():
                    losses = micro_batch_losses(trainer, batch)
                with torch.autocast(acc.device.type, enabled=False):  # backward in full precision
                    acc.backward(losses["total"] / count)
            for name, value in losses.items():
                share = value.detach() / count
                means[name] = means[name] + share if name in means else share
    return means


def micro_batch_losses(trainer: Trainer, batch: dict[str, Any]) -> dict[str, Tensor]:
    """The loss terms of Eq. 5 on one micro-batch, with the step's draws (t, noise, dropout)."""
    if "context" in batch:  # text-to-image: caption features, dropout already applied
        return trainer.loss_fn(
            trainer.model, batch["x"], batch["context"].float(), alignment_targets(trainer, batch),
            t=batch["t"], noise=batch["noise"],
        )  # fmt: skip
    return trainer.loss_fn(
        trainer.model,
        batch["x"],
        batch["y"],
        alignment_targets(trainer, batch),
        t=batch["t"],
        noise=batch["noise"],
        # Label dropout, drawn once per step for the global batch: given these decisions, the
        # model's label embedder applies them and draws nothing.
        model_kwargs={"force_drop_ids": batch["drop"]},
    )


def compiled_gradient_check(trainer: Trainer, batch: dict[str, Any]) -> GradientCheck:
    """`speed.check_compiled_gradients` on the micro-batch `batch`, in the run's precision."""
    acc = trainer.accelerator
    tf32 = acc.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return check_compiled_gradients(
        trainer.model,
        lambda: micro_batch_losses(trainer, batch)["total"],
        acc.autocast,
        low_precision=acc.mixed_precision != "no" or tf32,
    )


def check_compilation(trainer: Trainer, batch: dict[str, Any], logger: Any) -> None:
    """--compile-check: the compiled and the eager gradients of the first micro-batch compared
    once, before the first step; a disagreement beyond what the precision explains stops the
    run in one line naming the worst parameter."""
    result = compiled_gradient_check(trainer, batch)
    logger.info(result.line())
    if not result.passed:
        raise TrainingError(
            f"{result.line()}. This torch's compiler ({torch.__version__}) computes other "
            "gradients than the eager code for this model: train with --no-compile (and "
            "report the torch version and GPU)"
        )


def gradient_norm(trainer: Trainer) -> Tensor:
    """The global gradient norm, in one foreach pass over this process's gradients (its shard
    when sharded): a 0-dim tensor, a DTensor when sharded."""
    trainer.accelerator.unscale_gradients()  # fp16: the loss scale comes out first
    grads = [p.grad for p in trainer.raw.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def full(norm: Tensor) -> Tensor:
    """Sharded: the norm of every process's shards (one all-reduce of a scalar)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_gradients(trainer: Trainer) -> Tensor:
    """Clip the global gradient norm to --max-grad-norm in two foreach passes over this
    process's gradients: one reads them for the norm, one scales them. Returns the norm before
    clipping, a 0-dim tensor equal on every process."""
    norm = gradient_norm(trainer)
    params = list(trainer.raw.parameters())
    max_norm = trainer.settings.optimizer.max_grad_norm
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return full(norm)


def apply_fused_update(trainer: Trainer, grad_norm: Tensor, with_ema: bool) -> None:
    """Clipping, AdamW and (`with_ema`) the EMA in one pass (`fused_update.fused_update`) on
    this process's shards, with AdamW's own state and hyperparameters. As AdamW, it leaves the
    parameters without a gradient alone; the EMA averages them too, as `update_ema` does."""
    assert trainer.update_fn is not None
    settings, optimizer = trainer.settings.optimizer, trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds AdamW
    decay = settings.ema_decay**settings.ema_every
    # (a shard's local view has no .grad: the gradients are read from the parameters)
    has_grad = [p.grad is not None for p in trainer.raw.parameters()]
    grads = local_tensors(p.grad for p in trainer.raw.parameters() if p.grad is not None)
    params = [p for p, g in zip(trainer.model_params, has_grad, strict=True) if g]
    ema = [e for e, g in zip(trainer.ema_params, has_grad, strict=True) if g]
    state = adamw_state(inner, has_grad)
    hyper = hyperparameters(inner, settings.max_grad_norm, decay)
    trainer.update_fn(params, grads, state["exp_avg"], state["exp_avg_sq"], state["step"],
                      ema if with_ema else [], grad_norm, hyper)  # fmt: skip
    if with_ema and not all(has_grad):
        still = [(e, p) for e, p, g in zip(trainer.ema_params, trainer.model_params, has_grad,
                                           strict=True) if not g]  # fmt: skip
        update_ema([e for e, _ in still], [p for _, p in still], decay)


def train_step(trainer: Trainer, micro_batches: list[dict[str, Any]]) -> dict[str, Tensor]:
    """One optimiser step on this process's micro-batches of the global batch: forward and
    backward with gradient accumulation, gradient clipping, AdamW, EMA (every --ema-every
    steps). Returns 0-dim device tensors, never read here (no host sync): the loss terms of
    Eq. 5 averaged over the micro-batches, `cos_sim`, `grad_norm`, `nonfinite` (1: the loss was
    not finite) and `skipped` (1: the weights were not updated)."""
    losses = accumulate_gradients(trainer, micro_batches)
    fused = trainer.update_fn is not None  # never with fp16 (validate_args)
    grad_norm = full(gradient_norm(trainer)) if fused else clip_gradients(trainer)
    if skips_nonfinite(trainer) and not torch.isfinite(grad_norm):  # (reads the norm: a sync)
        skipped = torch.ones_like(grad_norm, dtype=torch.float32)
    else:
        skipped = update_weights(trainer, grad_norm)
    trainer.optimizer.zero_grad(set_to_none=True)
    return {
        **losses,
        "grad_norm": grad_norm.detach().float(),
        "nonfinite": (~torch.isfinite(losses["total"])).float(),
        "skipped": skipped,
    }


def skips_nonfinite(trainer: Trainer) -> bool:
    """Whether this step checks the global gradient norm (equal on every process) and skips the
    update if it is not finite: --on-nonfinite skip, but not with fp16, whose loss scaler skips
    such steps by itself (`update_weights`)."""
    on_nonfinite = trainer.settings.optimizer.on_nonfinite
    return on_nonfinite == "skip" and trainer.accelerator.scaler is None


def update_weights(trainer: Trainer, grad_norm: Tensor) -> Tensor:
    """AdamW, and the EMA when due, on the clipped gradients. Returns whether the update was
    skipped, a 0-dim device tensor: 1 where fp16's loss scaler skipped it (a non-finite
    gradient: the scaler then lowers its scale), else 0."""
    settings, acc = trainer.settings.optimizer, trainer.accelerator
    ema_due = (trainer.step + 1) % settings.ema_every == 0  # this step is step trainer.step + 1
    if trainer.update_fn is not None:
        apply_fused_update(trainer, grad_norm, ema_due)
        return torch.zeros_like(grad_norm, dtype=torch.float32)
    scale_before = loss_scale(acc) if acc.scaler is not None else None
    trainer.optimizer.step()
    if ema_due:  # k steps of the EMA with θ held fixed
        update_ema(trainer.ema_params, trainer.model_params, settings.ema_decay**settings.ema_every)
    if scale_before is None:
        return torch.zeros_like(grad_norm, dtype=torch.float32)
    return (loss_scale(acc) < scale_before).float()


def loss_scale(acc: Accelerator) -> Tensor:
    """fp16's current loss scale, a 0-dim device tensor (a copy).

    Read on the device because `GradScaler.get_scale()` would sync with the host. The fused
    AdamW skips an overflowing step inside its kernel, where accelerate's `step_was_skipped`
    cannot see it; the drop of the scale shows it with either AdamW."""
    scale = acc.scaler._get_scale_async() if acc.scaler is not None else None
    if scale is None:
        raise RuntimeError("no fp16 loss scale: the scaler is off or has not scaled a loss yet")
    return scale.clone()


@torch.no_grad()
def update_ema(ema_params: list[Tensor], model_params: list[Tensor], decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · θ for every tensor at once (one foreach kernel)."""
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


#################################################################################
#                                  The batches                                  #
#################################################################################


def training_loader(
    settings: TrainSettings, dataset: Dataset, plan: BatchPlan, start_step: int, pin_memory: bool
) -> DataLoader:
    """This process's micro-batches from step `start_step` on, as CPU dicts (TrainingBatches);
    --num-workers processes load the samples and make the draws ahead of the loop. With
    `pin_memory`, batches arrive in pinned memory: read into it directly without workers, copied
    into it by DataLoader's pinning thread from the workers' shared memory."""
    objective, schedule = settings.objective, settings.schedule
    draws = StepDraws(objective.weighting, objective.path_type, objective.cfg_prob)
    accumulation = schedule.gradient_accumulation_steps
    return DataLoader(
        TrainingBatches(dataset, plan, draws, pin_memory),
        batch_size=None,
        sampler=range(start_step * accumulation, schedule.max_train_steps * accumulation),
        num_workers=schedule.num_workers,
        pin_memory=pin_memory,
        worker_init_fn=StopRequest.ignore_in_worker,
    )


def batches_from(trainer: Trainer, dataset: Dataset, start_step: int) -> Iterator[dict[str, Any]]:
    """This process's micro-batches from step `start_step` on, on the device."""
    device = trainer.accelerator.device
    pin = device.type == "cuda"
    for batch in training_loader(trainer.settings, dataset, trainer.plan, start_step, pin):
        yield to_device(batch, device)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A micro-batch's tensors (and lists of tensors) on `device`; from pinned memory the copies
    are asynchronous (no host sync)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor)
        else [f.to(device, non_blocking=True) for f in v] if isinstance(v, list)
        else v
        for k, v in batch.items()
    }  # fmt: skip


#################################################################################
#                        Checkpoints (every process takes part)                 #
#################################################################################


def data_position(trainer: Trainer) -> dict[str, Any]:
    """Where the data plan stands: step s reads global batch s of the (seed, epoch) orders of
    the dataset `dataset_id`, with version `draws` of the per-step draws."""
    plan = trainer.plan
    epoch, batch_in_epoch = divmod(trainer.step, plan.steps_per_epoch)
    return dict(
        step=trainer.step,
        epoch=epoch,
        batch_in_epoch=batch_in_epoch,
        dataset_size=plan.dataset_size,
        dataset_id=trainer.dataset_id,
        global_batch=plan.global_batch,
        seed=plan.seed,
        draws=DRAWS_VERSION,
    )


def save_training_checkpoint(trainer: Trainer, run_dir: str, logger: Any) -> str:
    """Write checkpoints/{step:07d}.pt on the main process (see `checkpoints.save_run_checkpoint`),
    with the RNG states gathered from every process. A failed write raises on every process."""
    acc, schedule, step = trainer.accelerator, trainer.settings.schedule, trainer.step
    rng = gather_object([rng_state()])  # one entry per process, in rank order
    outcome: list[tuple[str, str | None]] = [("", None)]  # (path, error message)
    # Every process: sharded states are gathered whole onto the main process (a collective).
    state = checkpoint_state(
        trainer.raw, trainer.ema, step, args=trainer.settings.flags, opt=trainer.optimizer,
        scaler=acc.scaler, rng={"processes": rng}, data=data_position(trainer),
    )  # fmt: skip
    if acc.is_main_process:
        export = export_due(step, schedule.milestone_every, schedule.max_train_steps)
        try:
            path, removed = save_run_checkpoint(
                run_dir, state, export, schedule.keep_last, schedule.milestone_every
            )
        except TrainingError as err:
            outcome = [("", str(err))]
        else:
            for old in removed:
                logger.info(f"removed old checkpoint {old}")
            logger.info(f"saved checkpoint {path}")
            outcome = [(path, None)]
    broadcast_object_list(outcome)
    path, error = outcome[0]
    if error is not None:
        raise TrainingError(error)
    return path


def restore(trainer: Trainer, ckpt: dict[str, Any], logger: Any) -> None:
    """Continue from a training checkpoint: states, step, and this process's RNG states."""
    acc = trainer.accelerator
    trainer.step = restore_run_state(ckpt, trainer.raw, trainer.ema, trainer.optimizer, acc.scaler)
    trainer.bind_parameters()
    rng = ckpt["rng"]["processes"]
    if len(rng) == acc.num_processes:
        set_rng_state(rng[acc.process_index])
    else:  # harmless: no training randomness comes from these generators
        logger.warning(
            f"checkpoint has RNG states of {len(rng)} processes, this run has "
            f"{acc.num_processes}: not restored"
        )


#################################################################################
#                          Logs, non-finite losses, previews                    #
#################################################################################


@dataclass
class Monitor:
    """Interval bookkeeping of the loop: metrics, throughput, the first non-finite step."""

    trainer: Trainer
    run_dir: str
    logger: Any
    flops_per_image: float  # training FLOPs per image (3 × forward, 2 FLOPs per MAC)
    peak: float | None  # peak FLOP/s of one device
    meter: MetricMeans = field(default_factory=MetricMeans)
    first_nonfinite: Tensor | None = None
    last_time: float = field(default_factory=time.perf_counter)
    last_step: int = 0
    train_seconds: float = 0.0  # training time so far in this process, evaluations excluded
    rate: StepRate = field(default_factory=StepRate)

    def add(self, stats: dict[str, Tensor], step: int) -> None:
        bad = torch.where(stats.pop("nonfinite") > 0, step, sys.maxsize)
        first = self.first_nonfinite
        self.first_nonfinite = bad if first is None else torch.minimum(first, bad)
        self.meter.add(stats)

    def check_finite(self, last_good: str | None) -> None:
        """Stop (on every process) if any process saw a non-finite loss (stop mode)."""
        stops = self.trainer.settings.optimizer.on_nonfinite == "stop"
        if self.first_nonfinite is None or not stops:
            return
        acc = self.trainer.accelerator
        first = int(acc.gather(self.first_nonfinite.view(1)).min())
        if first != sys.maxsize:
            raise TrainingError(
                f"the loss was not finite at step {first}: training stopped, no checkpoint was "
                f"written after it. Last good checkpoint: {last_good or 'none'}. Resume from it "
                "(--resume auto) with a lower --learning-rate or --mixed-precision bf16, or pass "
                "--on-nonfinite skip to skip such steps"
            )

    def log(self, step: int) -> dict[str, Any]:
        acc, schedule = self.trainer.accelerator, self.trainer.settings.schedule
        means = self.meter.pop(lambda x: acc.reduce(x, "mean"))  # the interval's one host sync
        now = time.perf_counter()
        sec_per_step = (now - self.last_time) / max(1, step - self.last_step)
        images_per_sec = schedule.batch_size / sec_per_step
        if not self.rate.points:  # where this process started training
            self.rate.add(self.train_seconds, self.last_step)
        self.train_seconds += now - self.last_time
        self.rate.add(self.train_seconds, step)
        self.last_time, self.last_step = now, step
        epoch = step / self.trainer.plan.steps_per_epoch  # as the data plan counts epochs
        record: dict[str, Any] = {"step": step, "epoch": round(epoch, 4)}
        record.update({k: round(v, 6) for k, v in means.items()})
        record["lr"] = self.trainer.optimizer.param_groups[0]["lr"]
        record["images_per_sec"] = round(images_per_sec, 2)
        record["sec_per_step"] = round(sec_per_step, 4)
        if self.peak is not None:
            mfu = self.flops_per_image * images_per_sec / (self.peak * acc.num_processes)
            record["mfu"] = round(mfu, 4)
        if acc.device.type == "cuda":
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 2)
        if acc.is_main_process:
            append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), record)
            line = format_metrics(step, {k: v for k, v in record.items() if k != "step"})
            rate = self.rate.sec_per_step  # steadier than this interval's sec_per_step
            eta = time_remaining(step, rate, schedule.max_train_steps, schedule.checkpointing_steps)
            self.logger.info(f"{line} | {eta} {self.rate.describe()}")
        acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
        return record


@dataclass
class Previews:
    """Preview grids of the EMA model from fixed noise and labels (seeded by --seed), decoded
    by the VAE: the same images at every preview, so that they show the progress alone."""

    trainer: Trainer
    vae: Any  # LatentAutoencoder, on the main process only
    # A text-to-image run's (captions (n, L, D), empty caption (L, D)): image k shows caption k.
    captions: tuple[Tensor, Tensor] | None = None
    noise: Tensor = field(init=False)
    labels: Tensor = field(init=False)

    def __post_init__(self) -> None:
        schedule, model = self.trainer.settings.schedule, self.trainer.raw
        count = schedule.preview_images
        generator = torch.Generator().manual_seed(derive_seed(schedule.seed, SEED_PREVIEW))
        noise = torch.randn(count, *model.latent_shape, generator=generator)
        if self.captions is None:
            labels = torch.randint(model.num_classes, (count,), generator=generator)
        else:
            labels = torch.arange(count) % len(self.captions[0])
        device = self.trainer.accelerator.device
        self.noise, self.labels = noise.to(device), labels.to(device)

    def conditioned_ema(self) -> Any:
        """The EMA model as the sampler calls it: by label, or by caption (`ContextTable`)."""
        if self.captions is None:
            return self.trainer.ema
        device = self.trainer.accelerator.device
        contexts, empty = (c.to(device, torch.float32) for c in self.captions)
        return ContextTable(self.trainer.ema, contexts, empty)

    def save(self, path: str) -> Any:
        """Sample (50 Euler steps, CFG 4 if the model has a null class), decode, save a PNG
        grid; returns the grid (H, W, 3) uint8. A sharded EMA samples on every process (each
        forward pass gathers its shards); the main process alone decodes and saves (None
        elsewhere)."""
        trainer = self.trainer
        cfg = PREVIEW_CFG_SCALE if trainer.settings.objective.cfg_prob > 0 else 1.0
        model = VelocityOnly(self.conditioned_ema())  # the projector heads are not needed
        with trainer.accelerator.autocast():
            latents = euler_sampler(
                model, self.noise, self.labels, PREVIEW_SAMPLING_STEPS, cfg_scale=cfg
            )
        if not trainer.accelerator.is_main_process:
            return None
        grid = grid_image(self.vae.decode(latents.float()))
        Image.fromarray(grid).save(path)
        return grid


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop then finishes its step, saves a checkpoint and exits.
    A second SIGINT interrupts at once.

    With several processes a signal may reach them at different steps, so they agree on the
    flag by an all-reduce (max) over a CPU (gloo) group, all at the same steps: every
    `check_every`-th step, so that the processes meet on the host only there, not at every
    step. A stop therefore comes up to `check_every` steps
    after the signal; one process alone reads its flag at every step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    CHECK_EVERY = 10  # steps: ~5 s of SiT↓-XL/2 on 8 GPUs, well inside a scheduler's grace time

    def __init__(self, check_every: int = CHECK_EVERY) -> None:
        self.requested = False
        self.check_every = check_every
        self._previous: dict[int, Any] = {}
        self._group: dist.ProcessGroup | None = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.new_group(backend="gloo")
            assert isinstance(group, dist.ProcessGroup)  # (a member of the group: all are)
            self._group = group

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @staticmethod
    def ignore_in_worker(worker_id: int) -> None:
        """DataLoader `worker_init_fn`: a scheduler signals the whole process group, and a
        worker killed mid-step would crash the loop before it saves; the workers ignore the
        signals and end with the main process."""
        for sig in StopRequest.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def __call__(self, step: int) -> bool:
        """Whether any process has been asked to stop, as agreed after `step` (every process
        asks after every step; at every `check_every`-th they meet in a collective)."""
        if self._group is None:
            return self.requested
        if step % self.check_every:
            return False
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


#################################################################################
#                                    The loop                                   #
#################################################################################


@contextmanager
def progress_bar(trainer: Trainer) -> Iterator[tqdm]:
    """On a terminal (main process): a bar of steps with the rate and the time remaining; the
    log lines go above it. Elsewhere it is off and the log lines carry s/step and the ETA.
    The bar reads the clock only: no host sync."""
    acc, total = trainer.accelerator, trainer.settings.schedule.max_train_steps
    interactive = acc.is_main_process and sys.stderr.isatty()
    # smoothing 0.01: the rate (and time left) is a mean over about 100 updates, not over the
    # last few, which swing with the load of a shared machine
    with tqdm(total=total, initial=trainer.step, unit="step", desc="training",
              disable=not interactive, dynamic_ncols=True, smoothing=0.01) as bar:  # fmt: skip
        if not interactive:
            yield bar
            return
        with logging_redirect_tqdm(loggers=[logging.getLogger(LOGGER_NAME)]):
            yield bar


def train(
    trainer: Trainer,
    dataset: Dataset,
    run_dir: str,
    previews: Previews,
    monitor: Monitor,
    evaluation: Evaluation | None = None,
) -> bool:
    """The loop: a step, then on schedule logs, checkpoints, previews and evaluations
    (`evaluation(step)`, or None); a signal stops it after the current step, with a checkpoint.
    Returns whether a signal stopped it."""
    schedule, speed = trainer.settings.schedule, trainer.settings.speed
    acc, logger = trainer.accelerator, monitor.logger
    last_good = latest_checkpoint(run_dir)
    start_step = trainer.step
    micro_batches = batches_from(trainer, dataset, start_step)
    monitor.last_step, monitor.last_time = trainer.step, time.perf_counter()
    trainer.model.train()
    with StopRequest() as stop, progress_bar(trainer) as progress:
        while trainer.step < schedule.max_train_steps:
            batch = [next(micro_batches) for _ in range(schedule.gradient_accumulation_steps)]
            if speed.compile and speed.compile_check and trainer.step == start_step:
                check_compilation(trainer, batch[0], logger)
            stats = train_step(trainer, batch)
            trainer.step += 1  # steps count from 1: step s ends with checkpoint s
            progress.update()
            step = trainer.step
            monitor.add(stats, step)
            stopping = stop(step)
            last = step == schedule.max_train_steps or stopping
            if step % schedule.log_every == 0 or last:
                monitor.check_finite(last_good)
                monitor.log(step)
            if step % schedule.checkpointing_steps == 0 or last:
                monitor.check_finite(last_good)
                last_good = save_training_checkpoint(trainer, run_dir, logger)
            if schedule.sampling_steps and step % schedule.sampling_steps == 0:
                if acc.is_main_process or trainer.sharded:
                    grid = previews.save(os.path.join(run_dir, "samples", f"{step:07d}.png"))
                    if acc.is_main_process:
                        track_image(acc, grid, step)
                acc.wait_for_everyone()
            if evaluation is not None and not stopping:  # a stopped run evaluates on resume
                monitor.last_time += evaluation(step)  # not counted as training time
            if stopping:  # the caller says so, with the command that continues
                return True
    return False

"""Train SiT↓ (U-REPA) or SiT (REPA) on a dataset written by `preprocessing/prepare.py`.

    accelerate launch --multi_gpu --num_processes 8 train.py \\
        --data-dir data/imagenet256 --exp-name sitdown-xl-urepa       # the paper's recipe

REPA's `train.py`, flag for flag where REPA has the flag (`--batch-size` is the global batch);
the defaults are the U-REPA paper's SiT↓-XL/2 recipe (U-REPA §4, REPA's protocol). Re-running the
same command with `--resume auto` continues a run exactly where its last checkpoint left it.
`--dry-run` builds everything, prints the plan and exits.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from checkpoints import (
    MODEL_CLASSES,
    build_from_config,
    checkpoint_state,
    export_ema_safetensors,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dataset import LatentDataset
from frozen import RepresentationEncoder, encoder_dim, load_encoder, load_vae, parse_encoder_list
from loss import LAMBDA_SCHEDULES, MANIFOLD_MODES, PATH_TYPES, WEIGHTINGS, SILoss
from models import canonical_name
from models.base import AlignedDiffusionTransformer
from models.layers import SDPA_BACKENDS, sdpa_backend
from models.projector import ALIGN_RESOLUTIONS, UPSAMPLE_KERNELS, UPSAMPLE_ORDERS
from models.summary import count_macs
from samplers import VelocityOnly, euler_sampler
from training import (
    SEED_PREVIEW,
    BatchPlan,
    MetricMeans,
    StepDraws,
    StopRequest,
    TrainingBatches,
    TrainingError,
    add_log_file,
    append_jsonl,
    check_resumable,
    close_logger,
    create_logger,
    derive_seed,
    ema_export_path,
    format_metrics,
    grid_image,
    list_checkpoints,
    peak_flops,
    prune_checkpoints,
    update_ema,
)

PREVIEW_SAMPLING_STEPS = 50  # Euler steps of the preview sampler (REPA's)
PREVIEW_CFG_SCALE = 4.0  # classifier-free guidance of the previews (REPA's)

# Constructor arguments that flags (or the dataset) set; --model-config may not set them too.
FLAG_OF_MODEL_KWARG = {
    "input_size": "--resolution (from the dataset)",
    "num_classes": "the dataset",
    "z_dims": "--enc-type",
    "encoder_depth": "--encoder-depth",
    "class_dropout_prob": "--cfg-prob",
    "projector_upsample": "--projector-upsample",
    "projector_kernel": "--projector-kernel",
    "align_resolution": "--align-resolution",
    "time_aware_projector": "--time-aware-projector",
}


#################################################################################
#                                     Flags                                     #
#################################################################################


def _checked(kind: type, valid: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse `type`: parse `kind`, then require `valid(value)` ("must be {what}")."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
nonnegative_float = _checked(float, lambda v: v >= 0, ">= 0")
unit_interval = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
unit_closed = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def model_name(text: str) -> str:
    if text in MODEL_CLASSES:  # a bare class, sized by --model-config
        return text
    try:
        return canonical_name(text)
    except KeyError as err:
        raise argparse.ArgumentTypeError(err.args[0]) from None


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# The flag tables below are formatted by hand, one flag per line or two, as in REPA.
# fmt: off
def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (U-REPA §3.2-3.3, Tables 5-7, 9)")
    g.add_argument("--model", type=model_name, default="SiTDown-XL/2",
                   help="registry name: SiT-{S,B,L,XL}/{2,4,8}, SiTDown-{B,L,XL}/2 (alias SiT↓-); "
                        "or a class, SiT or SiTDown, sized by --model-config (small experiments)")
    g.add_argument("--encoder-depth", type=positive_int, default=None,
                   help="align the output of this block (1-indexed through all stages); default: "
                        "the model's: SiT 8, SiT↓ its middle block, 8/16/18 for B/L/XL (Table 5)")
    g.add_argument("--projector-upsample", choices=UPSAMPLE_ORDERS, default="after",
                   help="resample a coarse tap after the projector MLP, before it, or within it "
                        "by pixel shuffle (Table 7)")
    g.add_argument("--projector-kernel", choices=UPSAMPLE_KERNELS, default="bilinear",
                   help="interpolation kernel of the projector's upsampling")
    g.add_argument("--align-resolution", choices=ALIGN_RESOLUTIONS, default="upsample",
                   help="upsample the model's features to the encoder's grid, or average-pool the "
                        "encoder's features to the tap's grid (Table 6)")
    g.add_argument("--time-aware-projector", action=argparse.BooleanOptionalAction, default=False,
                   help="modulate the projector output by the time, (1 + γ(t))·h + β(t) (Table 9)")
    g.add_argument("--model-config", type=json_object, default={},
                   help="JSON object of further constructor arguments (recorded in checkpoints), "
                        "e.g. '{\"downsample\": \"unshuffle\"}', or with --model SiTDown "
                        "'{\"hidden_size\": 64, \"depths\": [2, 2, 2], \"num_heads\": 2}'")


def add_alignment_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("objective (U-REPA Eq. 5: L_v + λ(t)·(L_REPA + w·L_ML))")
    g.add_argument("--enc-type", default="dinov2-vit-b",
                   help="representation encoder(s), comma-separated, or 'none' to train without "
                        "alignment (needs --proj-coeff 0)")
    g.add_argument("--encoder-mode", choices=["precomputed", "online"], default="precomputed",
                   help="read the dataset's stored encoder features, or run the encoder on the "
                        "dataset's stored pixels in the loop (as REPA does)")
    g.add_argument("--enc-weights", default=None,
                   help="online mode: local weight file of each encoder, comma-separated")
    g.add_argument("--proj-coeff", type=nonnegative_float, default=0.5,
                   help="λ, weight of the alignment terms (0: plain SiT, needs --enc-type none)")
    g.add_argument("--manifold-coeff", type=nonnegative_float, default=3.0,
                   help="w, weight of the manifold loss (Table 8; 0: plain REPA)")
    g.add_argument("--manifold-mode", choices=MANIFOLD_MODES, default="token",
                   help="pairs the manifold loss compares: tokens of an image (Eq. 4), images at "
                        "a token position, or all tokens of the per-process micro-batch")
    g.add_argument("--lambda-schedule", choices=list(LAMBDA_SCHEDULES), default="constant",
                   help="λ(t) of Table 10: constant, rise max(1, t+0.5), fall max(1, 1.5-t), "
                        "dip min(1, max(1.5-2t, 2t-0.5))")
    g.add_argument("--path-type", choices=PATH_TYPES, default="linear",
                   help="interpolant (t = 1 is noise)")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="uniform",
                   help="distribution of training times: uniform, or log-normal (EDM's)")
    g.add_argument("--cfg-prob", type=unit_interval, default=0.1,
                   help="probability of replacing a label by the null class (for CFG)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", required=True,
                   help="a dataset written by preprocessing/prepare.py")
    g.add_argument("--resolution", type=positive_int, default=256,
                   help="image resolution; must match the dataset's")
    g.add_argument("--num-workers", type=nonnegative_int, default=4,
                   help="data-loading processes per training process")
    g.add_argument("--vae", default="ema",
                   help="SD-VAE that decodes the previews: ema, mse, a local diffusers folder, or "
                        "tiny-random (tests)")


def add_optimization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimisation (REPA's protocol)")
    g.add_argument("--batch-size", type=positive_int, default=256,
                   help="GLOBAL batch, split over processes and accumulation steps")
    g.add_argument("--max-train-steps", type=positive_int, default=400_000,
                   help="optimiser steps (400K: Table 3; 100K: ablations)")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=1,
                   help="micro-batches per optimiser step and process")
    g.add_argument("--learning-rate", type=positive_float, default=1e-4, help="AdamW, constant")
    g.add_argument("--adam-beta1", type=unit_interval, default=0.9)
    g.add_argument("--adam-beta2", type=unit_interval, default=0.999)
    g.add_argument("--adam-weight-decay", type=nonnegative_float, default=0.0)
    g.add_argument("--adam-epsilon", type=positive_float, default=1e-8)
    g.add_argument("--max-grad-norm", type=positive_float, default=1.0,
                   help="clip the global gradient norm to this")
    g.add_argument("--ema-decay", type=unit_closed, default=0.9999,
                   help="EMA decay, applied every optimiser step")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="fixes the initialisation, the data order and every random draw")
    g.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop",
                   help="stop: a non-finite loss ends the run, naming the step, and no checkpoint "
                        "is written after it; skip: steps with non-finite gradients are skipped "
                        "and counted (costs one host sync per step)")


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("precision and speed")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="fp16",
                   help="autocast dtype; fp16 uses loss scaling (REPA's default)")
    g.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls and convolutions on Ampere+ GPUs (REPA's command uses it)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model")
    g.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="AdamW's fused kernel (one launch for all parameters; with fp16, no host "
                        "sync for the loss scaler); off: PyTorch's default foreach AdamW, as REPA")
    g.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default="auto",
                   help="attention kernel of scaled_dot_product_attention: PyTorch's choice, or "
                        "only flash, efficient (memory-efficient), cudnn or math")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run directory, checkpoints, logs")
    g.add_argument("--output-dir", "--output_dir", default="exps",
                   help="parent of run directories")
    g.add_argument("--exp-name", "--exp_name", required=True,
                   help="run directory name: OUTPUT_DIR/EXP_NAME")
    g.add_argument("--resume", default=None,
                   help="'auto': continue from the run directory's latest checkpoint (or start "
                        "the run if it has none); or a checkpoint path")
    g.add_argument("--checkpointing-steps", type=positive_int, default=50_000,
                   help="save a checkpoint every this many steps, and at the end")
    g.add_argument("--keep-last", type=positive_int, default=2,
                   help="keep this many most recent checkpoints, besides milestones")
    g.add_argument("--milestone-every", type=nonnegative_int, default=100_000,
                   help="checkpoints at multiples of this are kept for good, with their EMA "
                        "exported as safetensors (0: none)")
    g.add_argument("--sampling-steps", type=nonnegative_int, default=10_000,
                   help="save a preview grid (EMA, fixed noise and labels, 50 Euler steps, CFG "
                        "4) every this many steps (0: never)")
    g.add_argument("--preview-images", type=positive_int, default=16, help="images per preview")
    g.add_argument("--log-every", type=positive_int, default=100,
                   help="read, average and log the metrics every this many steps")
    g.add_argument("--report-to", choices=["none", "wandb", "tensorboard"], default="none",
                   help="tracker besides log.txt and metrics.jsonl")
    g.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="peak TFLOP/s of one device, for the MFU estimate (default: known GPUs)")
    g.add_argument("--dry-run", action="store_true",
                   help="build everything, print the plan and exit without training")
# fmt: on


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train SiT↓ / SiT with U-REPA or REPA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add in (
        add_model_args,
        add_alignment_args,
        add_data_args,
        add_optimization_args,
        add_precision_args,
        add_run_args,
    ):
        add(parser)
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Checks between flags (each flag's own range is checked by its `type`)."""
    args.encoders = [] if args.enc_type.lower() == "none" else parse_encoder_list(args.enc_type)
    if not args.encoders and args.proj_coeff > 0:
        raise ValueError("--enc-type none trains without alignment: it needs --proj-coeff 0")
    if args.encoders and args.proj_coeff == 0:
        raise ValueError(
            "--proj-coeff 0 switches alignment off: pass --enc-type none too, so that the model "
            "has no projector to leave untrained"
        )
    if args.encoder_mode == "online" and not args.encoders:
        raise ValueError("--encoder-mode online needs an encoder (--enc-type)")
    if args.enc_weights is not None and len(args.enc_weights.split(",")) != len(args.encoders):
        raise ValueError("--enc-weights needs one path per encoder of --enc-type")
    if args.batch_size % args.gradient_accumulation_steps:
        raise ValueError(
            f"--batch-size {args.batch_size} (global) is not divisible by "
            f"--gradient-accumulation-steps {args.gradient_accumulation_steps}"
        )
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise ValueError(f"--resume: no checkpoint file {args.resume!r} (or pass 'auto')")
    package = {"wandb": "wandb", "tensorboard": "tensorboard"}.get(args.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"--report-to {args.report_to} needs the {package} package: "
            f"pip install {package} (or --report-to none)"
        )
    clashes = sorted(set(args.model_config) & set(FLAG_OF_MODEL_KWARG))
    if clashes:
        raise ValueError(
            "--model-config may not set "
            + ", ".join(f"{k} (set by {FLAG_OF_MODEL_KWARG[k]})" for k in clashes)
        )


#################################################################################
#                            Building the pieces                                #
#################################################################################


def create_accelerator(args: argparse.Namespace, run_dir: str) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=run_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise TrainingError(
            f"{launched} processes were launched but accelerate sees "
            f"{accelerator.num_processes}; without GPUs, set ACCELERATE_USE_CPU=1 (or use "
            "`accelerate launch --cpu`) so that the processes train together"
        )
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    torch.backends.cudnn.allow_tf32 = args.allow_tf32
    return accelerator


def resolve_run(args: argparse.Namespace) -> str | None:
    """Check the run directory against --resume (on every process, before anything is written)
    and return the checkpoint to resume from, if any."""
    run_dir = os.path.join(args.output_dir, args.exp_name)
    if args.resume is None:
        if os.path.exists(run_dir):
            raise TrainingError(
                f"the run directory {run_dir} already exists: pass --resume auto to continue "
                "that run, or choose another --exp-name (runs are never overwritten)"
            )
        return None
    if args.resume == "auto":
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[max(checkpoints)] if checkpoints else None
    return args.resume


def open_dataset(args: argparse.Namespace) -> Dataset:
    """The preprocessed dataset, with the features (or, online, the pixels) this run needs."""
    online = args.encoder_mode == "online"
    dataset = LatentDataset(args.data_dir, encoders=[] if online else args.encoders, pixels=online)
    if dataset.resolution != args.resolution:
        raise TrainingError(
            f"{args.data_dir} holds {dataset.resolution}-px data but --resolution is "
            f"{args.resolution}"
        )
    return dataset


def create_model(
    args: argparse.Namespace, dataset: Any, sample: dict[str, Any]
) -> AlignedDiffusionTransformer:
    """Build the model from the flags, the dataset (classes, latent size) and --model-config.
    Initialised from --seed, so every process and every run with that seed starts alike."""
    kwargs: dict[str, Any] = dict(
        input_size=sample["moments"].shape[-1],
        num_classes=dataset.num_classes,
        z_dims=[encoder_dim(name) for name in args.encoders],
        class_dropout_prob=args.cfg_prob,
        projector_upsample=args.projector_upsample,
        projector_kernel=args.projector_kernel,
        align_resolution=args.align_resolution,
        time_aware_projector=args.time_aware_projector,
    )
    if args.encoder_depth is not None:
        kwargs["encoder_depth"] = args.encoder_depth
    kwargs.update(args.model_config)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(args.seed)  # the model is built on the CPU
        try:
            model = build_from_config(args.model, kwargs)
        except (TypeError, ValueError) as err:
            raise TrainingError(f"cannot build {args.model}: {err}") from err
    return model


def load_encoders(args: argparse.Namespace, device: torch.device) -> list[RepresentationEncoder]:
    """Online mode: the frozen encoders, run on the stored pixels in the loop."""
    if args.encoder_mode != "online":
        return []
    weights = args.enc_weights.split(",") if args.enc_weights else [None] * len(args.encoders)
    return [
        load_encoder(name, args.resolution, path, device)
        for name, path in zip(args.encoders, weights, strict=True)
    ]


@dataclass
class Trainer:
    """What a training step, a checkpoint and a preview need."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: nn.Module  # as prepared: possibly compiled and DDP-wrapped
    ema: AlignedDiffusionTransformer  # eval mode, no gradients, never wrapped
    optimizer: torch.optim.Optimizer
    loss_fn: SILoss
    encoders: list[RepresentationEncoder]
    plan: BatchPlan
    step: int = 0
    raw: AlignedDiffusionTransformer = field(init=False)

    def __post_init__(self) -> None:
        raw = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        assert isinstance(raw, AlignedDiffusionTransformer)
        self.raw = raw
        self.ema_params: list[Tensor] = list(self.ema.parameters())
        self.model_params: list[Tensor] = list(raw.parameters())


def alignment_targets(tr: Trainer, batch: dict[str, Any]) -> list[Tensor]:
    """Encoder features (N, T, D) per encoder, on the grid of the model's projections."""
    if tr.encoders:  # online: run the frozen encoders on the stored pixels
        zs = [encoder(batch["pixels"]) for encoder in tr.encoders]
    else:
        zs = [f.float() for f in batch["features"]]
    return tr.raw.align_targets(zs)


def train_step(tr: Trainer, micro_batches: list[dict[str, Any]]) -> dict[str, Tensor]:
    """One optimiser step on this process's micro-batches of the global batch: forward and
    backward with gradient accumulation, gradient clipping, AdamW, EMA.

    Returns 0-dim device tensors, never read here (no host sync): the loss terms of Eq. 5
    averaged over the micro-batches, `cos_sim`, `grad_norm`, and `nonfinite` (1 if the loss was
    not finite) and `skipped` (1 if the update was skipped).
    """
    acc, a = tr.accelerator, len(micro_batches)
    sums: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        # Gradients are all-reduced once per step, in the last micro-batch's backward pass.
        with nullcontext() if i == a - 1 else acc.no_sync(tr.model):
            with acc.autocast():
                losses = tr.loss_fn(
                    tr.model,
                    batch["x"],
                    batch["y"],
                    alignment_targets(tr, batch),
                    t=batch["t"],
                    noise=batch["noise"],
                    # Label dropout, drawn once per step for the global batch: given these
                    # decisions, the model's label embedder applies them and draws nothing.
                    model_kwargs={"force_drop_ids": batch["drop"]},
                )
            acc.backward(losses["total"] / a)
        for name, value in losses.items():
            sums[name] = sums[name] + value.detach() / a if name in sums else value.detach() / a

    grad_norm = acc.clip_grad_norm_(tr.model.parameters(), tr.args.max_grad_norm)
    # --on-nonfinite skip reads the global gradient norm (equal on every process) to decide;
    # with fp16, the loss scaler skips steps with non-finite gradients by itself.
    skip = tr.args.on_nonfinite == "skip" and acc.scaler is None and not torch.isfinite(grad_norm)
    skipped = torch.full_like(grad_norm, float(skip), dtype=torch.float32)
    if not skip:
        scale = loss_scale(acc) if acc.scaler is not None else None
        tr.optimizer.step()
        update_ema(tr.ema_params, tr.model_params, tr.args.ema_decay)
        if scale is not None:  # fp16: the scaler lowers its scale when it skips a step
            skipped = (loss_scale(acc) < scale).float()
    tr.optimizer.zero_grad(set_to_none=True)
    return {
        **sums,
        "grad_norm": grad_norm.detach().float(),
        "nonfinite": (~torch.isfinite(sums["total"])).float(),
        "skipped": skipped,
    }


def loss_scale(acc: Accelerator) -> Tensor:
    """fp16's current loss scale, a 0-dim device tensor (a copy).

    Read on the device because `GradScaler.get_scale()` would sync with the host. The fused
    AdamW skips an overflowing step inside its kernel, where accelerate's `step_was_skipped`
    cannot see it; the drop of the scale shows it with either AdamW."""
    scale = acc.scaler._get_scale_async() if acc.scaler is not None else None
    if scale is None:
        raise RuntimeError("no fp16 loss scale: the scaler is off or has not scaled a loss yet")
    return scale.clone()


#################################################################################
#                              Checkpoints and resume                           #
#################################################################################


def data_position(tr: Trainer) -> dict[str, int]:
    """Where the data plan stands: step s reads global batch s of the (seed, epoch) orders."""
    epoch, batch_in_epoch = divmod(tr.step, tr.plan.steps_per_epoch)
    return dict(
        step=tr.step,
        epoch=epoch,
        batch_in_epoch=batch_in_epoch,
        dataset_size=tr.plan.dataset_size,
        global_batch=tr.plan.global_batch,
        seed=tr.plan.seed,
    )


def save_training_checkpoint(tr: Trainer, run_dir: str, logger: Any) -> str:
    """Write checkpoints/{step:07d}.pt (atomically, main process), export milestone EMAs, prune
    old checkpoints. Every process takes part (RNG states are gathered). A failed write raises
    on every process and leaves the previous checkpoints as they were."""
    acc, args = tr.accelerator, tr.args
    rng = gather_object([rng_state()])  # one entry per process, in rank order
    path = os.path.join(run_dir, "checkpoints", f"{tr.step:07d}.pt")
    error: list[str | None] = [None]
    if acc.is_main_process:
        state = checkpoint_state(
            tr.raw, tr.ema, tr.step, args=vars(args), opt=tr.optimizer, scaler=acc.scaler,
            rng={"processes": rng}, data=data_position(tr),
        )  # fmt: skip
        milestone = args.milestone_every and tr.step % args.milestone_every == 0
        try:
            save_checkpoint(path, state)
            if milestone or tr.step == args.max_train_steps:
                export_ema_safetensors(
                    ema_export_path(path),
                    tr.ema.state_dict(),
                    tr.raw.model_name,
                    tr.raw.model_kwargs,
                )
        except OSError as err:
            earlier = [p for s, p in list_checkpoints(run_dir).items() if s < tr.step]
            error = [
                f"could not write the checkpoint of step {tr.step} to {path}: {err}. "
                f"The previous checkpoint ({earlier[-1] if earlier else 'none'}) is intact; "
                "make room and resume with --resume auto"
            ]
        else:
            for removed in prune_checkpoints(run_dir, args.keep_last, args.milestone_every):
                logger.info(f"removed old checkpoint {removed}")
            logger.info(f"saved checkpoint {path}")
    broadcast_object_list(error)
    if error[0] is not None:
        raise TrainingError(error[0])
    return path


def restore(tr: Trainer, ckpt: dict[str, Any], logger: Any) -> None:
    """Load model, EMA, optimiser, loss scaler, RNG states and the data position."""
    tr.raw.load_state_dict(ckpt["model"])
    tr.ema.load_state_dict(ckpt["ema"])
    # This run's AdamW kernel (--fused-optimizer may change on resume), not the checkpoint's;
    # loading then puts the step counters where that kernel keeps them (device or CPU).
    for saved, group in zip(ckpt["opt"]["param_groups"], tr.optimizer.param_groups, strict=True):
        saved["fused"], saved["foreach"] = group["fused"], group["foreach"]
    tr.optimizer.load_state_dict(ckpt["opt"])
    if tr.accelerator.scaler is not None and ckpt["scaler"] is not None:
        tr.accelerator.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]["processes"]
    if len(rng) == tr.accelerator.num_processes:
        set_rng_state(rng[tr.accelerator.process_index])
    else:  # harmless: no training randomness comes from these generators
        logger.warning(
            f"checkpoint has RNG states of {len(rng)} processes, this run has "
            f"{tr.accelerator.num_processes}: not restored"
        )
    tr.step = ckpt["step"]


#################################################################################
#                                   Previews                                    #
#################################################################################


def save_preview(tr: Trainer, vae: Any, noise: Tensor, labels: Tensor, path: str) -> Any:
    """Sample the EMA model from fixed noise and labels, decode, save a PNG grid."""
    cfg = PREVIEW_CFG_SCALE if tr.args.cfg_prob > 0 else 1.0
    model = VelocityOnly(tr.ema)  # the projector heads are not needed to sample
    with tr.accelerator.autocast():
        latents = euler_sampler(model, noise, labels, PREVIEW_SAMPLING_STEPS, cfg_scale=cfg)
    grid = grid_image(vae.decode(latents.float()))
    Image.fromarray(grid).save(path)
    return grid


#################################################################################
#                                 Training loop                                 #
#################################################################################


def training_loader(
    args: argparse.Namespace, dataset: Dataset, plan: BatchPlan, start_step: int, pin_memory: bool
) -> DataLoader:
    """This process's micro-batches from step `start_step` on, as CPU dicts (TrainingBatches);
    --num-workers processes load the samples and make the draws ahead of the loop."""
    draws = StepDraws(args.weighting, args.path_type, args.cfg_prob)
    a = args.gradient_accumulation_steps
    return DataLoader(
        TrainingBatches(dataset, plan, draws),
        batch_size=None,
        sampler=range(start_step * a, args.max_train_steps * a),
        num_workers=args.num_workers,
        pin_memory=pin_memory,
        worker_init_fn=StopRequest.ignore_in_worker,
    )


def batches_from(tr: Trainer, dataset: Dataset, start_step: int) -> Iterator[dict[str, Any]]:
    """This process's micro-batches from step `start_step` on, on the device."""
    device = tr.accelerator.device
    for batch in training_loader(tr.args, dataset, tr.plan, start_step, device.type == "cuda"):
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


@dataclass
class Monitor:
    """Interval bookkeeping of the loop: metrics, throughput, the first non-finite step."""

    tr: Trainer
    run_dir: str
    logger: Any
    flops_per_image: float  # training FLOPs per image (3 × forward, 2 FLOPs per MAC)
    peak: float | None  # peak FLOP/s of one device
    meter: MetricMeans = field(default_factory=MetricMeans)
    first_nonfinite: Tensor | None = None
    last_time: float = field(default_factory=time.perf_counter)
    last_step: int = 0

    def add(self, stats: dict[str, Tensor], step: int) -> None:
        bad = torch.where(stats.pop("nonfinite") > 0, step, sys.maxsize)
        first = self.first_nonfinite
        self.first_nonfinite = bad if first is None else torch.minimum(first, bad)
        self.meter.add(stats)

    def check_finite(self, last_good: str | None) -> None:
        """Stop (on every process) if any process saw a non-finite loss (stop mode)."""
        if self.first_nonfinite is None or self.tr.args.on_nonfinite != "stop":
            return
        acc = self.tr.accelerator
        first = int(acc.gather(self.first_nonfinite.view(1)).min())
        if first != sys.maxsize:
            raise TrainingError(
                f"the loss was not finite at step {first}: training stopped, no checkpoint was "
                f"written after it. Last good checkpoint: {last_good or 'none'}. Resume from it "
                "(--resume auto) with a lower --learning-rate or --mixed-precision bf16, or pass "
                "--on-nonfinite skip to skip such steps"
            )

    def log(self, step: int) -> dict[str, Any]:
        acc, args = self.tr.accelerator, self.tr.args
        means = self.meter.pop(lambda x: acc.reduce(x, "mean"))  # the interval's one host sync
        now = time.perf_counter()
        images_per_sec = (step - self.last_step) * args.batch_size / (now - self.last_time)
        self.last_time, self.last_step = now, step
        epoch = step * args.batch_size / self.tr.plan.dataset_size
        record: dict[str, Any] = {"step": step, "epoch": round(epoch, 4)}
        record.update({k: round(v, 6) for k, v in means.items()})
        record["lr"] = self.tr.optimizer.param_groups[0]["lr"]
        record["images_per_sec"] = round(images_per_sec, 2)
        if self.peak is not None:
            mfu = self.flops_per_image * images_per_sec / (self.peak * acc.num_processes)
            record["mfu"] = round(mfu, 4)
        if acc.device.type == "cuda":
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 2)
        if acc.is_main_process:
            append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), record)
            self.logger.info(format_metrics(step, {k: v for k, v in record.items() if k != "step"}))
        acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
        return record


def train(tr: Trainer, dataset: Dataset, run_dir: str, vae: Any, monitor: Monitor) -> None:
    """The loop: a step, then on schedule logs, checkpoints and previews; a signal stops it
    after the current step, with a checkpoint."""
    args, acc, logger = tr.args, tr.accelerator, monitor.logger
    generator = torch.Generator().manual_seed(derive_seed(args.seed, SEED_PREVIEW))
    preview_noise = torch.randn(args.preview_images, *tr.raw.latent_shape, generator=generator)
    preview_labels = torch.randint(tr.raw.num_classes, (args.preview_images,), generator=generator)
    preview = (preview_noise.to(acc.device), preview_labels.to(acc.device))
    checkpoints = list_checkpoints(run_dir)
    last_good = checkpoints[max(checkpoints)] if checkpoints else None
    micro_batches = batches_from(tr, dataset, tr.step)
    monitor.last_step, monitor.last_time = tr.step, time.perf_counter()
    tr.model.train()
    with StopRequest() as stop:
        while tr.step < args.max_train_steps:
            batch = [next(micro_batches) for _ in range(args.gradient_accumulation_steps)]
            stats = train_step(tr, batch)
            tr.step += 1  # steps count from 1: step s ends with checkpoint s
            monitor.add(stats, tr.step)
            stopping = stop()
            last = tr.step == args.max_train_steps or stopping
            if tr.step % args.log_every == 0 or last:
                monitor.check_finite(last_good)
                monitor.log(tr.step)
            if tr.step % args.checkpointing_steps == 0 or last:
                monitor.check_finite(last_good)
                last_good = save_training_checkpoint(tr, run_dir, logger)
            if args.sampling_steps and tr.step % args.sampling_steps == 0:
                if acc.is_main_process:
                    path = os.path.join(run_dir, "samples", f"{tr.step:07d}.png")
                    track_image(acc, save_preview(tr, vae, *preview, path), tr.step)
                acc.wait_for_everyone()
            if stopping:
                logger.info(
                    f"stopped by a signal after step {tr.step}, checkpoint saved: "
                    "continue with --resume auto"
                )
                break


def track_image(acc: Accelerator, grid: Any, step: int) -> None:
    """Send a preview grid (H, W, 3) uint8 to the tracker, if any."""
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            tracker.log_images({"preview": [grid]}, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({"preview": grid[None]}, step=step, dataformats="NHWC")


#################################################################################
#                                     Main                                      #
#################################################################################


def setup(
    args: argparse.Namespace, accelerator: Accelerator, resume: str | None, logger: Any
) -> tuple[Trainer, Dataset]:
    """Data, encoders, model, EMA, optimiser, objective; then the checkpoint to resume, if any."""
    dataset = open_dataset(args)
    try:
        plan = BatchPlan(
            len(dataset),  # type: ignore[arg-type]
            args.batch_size,
            args.gradient_accumulation_steps,
            accelerator.num_processes,
            accelerator.process_index,
            args.seed,
        )
    except ValueError as err:  # the global batch does not split, or exceeds the dataset
        raise TrainingError(str(err)) from None
    model = create_model(args, dataset, dataset[0])
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:  # refuse before any state is touched
        check_resumable(ckpt, model.model_name, model.model_kwargs, vars(args), plan.dataset_size)
    tr = create_trainer(args, accelerator, model, plan, load_encoders(args, accelerator.device))
    if ckpt is not None:
        restore(tr, ckpt, logger)
    return tr, dataset


def create_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (REPA's protocol); --fused-optimizer picks PyTorch's fused kernel (CUDA and CPU)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=args.fused_optimizer,
    )


def create_trainer(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: AlignedDiffusionTransformer,
    plan: BatchPlan,
    encoders: list[RepresentationEncoder],
) -> Trainer:
    """EMA, optimiser and objective for `model`, then compilation and accelerate's wrapping.
    `encoders`: the frozen encoders run in the loop (online mode), else []."""
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # starts equal to the model
    optimizer = create_optimizer(args, model)
    loss_fn = SILoss(
        path_type=args.path_type,
        weighting=args.weighting,
        proj_coeff=args.proj_coeff,
        manifold_coeff=args.manifold_coeff,
        manifold_mode=args.manifold_mode,
        lambda_schedule=args.lambda_schedule,
    )
    prepared = torch.compile(model) if args.compile else model
    prepared, optimizer = accelerator.prepare(prepared, optimizer)
    ema.to(accelerator.device)
    return Trainer(args, accelerator, prepared, ema, optimizer, loss_fn, encoders, plan)


def describe(tr: Trainer, macs: int, resume: str | None) -> str:
    """The plan of the run, for the log and --dry-run."""
    args, acc, plan, model = tr.args, tr.accelerator, tr.plan, tr.raw
    epochs = args.max_train_steps / plan.steps_per_epoch
    inactive = args.mixed_precision != "no" and not acc.native_amp
    amp_note = f" (no autocast on {acc.device.type}: fp32)" if inactive else ""
    return "\n".join([
        f"model       {model.model_name}: {model.num_parameters() / 1e6:.4g} M parameters "
        f"({model.num_parameters(include_projectors=False) / 1e6:.4g} M without projectors), "
        f"{macs / 1e9:.4g} G MACs per image; alignment tap after block "
        f"{model.encoder_depth}",
        f"arguments   {json.dumps(model.model_kwargs)}",
        f"objective   {tr.loss_fn}",
        f"encoders    {', '.join(args.encoders) or 'none'} ({args.encoder_mode})",
        f"data        {args.data_dir}: {plan.dataset_size} samples, {plan.steps_per_epoch} steps "
        "per epoch",
        f"batch       {args.batch_size} (global) = {acc.num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation steps × {plan.micro_batch}",
        f"steps       {tr.step} → {args.max_train_steps} ({epochs:.2f} epochs)"
        + (f", resuming {resume}" if resume else ""),
        f"checkpoints every {args.checkpointing_steps} steps; the last {args.keep_last} kept, and "
        f"every {args.milestone_every or '-'}th with an EMA export",
        f"precision   {args.mixed_precision}{amp_note}, TF32 {args.allow_tf32}, "
        f"compile {args.compile}, fused AdamW {args.fused_optimizer}, "
        f"attention {args.sdpa_backend}, "
        f"device {acc.device} × {acc.num_processes}",
    ])  # fmt: skip


def training_macs(model: AlignedDiffusionTransformer) -> int:
    """Forward multiply-adds per image, projector included (counted on a meta-device copy)."""
    with torch.device("meta"):
        meta = build_from_config(model.model_name, model.model_kwargs)
    return count_macs(meta, model.latent_shape[-1], include_projectors=True)


def main(args: argparse.Namespace) -> None:
    run_dir = os.path.join(args.output_dir, args.exp_name)
    accelerator = create_accelerator(args, run_dir)
    resume = resolve_run(args)  # before anything is written, on every process
    logger = create_logger(accelerator.is_main_process)
    try:
        tr, dataset = setup(args, accelerator, resume, logger)
        macs = training_macs(tr.raw)
        if args.dry_run:
            logger.info(describe(tr, macs, resume))
            return
        if accelerator.is_main_process:
            for sub in ("checkpoints", "samples"):
                os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
            add_log_file(logger, os.path.join(run_dir, "log.txt"))
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
            accelerator.init_trackers(
                "u-repa",
                config={
                    k: v if isinstance(v, int | float | str | bool) else str(v)
                    for k, v in vars(args).items()
                },
                init_kwargs={"wandb": {"name": args.exp_name, "dir": run_dir}},
            )
        accelerator.wait_for_everyone()
        logger.info(describe(tr, macs, resume))
        if tr.step >= args.max_train_steps:
            logger.info(f"nothing to do: the run is at step {tr.step} of {args.max_train_steps}")
            return
        vae = load_vae(args.vae, accelerator.device) if accelerator.is_main_process else None
        peak = peak_flops(
            accelerator.device, args.mixed_precision, args.allow_tf32, args.peak_tflops
        )
        monitor = Monitor(tr, run_dir, logger, 6.0 * macs, peak)
        with sdpa_backend(args.sdpa_backend):
            train(tr, dataset, run_dir, vae, monitor)
        logger.info(f"done: step {tr.step}")
    finally:
        accelerator.end_training()
        close_logger(logger)


if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as err:
        sys.exit(f"train.py: error: {err}")

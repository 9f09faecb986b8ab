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
import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import Tensor
from torch.utils.data import Dataset

from dataset import LatentDataset, stored_encoders
from loss import LAMBDA_SCHEDULES, MANIFOLD_MODES, PATH_TYPES, WEIGHTINGS
from models import TEXT_TO_IMAGE_MODELS, build_model, check_model_config
from models.layers import sdpa_backend
from models.mmdit import CLIP_TEXT_DIM
from models.projector import ALIGN_RESOLUTIONS, UPSAMPLE_KERNELS, UPSAMPLE_ORDERS
from models.summary import count_macs
from urepa.captions import check_model_matches_data, dataset_contexts
from urepa.checkpoints import (
    TrainingError,
    check_resumable,
    load_checkpoint,
    remove_interrupted_saves,
    resume_checkpoint,
    write_missing_exports,
)
from urepa.cli import (
    DEFAULT_ENCODER,
    DefaultsHelpFormatter,
    add_debug_arg,
    add_encoder_args,
    add_speed_args,
    add_vae_args,
    any_model_name,
    encoder_list,
    encoder_weights,
    json_object,
    nonnegative_float,
    nonnegative_int,
    parse_checked,
    positive_float,
    positive_int,
    resolve_speed_args,
    run_main,
    unit_closed,
    unit_interval,
)
from urepa.data_plan import BatchPlan, draws_mismatch
from urepa.encoders import (
    RepresentationEncoder,
    check_resolution,
    load_encoder,
)
from urepa.hub import local_dataset
from urepa.model_setup import (
    PROJECTOR_FLAGS,
    create_model,
    model_arguments,
    text_to_image_arguments,
)
from urepa.periodic_eval import (
    PeriodicEvaluation,
    check_eval_captions,
    check_eval_settings,
    create_evaluation,
)
from urepa.run_log import (
    add_log_file,
    close_logger,
    create_logger,
    damaged_lines_note,
    keep_metrics_until,
    peak_flops,
    repair_jsonl,
)
from urepa.settings import EVAL_FILE, EVAL_PRESETS, EvalSettings, ModelSettings, TrainSettings
from urepa.shards import DatasetError, dataset_identity, load_manifest
from urepa.trainer import (
    Monitor,
    Previews,
    Trainer,
    create_accelerator,
    create_trainer,
    restore,
    train,
)
from urepa.utils import EXIT_STOPPED, ReportedError, exclusive_lock
from urepa.vae import latent_geometry, load_vae, resolve_vae

# Constructor arguments that flags (or the dataset) set; --model-config may not set them too.
FLAG_OF_MODEL_KWARG = {
    "input_size": "--resolution (from the dataset)",
    "num_classes": "the dataset",
    "z_dims": "--enc-type",
    "encoder_depth": "--encoder-depth",
    "class_dropout_prob": "--cfg-prob",
    **{name: "--" + name.replace("_", "-") for name in PROJECTOR_FLAGS},
}


#################################################################################
#                                     Flags                                     #
#################################################################################


# The flag tables below are formatted by hand, one flag per line or two, as in REPA.
# fmt: off
def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (U-REPA §3.2-3.3, Tables 5-7, 9)")
    g.add_argument("--model", type=any_model_name, default="SiTDown-XL/2",
                   help="registry name: SiT-{S,B,L,XL}/{2,4,8}, SiTDown-{B,L,XL}/2 (alias SiT↓-); "
                        "or a class, SiT or SiTDown, sized by --model-config (small experiments); "
                        "text-to-image on a captioned dataset (--captions in prepare.py): "
                        "MMDiT-d24/2 (REPA's Table 12), or MMDiT sized by --model-config")
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
    add_encoder_args(g, none_means="trains without alignment (needs --proj-coeff 0)",
                     default_note="the encoder whose features the dataset stores; "
                                  "dinov2-vit-b where it stores that one among others, none, or "
                                  "with --encoder-mode online; none with --proj-coeff 0")
    g.add_argument("--encoder-mode", choices=["precomputed", "online"], default="precomputed",
                   help="read the dataset's stored encoder features, or run the encoder on the "
                        "dataset's stored pixels in the loop (as REPA does)")
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
                   help="distribution of training times: uniform; lognormal, log(σ_t/α_t) ~ "
                        "N(0, 1) (REPA's); lognormal-edm, N(-1.2, 1.2²) (EDM's P_mean, P_std)")
    g.add_argument("--cfg-prob", type=unit_interval, default=0.1,
                   help="probability of replacing a label by the null class (for CFG)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", required=True,
                   help="a dataset written by preprocessing/prepare.py, or a Hub dataset "
                        "repository ORG/NAME[@REVISION] of one (a local path wins; "
                        "docs/sharing.md)")
    g.add_argument("--resolution", type=positive_int, default=None,
                   help="image resolution; default: the dataset's, which it must match")
    g.add_argument("--num-workers", type=nonnegative_int, default=4,
                   help="data-loading processes per training process")
    add_vae_args(g, purpose="decodes the previews", recorded_in="the dataset")


def add_optimization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimisation (REPA's protocol)")
    g.add_argument("--batch-size", type=positive_int, default=256,
                   help="GLOBAL batch, split over processes and accumulation steps")
    g.add_argument("--max-train-steps", type=positive_int, default=400_000,
                   help="optimiser steps (400K: Table 3; 100K: ablations)")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=1,
                   help="micro-batches per optimiser step and process")
    g.add_argument("--learning-rate", type=positive_float, default=1e-4, help="AdamW, constant")
    g.add_argument("--adam-beta1", type=unit_interval, default=0.9,
                   help="AdamW's decay of the gradient's running mean")
    g.add_argument("--adam-beta2", type=unit_interval, default=0.999,
                   help="AdamW's decay of the squared gradient's running mean")
    g.add_argument("--adam-weight-decay", type=nonnegative_float, default=0.0,
                   help="AdamW's decoupled weight decay (0: none, REPA's protocol)")
    g.add_argument("--adam-epsilon", type=positive_float, default=1e-8,
                   help="AdamW's epsilon, added to the root of the squared-gradient mean")
    g.add_argument("--max-grad-norm", type=positive_float, default=1.0,
                   help="clip the global gradient norm to this")
    g.add_argument("--ema-decay", type=unit_closed, default=0.9999,
                   help="EMA decay per optimiser step")
    g.add_argument("--ema-every", type=positive_int, default=1,
                   help="update the EMA every k steps with decay^k (1: every step, REPA's "
                        "protocol); a checkpoint's EMA then lags by at most k - 1 steps")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="fixes the initialisation, the data order and every random draw")
    g.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop",
                   help="stop: a non-finite loss ends the run, naming the step, and no checkpoint "
                        "is written after it; skip: steps with non-finite gradients are skipped "
                        "and counted (costs one host sync per step)")


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("precision and speed")
    g.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="autocast dtype. auto: bf16 on GPUs that support it (no loss scaler), "
                        "fp16 on older GPUs, no on CPUs; fp16 with loss scaling is REPA's "
                        "protocol (pass it to reproduce REPA exactly)")
    g.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls and convolutions on Ampere+ GPUs (REPA's command uses it)")
    g.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="AdamW's fused kernel (one launch for all parameters; with fp16, no host "
                        "sync for the loss scaler); off: PyTorch's default foreach AdamW, as REPA")
    g.add_argument("--compile-update", action=argparse.BooleanOptionalAction, default=False,
                   help="compile gradient clipping, AdamW and the EMA into one pass over the "
                        "weights and their state (36 bytes per parameter instead of 48, after "
                        "the gradient norm's 4); not with fp16, whose loss scaler needs the "
                        "optimiser's own step. Off by default until its compile time on a GPU "
                        "is measured")
    g.add_argument("--fsdp", choices=["auto", "on", "off"], default="off",
                   help="shard weights, gradients, AdamW state and EMA over the processes "
                        "(FSDP2), so that each updates 1/N of them; auto: on with several CUDA "
                        "processes (not with fp16), on: with several processes, off: DDP")
    add_speed_args(g)
    g.add_argument("--compile-check", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: before the first step, compare the compiled and the "
                        "eager gradients of the first micro-batch once and stop, naming the "
                        "worst parameter, if they differ beyond what the precision explains "
                        "(costs two extra forward and backward passes; the time is logged)")


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
    add_debug_arg(g)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluation during training (off by default)")
    g.add_argument("--eval-every", type=nonnegative_int, default=0,
                   help="evaluate the EMA model every this many steps, on every process (0: "
                        "never); results in RUN_DIR/eval.jsonl, the log and the tracker")
    g.add_argument("--eval-samples", type=positive_int, default=10_000,
                   help="samples per evaluation, balanced over the classes (10000: FID-10K, "
                        "which is NOT comparable with papers' FID-50K; 50000 allowed)")
    g.add_argument("--eval-ref", metavar="REF.npz", default=None,
                   help="reference batch: ADM's VIRTUAL_imagenet256_labeled.npz, or one made by "
                        "evaluations/make_reference.py")
    g.add_argument("--eval-captions-from", metavar="DATA_DIR", default=None,
                   help="text-to-image runs (required there): the captioned validation set "
                        "(preprocessing/prepare.py --captions) whose captions the samples take, "
                        "in generate.py --captions-from's order")
    g.add_argument("--eval-preset", choices=sorted(EVAL_PRESETS), default="ablation",
                   help="sampler: ablation: Euler ODE 50 steps, cfg 1.8 on [0, 0.7]; "
                        "paper-main: SDE 250 steps, cfg 1.65 on [0, 0.7]; no-guidance: SDE 250 "
                        "steps, cfg 1")
    g.add_argument("--eval-num-steps", type=positive_int, default=None,
                   help="sampler steps instead of the preset's (a cheaper curve; its numbers "
                        "are then not the preset's)")
    g.add_argument("--eval-batch-size", type=positive_int, default=64,
                   help="images per process per sampling batch; the metrics are the same up to "
                        "float rounding")
    g.add_argument("--eval-fd-dinov2", action=argparse.BooleanOptionalAction, default=False,
                   help="also FD-DINOv2 (DINOv2 ViT-L/14 features, as EDM2)")
    g.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: torch hub's cache, "
                        "downloaded on first use)")
    g.add_argument("--dinov2-weights", metavar="PATH", default=None,
                   help="timm's vit_large_patch14_dinov2.lvd142m weights file (default: the "
                        "Hugging Face hub, cached)")
    # Test only: tiny random feature networks, so that evaluation runs in seconds on a CPU.
    g.add_argument("--eval-standins-for-tests", action="store_true", help=argparse.SUPPRESS)
# fmt: on


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train SiT↓ / SiT with U-REPA or REPA.",
        formatter_class=DefaultsHelpFormatter,
    )
    for add in (
        add_model_args,
        add_alignment_args,
        add_data_args,
        add_optimization_args,
        add_precision_args,
        add_run_args,
        add_eval_args,
    ):
        add(parser)
    return parse_checked(parser, argv, validate_args)


def resolve_compile_update(args: argparse.Namespace) -> None:
    """--compile-update is refused with fp16."""
    if args.compile_update and args.mixed_precision == "fp16":
        raise ValueError(
            "--compile-update does not work with --mixed-precision fp16 (its loss scaler "
            "unscales and skips steps inside the optimiser's step): drop one of them"
        )


def validate_args(args: argparse.Namespace) -> None:
    """Checks between flags (each flag's own range is checked by its `type`); resolves
    --mixed-precision auto and --compile, so that checkpoints record what was actually used."""
    args.mixed_precision = resolve_precision(args.mixed_precision)
    resolve_speed_args(args, training=True)
    resolve_compile_update(args)
    if args.enc_type is None and args.proj_coeff == 0:
        args.enc_type = "none"
    if args.enc_type is not None:  # else once the dataset says which encoders it stores
        check_encoder_args(args)
    if args.enc_weights and args.encoder_mode != "online":
        raise ValueError(
            "--enc-weights is read only with --encoder-mode online: precomputed features come "
            "from the dataset (give the weights to preprocessing/prepare.py instead)"
        )
    if args.fsdp == "on" and args.mixed_precision == "fp16":
        raise ValueError(
            "--fsdp on does not work with --mixed-precision fp16 (its loss scaler does not know "
            "shards): use bf16, or --fsdp off"
        )
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
            f"--report-to {args.report_to} needs the {package} package, an optional extra: "
            f"pip install -r requirements-trackers.txt (or pip install {package}; or "
            "--report-to none)"
        )
    clashes = sorted(set(args.model_config) & set(FLAG_OF_MODEL_KWARG))
    if clashes:
        raise ValueError(
            "--model-config may not set "
            + ", ".join(f"{k} (set by {FLAG_OF_MODEL_KWARG[k]})" for k in clashes)
        )
    check_model_config(args.model, args.model_config)
    check_eval_settings(EvalSettings.from_flags(vars(args)), args.cfg_prob)


def check_encoder_args(args: argparse.Namespace) -> None:
    """Set `args.encoders` from --enc-type and check it against the flags that depend on it
    (ValueError); --resolution too once it is known."""
    args.encoders = encoder_list(args.enc_type)
    encoder_weights(args.enc_weights, args.encoders)
    for name in args.encoders if args.resolution is not None else []:
        check_resolution(name, args.resolution)
    if not args.encoders and args.proj_coeff > 0:
        raise ValueError("--enc-type none trains without alignment: it needs --proj-coeff 0")
    if args.encoders and args.proj_coeff == 0:
        raise ValueError(
            "--proj-coeff 0 switches alignment off: pass --enc-type none too, so that the model "
            "has no projector to leave untrained"
        )
    if args.encoder_mode == "online" and not args.encoders:
        raise ValueError("--encoder-mode online needs an encoder (--enc-type)")


def resolve_precision(mixed_precision: str) -> str:
    """--mixed-precision auto: bf16 where the GPU supports it, fp16 on older GPUs, no on CPUs."""
    if mixed_precision != "auto":
        return mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


#################################################################################
#                            Building the pieces                                #
#################################################################################


def take_from_dataset(args: argparse.Namespace, manifest: dict[str, Any]) -> None:
    """The flags not given that the dataset decides: --resolution, --enc-type (the encoder it
    stores) and --vae (the one that encoded it); a given flag that contradicts it is an error."""
    if args.resolution is None:
        args.resolution = manifest["resolution"]
    if args.enc_type is None:
        stored = stored_encoders(manifest)
        if args.encoder_mode == "online" or DEFAULT_ENCODER in stored or not stored:
            args.enc_type = DEFAULT_ENCODER
        elif len(stored) == 1:
            args.enc_type = stored[0]
        else:
            raise TrainingError(
                f"{args.data_dir} stores the features of {', '.join(stored)}: pass --enc-type "
                "to pick them"
            )
    try:
        check_encoder_args(args)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    encoded_by = manifest.get("settings", {}).get("vae")
    args.vae = resolve_vae(args.vae, encoded_by, f"{args.data_dir} was encoded")


def open_dataset(args: argparse.Namespace) -> LatentDataset:
    """The preprocessed dataset, with the features (or, online, the pixels) this run needs."""
    online = args.encoder_mode == "online"
    try:
        take_from_dataset(args, load_manifest(args.data_dir))
        dataset = LatentDataset(
            args.data_dir, encoders=[] if online else args.encoders, pixels=online
        )
    except DatasetError as err:  # missing, incomplete or corrupt: the message says what to do
        raise TrainingError(str(err)) from err
    if dataset.resolution != args.resolution:
        raise TrainingError(
            f"{args.data_dir} holds {dataset.resolution}-px data but --resolution is "
            f"{args.resolution}"
        )
    return dataset


def load_encoders(args: argparse.Namespace, device: torch.device) -> list[RepresentationEncoder]:
    """Online mode: the frozen encoders, run on the stored pixels in the loop."""
    if args.encoder_mode != "online":
        return []
    weights = encoder_weights(args.enc_weights, args.encoders)
    return [
        load_encoder(name, args.resolution, path, device)
        for name, path in zip(args.encoders, weights, strict=True)
    ]


#################################################################################
#                                     Main                                      #
#################################################################################


def setup(
    args: argparse.Namespace, accelerator: Accelerator, resume: str | None, logger: Any
) -> tuple[Trainer, Dataset]:
    """Data, encoders, model, EMA, optimiser, objective; then the checkpoint to resume, if any."""
    dataset = open_dataset(args)
    check_model_matches_data(args.model, dataset.captioned, args.data_dir)
    if dataset.captioned:  # in the checkpoints' flags: sample.py --prompts encodes with it
        args.text_encoder = dataset.manifest["captions"]["text_encoder"]
    check_eval_captions(EvalSettings.from_flags(vars(args)), dataset.captioned)
    try:
        plan = BatchPlan(
            len(dataset),
            args.batch_size,
            args.gradient_accumulation_steps,
            accelerator.num_processes,
            accelerator.process_index,
            args.seed,
        )
    except ValueError as err:  # the global batch does not split, or exceeds the dataset
        raise TrainingError(str(err)) from None
    model_settings = ModelSettings.from_flags(vars(args))
    device, processes = accelerator.device, accelerator.num_processes
    model = create_model(model_settings, dataset, dataset[0], device, processes)
    dataset_id = dataset_identity(dataset.manifest)
    ckpt = load_checkpoint(resume, verify=False) if resume else None  # verified by main
    if ckpt is not None:  # refuse before any state is touched
        data = {"dataset_size": plan.dataset_size, "dataset_id": dataset_id}
        for unchecked in check_resumable(
            ckpt, model.model_name, model.model_kwargs, vars(args), data
        ):
            logger.warning(unchecked)
        if (other_draws := draws_mismatch(ckpt["data"])) is not None:
            raise TrainingError(other_draws)
    encoders = load_encoders(args, accelerator.device)
    settings = TrainSettings.from_flags(vars(args))
    trainer = create_trainer(settings, accelerator, model, plan, encoders, dataset_id)
    if ckpt is not None:
        restore(trainer, ckpt, logger)
    return trainer, dataset


def describe(args: argparse.Namespace, trainer: Trainer, macs: int, resume: str | None) -> str:
    """The plan of the run, for the log and --dry-run."""
    acc, plan, model = trainer.accelerator, trainer.plan, trainer.raw
    epochs = args.max_train_steps / plan.steps_per_epoch
    inactive = args.mixed_precision != "no" and not acc.native_amp
    amp_note = f" (no autocast on {acc.device.type}: fp32)" if inactive else ""
    return "\n".join([
        f"model       {model.model_name}: {model.num_parameters() / 1e6:.4g} M parameters "
        f"({model.num_parameters(include_projectors=False) / 1e6:.4g} M without projectors), "
        f"{macs / 1e9:.4g} G MACs per image; alignment tap after block "
        f"{model.encoder_depth}",
        f"arguments   {json.dumps(model.model_kwargs)}",
        f"objective   {trainer.loss_fn}",
        f"encoders    {', '.join(args.encoders) or 'none'} ({args.encoder_mode})",
        f"data        {args.data_dir}: {plan.dataset_size} samples, {plan.steps_per_epoch} steps "
        "per epoch",
        f"batch       {args.batch_size} (global) = {acc.num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation steps × {plan.micro_batch}",
        f"steps       {trainer.step} → {args.max_train_steps} ({epochs:.2f} epochs)"
        + (f", resuming {resume}" if resume else ""),
        f"checkpoints every {args.checkpointing_steps} steps; {retention(args)}",
        f"precision   {args.mixed_precision}{amp_note}, TF32 {args.allow_tf32}, "
        f"compile {args.compile}, fused AdamW {args.fused_optimizer}, "
        f"compiled update {args.compile_update}, "
        f"attention {args.sdpa_backend}, "
        f"device {acc.device} × {acc.num_processes}",
        f"update      {SHARDING[trainer.sharded]}, EMA every {args.ema_every} step(s)",
    ])  # fmt: skip


SHARDING = {True: "sharded over the processes (FSDP2)", False: "whole on each process"}


def retention(args: argparse.Namespace) -> str:
    """Which checkpoints a run keeps, in words."""
    kept = f"the last {args.keep_last} kept"
    if not args.milestone_every:
        return f"{kept}; the final one with an EMA export (no milestones)"
    return f"{kept}, and every {args.milestone_every}th kept for good with an EMA export"


def plan_without_data(args: argparse.Namespace, accelerator: Accelerator, error: Exception) -> str:
    """--dry-run when the dataset cannot be opened: the model and the batch from the flags
    alone (ImageNet's 1000 classes assumed), and what is missing."""
    channels, factor = latent_geometry(args.vae or "ema")
    size, settings = args.resolution // factor, ModelSettings.from_flags(vars(args))
    kwargs = {"in_channels": channels, **model_arguments(settings, size, 1000)}
    if args.model in TEXT_TO_IMAGE_MODELS:  # CLIP ViT-L/14's captions, U-ViT's protocol
        kwargs = text_to_image_arguments(kwargs, CLIP_TEXT_DIM)
    with torch.device("meta"):
        model = build_model(args.model, **kwargs)
    macs = count_macs(model, model.latent_shape[-1], include_projectors=True)
    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    return "\n".join([
        f"data        cannot be opened: {error}",
        "            the plan below assumes ImageNet's 1000 classes at --resolution",
        f"model       {model.model_name}: {model.num_parameters() / 1e6:.4g} M parameters, "
        f"{macs / 1e9:.4g} G MACs per image; alignment tap after block {model.encoder_depth}",
        f"batch       {args.batch_size} (global) = {processes} processes × {accumulation} "
        f"accumulation steps × {args.batch_size // (processes * accumulation)}",
        f"steps       0 → {args.max_train_steps}; checkpoints every {args.checkpointing_steps} "
        f"steps; {retention(args)}",
    ])  # fmt: skip


def start_run_directory(args: argparse.Namespace, accelerator: Accelerator, logger: Any) -> None:
    """Main process: the run's folders, log.txt, args.json and the tracker."""
    run_dir = os.path.join(args.output_dir, args.exp_name)
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


def repair_run_directory(args: argparse.Namespace, step: int, logger: Any) -> None:
    """Main process, before anything is saved: clear up after a run that was killed. The
    temporary files of its interrupted saves go, the metrics of steps after `step` (run again
    now) go, damaged lines of metrics.jsonl and eval.jsonl go, and EMA exports lost between a
    checkpoint and its export are written again."""
    run_dir = os.path.join(args.output_dir, args.exp_name)
    for path in remove_interrupted_saves(run_dir):
        logger.info(f"removed {path}, left by a save that was interrupted")
    eval_log = os.path.join(run_dir, EVAL_FILE)
    if damaged := repair_jsonl(eval_log):
        logger.warning(f"{damaged_lines_note(eval_log, damaged)}; rewritten without them")
    dropped = keep_metrics_until(os.path.join(run_dir, "metrics.jsonl"), step)
    if dropped:
        logger.info(
            f"metrics.jsonl: removed {dropped} rows after step {step} (run again now) or damaged"
        )
    for path in write_missing_exports(run_dir, args.milestone_every, args.max_train_steps):
        logger.info(f"wrote the missing EMA export {path}")


def run_lock_path(run_dir: str) -> str:
    """exps/RUN -> exps/.RUN.lock: beside the run directory, so that a run that fails before its
    first write leaves the directory absent, and a race to create it is decided under the lock."""
    parent, name = os.path.split(os.path.normpath(run_dir))
    return os.path.join(parent, f".{name}.lock")


@contextmanager
def run_directory_lock(run_dir: str, accelerator: Accelerator, dry_run: bool) -> Iterator[None]:
    """One writer per run directory: the main process holds its lock while the run lives (a dry
    run writes nothing and takes none). A directory in use is refused on every process."""
    if dry_run:
        yield
        return
    with ExitStack() as held:
        advice = "wait for it to end, or choose another --exp-name"
        lock = exclusive_lock(run_lock_path(run_dir), run_dir, advice)
        decided_by_main(accelerator, lambda: held.enter_context(lock))
        yield


def decided_by_main(accelerator: Accelerator, decide: Callable[[], Any]) -> Any:
    """`decide()`'s result, computed on the main process and sent to every process; an expected
    failure there is raised on every process, so that none waits for the others."""
    outcome: list[Any] = [(None, None)]  # (result, error message)
    if accelerator.is_main_process:
        try:
            outcome = [(decide(), None)]
        except ReportedError as err:
            outcome = [(None, str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    result, error = outcome[0]
    if error is not None:
        raise TrainingError(error)
    return result


def preview_captions(args: argparse.Namespace, dataset: Any) -> tuple[Tensor, Tensor] | None:
    """A text-to-image run's preview captions (the first caption of the first images) and the
    empty caption's features; None for a class-conditional run."""
    if not dataset.captioned:
        return None
    count = min(args.preview_images, len(dataset))
    return dataset_contexts(dataset, torch.arange(count)), dataset.empty_context


def evaluation_of(
    args: argparse.Namespace, trainer: Trainer, vae: Any, run_dir: str, logger: Any
) -> PeriodicEvaluation | None:
    """--eval-every's evaluation of the trainer's EMA model (None when off)."""
    settings = EvalSettings.from_flags(vars(args))
    acc, ema = trainer.accelerator, trainer.ema
    return create_evaluation(settings, acc, ema, trainer.step, vae, run_dir, logger)


def main(args: argparse.Namespace, stop_hint: str | None = "continue with --resume auto") -> int:
    """Train; returns the exit code: 0, or EXIT_STOPPED when a signal stopped the run after its
    checkpoint, which the log says, followed by `stop_hint` (how to continue; None: the caller
    reports the stop itself)."""
    run_dir = os.path.join(args.output_dir, args.exp_name)
    accelerator = create_accelerator(args.mixed_precision, args.report_to, args.allow_tf32, run_dir)
    with run_directory_lock(run_dir, accelerator, args.dry_run):
        return train_into(args, accelerator, run_dir, stop_hint)


def train_into(
    args: argparse.Namespace, accelerator: Accelerator, run_dir: str, stop_hint: str | None
) -> int:
    """main's work, under the run directory's lock: what an earlier process left there is
    cleared only by the holder."""
    logger = create_logger(accelerator.is_main_process)
    # Checked against its SHA-256 by the main process (a damaged latest one passed over with
    # --resume auto), before anything is written; every process resumes the one it chose.
    resume = decided_by_main(accelerator, lambda: resume_checkpoint(run_dir, args.resume))
    if not args.dry_run:  # a dataset repository: downloaded and checked once, by the main process
        args.data_dir = decided_by_main(accelerator, lambda: local_dataset(args.data_dir))
    try:
        if args.dry_run and not os.path.isdir(args.data_dir):
            error = FileNotFoundError(f"no folder {args.data_dir} (--data-dir)")
            take_from_dataset(args, {"resolution": 256, "modalities": {}})  # ImageNet's
            logger.info(plan_without_data(args, accelerator, error))
            return 0
        trainer, dataset = setup(args, accelerator, resume, logger)
        model = trainer.raw  # forward MACs per image, projector included, for MFU
        macs = count_macs(model, model.latent_shape[-1], include_projectors=True)
        if args.dry_run:
            logger.info(describe(args, trainer, macs, resume))
            return 0
        # Every process samples for the evaluation; otherwise the main one decodes previews.
        wants_vae = accelerator.is_main_process or args.eval_every > 0
        vae = load_vae(args.vae, accelerator.device) if wants_vae else None
        evaluation = evaluation_of(args, trainer, vae, run_dir, logger)  # before any write
        if accelerator.is_main_process:
            start_run_directory(args, accelerator, logger)
            repair_run_directory(args, trainer.step, logger)
        accelerator.wait_for_everyone()
        logger.info(describe(args, trainer, macs, resume))
        if evaluation is not None:
            evaluation.catch_up(trainer.step)  # the resumed step's, if a kill interrupted it
        if trainer.step >= args.max_train_steps:
            logger.info(
                f"nothing to do: the run is at step {trainer.step} of {args.max_train_steps}"
            )
            return 0
        peak = peak_flops(
            accelerator.device, args.mixed_precision, args.allow_tf32, args.peak_tflops
        )
        monitor = Monitor(trainer, run_dir, logger, 6.0 * macs, peak)
        with sdpa_backend(args.sdpa_backend):
            evaluate = evaluation.maybe_run if evaluation is not None else None
            previews = Previews(trainer, vae, preview_captions(args, dataset))
            stopped = train(trainer, dataset, run_dir, previews, monitor, evaluate)
        if stopped:
            if stop_hint is not None:
                logger.info(f"stopped by a signal after step {trainer.step}, checkpoint saved: "
                            f"{stop_hint}")  # fmt: skip
            return EXIT_STOPPED
        logger.info(f"done: step {trainer.step}")
        return 0
    finally:
        accelerator.end_training()
        close_logger(logger)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

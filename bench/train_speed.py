"""Training speed of train.py's own step, our configuration beside REPA's protocol in one run.

    # one H100/H200: SiT↓-XL/2 + U-REPA, per-GPU batch 32, bf16 (ours) vs REPA's protocol
    python -m bench.train_speed
    # SiT-XL/2 + REPA (REPA's recipe: tap at block 8, no manifold term)
    python -m bench.train_speed --model SiT-XL/2 --encoder-depth 8 --manifold-coeff 0
    # each optimisation alone
    python -m bench.train_speed --configs ours,compile,fp16,no-fused-adamw,sdpa-flash,sdpa-cudnn
    # beside REPA's own step (SiT-XL/2, fp16), imported from a clone of its repository
    python -m bench.train_speed --configs ours --repa-src ../REPA
    # CPU smoke: a tiny SiT↓, the stand-in encoder, 64-px images
    python -m bench.train_speed --model SiTDown --resolution 64 --batch-size 8 \\
        --model-config '{"hidden_size": 64, "depths": [1, 2, 1], "num_heads": 2}' \\
        --enc-type dinov2-vit-tiny-random --steps 3 --rounds 2 --warmup 1

Flags other than this script's own go to train.py's parser, so every training flag applies;
`--batch-size` is then the per-device batch (one process). What runs is train.py's: the model,
EMA, AdamW and objective come from `model_setup.create_model` / `trainer.create_trainer`, each
step is `trainer.train_step` after `trainer.to_device` (the loop's copy from pinned memory), and
the metric bookkeeping is the loop's `trainer.Monitor` (one read per log interval, here one per
round of --steps).
The batch is synthetic (random latents, labels, features or pixels), made once: no dataset is
read. Online encoders get random weights of the real architecture (nothing is downloaded).

Printed per configuration: images/s (median over --rounds, with min and max), MFU = images/s × 3
× 2 × forward MACs ÷ peak (forward MACs as Table 2 counts them: projector excluded; peak from
--peak-tflops or the GPU's dense bf16/fp16 figure), peak memory, host synchronisations per step
between log intervals and per log, and the AdamW step, EMA update and clipping timed alone
(on random gradients) as shares of the step. "ours" also times the other AdamW kernel and REPA's
per-tensor EMA loop on the same parameters, which is what fused AdamW and the foreach EMA save.
With --repa-src, "repa-actual" is REPA's own step (`bench.repa`) on the same device and batch,
and the ratio of images/s ours / REPA is printed.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.state import AcceleratorState
from torch import Tensor

import train
from bench.common import (
    CUDA_ONLY,
    count_syncs,
    environment,
    fmt,
    median_spread,
    mfu,
    peak_memory_gib,
    pinned,
    random_encoder,
    report,
    reset_peak_memory,
    synchronize,
    time_calls,
    write_json,
)
from bench.repa import (
    add_repa_source_args,
    build_repa_model,
    build_repa_trainer,
    load_repa,
    repa_forward_macs,
    repa_train_step,
)
from models.layers import sdpa_backend
from models.summary import count_macs
from urepa.cli import nonnegative_int, positive_int, run_main
from urepa.data_plan import BatchPlan, StepDraws
from urepa.encoders import encoder_dim
from urepa.model_setup import create_model
from urepa.run_log import create_logger, peak_flops
from urepa.settings import ModelSettings, TrainSettings
from urepa.trainer import (
    Monitor,
    Trainer,
    compiled_gradient_check,
    create_accelerator,
    create_trainer,
    to_device,
    train_step,
    update_ema,
)
from urepa.utils import InputError
from urepa.vae import sample_latents

IMAGENET_TRAIN = 1_281_167  # dataset size for the data plan (only the epoch counter uses it)
DEFAULT_TRAIN_FLAGS = ["--batch-size", "32", "--mixed-precision", "bf16"]
REPA_PROTOCOL_FLAGS = ["--mixed-precision", "fp16", "--no-compile", "--encoder-mode", "online",
                       "--no-fused-optimizer", "--sdpa-backend", "auto"]  # fmt: skip

# name -> (train flags added after the user's, read the metrics every step as REPA, description)
CONFIGS: dict[str, tuple[list[str], bool, str]] = {
    "ours": (
        [],
        False,
        "the flags given (default bf16, fused AdamW, precomputed features, compiled where CUDA is)",
    ),
    "repa-protocol": (
        REPA_PROTOCOL_FLAGS,
        True,
        "REPA's protocol: fp16 autocast with loss scaling, eager, encoder run online on pixels, "
        "metrics read on the host every step, PyTorch's default AdamW (foreach on a GPU, its "
        "per-tensor loop on a CPU)",
    ),
    "compile": (["--compile"], False, "ours + torch.compile of the blocks and the loss"),
    "eager": (["--no-compile"], False, "ours without torch.compile"),
    "compile-update": (
        ["--compile-update"],
        False,
        "ours with clipping, AdamW and EMA compiled into one pass",
    ),  # fmt: skip
    "fp16": (["--mixed-precision", "fp16"], False, "ours with fp16 autocast + loss scaling"),
    "no-fused-adamw": (["--no-fused-optimizer"], False, "ours with PyTorch's default AdamW"),
    "online-encoder": (["--encoder-mode", "online"], False, "ours, encoder run online"),
    "log-every-step": ([], True, "ours, metrics read on the host every step (REPA's logging)"),
    **{
        f"sdpa-{name}": (["--sdpa-backend", name], False, f"ours, attention kernel {name} only")
        for name in ("flash", "efficient", "cudnn", "math")
    },
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other flag is train.py's (e.g. --model, --model-config, --batch-size).",
        allow_abbrev=False,
    )
    p.add_argument(
        "--configs",
        default="ours,repa-protocol",
        help=f"comma-separated (repeats allowed: ours,repa-protocol,ours,...), or 'all': "
        f"{', '.join(CONFIGS)}",
    )
    p.add_argument("--steps", type=positive_int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=nonnegative_int, default=5, help="untimed steps first")
    p.add_argument(
        "--sync-steps",
        type=positive_int,
        default=10,
        help="steps over which host syncs are counted (CUDA)",
    )
    p.add_argument(
        "--update-repeats",
        type=positive_int,
        default=10,
        help="timed repeats of the AdamW step / EMA update alone",
    )
    p.add_argument("--num-classes", type=positive_int, default=1000)
    add_repa_args(p)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench, train_argv = p.parse_known_args(argv)
    names = list(CONFIGS) if bench.configs == "all" else bench.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    bench.config_names = names
    return bench, train_argv  # fmt: skip


def add_repa_args(p: argparse.ArgumentParser) -> None:
    add_repa_source_args(p, "REPA's own training step (its models/sit.py, loss.py, update_ema) "
                         "on the same device and batch")  # fmt: skip
    p.add_argument(
        "--repa-precision",
        choices=["fp16", "bf16", "no"],
        default="fp16",
        help="REPA's --mixed-precision (its default: fp16)",
    )


# --------------------------------------------------------------------------------------------
# Building train.py's pieces without a dataset
# --------------------------------------------------------------------------------------------


def train_args(train_argv: list[str], extra: list[str]) -> argparse.Namespace:
    """train.py's flags: our defaults, then the user's, then the configuration's."""
    return train.parse_args(
        ["--data-dir", "synthetic", "--exp-name", "bench", *DEFAULT_TRAIN_FLAGS, *train_argv,
         *extra]
    )  # fmt: skip


def build_trainer(args: argparse.Namespace, num_classes: int, run_dir: str) -> Trainer:
    """Model, EMA, AdamW, objective (and online encoders) as train.py builds them."""
    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per configuration
    accelerator = create_accelerator(args.mixed_precision, args.report_to, args.allow_tf32, run_dir)
    # What a dataset would decide (synthetic data: ImageNet's 256 px unless --resolution).
    train.take_from_dataset(args, {"resolution": 256, "modalities": {}})
    latent = args.resolution // 8  # SD-VAE: 8× downsampling
    moments = {"shape": [8, latent, latent]}  # SD-VAE latents' mean and std
    dataset = SimpleNamespace(
        num_classes=num_classes, manifest={"modalities": {"moments": moments}}
    )
    settings = ModelSettings.from_flags(vars(args))
    model = create_model(settings, dataset, {"moments": torch.empty(8, latent, latent)})
    plan = BatchPlan(
        max(IMAGENET_TRAIN, args.batch_size),
        args.batch_size,
        args.gradient_accumulation_steps,
        accelerator.num_processes,
        accelerator.process_index,
        args.seed,
    )
    encoders = []
    if args.encoder_mode == "online":
        encoders = [random_encoder(e, args.resolution, accelerator.device) for e in args.encoders]
    return create_trainer(TrainSettings.from_flags(vars(args)), accelerator, model, plan, encoders)


def synthetic_batch(trainer: Trainer, num_classes: int) -> dict[str, Any]:
    """One micro-batch as the data loader yields it (CPU, pinned on a GPU machine)."""
    args, model, n = trainer.settings.flags, trainer.raw, trainer.plan.micro_batch
    shape = model.latent_shape
    g = torch.Generator().manual_seed(0)
    objective = trainer.settings.objective
    draws = StepDraws(objective.weighting, objective.path_type, objective.cfg_prob).draw(
        trainer.settings.schedule.seed, 0, n, shape
    )
    mean = torch.randn(n, *shape, generator=g)
    std = 0.1 + 0.5 * torch.rand(n, *shape, generator=g)
    batch: dict[str, Any] = {
        "x": sample_latents(torch.cat([mean, std], dim=1), noise=draws["eps"]),
        "y": torch.randint(num_classes, (n,), generator=g),
        "t": draws["t"],
        "noise": draws["noise"],
        "drop": draws["drop"],
        "indices": torch.arange(n),
        "step": 0,
    }
    if trainer.encoders:
        side = args["resolution"]
        batch["pixels"] = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    else:
        tokens = model.encoder_grid**2
        batch["features"] = [
            torch.randn(n, tokens, encoder_dim(e), generator=g).half() for e in args["encoders"]
        ]
    return pinned(batch, trainer.accelerator.device)


def forward_macs(model: Any) -> tuple[int, int]:
    """Forward MACs per image: (Table 2's count, projector excluded; with the projector)."""
    size = model.latent_shape[-1]
    return count_macs(model, size), count_macs(model, size, include_projectors=True)


def read_like_repa(trainer: Trainer, stats: dict[str, Tensor]) -> dict[str, float]:
    """REPA's loop reads its logs on the host every step: loss, projection loss and gradient
    norm, each gathered over processes and `.item()`-ed."""
    acc = trainer.accelerator
    return {k: acc.gather(stats[k]).mean().detach().item() for k in ("total", "repa", "grad_norm")}


@torch.no_grad()
def repa_ema_loop(ema_params: list[Tensor], params: list[Tensor], decay: float) -> None:
    """REPA's EMA: one multiply and one add per tensor (for comparison with `update_ema`)."""
    for e, p in zip(ema_params, params, strict=True):
        e.mul_(decay).add_(p, alpha=1 - decay)


def time_updates(trainer: Trainer, repeats: int, compare: bool) -> dict[str, float]:
    """Milliseconds of the AdamW step, the EMA update and the gradient clipping, each alone on
    random gradients (their cost does not depend on the values). Changes the weights."""
    device, params = trainer.accelerator.device, trainer.model_params
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    # AdamW itself, without accelerate's wrapper and its loss scaler
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    settings = trainer.settings.optimizer
    decay, max_norm = settings.ema_decay, settings.max_grad_norm

    def ms(fn: Callable[[], Any]) -> float:
        return 1e3 * time_calls(fn, device, repeats)

    out = {
        "adamw_step_ms": ms(inner.step),
        "ema_update_ms": ms(lambda: update_ema(trainer.ema_params, params, decay)),
        "clip_grad_ms": ms(lambda: torch.nn.utils.clip_grad_norm_(params, max_norm)),
    }
    if compare:
        other = not settings.fused_optimizer
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, fused=other or None)
        # not fused: PyTorch's default, foreach on a GPU and a loop over the tensors on a CPU
        out["adamw_fused_step_ms" if other else "adamw_default_step_ms"] = ms(optimizer.step)
        out["ema_per_tensor_loop_ms"] = ms(lambda: repa_ema_loop(trainer.ema_params, params, decay))
    for p in params:
        p.grad = None
    return out


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------


def time_steps(
    step: Callable[[], Any], log: Callable[[], Any], bench: argparse.Namespace, device: Any
) -> dict[str, Any]:
    """Warm-up, then --rounds of --steps steps (each round ends with the loop's log), then the
    host syncs of --sync-steps steps and of one log. Seconds per round, peak memory, syncs."""
    reset_peak_memory(device)
    for _ in range(bench.warmup):
        step()
    log()
    seconds = []
    for _ in range(bench.rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(bench.steps):
            step()
        log()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak_mem = peak_memory_gib(device)
    with count_syncs(device) as syncs:
        for _ in range(bench.sync_steps):
            step()
    synchronize(device)
    with count_syncs(device) as log_syncs:
        log()
    per_step = None if syncs.value is None else syncs.value / bench.sync_steps
    return {"seconds": seconds, "peak_mem_gib": peak_mem, "syncs_per_step": per_step,
            "syncs_per_log": log_syncs.value}  # fmt: skip


def measure(name: str, bench: argparse.Namespace, train_argv: list[str]) -> dict[str, Any]:
    """Time configuration `name` (CONFIGS) on train.py's own step; returns its figures."""
    extra, log_every_step, description = CONFIGS[name]
    args = train_args(train_argv, extra)
    run_dir = tempfile.mkdtemp(prefix="bench-train-")
    trainer = build_trainer(args, bench.num_classes, run_dir)
    device = trainer.accelerator.device
    batch = synthetic_batch(trainer, bench.num_classes)
    macs, macs_with_projector = forward_macs(trainer.raw)
    peak = peak_flops(device, args.mixed_precision, args.allow_tf32, args.peak_tflops)
    monitor = Monitor(trainer, run_dir, create_logger(False), 6.0 * macs_with_projector, peak)
    micro_batches = args.gradient_accumulation_steps

    def step() -> None:
        stats = train_step(trainer, [to_device(batch, device) for _ in range(micro_batches)])
        trainer.step += 1
        monitor.add(stats, trainer.step)
        if log_every_step:
            read_like_repa(trainer, stats)

    def log() -> None:  # the loop's log: one gather and one host read of the interval's means
        monitor.check_finite(None)
        monitor.log(trainer.step)

    trainer.model.train()
    with sdpa_backend(args.sdpa_backend):
        check = compile_check(trainer, [to_device(batch, device) for _ in range(micro_batches)])
        timings = time_steps(step, log, bench, device)
        updates = time_updates(trainer, bench.update_repeats, compare=name == "ours")

    rate, low, high = median_spread(
        [args.batch_size * bench.steps / s for s in timings.pop("seconds")]
    )
    step_ms = 1e3 * args.batch_size / rate
    return {
        "description": description,
        "model": args.model,
        "model_config": args.model_config,
        "batch_per_device": args.batch_size,
        "resolution": args.resolution,
        "precision": args.mixed_precision,
        "compile": args.compile,
        "fused_adamw": args.fused_optimizer,
        "sdpa_backend": args.sdpa_backend,
        "encoder_mode": args.encoder_mode,
        "encoders": args.encoders,
        "metrics_read": "every step" if log_every_step else f"every {bench.steps} steps",
        "forward_gmacs": macs / 1e9,
        "forward_gmacs_with_projector": macs_with_projector / 1e9,
        "images_per_sec": rate,
        "images_per_sec_min": low,
        "images_per_sec_max": high,
        "step_ms": step_ms,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": mfu(rate * 6.0 * macs, peak),
        **timings,
        **updates,
        "ema_opt_share": (updates["adamw_step_ms"] + updates["ema_update_ms"]) / step_ms,
        "compile_check": check,
    }


def compile_check(trainer: Trainer, micro_batches: list[dict[str, Any]]) -> str:
    """The verdict of the start-up check that compiled and eager gradients agree, run here as
    train.py runs it before its first step; "not compiled" or "not available" otherwise."""
    if not trainer.settings.speed.compile:
        return "not compiled"
    try:
        return compiled_gradient_check(trainer, micro_batches[0]).line()
    except Exception as err:  # the verdict is a figure of the run, not the end of it
        return f"failed: {type(err).__name__}: {err}"


def measure_repa(bench: argparse.Namespace, args: argparse.Namespace) -> dict[str, Any]:
    """REPA's own training step (bench.repa) on this device, batch and resolution."""
    code = load_repa(bench.repa_src)
    z_dim = encoder_dim(args.encoders[0])
    model = build_repa_model(code, bench.repa_model, bench.repa_model_config, args.resolution,
                             z_dim, fused_attn=True)  # fmt: skip
    macs = repa_forward_macs(model)
    tr = build_repa_trainer(code, model, args.batch_size, bench.repa_precision, args.resolution,
                            z_dim, cpu=_cpu_forced())  # fmt: skip
    device = tr.accelerator.device
    peak = peak_flops(device, bench.repa_precision, args.allow_tf32, args.peak_tflops)
    with sdpa_backend(args.sdpa_backend):
        timings = time_steps(lambda: repa_train_step(tr), lambda: None, bench, device)
        updates = time_repa_updates(tr, bench.update_repeats)
    rate, low, high = median_spread(
        [args.batch_size * bench.steps / s for s in timings.pop("seconds")]
    )
    step_ms = 1e3 * args.batch_size / rate
    return {
        "description": f"REPA's own step from {code.path} (models/sit.py, loss.py, update_ema; "
        "its DINOv2 replaced by precomputed random features, so REPA's time is a lower bound)",
        "model": f"REPA {bench.repa_model_config or bench.repa_model}",
        "model_config": None, "batch_per_device": args.batch_size,
        "resolution": args.resolution, "precision": bench.repa_precision, "compile": False,
        "fused_adamw": False, "sdpa_backend": args.sdpa_backend,
        "encoder_mode": "precomputed random features (REPA: DINOv2 online)",
        "encoders": args.encoders[:1], "metrics_read": "every step",
        "forward_gmacs": macs / 1e9, "forward_gmacs_with_projector": None,
        "images_per_sec": rate, "images_per_sec_min": low, "images_per_sec_max": high,
        "step_ms": step_ms, "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": mfu(rate * 6.0 * macs, peak), **timings, **updates,
        "ema_opt_share": (updates["adamw_step_ms"] + updates["ema_update_ms"]) / step_ms,
    }  # fmt: skip


def time_repa_updates(tr: Any, repeats: int) -> dict[str, float]:
    """REPA's AdamW step, its update_ema and clipping alone, on random gradients."""
    device, params = tr.accelerator.device, list(tr.model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    inner = getattr(tr.optimizer, "optimizer", tr.optimizer)

    def ms(fn: Callable[[], Any]) -> float:
        return 1e3 * time_calls(fn, device, repeats)

    out = {
        "adamw_step_ms": ms(inner.step),
        "ema_update_ms": ms(lambda: tr.code.update_ema(tr.ema, tr.model)),
        "clip_grad_ms": ms(lambda: torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)),
    }
    for p in params:
        p.grad = None
    return out


def show(name: str, r: dict[str, Any], bench: argparse.Namespace) -> None:
    peak = "n/a (unknown peak for this device: pass --peak-tflops)"
    rows = {
        "config": r["description"],
        "model": f"{r['model']} {r['model_config'] or ''}".strip(),
        "batch": f"{r['batch_per_device']} per device, {r['resolution']}px",
        "precision": r["precision"],
        "compile": r["compile"],
        "fused_adamw": r["fused_adamw"],
        "sdpa_backend": r["sdpa_backend"],
        "encoder": f"{','.join(r['encoders']) or 'none'} ({r['encoder_mode']})",
        "metrics_read": r["metrics_read"],
        "forward_gmacs": f"{fmt(r['forward_gmacs'])} per image (Table 2 convention; "
        f"{fmt(r['forward_gmacs_with_projector'])} with the projector)",
        "images_per_sec": f"{fmt(r['images_per_sec'])} (median of {bench.rounds} rounds of "
        f"{bench.steps} steps; min {fmt(r['images_per_sec_min'])}, "
        f"max {fmt(r['images_per_sec_max'])})",
        "step_ms": r["step_ms"],
        "mfu": peak if r["mfu"] is None else f"{r['mfu']:.3f} of {fmt(r['peak_tflops'])} TFLOP/s",
        "peak_mem_gib": CUDA_ONLY if r["peak_mem_gib"] is None else r["peak_mem_gib"],
        "syncs_per_step": CUDA_ONLY if r["syncs_per_step"] is None
        else f"{fmt(r['syncs_per_step'])} (over {bench.sync_steps} steps between logs)",
        "syncs_per_log": CUDA_ONLY if r["syncs_per_log"] is None else r["syncs_per_log"],
        "compile_check": r.get("compile_check", "n/a"),
    }  # fmt: skip
    for key in ("adamw_step_ms", "ema_update_ms", "clip_grad_ms", "adamw_fused_step_ms",
                "adamw_default_step_ms", "ema_per_tensor_loop_ms"):  # fmt: skip
        if key in r:
            rows[key] = f"{fmt(r[key])} (alone, median of {bench.update_repeats})"
    rows["ema_opt_share"] = f"{r['ema_opt_share']:.3f} of the step (AdamW step + EMA update)"
    report(f"training: {name}", rows)


def measure_one(key: str, run: Callable[[], dict[str, Any]], results: dict[str, Any],
                bench: argparse.Namespace, device: torch.device) -> None:  # fmt: skip
    """Measure one configuration into results["configs"][key]; a failure is reported, not
    fatal (e.g. an attention kernel that cannot run these inputs)."""
    try:
        r = run()
    except InputError:
        raise
    except Exception as err:
        results["configs"][key] = {"error": f"{type(err).__name__}: {err}"}
        print(f"\n== training: {key} ==\nfailed: {type(err).__name__}: {err}")
        return
    finally:
        gc.collect()  # the configuration's model and optimiser go before the next one's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["configs"][key] = r
    show(key, r, bench)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    bench, train_argv = parse_args(argv)
    first = train_args(train_argv, [])
    device = torch.device("cuda" if torch.cuda.is_available() and not _cpu_forced() else "cpu")
    env = environment(device)
    report("environment", {k: str(v) for k, v in env.items()})
    results: dict[str, Any] = {"environment": env, "train_args": vars(first), "configs": {}}
    for i, name in enumerate(bench.config_names):
        key = name if name not in bench.config_names[:i] else f"{name}#{i}"  # a repeat
        measure_one(key, partial(measure, name, bench, train_argv), results, bench, device)
    if bench.repa_src:
        measure_one("repa-actual", lambda: measure_repa(bench, first), results, bench, device)
    ours = results["configs"].get("ours", {})
    ratios = {
        f"ours/{name}": ours["images_per_sec"] / r["images_per_sec"]
        for name, r in results["configs"].items()
        if name != "ours" and "images_per_sec" in r and "images_per_sec" in ours
    }
    if ratios:
        report("ratios of images/s", {k: f"{v:.2f}x" for k, v in ratios.items()})
    results["ratios"] = ratios
    write_json(bench.json, results)
    return results


def _cpu_forced() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


if __name__ == "__main__":
    run_main(main)

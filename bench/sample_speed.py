"""Sampling speed of generate.py's own sampler, and bf16 against fp32 on the same noise.

    # one H100/H200: SiT↓-XL/2, SDE 250 steps, cfg 1.65 on t in [0, 0.7] (Table 4), bf16
    python -m bench.sample_speed
    # a trained checkpoint (real weights: the bf16-vs-fp32 difference then means something)
    python -m bench.sample_speed --ckpt exps/run/checkpoints/0400000.pt
    # beside REPA's own sampler (SiT-XL/2, its samplers.py, as its generate.py runs it)
    python -m bench.sample_speed --repa-src ../REPA
    # CPU smoke
    python -m bench.sample_speed --model SiTDown --resolution 64 --per-proc-batch-size 4 \\
        --model-config '{"hidden_size": 32, "depths": [1, 1, 1], "num_heads": 2}' \\
        --num-steps 4 --compare-samples 2

Flags other than this script's own go to generate.py's parser (defaults here: --preset
paper-main --precision bf16 --per-proc-batch-size 64), so --mode, --num-steps, --cfg-scale,
--precision, --compile, --sdpa-backend and --no-predraw-noise apply as they do there. What runs is
generate.py's: `sampling.generate_latents` (per-sample generators, the noise drawn in a background
thread, the projector heads skipped) on --batches + 1 batches; the first is dropped from the
timing (it waits for its own noise and pays for any compilation). VAE decoding and PNG writing
are not included. Without --ckpt the model has random weights, with its zero-initialised
AdaLN and output layers re-drawn so that the velocity is not zero.

Printed: samples/s, the forward passes actually run (a guided step runs 2N images), MFU =
forward images/s × 2 × forward MACs ÷ peak (Table 2's MACs: the projector is skipped), the time
for 50K samples on 8 such devices, host syncs per sampler step, peak memory, the same with the
noise drawn step by step, and max / mean / relative differences between bf16 and fp32 (and TF32)
outputs of the same samples. With --repa-src, REPA's own sampler and model on the same batch and
sampler settings (`bench.repa`), and the ratio of samples/s ours / REPA.
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial
from typing import Any

import torch
from torch import Tensor

import generate
from bench.common import (
    CUDA_ONLY,
    count_syncs,
    environment,
    fmt,
    median_spread,
    mfu,
    peak_memory_gib,
    report,
    reset_peak_memory,
    synchronize,
    write_json,
)
from bench.repa import (
    add_repa_source_args,
    build_repa_model,
    load_repa,
    nonzero_velocity,
    repa_forward_macs,
)
from models import build_model
from models.base import AlignedDiffusionTransformer
from models.layers import sdpa_backend
from models.summary import count_macs
from urepa import sampling
from urepa.checkpoints import load_model_for_sampling
from urepa.cli import json_object, model_name, positive_float, positive_int, run_main
from urepa.run_log import peak_flops
from urepa.settings import SamplerSettings, SamplingSpeed
from urepa.utils import init_distributed

DEFAULT_GENERATE_FLAGS = ["--preset", "paper-main", "--precision", "bf16",
                          "--per-proc-batch-size", "64", "--path-type", "linear"]  # fmt: skip
FID_SAMPLES, FID_DEVICES = 50_000, 8


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other flag is generate.py's (e.g. --num-steps, --precision, --compile).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model",
        type=model_name,
        default="SiTDown-XL/2",
        help="registry name, or SiT / SiTDown sized by --model-config",
    )
    parser.add_argument(
        "--model-config",
        type=json_object,
        default={},
        help="JSON object of further constructor arguments",
    )
    parser.add_argument(
        "--ckpt", default=None, help="a checkpoint to sample instead of random weights"
    )
    parser.add_argument(
        "--resolution", type=positive_int, default=256, help="image side (latents: /8)"
    )
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument(
        "--batches", type=positive_int, default=2, help="timed batches (after one untimed)"
    )
    parser.add_argument(
        "--compare-noise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the other way of drawing the SDE noise (--predraw-noise)",
    )
    parser.add_argument(
        "--compare-precision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample --compare-samples images in fp32, TF32 and bf16 and compare",
    )
    parser.add_argument("--compare-samples", type=positive_int, default=8)
    parser.add_argument(
        "--peak-tflops",
        type=positive_float,
        default=None,
        help="peak TFLOP/s of the device, for MFU (default: known GPUs, bf16)",
    )
    add_repa_args(parser)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench, rest = parser.parse_known_args(argv)
    args = generate.parse_args(["--ckpt", bench.ckpt or "random", "--sample-dir", "unused",
                                *DEFAULT_GENERATE_FLAGS, *rest])  # fmt: skip
    return bench, args


def add_repa_args(parser: argparse.ArgumentParser) -> None:
    add_repa_source_args(parser, "REPA's own sampler (its samplers.py and models/sit.py, as its "
                         "generate.py runs them) on the same batch")  # fmt: skip
    parser.add_argument(
        "--repa-fused-attn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="REPA's generate.py --fused-attn (its default: off, timm's unfused attention)",
    )


class CountingModel:
    """The sampling model, counting the images of every forward pass (a guided step runs 2N)."""

    def __init__(self, model: Any):
        self.model = model
        self.num_classes = model.num_classes
        self.images = 0
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Any:
        self.images += x.shape[0]
        self.calls += 1
        return self.model(x, t, y, **kwargs)


def benchmark_model(bench: argparse.Namespace, device: torch.device) -> AlignedDiffusionTransformer:
    """The checkpoint's EMA model, or random weights with a non-zero velocity."""
    if bench.ckpt:
        return load_model_for_sampling(bench.ckpt, device)
    kwargs = {"input_size": bench.resolution // 8, "num_classes": bench.num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(bench.model, **kwargs, **bench.model_config)
        for module in model.modules():  # AdaLN-Zero and the output layer start at zero
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                torch.nn.init.normal_(module.weight, std=0.02)
    return model.to(device).eval()


def sampler_of(args: argparse.Namespace) -> SamplerSettings:
    """generate.py's sampler settings from its flags."""
    return SamplerSettings.from_flags(vars(args))


def speed_of(args: argparse.Namespace) -> SamplingSpeed:
    """generate.py's sampling speed settings from its flags."""
    return SamplingSpeed.from_flags(vars(args))


def time_batches(
    model: AlignedDiffusionTransformer, args: argparse.Namespace, device: torch.device, n: int
) -> dict[str, Any]:
    """Sample n + 1 batches; time and count the last n."""
    counting = CountingModel(sampling.sampling_model(model, args.precision, speed_of(args)))
    size = args.per_proc_batch_size
    todo = list(range((n + 1) * size))
    seconds: list[float] = []
    images = calls = 0
    with sdpa_backend(args.sdpa_backend):
        batches = sampling.generate_latents(
            counting, model.latent_shape, todo, sampler_of(args), None, device
        )
        next(batches)  # untimed: compilation, first noise draw
        synchronize(device)
        reset_peak_memory(device)
        images, calls = counting.images, counting.calls
        start = time.perf_counter()
        for _ in batches:
            synchronize(device)
            now = time.perf_counter()
            seconds.append(now - start)
            start = now
    return {
        "seconds": seconds,
        "forward_images": counting.images - images,
        "forward_calls": counting.calls - calls,
    }


def count_step_syncs(model: AlignedDiffusionTransformer, args: argparse.Namespace,
                     device: torch.device) -> float | None:  # fmt: skip
    """Host syncs per sampler step over one short batch (CUDA only)."""
    short = copy.copy(args)
    short.num_steps = min(args.num_steps, 10)
    todo = list(range(args.per_proc_batch_size))
    inputs = sampling.draw_inputs(todo, sampler_of(short), None, model.num_classes,
                                  model.latent_shape, pin=device.type == "cuda")  # fmt: skip
    synchronize(device)
    with sdpa_backend(args.sdpa_backend), count_syncs(device) as syncs:
        sampling.sample_batch(model, inputs, sampler_of(short), device)
    return None if syncs.value is None else syncs.value / short.num_steps


def compare_precisions(
    model: AlignedDiffusionTransformer, args: argparse.Namespace, device: torch.device, n: int
) -> dict[str, float]:
    """The same n samples (seeds 0..n-1) in fp32, TF32 and bf16: differences of the latents."""
    outputs = {}
    for precision in ("fp32", "tf32", "bf16"):
        run = copy.copy(args)
        run.precision, run.per_proc_batch_size = precision, n
        sampling.set_precision(precision)
        with sdpa_backend(args.sdpa_backend):
            _, latents = next(sampling.generate_latents(
                model, model.latent_shape, list(range(n)), sampler_of(run), None, device
            ))  # fmt: skip
        outputs[precision] = latents.double().cpu()
    sampling.set_precision(args.precision)
    ref = outputs["fp32"]
    out: dict[str, float] = {"fp32_rms": ref.square().mean().sqrt().item()}
    for precision in ("tf32", "bf16"):
        diff = (outputs[precision] - ref).abs()
        out[f"{precision}_max_abs_diff"] = diff.max().item()
        out[f"{precision}_mean_abs_diff"] = diff.mean().item()
        out[f"{precision}_rel_l2"] = (diff.norm() / ref.norm()).item()
    return out


def time_repa_sampler(
    bench: argparse.Namespace, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """REPA's own sampler on REPA's SiT (random weights), as its generate.py runs it: fp32
    latents with TF32 matrix products (its --tf32 default), noise and labels drawn on the
    device, --repa-fused-attn; the same sampler settings and batch as ours."""
    code = load_repa(bench.repa_src)
    model = build_repa_model(code, bench.repa_model, bench.repa_model_config, bench.resolution,
                             768, fused_attn=bench.repa_fused_attn)  # fmt: skip
    macs = repa_forward_macs(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nonzero_velocity(model).to(device).eval()
    counting = CountingModel(model)
    sampler = code.samplers.euler_maruyama_sampler if args.mode == "sde" else partial(
        code.samplers.euler_sampler, heun=args.heun)  # fmt: skip
    n, size = args.per_proc_batch_size, model.x_embedder.img_size[0]
    sampling.set_precision("tf32")
    seconds, images = [], 0
    for k in range(bench.batches + 1):  # the first is untimed
        synchronize(device)
        start, before = time.perf_counter(), counting.images
        z = torch.randn(n, model.in_channels, size, size, device=device)
        y = torch.randint(0, 1000, (n,), device=device)
        with torch.no_grad():
            sampler(model=counting, latents=z, y=y, num_steps=args.num_steps,
                    cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                    guidance_high=args.guidance_high, path_type=args.path_type)  # fmt: skip
        synchronize(device)
        if k:
            seconds.append(time.perf_counter() - start)
            images += counting.images - before
    sampling.set_precision(args.precision)
    peak = peak_flops(device, "no", True, bench.peak_tflops)
    batch_s = median_spread(seconds)[0]
    return {"source": code.path, "precision": "tf32", "fused_attn": bench.repa_fused_attn,
            "forward_gmacs": macs / 1e9, "batch_seconds": batch_s,
            "samples_per_sec": n / batch_s, "forward_images_per_batch": images / len(seconds),
            "mfu": mfu(images / sum(seconds) * 2.0 * macs, peak)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    bench, args = parse_args(argv)
    rank, world, device = init_distributed()
    sampling.set_precision(args.precision)
    env = environment(device)
    report("environment", {k: str(v) for k, v in env.items()})
    model = benchmark_model(bench, device)
    macs = count_macs(model, model.latent_shape[-1])  # the projector heads are skipped
    precision = "bf16" if args.precision == "bf16" else "no"  # the peak of the units used
    peak = peak_flops(device, precision, args.precision == "tf32", bench.peak_tflops)

    timed = time_batches(model, args, device, bench.batches)
    peak_mem = peak_memory_gib(device)
    batch_s, low, high = median_spread(timed["seconds"])
    total_s = sum(timed["seconds"])
    samples_per_sec = args.per_proc_batch_size / batch_s
    forward_per_sec = timed["forward_images"] / total_s
    result: dict[str, Any] = {
        "model": model.model_name,
        "model_config": model.model_kwargs,
        "weights": bench.ckpt or "random",
        "mode": args.mode,
        "num_steps": args.num_steps,
        "cfg_scale": args.cfg_scale,
        "guidance_interval": [args.guidance_low, args.guidance_high],
        "batch_per_device": args.per_proc_batch_size,
        "precision": args.precision,
        "compile": args.compile,
        "sdpa_backend": args.sdpa_backend,
        "predraw_noise": args.predraw_noise,
        "forward_gmacs": macs / 1e9,
        "batch_seconds": batch_s,
        "batch_seconds_min": low,
        "batch_seconds_max": high,
        "samples_per_sec": samples_per_sec,
        "forward_images_per_batch": timed["forward_images"] / len(timed["seconds"]),
        "forward_calls_per_batch": timed["forward_calls"] / len(timed["seconds"]),
        "forward_images_per_sec": forward_per_sec,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": mfu(forward_per_sec * 2.0 * macs, peak),
        "minutes_for_50k_on_8": FID_SAMPLES / (FID_DEVICES * samples_per_sec) / 60,
        "peak_mem_gib": peak_mem,
        "syncs_per_step": count_step_syncs(model, args, device),
    }
    if bench.compare_noise and args.mode == "sde":
        other = copy.copy(args)
        other.predraw_noise = not args.predraw_noise
        seconds = time_batches(model, other, device, bench.batches)["seconds"]
        result["other_noise_batch_seconds"] = median_spread(seconds)[0]
        result["other_noise_syncs_per_step"] = count_step_syncs(model, other, device)
    if bench.compare_precision:
        result.update(compare_precisions(model, args, device, bench.compare_samples))
    if bench.repa_src:
        repa = time_repa_sampler(bench, args, device)
        result["repa"] = repa
        result["ratio_to_repa"] = samples_per_sec / repa["samples_per_sec"]
    show(result, bench)
    write_json(bench.json, {"environment": env, "sampling": result})
    return result


def show(r: dict[str, Any], bench: argparse.Namespace) -> None:
    peak = "n/a (unknown peak for this device: pass --peak-tflops)"
    low, high = fmt(r["batch_seconds_min"]), fmt(r["batch_seconds_max"])
    rows: dict[str, Any] = {
        "model": f"{r['model']} ({r['weights']} weights)",
        "sampler": f"{r['mode']} {r['num_steps']} steps, cfg {r['cfg_scale']} on "
        f"t in {r['guidance_interval']}",
        "batch": f"{r['batch_per_device']} per device",
        "precision": r["precision"],
        "compile": r["compile"],
        "sdpa_backend": r["sdpa_backend"],
        "predraw_noise": r["predraw_noise"],
        "forward_gmacs": f"{fmt(r['forward_gmacs'])} per image (Table 2 convention)",
        "batch_seconds": f"{fmt(r['batch_seconds'])} (median of {bench.batches}; "
        f"min {low}, max {high})",
        "samples_per_sec": r["samples_per_sec"],
        "forward_images": f"{fmt(r['forward_images_per_batch'])} per batch in "
        f"{fmt(r['forward_calls_per_batch'])} forward calls",
        "forward_images_per_sec": r["forward_images_per_sec"],
        "mfu": peak if r["mfu"] is None else f"{r['mfu']:.3f} of {fmt(r['peak_tflops'])} TFLOP/s",
        "minutes_for_50k_on_8": f"{fmt(r['minutes_for_50k_on_8'])} (sampling only: no VAE "
        "decoding, no PNGs)",
        "peak_mem_gib": CUDA_ONLY if r["peak_mem_gib"] is None else r["peak_mem_gib"],
        "syncs_per_step": CUDA_ONLY if r["syncs_per_step"] is None else r["syncs_per_step"],
    }
    if "other_noise_batch_seconds" in r:
        other = "step by step" if r["predraw_noise"] else "pre-drawn"
        syncs = r["other_noise_syncs_per_step"]
        rows["other_noise_batch_seconds"] = (
            f"{fmt(r['other_noise_batch_seconds'])} (SDE noise drawn {other}; syncs per step "
            f"{CUDA_ONLY if syncs is None else fmt(syncs)})"
        )
    if "bf16_max_abs_diff" in r:
        for precision in ("tf32", "bf16"):
            rows[f"{precision}_vs_fp32"] = (
                f"max abs {fmt(r[f'{precision}_max_abs_diff'])}, mean abs "
                f"{fmt(r[f'{precision}_mean_abs_diff'])}, relative L2 "
                f"{fmt(r[f'{precision}_rel_l2'])} (latents of {bench.compare_samples} samples, "
                f"fp32 RMS {fmt(r['fp32_rms'])})"
            )
    report("sampling", rows)
    if "repa" in r:
        repa = r["repa"]
        report("sampling: repa-actual", {
            "source": f"{repa['source']} (samplers.py, models/sit.py)",
            "precision": f"{repa['precision']}, fused_attn {repa['fused_attn']}",
            "forward_gmacs": repa["forward_gmacs"],
            "batch_seconds": repa["batch_seconds"],
            "samples_per_sec": repa["samples_per_sec"],
            "forward_images": repa["forward_images_per_batch"],
            "mfu": "n/a" if repa["mfu"] is None else f"{repa['mfu']:.3f}",
            "ratio_ours_to_repa": f"{r['ratio_to_repa']:.2f}x (samples/s)",
        })  # fmt: skip


if __name__ == "__main__":
    run_main(main)

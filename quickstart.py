"""Quickstart: the whole U-REPA pipeline on a toy dataset, on a CPU or one GPU.

    python quickstart.py          # 1,200 steps (minutes on an idle CPU); a GPU is used if present
    python quickstart.py --fast   # 6 steps: checks the plumbing only

1. draws the toy dataset (`urepa/toy_shapes.py`: ten classes of coloured shapes, 3,000 images);
2. `preprocessing/prepare.py`: "latents" and representation-encoder features;
3. `train.py`: a small SiT↓ with U-REPA (tap in the middle stage, manifold loss w = 3),
   checkpointed;
4. `generate.py`: the ODE sampler (the ablation preset: Euler 50 steps, cfg 1.8 on [0, 0.7]) and
   the SDE sampler (the paper-main preset: Euler-Maruyama 250 steps, cfg 1.65 on [0, 0.7]);
5. evaluation: does each sample show its class's shape and colour (`toy_shapes.measure`); FID
   with `evaluations/` when the Inception weights are available and a GPU is used (or --fid);
6. writes `samples.png` (one row per class), `training_curve.png` and `metrics.json` to --out.

Every stage calls the repository's own entry point and prints the command that does the same
by hand. The pretrained SD-VAE and DINOv2-S are used when they can be fetched (or are cached):
64-px images, 8×8×4 latents, patch 2, a 2×2 middle stage upsampled to DINOv2's 4×4 grid.
Otherwise the run says so and uses stand-ins: pixel space instead of the SD-VAE (`--vae
pixels-2x`: the 64-px images pooled to 32×32, in 8×8 patches: the same 4×4 tokens and 2×2 middle
stage, upsampled to the encoder's 4×4 grid) and a tiny random ViT instead of DINOv2 (the
alignment targets are then random features of the image). Re-running the same command resumes;
Ctrl-C stops it cleanly (training saves a checkpoint first); use a new --out for another
configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import generate
import train
from preprocessing import prepare
from urepa import toy_shapes
from urepa.cli import DefaultsHelpFormatter, add_debug_arg, run_main
from urepa.encoders import ENCODER_STANDIN, load_encoder
from urepa.utils import EXIT_STOPPED, InputError, ReportedError, RunStopped
from urepa.vae import VAE_PIXELS_2X, load_vae

EXP_NAME = "toy-sitdown-urepa"
VAE_PRETRAINED, ENCODER_PRETRAINED = "ema", "dinov2-vit-s"
# What `toy_shapes.measure` reads in a sample, and the colour of its frame in samples.png.
VERDICT_CLASS, VERDICT_OTHER, VERDICT_NO_SHAPE = "its class", "another class", "no shape"
FRAME_COLOURS = {VERDICT_CLASS: (40, 170, 60), VERDICT_OTHER: (215, 40, 40),
                 VERDICT_NO_SHAPE: (150, 150, 150)}  # fmt: skip
SAMPLERS = {  # name: (generate.py preset, description)
    "ode": ("ablation", "ODE: Euler 50 steps, cfg 1.8 on t in [0, 0.7] (Tables 5-10)"),
    "sde": ("paper-main", "SDE: Euler-Maruyama 250 steps, cfg 1.65 on t in [0, 0.7] (Table 4)"),
}


@dataclass(frozen=True)
class Config:
    images_per_class: int  # training images
    steps: int  # optimiser steps
    batch_size: int
    samples_per_class: int  # per sampler, for the measurement
    grid_columns: int  # samples per class and sampler in samples.png
    learning_rate: float = 1e-3  # REPA's 1e-4 is for 400K steps; a few hundred need more
    ema_decay: float = 0.99  # REPA's 0.9999 averages over 10K steps, longer than this run


FULL = Config(images_per_class=300, steps=1200, batch_size=64, samples_per_class=10,
              grid_columns=6)  # fmt: skip
FAST = Config(images_per_class=8, steps=6, batch_size=16, samples_per_class=2, grid_columns=2)


@dataclass
class Networks:
    """The frozen networks the run uses, and what choosing them means for the result."""

    vae: str
    encoder: str
    notes: list[str] = field(default_factory=list)

    @property
    def stand_ins(self) -> bool:
        return self.vae == VAE_PIXELS_2X or self.encoder == ENCODER_STANDIN

    resolution = 64  # px: SD-VAE 8×8 latents, or pixels-2x 32×32 "latents"

    def model_config(self) -> dict[str, Any]:
        """Constructor arguments of the small SiT↓; train.py takes the rest from the flags and
        the data: the latent channels, the encoder's grid (4×4 at 64 px) and the patch that
        gives one token per encoder patch (2 for SD-VAE latents; 8 for pixels-2x, 4×4 tokens
        of 192 numbers, no more than the width, or the velocity would lose dimensions). Both
        give a 2×2 middle stage, upsampled ×2 to the encoder's grid as with SD-VAE and DINOv2
        at 256 px."""
        return dict(hidden_size=192, depths=[2, 2, 2], num_heads=4, projector_dim=256)


# fmt: off
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    p.add_argument("--out", default="quickstart-out", help="output folder (re-run to resume)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {FULL.steps}; --fast: {FAST.steps})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU when there is one")
    p.add_argument("--fast", action="store_true",
                   help="a tiny configuration (80 images, 6 steps): checks the plumbing only")
    p.add_argument("--weights", choices=["auto", "pretrained", "stand-in"], default="auto",
                   help="auto: SD-VAE and DINOv2-S if they can be fetched, else stand-ins")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=None,
                   help="FID etc. with evaluations/ (needs the Inception weights); default: on "
                        "with a GPU, off on a CPU, where it takes minutes")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth for --fid, where it cannot be "
                        "downloaded (default: the torch hub cache, downloaded on first use)")
    add_debug_arg(p)
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be at least 2")
    return args
# fmt: on


# --------------------------------------------------------------------------------------------
# Environment: device, network, pretrained weights
# --------------------------------------------------------------------------------------------


@contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration of the run, then restore them."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def device_environment(device: str) -> dict[str, str]:
    """Variables that make every stage run on `device` (entry points pick CUDA when visible)."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    return {}


def reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def try_load(load: Callable[[], Any]) -> str | None:
    """None if `load()` works, else why not (the error's first sentence)."""
    try:
        load()
        return None
    except (RuntimeError, OSError, ValueError) as err:
        return str(err).split(". ")[0]


def pick_networks(choice: str) -> Networks:
    """The pretrained SD-VAE and DINOv2-S if they load (from the cache or the hub), else the
    stand-ins, saying what that means."""
    if choice == "stand-in":
        failures = ["--weights stand-in"]
    else:
        failures = []
        if not reachable("huggingface.co"):  # the local cache only: fail fast, do not retry
            failures.append("huggingface.co cannot be reached")
            os.environ["HF_HUB_OFFLINE"] = "1"
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True
        vae_error = try_load(lambda: load_vae(VAE_PRETRAINED))
        encoder_error = try_load(lambda: load_encoder(ENCODER_PRETRAINED, 64))
        if vae_error is None and encoder_error is None:
            return Networks(VAE_PRETRAINED, ENCODER_PRETRAINED)
        failures += [e for e in (vae_error, encoder_error) if e]
        if choice == "pretrained":
            raise ReportedError("--weights pretrained, but " + "; ".join(failures))
    notes = [
        "STAND-INS: the pretrained SD-VAE and DINOv2 are not used (" + "; ".join(failures) + ").",
        "  * SD-VAE -> pixel space at half the resolution (--vae pixels-2x): the model denoises "
        "the 64-px images pooled to 32x32 in 8x8 patches (the 4x4 tokens SD-VAE + patch 2 give "
        "at 64 px); samples are real images. The projector upsamples the 2x2 middle stage to "
        "the encoder's 4x4 grid, as with SD-VAE and DINOv2.",
        "  * DINOv2 -> a tiny randomly initialised ViT (dinov2-vit-tiny-random): the alignment "
        "targets are random features of the image, not DINOv2's semantics.",
        "  The pipeline is the real one; the numbers say whether it works, not what U-REPA "
        "gains, and are not comparable to the paper's.",
    ]
    return Networks(VAE_PIXELS_2X, ENCODER_STANDIN, notes)


# --------------------------------------------------------------------------------------------
# The stages: each an entry point of the repository, with the command that runs it by hand
# --------------------------------------------------------------------------------------------


def stage(title: str, command: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ {command} {shlex.join(argv)}", flush=True)


def prepare_argv(images: str, data: str, net: Networks) -> list[str]:
    return ["--source", images, "--dest", data, "--resolution", str(net.resolution),
            "--vae", net.vae, "--enc-type", net.encoder, "--shard-size", "1000",
            "--batch-size", "100", "--num-workers", "0"]  # fmt: skip


def train_argv(data: str, out: str, net: Networks, cfg: Config, cuda: bool) -> list[str]:
    return [
        "--data-dir", data, "--output-dir", out, "--exp-name", EXP_NAME, "--resume", "auto",
        "--model", "SiTDown", "--model-config", json.dumps(net.model_config()),
        "--batch-size", str(cfg.batch_size), "--max-train-steps", str(cfg.steps),
        "--learning-rate", str(cfg.learning_rate), "--ema-decay", str(cfg.ema_decay),
        "--checkpointing-steps", str(cfg.steps // 2), "--milestone-every", "0",
        "--sampling-steps", "0", "--log-every", str(max(1, cfg.steps // 100)),
        "--num-workers", "2" if cuda else "0", "--mixed-precision", "bf16" if cuda else "no",
    ]  # fmt: skip


def generate_argv(ckpt: str, sample_dir: str, preset: str, n: int) -> list[str]:
    """generate.py's flags: the VAE is the one the checkpoint was trained with."""
    return ["--ckpt", ckpt, "--sample-dir", sample_dir, "--preset", preset,
            "--num-fid-samples", str(n), "--label-sampling", "balanced",
            "--per-proc-batch-size", str(min(n, 100))]  # fmt: skip


def inception_weights(args: argparse.Namespace, device: str) -> tuple[str | None, str]:
    """(the Inception weights file FID needs, or None; why not), found before any work: asked
    for (--fid, --inception-weights) and unavailable is an error, by default a skip."""
    if not (args.fid if args.fid is not None else device == "cuda"):
        return None, "off on a CPU; --fid computes it"
    from evaluations.inception import fetch_weights

    try:
        return str(fetch_weights(args.inception_weights)), ""
    except (RuntimeError, OSError) as err:
        if args.fid or args.inception_weights is not None:
            raise ReportedError(f"--fid: no Inception weights: {err}") from err
        return None, f"no Inception weights ({err}); pass --inception-weights PATH"


def fid_metrics(
    images: str, npz: dict[str, str], out: str, resolution: int, weights: str
) -> dict[str, Any]:
    """evaluations/: a reference from the training images, then each sampler's metrics."""
    from evaluations import evaluator, make_reference

    ref = os.path.join(out, "reference.npz")
    argv = ["--source", images, "--out", ref, "--resolution", str(resolution),
            "--inception-weights", weights]  # fmt: skip
    stage("Reference statistics for FID", "python evaluations/make_reference.py", argv)
    make_reference.main(argv)
    results: dict[str, Any] = {}
    for name, path in npz.items():
        argv = [ref, path, "--json", os.path.join(out, f"fid-{name}.json"),
                "--inception-weights", weights]  # fmt: skip
        stage(f"FID etc. of the {name.upper()} samples", "python evaluations/evaluator.py", argv)
        results[name] = evaluator.main(argv)
    return results


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def sample_grid(path: str, images: str, samples: dict[str, Samples], k: int) -> None:
    """One row per class: a training image, then k samples of each sampler; a sample's frame is
    green when `toy_shapes.measure` reads its class, red when it reads another, grey when it
    reads no shape."""
    show = 64  # smaller images are enlarged (nearest neighbour)
    cell, pad, left, top = show + 6, 6, 130, 40
    blocks = 1 + len(samples) * k
    width = left + blocks * cell + len(samples) * pad
    canvas = Image.new("RGB", (width, top + toy_shapes.NUM_CLASSES * cell + 24), "white")
    draw, small = ImageDraw.Draw(canvas), font(12)
    draw.text((left, 8), "training\nimage", fill="black", font=small)
    x0 = left + cell + pad
    for name, _ in samples.items():
        draw.text((x0, 8), SAMPLERS[name][1].split(" (")[0].replace(", ", "\n", 1), "black", small)
        x0 += k * cell + pad
    for label in range(toy_shapes.NUM_CLASSES):
        y = top + label * cell
        draw.text(
            (6, y + cell // 2 - 7), f"{label}: {toy_shapes.class_name(label)}", "black", small
        )
        with Image.open(os.path.join(images, toy_shapes.folder_name(label), "00000.png")) as f:
            real = f.convert("RGB")
        canvas.paste(real.resize((show, show), Image.Resampling.NEAREST), (left + 3, y + 3))
        x0 = left + cell + pad
        for s in samples.values():
            picks = np.flatnonzero(s.labels == label)[:k]
            for j, i in enumerate(picks):
                x = x0 + j * cell
                colour = FRAME_COLOURS[s.verdicts[i]]
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
                canvas.paste(
                    Image.fromarray(s.pixels[i]).resize((show, show), Image.Resampling.NEAREST),
                    (x + 3, y + 3),
                )
            x0 += k * cell + pad
    legend = ("frame (toy_shapes.measure): green = shows its class's shape and colour, red = "
              "another class, grey = no recognisable shape")  # fmt: skip
    draw.text((6, top + toy_shapes.NUM_CLASSES * cell + 6), legend, "black", small)
    canvas.save(path)


def training_curve(path: str, records: list[dict[str, Any]]) -> None:
    """Loss terms and the alignment's token cosine similarity against the step (PIL only)."""
    panels = [
        ("loss (Eq. 5)", ["total", "velocity"]),
        ("manifold loss L_ML", ["manifold"]),
        ("token cosine similarity", ["cos_sim"]),
    ]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    w, h, margin = 300, 220, 48
    canvas = Image.new("RGB", (w * len(panels), h + 30), "white")
    draw, small = ImageDraw.Draw(canvas), font(11)
    steps = [r["step"] for r in records]
    for p, (title, keys) in enumerate(panels):
        x0, x1, y0, y1 = p * w + margin, (p + 1) * w - 12, 40, h - 24
        values = [r[k] for r in records for k in keys if k in r]
        if not values:
            continue
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        draw.text((x0, 6), title, "black", font(13))
        draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
        for frac in (0.0, 0.5, 1.0):
            y = y1 - frac * (y1 - y0)
            draw.text((p * w + 2, y - 6), f"{lo + frac * (hi - lo):.3g}", "black", small)
        draw.text((x0, y1 + 4), "0", "black", small)
        draw.text((x1 - 40, y1 + 4), f"step {max(steps)}", "black", small)
        for k, (key, colour) in enumerate(zip(keys, colours, strict=False)):
            points = [
                (
                    x0 + (x1 - x0) * r["step"] / max(steps),
                    y1 - (y1 - y0) * (r[key] - lo) / (hi - lo),
                )
                for r in records
                if key in r
            ]
            draw.line(points, fill=colour, width=2)
            draw.text((x0 + 70 * k, y0 - 15), key, colour, small)
    canvas.save(path)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    args.command = shlex.join(["python", "quickstart.py", *words])  # what continues this run
    cfg = FAST if args.fast else FULL
    if args.steps is not None:
        cfg = Config(**{**asdict(cfg), "steps": args.steps})
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: PyTorch sees no GPU; use --device cpu")
    with environment(**device_environment(device)):
        try:
            return run(args, cfg, device)
        except KeyboardInterrupt:  # in preparation or sampling, which both resume
            raise RunStopped(f"interrupted: re-run {args.command} to continue") from None


def run(args: argparse.Namespace, cfg: Config, device: str) -> dict[str, Any]:
    """Data -> preprocessing -> training -> sampling -> measurement -> figures and metrics."""
    clock = Clock()
    out = args.out
    print(f"U-REPA quickstart: {'--fast, ' if args.fast else ''}{cfg}, device {device}")
    net = pick_networks(args.weights)
    weights, why_no_fid = inception_weights(args, device)  # before the minutes of work
    print("\n".join(net.notes) or f"pretrained weights: --vae {net.vae}, --enc-type {net.encoder}")
    clock.lap("networks")  # reaching the hub, loading or giving up on the pretrained networks
    ckpt = prepare_and_train(out, net, cfg, device, clock, args.command)

    samples = {name: sample(name, ckpt, out, cfg) for name in SAMPLERS}
    clock.lap("generate")
    npz = {name: s.npz for name, s in samples.items()}
    images = os.path.join(out, "images")
    fid = (
        fid_metrics(images, npz, out, net.resolution, weights)
        if weights
        else {"skipped": why_no_fid}
    )
    clock.lap("evaluate")

    paths, log = draw_figures(out, ckpt, samples, cfg)
    clock.lap("figures")
    record = {
        "comparable_to_paper": False,
        "networks": {
            "vae": net.vae,
            "encoder": net.encoder,
            "stand_ins": net.stand_ins,
            "notes": net.notes,
        },  # fmt: skip
        "config": asdict(cfg),
        "device": device,
        "agreement": {name: s.agreement for name, s in samples.items()},
        "agreement_on_fresh_images": measurement_ceiling(net.resolution),
        "agreement_on_noise": measurement_floor(net.resolution),
        "agreement_chance": {"class": 0.1, "shape": 0.2, "colour": 0.2},
        "fid": fid,
        "last_training_log": log[-1],
        "times_s": clock.laps,
        "outputs": paths,
    }
    record["times_s_earlier_runs"] = earlier_times(paths["metrics"])
    with open(paths["metrics"], "w") as f:
        json.dump(record, f, indent=2)
    report(record)
    return record


def earlier_times(metrics_path: str) -> list[dict[str, float]]:
    """The stage times of the runs before this one (a re-run resumes, and its own times are
    those of the work left), from their metrics.json."""
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        earlier = json.load(f)
    return [*earlier.get("times_s_earlier_runs", []), earlier["times_s"]]


def prepare_and_train(
    out: str, net: Networks, cfg: Config, device: str, clock: Clock, command: str
) -> str:
    """The toy dataset, prepare.py on it, then train.py; returns the final checkpoint's path.
    Stopped by a signal, training saves a checkpoint and this says, in one line, that
    `command` (the quickstart's own) continues."""
    images, data, exps = (os.path.join(out, d) for d in ("images", "data", "exps"))
    count = toy_shapes.write_dataset(images, cfg.images_per_class, net.resolution)
    print(f"\n=== Toy dataset: {count} images of {toy_shapes.NUM_CLASSES} classes in {images}")
    clock.lap("dataset")
    argv = prepare_argv(images, data, net)
    stage("Preprocessing", "python preprocessing/prepare.py", argv)
    prepare.main(prepare.parse_args(argv))
    clock.lap("prepare")

    argv = train_argv(data, exps, net, cfg, device == "cuda")
    env = "ACCELERATE_USE_CPU=1 " if device == "cpu" else ""
    stage(f"Training ({cfg.steps} steps)", f"{env}python train.py", argv)
    if train.main(train.parse_args(argv), stop_hint=None) == EXIT_STOPPED:
        raise RunStopped(
            f"training stopped by a signal, its checkpoint saved: re-run {command} to continue"
        )
    clock.lap("train")
    return os.path.join(exps, EXP_NAME, "checkpoints", f"{cfg.steps:07d}.pt")


def draw_figures(
    out: str, ckpt: str, samples: dict[str, Samples], cfg: Config
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """samples.png and training_curve.png; returns the output paths and the training log."""
    run_dir = os.path.join(out, "exps", EXP_NAME)
    paths = {
        "samples": os.path.join(out, "samples.png"),
        "training_curve": os.path.join(out, "training_curve.png"),
        "metrics": os.path.join(out, "metrics.json"),
        "checkpoint": ckpt,
        "log": os.path.join(run_dir, "log.txt"),
    }
    sample_grid(paths["samples"], os.path.join(out, "images"), samples, cfg.grid_columns)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f]
    training_curve(paths["training_curve"], log)
    return paths, log


class Clock:
    """Seconds per stage, and in total."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 1)
        self.laps["total"] = round(now - self.start, 1)
        self.last = now


@dataclass
class Samples:
    """One sampler's images, the labels they were drawn for, and what `measure` reads."""

    npz: str
    pixels: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,)
    verdicts: list[str]  # VERDICT_*, per image
    agreement: dict[str, Any]


def sample(name: str, ckpt: str, out: str, cfg: Config) -> Samples:
    """generate.py with sampler `name`, then the shape/colour measurement of its images."""
    preset, description = SAMPLERS[name]
    n = cfg.samples_per_class * toy_shapes.NUM_CLASSES
    sample_dir = os.path.join(out, "samples", f"{name}-{cfg.steps:07d}")
    argv = generate_argv(ckpt, sample_dir, preset, n)
    stage(f"Sampling, {description}", "python generate.py", argv)
    generate.main(generate.parse_args(argv))
    with np.load(f"{sample_dir}.npz") as f:
        pixels = f["arr_0"]
    labels = generate.balanced_labels(n, toy_shapes.NUM_CLASSES, 0).numpy()  # --global-seed 0
    agreement = toy_shapes.agreement(pixels, labels)
    verdicts = [
        VERDICT_NO_SHAPE if not seen else VERDICT_CLASS if right else VERDICT_OTHER
        for right, seen in zip(agreement.pop("correct"), agreement.pop("recognised"), strict=True)
    ]
    return Samples(f"{sample_dir}.npz", pixels, labels, verdicts, agreement)


def measured(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """`toy_shapes.agreement` without its per-image lists."""
    result = toy_shapes.agreement(images, labels)
    for per_image in ("correct", "recognised"):
        result.pop(per_image)
    return result


def measurement_ceiling(resolution: int, per_class: int = 20) -> dict[str, Any]:
    """The measurement on freshly drawn images (never trained on): a perfect generator's score."""
    labels = np.repeat(np.arange(toy_shapes.NUM_CLASSES), per_class)
    images = np.stack(
        [toy_shapes.draw(int(k), i, resolution, seed=1) for i, k in enumerate(labels)]
    )
    return measured(images, labels)


def measurement_floor(resolution: int, per_class: int = 20) -> dict[str, Any]:
    """The measurement on uniform noise: what a generator that learned nothing scores (0: noise
    shows no shape, below chance)."""
    labels = np.repeat(np.arange(toy_shapes.NUM_CLASSES), per_class)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (len(labels), resolution, resolution, 3), dtype=np.uint8)
    return measured(noise, labels)


def report(record: dict[str, Any]) -> None:
    print(f"\n=== Done in {record['times_s']['total'] / 60:.1f} min ({record['times_s']})")
    for note in record["networks"]["notes"]:
        print(note)
    print("\nDo the samples show their class's shape and colour? (toy_shapes.measure)")
    rows = [(SAMPLERS[k][1], v) for k, v in record["agreement"].items()]
    rows += [("fresh images drawn like the training set (the ceiling)",
              record["agreement_on_fresh_images"]),
             ("chance (labels drawn at random)", record["agreement_chance"]),
             ("uniform noise (the floor: no shape)", record["agreement_on_noise"])]  # fmt: skip
    width = max(len(title) for title, _ in rows) + 2
    print(f"  {'':<{width}}{'class':>7}{'shape':>7}{'colour':>7}")
    for title, a in rows:
        print(f"  {title:<{width}}{a['class']:>7.3f}{a['shape']:>7.3f}{a['colour']:>7.3f}")
    fid = record["fid"]
    if "skipped" in fid:
        print(f"FID: skipped ({fid['skipped']})")
    else:
        for name, m in fid.items():
            print(f"FID of the {name.upper()} samples ({m['num_samples']} samples against the "
                  f"toy training set; not comparable to the paper's): {m['fid']:.2f}")  # fmt: skip
    print("\nOutputs:")
    for name, path in record["outputs"].items():
        print(f"  {name:<15} {path}")


if __name__ == "__main__":
    run_main(main)

"""Estimated H100 GPU-hours of every paper result, from the models' MACs (an estimate, not a
measurement: no throughput has been measured on GPUs yet).

    python scripts/gpu_hours.py              # the README's table, at 30 % MFU
    python scripts/gpu_hours.py --mfu 0.12   # at REPA's reported speed (see below)

Training: 3 × forward MACs (projector included) × 2 FLOPs per MAC × 256 images per step.
Sampling: 50K images × model evaluations of the sampler (guidance doubles the batch inside its
interval) × 2 × forward MACs; SD-VAE decoding and the evaluator are left out (< 1 GPU-hour).
Peak: H100 SXM dense BF16/FP16, 989 TFLOP/s. REPA reports 5.4 steps/s at batch 256 on 8 H100s;
if that was SiT-XL/2 it is ≈ 12 % MFU, and the hours below would be ≈ 2.5× longer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model
from models.summary import count_macs
from urepa.cli import positive_float

H100_PEAK = 989e12  # FLOP/s, dense BF16/FP16
BATCH = 256
NUM_SAMPLES = 50_000
IMAGENET = 1_281_167
COCO_SAMPLES = 30_000  # U-ViT's and REPA's text-to-image FID

# (table, setting, model, training steps, sampler, latent side); sampler = (mode, steps, cfg,
# guidance_high); "R11" is REPA's Table 11 (ImageNet 512: 64×64 latents), "R12" its Table 12
# (MS-COCO text-to-image, 30K samples; its "epochs" are ImageNet's)
TABLE3 = (None, 250, 1.0, 1.0)  # SDE 250, no guidance
PAPER_MAIN = ("sde", 250, 1.65, 0.7)
ABLATION = ("ode", 50, 1.8, 0.7)
REPA_CFG = ("sde", 250, 1.35, 1.0)  # REPA's Table 11: cfg 1.35 at every step
T2I_ODE, T2I_SDE = ("ode", 50, 2.0, 1.0), ("sde", 250, 2.0, 1.0)  # REPA's Table 12: cfg 2.0
ROWS = [
    ("3", "SiT-B/2 + REPA", "SiT-B/2", 400_000, TABLE3, 32),
    ("3", "SiT↓-B/2 + U-REPA", "SiTDown-B/2", 400_000, TABLE3, 32),
    ("3", "SiT-L/2 + REPA", "SiT-L/2", 700_000, TABLE3, 32),
    ("3", "SiT↓-L/2 + U-REPA", "SiTDown-L/2", 400_000, TABLE3, 32),
    ("3", "SiT-XL/2 + REPA", "SiT-XL/2", 4_000_000, TABLE3, 32),
    ("3", "SiT↓-XL/2 + U-REPA", "SiTDown-XL/2", 400_000, TABLE3, 32),
    ("4", "SiT↓-XL/2 + U-REPA, 200 epochs", "SiTDown-XL/2", 1_000_800, PAPER_MAIN, 32),
    ("4", "SiT↓-XL/2 + U-REPA, 400 epochs", "SiTDown-XL/2", 2_001_600, PAPER_MAIN, 32),
    ("5-10", "one 100K-step ablation run", "SiTDown-XL/2", 100_000, ABLATION, 32),
    ("R11", "SiT-XL/2 + REPA, 512 px, 80 ep.", "SiT-XL/2", 400_320, REPA_CFG, 64),
    ("R11", "SiT-XL/2 + REPA, 512 px, 100 ep.", "SiT-XL/2", 500_400, REPA_CFG, 64),
    ("R11", "SiT-XL/2 + REPA, 512 px, 200 ep.", "SiT-XL/2", 1_000_800, REPA_CFG, 64),
    ("R12", "MMDiT + REPA, COCO, ODE 50", "MMDiT-d24/2", 150_000, T2I_ODE, 32),
    ("R12", "MMDiT + REPA, COCO, SDE 250", "MMDiT-d24/2", 150_000, T2I_SDE, 32),
]


def model_evaluations(mode: str | None, steps: int, cfg: float, high: float) -> int:
    """Forward passes per image of generate.py's sampler (a guided step costs two)."""
    if mode == "ode":  # Euler on linspace(1, 0, steps + 1), evaluated at each step's start
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    else:  # Euler-Maruyama on linspace(1, 0.04, steps), then a last step from 0.04
        times = torch.linspace(1.0, 0.04, steps, dtype=torch.float64)
    guided = int((times <= high).sum()) if cfg != 1 else 0
    return len(times) + guided


def main(argv: list[str] | None = None) -> None:
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the first paragraph, unwrapped
    parser = argparse.ArgumentParser(description=summary)
    parser.add_argument(
        "--mfu", type=positive_float, default=0.3, help="assumed model FLOP utilisation"
    )
    args = parser.parse_args(argv)
    flops_per_second = H100_PEAK * args.mfu
    print(f"{'table':<6}{'setting':<34}{'steps':>10}{'epochs':>8}{'train h':>10}{'sample h':>10}")
    for table, setting, name, steps, sampler, latent in ROWS:
        with torch.device("meta"):
            model = build_model(name, input_size=latent, z_dims=[768])
        train_macs = count_macs(model, latent, include_projectors=True)
        sample_macs = count_macs(model, latent)
        train_h = 3 * 2 * train_macs * BATCH * steps / flops_per_second / 3600
        evaluations = model_evaluations(*sampler)
        samples = COCO_SAMPLES if table == "R12" else NUM_SAMPLES
        sample_h = 2 * sample_macs * evaluations * samples / flops_per_second / 3600
        epochs = steps * BATCH / IMAGENET
        print(f"{table:<6}{setting:<34}{steps:>10}{epochs:>8.0f}{train_h:>10.0f}{sample_h:>10.1f}")
    print(f"\nH100 GPU-hours at {args.mfu:.0%} MFU of {H100_PEAK / 1e12:.0f} TFLOP/s (estimates)")


if __name__ == "__main__":
    main()

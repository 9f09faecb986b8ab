"""Parameter and MAC counts of the registered models, beside the U-REPA paper's Table 2.

    python -m models.summary                 # SiT↓-B/L/XL vs Table 2, and the SiT baselines
    python -m models.summary --all           # every registry entry

MACs are counted the papers' way (one multiply-add = 1 FLOP) for one 256×256 image (a 32×32×4
latent): `torch.utils.flop_counter` reports 2 FLOPs per multiply-add, so its count is halved.
Matrix products, convolutions and attention (QKᵀ and AV) are counted; element-wise work is not.
Everything runs on the meta device: no memory is allocated and no arithmetic is done.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import MODEL_NAMES, build_model
from models.base import AlignedDiffusionTransformer

# U-REPA Table 2 (SiT↓) and the SiT rows of Table 3: (params in M, GFLOPs = G MACs at 256²).
PAPER_TABLE = {
    "SiTDown-B/2": (199.7, 24.1),
    "SiTDown-L/2": (686.6, 79.3),
    "SiTDown-XL/2": (954.4, 109.3),
    "SiT-B/2": (None, 23.0),
    "SiT-L/2": (None, 80.8),
    "SiT-XL/2": (None, 118.6),
}


def count_macs(
    model: AlignedDiffusionTransformer, input_size: int = 32, include_projectors: bool = False
) -> int:
    """Forward multiply-accumulates for one sample of shape (C, input_size, input_size).

    Counted on a meta-device copy (see `meta_copy`): on CPU, PyTorch dispatches attention to a
    fused kernel that the flop counter does not know, and would miss its MACs.
    """
    model = meta_copy(model)
    device = torch.device("meta")
    x = torch.zeros(1, model.in_channels, input_size, input_size, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    context_dim = getattr(model, "context_dim", None)
    if context_dim is not None:  # text-to-image: 77 caption tokens (CLIP's length) for the label
        y = torch.zeros(1, 77, context_dim, device=device)
    projectors = model.projectors
    if not include_projectors:
        model.projectors = torch.nn.ModuleList()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, y)
    finally:
        model.projectors = projectors
    return counter.get_total_flops() // 2


def meta_copy(model: AlignedDiffusionTransformer) -> AlignedDiffusionTransformer:
    """`model` on the meta device: itself if it is there already, else rebuilt there from the
    config `build_model` recorded (no memory, however large), else a deep copy moved there."""
    if next(model.parameters()).device.type == "meta":
        return model
    if hasattr(model, "model_name"):
        with torch.device("meta"):
            return build_model(model.model_name, **model.model_kwargs)
    return copy.deepcopy(model).to("meta")


def summarize(name: str, input_size: int = 32) -> dict[str, float]:
    """Params (M, without and with one DINOv2-B projector) and G MACs of a registry entry."""
    with torch.device("meta"):
        model = build_model(name, input_size=input_size)
    return {
        "params_m": model.num_parameters(include_projectors=False) / 1e6,
        "params_with_projector_m": model.num_parameters(include_projectors=True) / 1e6,
        "gmacs": count_macs(model, input_size) / 1e9,
    }


def deviation(value: float, reference: float | None) -> str:
    return "" if reference is None else f"{100 * (value / reference - 1):+.1f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--all", action="store_true", help="every registry entry, not only Table 2/3"
    )
    args = parser.parse_args(argv)
    names = MODEL_NAMES if args.all else list(PAPER_TABLE)
    header = (
        f"{'model':<14}{'params (M)':>11}{'paper':>8}{'dev':>8}{'+proj (M)':>11}"
        f"{'GMACs':>9}{'paper':>8}{'dev':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        s = summarize(name)
        paper_params, paper_macs = PAPER_TABLE.get(name, (None, None))
        print(
            f"{name:<14}{s['params_m']:>11.1f}{paper_params or '':>8}"
            f"{deviation(s['params_m'], paper_params):>8}{s['params_with_projector_m']:>11.1f}"
            f"{s['gmacs']:>9.2f}{paper_macs or '':>8}{deviation(s['gmacs'], paper_macs):>8}"
        )
    print(
        "\nparams exclude the projector (the '+proj' column adds one DINOv2-B head); MACs are for "
        "one 256×256 image (32×32×4 latent), projector excluded."
    )


if __name__ == "__main__":
    main()

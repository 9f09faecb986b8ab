"""Model registry: CLI name -> factory, as in DiT/REPA.

    model = build_model("SiTDown-XL/2", input_size=32, num_classes=1000, z_dims=[768])

Factories accept every constructor argument of their class (`input_size`, `num_classes`, `z_dims`,
`encoder_depth`, projector switches, ...); defaults give the baseline of each family. SiT↓ names
are also reachable with the arrow, e.g. `SiT↓-B/2`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.base import AlignedDiffusionTransformer
from models.sit import SiT
from models.sit_down import SiTDown


def SiT_XL_2(**kwargs: Any) -> SiT:
    return SiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def SiT_XL_4(**kwargs: Any) -> SiT:
    return SiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def SiT_XL_8(**kwargs: Any) -> SiT:
    return SiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def SiT_L_2(**kwargs: Any) -> SiT:
    return SiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def SiT_L_4(**kwargs: Any) -> SiT:
    return SiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def SiT_L_8(**kwargs: Any) -> SiT:
    return SiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def SiT_B_2(**kwargs: Any) -> SiT:
    return SiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def SiT_B_4(**kwargs: Any) -> SiT:
    return SiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def SiT_B_8(**kwargs: Any) -> SiT:
    return SiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def SiT_S_2(**kwargs: Any) -> SiT:
    return SiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def SiT_S_4(**kwargs: Any) -> SiT:
    return SiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def SiT_S_8(**kwargs: Any) -> SiT:
    return SiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


def SiTDown_XL_2(**kwargs: Any) -> SiTDown:
    return SiTDown(depths=(10, 16, 10), hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def SiTDown_L_2(**kwargs: Any) -> SiTDown:
    return SiTDown(depths=(9, 14, 9), hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def SiTDown_B_2(**kwargs: Any) -> SiTDown:
    return SiTDown(depths=(5, 5, 5), hidden_size=768, patch_size=2, num_heads=12, **kwargs)


SiT_models: dict[str, Callable[..., SiT]] = {
    "SiT-XL/2": SiT_XL_2, "SiT-XL/4": SiT_XL_4, "SiT-XL/8": SiT_XL_8,
    "SiT-L/2": SiT_L_2, "SiT-L/4": SiT_L_4, "SiT-L/8": SiT_L_8,
    "SiT-B/2": SiT_B_2, "SiT-B/4": SiT_B_4, "SiT-B/8": SiT_B_8,
    "SiT-S/2": SiT_S_2, "SiT-S/4": SiT_S_4, "SiT-S/8": SiT_S_8,
}  # fmt: skip

SiTDown_models: dict[str, Callable[..., SiTDown]] = {
    "SiTDown-XL/2": SiTDown_XL_2, "SiTDown-L/2": SiTDown_L_2, "SiTDown-B/2": SiTDown_B_2,
}  # fmt: skip

# Canonical names first; the arrow spellings of SiT↓ are aliases of the same factories.
MODEL_NAMES: tuple[str, ...] = tuple(SiT_models) + tuple(SiTDown_models)
MODELS: dict[str, Callable[..., AlignedDiffusionTransformer]] = {
    **SiT_models,
    **SiTDown_models,
    **{name.replace("SiTDown", "SiT↓"): factory for name, factory in SiTDown_models.items()},
}


def canonical_name(name: str) -> str:
    """`SiT↓-B/2` -> `SiTDown-B/2`; raises a KeyError listing the valid names otherwise."""
    canonical = name.replace("SiT↓", "SiTDown")
    if canonical not in MODEL_NAMES:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return canonical


def build_model(name: str, **kwargs: Any) -> AlignedDiffusionTransformer:
    """Build a registered model and record how (`model_name`, `model_kwargs`), so that a
    checkpoint can rebuild it without any command-line flags."""
    name = canonical_name(name)
    model = MODELS[name](**kwargs)
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model


__all__ = ["MODELS", "MODEL_NAMES", "SiT", "SiTDown", "build_model", "canonical_name"]

"""Model registry: CLI name -> factory, as in DiT/REPA.

    model = build_model("SiTDown-XL/2", input_size=32, num_classes=1000, z_dims=[768])

`build_model` takes flat keyword arguments (`input_size`, `num_classes`, `z_dims`, `encoder_depth`,
the projector options of `ProjectorConfig`, ...) and records them; defaults give the baseline of
each family. SiT↓ names are also reachable with the arrow, e.g. `SiT↓-B/2`; the classes `SiT` and
`SiTDown` by their names, sized entirely by the arguments. The text-to-image MMDiT
(`MMDiT-d24/2`, or the class `MMDiT` sized by `depth`) takes caption features where the others
take a label: `build_model("MMDiT-d24/2", input_size=32, z_dims=[768])(x, t, context)`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch.nn as nn

from models.base import AlignedDiffusionTransformer
from models.mmdit import MMDiT
from models.projector import ProjectorConfig
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


def MMDiT_d24_2(**kwargs: Any) -> MMDiT:
    return MMDiT(depth=24, patch_size=2, **kwargs)  # REPA's Table 12 model: hidden 768, 24 heads


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


# Models built from a class rather than a registry name, sized entirely by their arguments
# (small experiments and tests; `--model SiTDown --model-config '{...}'`).
MODEL_CLASSES: dict[str, Callable[..., AlignedDiffusionTransformer]] = {
    "SiT": SiT,
    "SiTDown": SiTDown,
}
# Text-to-image models, conditioned on caption features instead of a label:
# `model(x, t, context)`. The class name `MMDiT` is sized by `depth` (hidden 32·depth).
TEXT_TO_IMAGE_MODELS: dict[str, Callable[..., AlignedDiffusionTransformer]] = {
    "MMDiT-d24/2": MMDiT_d24_2,
    "MMDiT": MMDiT,
}
PROJECTOR_FIELDS = tuple(field.name for field in fields(ProjectorConfig))


def canonical_name(name: str) -> str:
    """`SiT↓-B/2` -> `SiTDown-B/2`; a class name (`SiT`, `SiTDown`) is its own canonical name.
    Raises a KeyError listing the valid names otherwise."""
    canonical = name.replace("SiT↓", "SiTDown")
    known = (*MODEL_NAMES, *MODEL_CLASSES, *TEXT_TO_IMAGE_MODELS)
    if canonical not in known:
        raise KeyError(
            f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)} "
            f"(or a class, {' or '.join(MODEL_CLASSES)}, sized by its arguments; "
            f"text-to-image: {', '.join(TEXT_TO_IMAGE_MODELS)})"
        )
    return canonical


def build_model(name: str, **kwargs: Any) -> AlignedDiffusionTransformer:
    """Build a registered model (or a class, by name) and record how: `model_name` and
    `model_kwargs`, from which a checkpoint rebuilds it without any command-line flags.

    `kwargs` are flat and JSON-friendly, as flags and checkpoints hold them: the projector's
    options (`projector_dim`, `projector_upsample`, ... the fields of `ProjectorConfig`) are
    gathered into the model's `projector` config here, and only here.
    """
    name = canonical_name(name)
    projector = ProjectorConfig(**{k: v for k, v in kwargs.items() if k in PROJECTOR_FIELDS})
    rest = {k: v for k, v in kwargs.items() if k not in PROJECTOR_FIELDS}
    factory = MODEL_CLASSES.get(name) or TEXT_TO_IMAGE_MODELS.get(name) or MODELS[name]
    model = factory(projector=projector, **rest)
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model


def model_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(model_name, model_kwargs) that `build_model` recorded on `model`."""
    name, kwargs = getattr(model, "model_name", None), getattr(model, "model_kwargs", None)
    if name is None or kwargs is None:
        raise ValueError(
            "the model does not record how it was built; create it with models.build_model"
        )
    return name, dict(kwargs)


#################################################################################
#             Checking constructor arguments given as JSON (--model-config)      #
#################################################################################


def constructor_types(name: str) -> dict[str, Any]:
    """{argument: annotation} of the constructor that builds model `name`, projector options
    included (a registry name's factory is annotated with the class it returns)."""
    factory = MODEL_CLASSES.get(name) or TEXT_TO_IMAGE_MODELS.get(name) or MODELS[name]
    cls = factory if isinstance(factory, type) else typing.get_type_hints(factory)["return"]
    hints = typing.get_type_hints(vars(cls)["__init__"])
    for gathered in ("return", "projector"):  # build_model makes `projector` from the fields
        hints.pop(gathered, None)
    return {**hints, **typing.get_type_hints(ProjectorConfig)}


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can be passed as an argument annotated `hint`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(fits(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        items = [item for item in typing.get_args(hint) if item is not Ellipsis]
        return isinstance(value, list) and all(any(fits(v, i) for i in items) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        return False  # JSON's true is not a number here, although Python's bool is an int
    if hint is float:
        return isinstance(value, int | float)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # Any, or an annotation no JSON value is checked against


def check_model_config(name: str, config: dict[str, Any]) -> None:
    """Refuse --model-config keys the model does not take and values of the wrong type, naming
    the key: a wrong type would otherwise fail deep inside the model with an unrelated message."""
    types_ = constructor_types(name)
    for key, value in config.items():
        if key not in types_:
            raise ValueError(
                f"--model-config: {name} takes no argument {key!r} (it takes: "
                f"{', '.join(sorted(types_))})"
            )
        hint = types_[key]
        if not fits(value, hint):
            wanted = hint.__name__ if isinstance(hint, type) else str(hint)
            raise ValueError(
                f"--model-config: {key} must be {wanted}, got {value!r} ({type(value).__name__})"
            )


__all__ = [
    "MODELS", "MODEL_CLASSES", "MODEL_NAMES", "MMDiT", "PROJECTOR_FIELDS", "ProjectorConfig",
    "SiT", "SiTDown", "TEXT_TO_IMAGE_MODELS", "build_model", "canonical_name", "check_model_config",
    "model_config",
]  # fmt: skip

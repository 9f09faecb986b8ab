"""The model of a training run from its settings and its data: the constructor arguments that
the flags (`ModelSettings`), the dataset's geometry and --model-config give, the size check
before anything is allocated, and the seeded build (`create_model`), used by train.py and
bench/."""

from __future__ import annotations

import math
from typing import Any

import torch

from models import MODEL_CLASSES, PROJECTOR_FIELDS, TEXT_TO_IMAGE_MODELS, build_model
from models.base import AlignedDiffusionTransformer
from urepa.checkpoints import TrainingError
from urepa.encoders import encoder_dim, encoder_grid
from urepa.settings import ModelSettings
from urepa.utils import available_memory, require
from urepa.vae import SD_VAE_FACTOR

CPU = torch.device("cpu")
# Projector options that are flags of the same name (every field of ProjectorConfig but its
# width); --model-config may not set them too.
PROJECTOR_FLAGS = tuple(name for name in PROJECTOR_FIELDS if name != "projector_dim")


def data_geometry(settings: ModelSettings, manifest: dict[str, Any]) -> dict[str, int]:
    """The constructor arguments the data decides besides its latent size and classes: the
    latent channels (4 for SD-VAE, 3 in pixel space), the encoder's token grid (the stored
    features', or at --resolution online) and, for a bare class (--model SiT or SiTDown)
    whose --model-config sets no patch_size, the patch that gives one token per encoder patch
    (2 for SD-VAE latents, 8 for pixels-2x). --model-config may repeat the first two, never
    contradict them. Each is given only where it differs from the constructor's default (4
    channels, SD-VAE's grid, patch 2), so that checkpoints of SD-VAE data record what they
    always did."""
    moments = manifest["modalities"]["moments"]["shape"]  # (2·C, h, w)
    tokens = manifest["modalities"].get(f"features-{(settings.encoders or [''])[0]}")
    grid = math.isqrt(tokens["shape"][0]) if tokens else encoder_grid(settings.resolution)
    found = {"in_channels": moments[0] // 2, "encoder_grid": grid}
    for key, value in found.items():
        given = settings.model_config.get(key, value)
        if given != value:
            raise TrainingError(
                f"--model-config {key} {given} contradicts {settings.data_dir}, whose data gives "
                f"{value}: leave {key} out of --model-config"
            )
    if settings.model in MODEL_CLASSES and "patch_size" not in settings.model_config:
        found["patch_size"] = max(1, moments[-1] // grid)
    defaults = {"in_channels": 4, "encoder_grid": encoder_grid(SD_VAE_FACTOR * moments[-1]),
                "patch_size": 2}  # fmt: skip
    return {key: value for key, value in found.items() if value != defaults[key]}


def model_arguments(settings: ModelSettings, input_size: int, num_classes: int) -> dict[str, Any]:
    """The model's constructor arguments: the data's latent size and classes, the flags that
    set model arguments (FLAG_OF_MODEL_KWARG), then --model-config."""
    kwargs: dict[str, Any] = dict(
        input_size=input_size,
        num_classes=num_classes,
        z_dims=[encoder_dim(name) for name in settings.encoders],
        class_dropout_prob=settings.cfg_prob,
        **{name: getattr(settings, name) for name in PROJECTOR_FLAGS},
    )
    if settings.encoder_depth is not None:
        kwargs["encoder_depth"] = settings.encoder_depth
    return {**kwargs, **settings.model_config}


def text_to_image_arguments(kwargs: dict[str, Any], context_dim: int) -> dict[str, Any]:
    """A text-to-image model's arguments from `model_arguments`'s: the caption features' width
    (given only where it differs from CLIP ViT-L/14's 768) in place of the label's classes and
    dropout (caption dropout is the data's: `data_plan.caption_contexts`)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "class_dropout_prob")}
    return {**kwargs, **({"context_dim": context_dim} if context_dim != 768 else {})}


def create_model(
    settings: ModelSettings,
    dataset: Any,
    sample: dict[str, Any],
    device: torch.device = CPU,
    processes: int = 1,
) -> AlignedDiffusionTransformer:
    """Build the model from the flags, the dataset (classes, latent size) and --model-config.
    Initialised from --seed, so every process and every run with that seed starts alike.
    Refused first if it cannot fit `device` (trained by `processes`)."""
    kwargs = model_arguments(settings, sample["moments"].shape[-1], dataset.num_classes)
    if settings.model in TEXT_TO_IMAGE_MODELS:
        kwargs = text_to_image_arguments(kwargs, dataset.context_dim)
    kwargs = {**data_geometry(settings, dataset.manifest), **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(settings.seed)  # the model is built on the CPU
        try:
            with torch.device("meta"):  # its size first: no memory, no initialisation
                parameters = build_model(settings.model, **kwargs).num_parameters()
            check_model_memory(settings.model, parameters, device, processes)
            model = build_model(settings.model, **kwargs)
        except (TypeError, ValueError) as err:
            raise TrainingError(f"cannot build {settings.model}: {err}") from err
    return model


def check_model_memory(model: str, parameters: int, device: torch.device, processes: int) -> None:
    """Refuse a model the memory cannot hold before it is allocated: each process builds it and
    its EMA on the CPU (fp32), then holds weights, EMA, gradients and AdamW's two moments on its
    device (sharded: a 1/N share of them)."""
    what = f"{model} with {parameters / 1e6:.4g} M parameters"
    advice = "choose a smaller --model or --model-config"
    require(what, 8 * parameters, available_memory(CPU), "host memory (model and EMA)", advice)
    if device.type != "cpu":
        share = 16 * parameters // processes
        require(what, share, available_memory(device), f"{device} memory", advice)

"""The rows of sample.py's grid: chosen classes of a class-conditional model, or prompts of a
text-to-image one.

A prompt is encoded as the model's training captions were (U-ViT's protocol,
`text_encoders.py`): by the text encoder its dataset names, which train.py records in the run's
flags (`text_encoder`), and rounded through float16 as `preprocessing/prepare.py` stores caption
features. The empty caption is encoded beside the prompts: `ContextTable` makes it the null
condition of the samplers' guidance, as in training's caption dropout.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from urepa.captions import ContextTable, is_text_to_image
from urepa.shards import MANIFEST, load_manifest
from urepa.text_encoders import load_text_encoder
from urepa.utils import InputError


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--prompts {path}: cannot read it ({err}); give a UTF-8 text file, "
                         "one prompt per line") from None  # fmt: skip
    if not prompts:
        raise InputError(f"--prompts {path} holds no prompt: write one per line")
    return prompts


def recorded_text_encoder(model: Any) -> str:
    """The text encoder of the model's training captions: its flags' `text_encoder`, or, for a
    checkpoint written before train.py recorded it, the one its --data-dir's manifest names."""
    flags = model.checkpoint_args
    if flags.get("text_encoder"):
        return str(flags["text_encoder"])
    data_dir = str(flags.get("data_dir", ""))
    if os.path.exists(os.path.join(data_dir, MANIFEST)):
        return str(load_manifest(data_dir)["captions"]["text_encoder"])
    raise InputError(
        f"the checkpoint names no text encoder and its dataset ({data_dir or 'unknown'}) is not "
        "here: sample from a checkpoint of a run of this version of train.py"
    )


def prompt_table(model: Any, prompts: list[str], device: torch.device | str) -> ContextTable:
    """`model` as the samplers call it with label k < len(prompts) meaning prompt k, and
    label len(prompts) the empty caption (guidance)."""
    encoder = load_text_encoder(recorded_text_encoder(model), device)
    features = encoder([*prompts, ""]).half().float()  # (n + 1, 77, D), stored as fp16
    if features.shape[-1] != model.context_dim:
        raise InputError(
            f"the text encoder {encoder.name} gives {features.shape[-1]}-wide features; the "
            f"model takes {model.context_dim}"
        )
    return ContextTable(model, features[:-1], features[-1])


def grid_rows(
    model: Any, classes: list[int], prompts_file: str | None, device: torch.device | str
) -> tuple[Any, Tensor, str]:
    """(the network the sampler calls, the label of each row (R,), what the rows are): the
    classes of a class-conditional model, the prompts of `prompts_file` for a text-to-image
    one."""
    if is_text_to_image(model) != (prompts_file is not None):
        raise InputError(
            "--prompts FILE (one prompt per line) is for text-to-image checkpoints, --classes "
            f"for class-conditional ones; {model.model_name} is "
            + ("text-to-image" if is_text_to_image(model) else "class-conditional")
        )
    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
        rows = torch.arange(len(prompts), device=device)
        return prompt_table(model, prompts, device), rows, f"prompts {prompts}"
    if not all(0 <= c < model.num_classes for c in classes):
        raise InputError(f"--classes must lie in [0, {model.num_classes}), got {classes}")
    return model, torch.tensor(classes, device=device), f"classes {classes}"

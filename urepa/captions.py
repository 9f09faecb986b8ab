"""Text-to-image conditioning around the samplers (REPA appendix K, U-ViT's protocol).

The samplers (`samplers.py`) guide a model by its null class: they call `model(x, t, y)` with
integer labels and append `model.num_classes` for the unconditional half. `ContextTable` keeps
that contract for a caption-conditioned model: label k < n picks row k of a table of n caption
features, label n the empty caption's, the null condition of U-ViT's and REPA's guidance. The
table lives on the device, so a guided step indexes it there (no host synchronisation).

Which caption sample i of a run of generation gets (`caption_of_sample`): image i mod N of the
prepared validation set, its caption (i div N) mod (its caption count), so that the order is
fixed by the dataset alone, whatever the number of processes or the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dataset import LatentDataset
from models import TEXT_TO_IMAGE_MODELS
from urepa.shards import DatasetError
from urepa.utils import InputError

# Sample indices -> their captions' features (n, L, D) and the empty caption's (L, D).
CaptionFeatures = Callable[[list[int]], tuple[Tensor, Tensor]]


class ContextTable:
    """`model(x, t, context)` as the samplers call a class-conditional model: y (B,) indexes
    [contexts; empty] (n + 1, L, D); `num_classes` = n is the empty caption."""

    def __init__(self, model: Any, contexts: Tensor, empty: Tensor):
        self.model = model
        self.num_classes = len(contexts)
        self.table = torch.cat([contexts, empty[None].to(contexts)])  # (n + 1, L, D)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Any:
        return self.model(x, t, self.table[y].to(x.dtype), **kwargs)


def is_text_to_image(model: Any) -> bool:
    """Whether a built model is conditioned on caption features (MMDiT) rather than labels."""
    return getattr(model, "model_name", None) in TEXT_TO_IMAGE_MODELS or hasattr(
        model, "context_embedder"
    )


def check_model_matches_data(model_name: str, captioned: bool, data_dir: str) -> None:
    """A text-to-image model trains on a captioned dataset, a class-conditional one on a
    labelled dataset; anything else is refused in one line."""
    if model_name in TEXT_TO_IMAGE_MODELS and not captioned:
        raise InputError(
            f"{model_name} is a text-to-image model: train it on a captioned dataset "
            "(preprocessing/prepare.py --captions ...); "
            f"{data_dir} holds class labels"
        )
    if captioned and model_name not in TEXT_TO_IMAGE_MODELS:
        raise InputError(
            f"{data_dir} is a captioned (text-to-image) dataset: train a text-to-image model on "
            f"it ({', '.join(TEXT_TO_IMAGE_MODELS)}), not the class-conditional {model_name}"
        )


def caption_of_sample(indices: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(image, caption) of generated samples `indices` (B,) given every image's caption count
    (N,): image i mod N, caption (i div N) mod count. Fixed by the dataset alone."""
    images = indices % len(counts)
    return images, (indices // len(counts)) % counts[images]


def dataset_contexts(dataset: Any, indices: Tensor) -> Tensor:
    """(B, L, D) float16 caption features of generated samples `indices` (see
    `caption_of_sample`), read from a prepared captioned dataset."""
    counts = dataset.caption_counts(torch.arange(len(dataset)))
    images, captions = caption_of_sample(indices, counts)
    return dataset.read_contexts(images, captions)


def dataset_captions(dataset: Any, indices: Tensor) -> list[str]:
    """The caption texts of generated samples `indices`, in the same order (for CLIP score)."""
    texts = dataset.caption_texts()
    counts = torch.tensor([len(t) for t in texts])
    images, captions = caption_of_sample(indices, counts)
    return [texts[i][j] for i, j in zip(images.tolist(), captions.tolist(), strict=True)]


def open_caption_set(data_dir: str, flag: str, model: Any) -> LatentDataset:
    """The captioned dataset that `flag` names, whose caption features must be as wide as the
    text-to-image `model`'s; anything else is refused in one line."""
    context_dim = model.context_dim
    try:
        dataset = LatentDataset(data_dir, encoders=[])
    except DatasetError as err:
        raise InputError(f"{flag}: {err}") from err
    if not dataset.captioned or dataset.context_dim != context_dim:
        raise InputError(
            f"{flag} {data_dir} must be a captioned dataset with "
            f"{context_dim}-wide caption features (the model's); prepare it with "
            "preprocessing/prepare.py --captions and the text encoder the model was trained with"
        )
    return dataset


def caption_features(dataset: LatentDataset) -> CaptionFeatures:
    """Sample indices -> their captions' features (`dataset_contexts`) and the empty caption's."""
    return lambda indices: (
        dataset_contexts(dataset, torch.tensor(indices, dtype=torch.int64)),
        dataset.empty_context,
    )

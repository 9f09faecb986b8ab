"""CLIP score of text-to-image samples: how well each image matches its caption.

    python evaluations/clip_score.py samples/coco.npz --captions samples/coco.captions.json

CLIP score (Hessel et al. 2021) as torchmetrics computes it: 100 · max(cos(E_I(image),
E_T(caption)), 0), averaged over the samples, with OpenAI's CLIP ViT-L/14
(`openai/clip-vit-large-patch14`, torchmetrics' default, through transformers). Images go through
CLIP's preprocessing: bicubic resize of the short side to 224, centre crop, CLIP's mean and std;
captions are truncated to CLIP's 77 tokens. `generate.py --captions-from` writes the captions
file beside its `.npz` (sample i's caption at position i). `--clip clip-tiny-random` is a
random-weight stand-in for tests. An extra metric, not one of REPA's tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as `python evaluations/clip_score.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluations.arrays import open_image_array
from evaluations.commands import InputError, Unavailable, add_debug_arg, positive_int, run_main

CLIP_MODEL = "openai/clip-vit-large-patch14"
CLIP_STANDIN = "clip-tiny-random"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def standin_clip() -> tuple[Any, Any]:
    """A random CLIPModel (tiny towers, 32-px images) and a CLIPTokenizer whose vocabulary is the
    byte-level characters, each also as a word end: the real code paths, no download."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    characters = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [c + suffix for c in characters for suffix in ("", "</w>")]
    vocab = {token: k for k, token in enumerate(["<|startoftext|>", "<|endoftext|>", *words])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2}  # fmt: skip
    text = {**small, "vocab_size": len(vocab), "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config={**small, "image_size": 32,
                        "patch_size": 8}, projection_dim=16)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    return model.eval(), tokenizer


def load_clip(name: str, device: torch.device) -> tuple[Any, Any]:
    """(CLIPModel, CLIPTokenizer): the stand-in, a Hub id or a local folder."""
    if name == CLIP_STANDIN:
        model, tokenizer = standin_clip()
        return model.to(device), tokenizer
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(name, torch_dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(name)
    except Exception as err:  # network errors come in many types; all mean "not available"
        raise Unavailable(
            f"cannot load CLIP {name!r} (no network, or not in the Hugging Face cache): download "
            "it where there is a network and pass its folder with --clip PATH"
        ) from err
    return model.eval().to(device), tokenizer


def clip_pixels(images: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float: CLIP's resize, centre crop, normalisation."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_scores(model: Any, tokenizer: Any, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """(N,) per-sample CLIP scores, 100 · max(cos, 0), of images (N, H, W, 3) uint8."""
    return 100 * np.maximum(clip_cosines(model, tokenizer, images, captions), 0)


@torch.no_grad()
def clip_cosines(model: Any, tokenizer: Any, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """(N,) cosine similarities of CLIP's image and caption embeddings."""
    device = next(model.parameters()).device
    pixels = clip_pixels(images, model.config.vision_config.image_size, device)
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
    # CLIP's projected pooled outputs (what `get_*_features` return in every transformers version)
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    text = model.text_projection(model.text_model(**tokens.to(device)).pooler_output)
    image_features, text_features = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return (image_features * text_features).sum(-1).double().cpu().numpy()


def read_captions(path: str, count: int) -> list[str]:
    with open(path) as f:
        captions = json.load(f)
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise InputError(f"{path} must hold a JSON list of caption strings")
    if len(captions) != count:
        raise InputError(f"{path} holds {len(captions)} captions for {count} images")
    return captions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="the samples' .npz (arr_0: uint8 N×H×W×3)")
    p.add_argument("--captions", default=None,
                   help="JSON list of the samples' captions; default: beside the .npz, "
                        "NAME.captions.json (generate.py --captions-from writes it)")  # fmt: skip
    p.add_argument("--clip", default=CLIP_MODEL,
                   help=f"a Hub id or local folder of a transformers CLIP; {CLIP_STANDIN}: the "
                        "test stand-in")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_debug_arg(p)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> float:
    captions_path = args.captions or args.samples.removesuffix(".npz") + ".captions.json"
    if not os.path.isfile(captions_path):
        raise InputError(f"no captions file {captions_path}: pass --captions")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open_image_array(args.samples) as images:
        captions = read_captions(captions_path, len(images))
        model, tokenizer = load_clip(args.clip, device)
        scores = [
            clip_scores(model, tokenizer, batch, captions[k * args.batch_size :][: len(batch)])
            for k, batch in enumerate(images.batches(args.batch_size))
        ]
    score = float(np.concatenate(scores).mean())
    print(f"CLIP score ({args.clip}, {len(captions)} samples): {score:.4f}")
    return score


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

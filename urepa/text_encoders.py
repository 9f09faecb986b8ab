"""The frozen text encoder of text-to-image training: caption -> (77, D) token features.

U-ViT's protocol, which REPA's MS-COCO experiment follows (appendix K): CLIP ViT-L/14's text
transformer (`openai/clip-vit-large-patch14`) through Hugging Face `transformers`
(`CLIPTokenizer` + `CLIPTextModel`), each caption padded or truncated to 77 tokens, and the
final hidden states (after the final layer norm, `last_hidden_state`) kept: 77 × 768 per
caption. `transformers` is the library U-ViT (and LDM's `FrozenCLIPEmbedder` it takes this
from) loads that model with, so the features are those of U-ViT's context files, byte for byte
up to the storage dtype; OpenAI's own `clip` package is not on PyPI, and open_clip's text tower
returns a different tensor (the pooled projection path).

Tests never download: `clip-text-tiny-random` is a two-layer `CLIPTextModel` with random,
seeded weights and a `CLIPTokenizer` whose vocabulary is the 256 byte-level characters (one
token per character), built in memory. It is selected by name, explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from urepa.encoders import WeightsUnavailable, offline_hint
from urepa.utils import InputError

CONTEXT_LENGTH = 77  # CLIP's text positions; every caption is padded or truncated to it


@dataclass(frozen=True)
class TextEncoderSpec:
    hub_id: str  # the Hugging Face model id (a stand-in: "")
    dim: int  # width of the token features


TEXT_ENCODERS = {"clip-vit-l14": TextEncoderSpec("openai/clip-vit-large-patch14", 768)}
TEXT_ENCODER_STANDIN = "clip-text-tiny-random"
TEXT_STANDINS = {TEXT_ENCODER_STANDIN: TextEncoderSpec("", 32)}
DEFAULT_TEXT_ENCODER = "clip-vit-l14"


def text_encoder_dim(name: str) -> int:
    """Feature width of a text encoder by name (a local folder: CLIP ViT-L/14's, checked when
    it is loaded)."""
    spec = TEXT_ENCODERS.get(name) or TEXT_STANDINS.get(name)
    return spec.dim if spec else TEXT_ENCODERS[DEFAULT_TEXT_ENCODER].dim


def check_text_encoder(name: str) -> None:
    """A known name or an existing local folder; else an InputError that lists the choices."""
    if name in TEXT_ENCODERS or name in TEXT_STANDINS or os.path.isdir(name):
        return
    raise InputError(
        f"--text-encoder must be one of {', '.join(TEXT_ENCODERS)}, a local folder of a "
        f"transformers CLIP text model and its tokenizer, or {TEXT_ENCODER_STANDIN} (test "
        f"stand-in); got {name!r}"
    )


class TextEncoder(nn.Module):
    """A tokenizer and a CLIP text transformer: captions -> (n, 77, D) fp32 token features."""

    def __init__(self, tokenizer: Any, model: Any, name: str):
        super().__init__()
        self.tokenizer = tokenizer
        self.model: Any = model.eval().requires_grad_(False)
        self.name = name
        self.dim: int = model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        """U-ViT's FrozenCLIPEmbedder: pad/truncate to 77 tokens, no attention mask (CLIP's
        causal mask already keeps the padding out of every real token), last_hidden_state."""
        tokens = self.tokenizer(
            captions,
            truncation=True,
            max_length=CONTEXT_LENGTH,
            padding="max_length",
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (n, 77)
        return self.model(input_ids=ids).last_hidden_state.float()  # (n, 77, D)


def standin_tokenizer() -> Any:
    """A real CLIPTokenizer over a byte-level character vocabulary, without merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set: sorted, for fixed ids
        for token in (char, char + "</w>"):
            vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def standin_text_encoder() -> TextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = standin_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_STANDINS[TEXT_ENCODER_STANDIN].dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPTextModel(config)
    return TextEncoder(tokenizer, model, TEXT_ENCODER_STANDIN)


def load_text_encoder(name: str, device: torch.device | str = "cpu") -> TextEncoder:
    """`clip-vit-l14` (from the Hugging Face hub or its cache), a local folder holding a
    transformers CLIP text model and tokenizer, or the test stand-in."""
    check_text_encoder(name)
    if name in TEXT_STANDINS:
        return standin_text_encoder().to(device)
    from transformers import CLIPTextModel, CLIPTokenizer

    source = TEXT_ENCODERS[name].hub_id if name in TEXT_ENCODERS else name
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
        model = CLIPTextModel.from_pretrained(source, torch_dtype=torch.float32)
    except Exception as err:  # network errors come in many types; all mean "not available"
        raise WeightsUnavailable(
            offline_hint("the CLIP text encoder", source, "--text-encoder PATH")
        ) from err
    encoder = TextEncoder(tokenizer, model, name)
    if name not in TEXT_ENCODERS and encoder.dim != text_encoder_dim(name):
        raise InputError(
            f"--text-encoder {name!r} gives {encoder.dim}-wide features; U-ViT's protocol needs "
            f"CLIP ViT-L/14's {text_encoder_dim(name)}"
        )
    return encoder.to(device)

"""The representation encoders REPA aligns to (REPA's Table 2), built through timm.

Every encoder takes uint8-range images (N, 3, r, r) and returns the tokens REPA aligns to,
(N, (r/16)², D), after REPA's own preprocessing (`train.preprocess_raw_image` and
`utils.load_encoders` of REPA's code): pixels / 255, the family's mean/std, a bicubic resize
(no antialias) only for 14-px-patch encoders (to 224 px per 256), position embeddings resampled
once at load to the token grid (timm's `resample_abs_pos_embed`: bicubic, antialiased; REPA uses
the same function), and the class and register tokens dropped. As in REPA's code, MAE and CLIP
give the last block's output (REPA skips their final norm), the others the final-norm tokens.

Weights come from timm's library (the Hugging Face hub), from a timm pretrained name, or from a
local file: the checkpoint the encoder's authors release (DINOv2's `dinov2_vitb14_pretrain.pth`,
DINO's, MoCo v3's or RCG's, MAE's `mae_pretrain_vit_large.pth`, I-JEPA's, OpenAI CLIP's, an
open_clip SigLIP file, DINOv3's) or a timm state dict; keys are converted where the layout differs.
Tests build `<family>-vit-tiny-random` stand-ins: the family's architecture at width 32 and
depth 2, random weights, through the same code.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from urepa.utils import InputError, ReportedError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (REPA's CLIP_DEFAULT_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SigLIP's [-1, 1] inputs
TOKEN_STRIDE = 16  # image pixels per token side, for every encoder (16×16 tokens at 256 px)


class WeightsUnavailable(ReportedError, RuntimeError):
    """Pretrained weights that cannot be loaded (no network and no local copy)."""


def offline_hint(what: str, source: str, flag: str) -> str:
    return (
        f"could not load {what} from {source!r}. If this machine has no internet access, "
        f"download the weights elsewhere (they are cached under ~/.cache/huggingface; "
        f"`huggingface-cli download {source}` fetches them) and either copy the cache here or "
        f"pass a local path with {flag}."
    )


#################################################################################
#                         Families: preprocessing and tokens                    #
#################################################################################


def mocov3_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """MoCo v3's release layout (and RCG's) -> timm's: the base encoder without its projection
    head, and the misnamed keys of RCG's ViT-L fixed as REPA's `fix_mocov3_state_dict` does."""
    state = checkpoint.get("state_dict", checkpoint)
    prefix = "module.base_encoder."
    renames = {
        "blocks.13.norm13": "blocks.13.norm1",
        "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
        "blocks.14.norm14": "blocks.14.norm2",
        "blocks.14.mlp.fc14": "blocks.14.mlp.fc2",
    }
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # the momentum encoder and the predictor
        key = key[len(prefix) :]
        for old, new in renames.items():
            key = key.replace(old, new)
        if "head" not in key and key.split(".")[0] != "fc":
            out[key] = value
    return out


# OpenAI CLIP weights that `clip.load` stores in fp16 (its `convert_weights`: convolutions, linear
# and attention projections) before REPA casts the model back to fp32 on the CPU.
CLIP_FP16 = re.compile(
    r"visual\.(conv1\.weight|proj|transformer\.resblocks\.\d+\."
    r"(attn\.in_proj_(weight|bias)|attn\.out_proj\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias)))"
)


def clip_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's CLIP layout, with the weights `clip.load` keeps in fp16 rounded to fp16 as REPA's
    loader does (a no-op on OpenAI's files, which are fp16 already)."""
    return {
        k: v.half().to(v.dtype) if CLIP_FP16.fullmatch(k) and v.is_floating_point() else v
        for k, v in checkpoint.items()
    }


@dataclass(frozen=True)
class Family:
    """How REPA feeds one family of encoders, and which of its outputs it aligns to."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_first: bool = False  # CLIP: resize, then normalise (REPA's order); others the reverse
    final_norm: bool = True  # False: the last block's output, as REPA's MAE and CLIP wrappers
    max_resolution: int | None = 256  # REPA: 512 px only with DINOv2
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # release -> timm keys


FAMILIES = {
    "dinov2": Family(max_resolution=None),
    "dinov1": Family(),
    "mocov3": Family(convert=mocov3_state_dict),
    "mae": Family(final_norm=False),
    "jepa": Family(),
    "clip": Family(
        CLIP_MEAN, CLIP_STD, resize_first=True, final_norm=False, convert=clip_state_dict
    ),
    "siglip": Family(SIGLIP_MEAN, SIGLIP_STD),
    "dinov3": Family(max_resolution=None),
}


@dataclass(frozen=True)
class EncoderSpec:
    """A `--enc-type` name: timm's architecture (and pretrained tag), its feature dimension."""

    timm_name: str  # `architecture.tag`: the tag names the library weights
    dim: int
    family: str = "dinov2"
    arch: tuple[tuple[str, Any], ...] = ()  # keyword arguments that make timm's model the authors'
    library: bool = True  # False: timm has no such weights (MoCo v3): --enc-weights is needed

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".")[0]


def _dinov2(size: str, reg: str, dim: int) -> EncoderSpec:
    return EncoderSpec(f"vit_{size}_patch14_{reg}dinov2.lvd142m", dim)


MOCO_S_HEADS = (("num_heads", 12),)  # MoCo v3's ViT-S has 12 heads (timm's ViT-S: 6)

ENCODERS: dict[str, EncoderSpec] = {
    **{
        f"dinov2-vit-{s}{suffix}": _dinov2(size, reg, dim)
        for s, size, dim in [
            ("s", "small", 384),
            ("b", "base", 768),
            ("l", "large", 1024),
            ("g", "giant", 1536),
        ]
        for suffix, reg in [("", ""), ("_reg", "reg4_")]
    },
    "dinov1-vit-b": EncoderSpec("vit_base_patch16_224.dino", 768, "dinov1"),
    "mocov3-vit-s": EncoderSpec("vit_small_patch16_224", 384, "mocov3", MOCO_S_HEADS, False),
    "mocov3-vit-b": EncoderSpec("vit_base_patch16_224", 768, "mocov3", library=False),
    "mocov3-vit-l": EncoderSpec("vit_large_patch16_224", 1024, "mocov3", library=False),
    "mae-vit-l": EncoderSpec("vit_large_patch16_224.mae", 1024, "mae"),
    "jepa-vit-h": EncoderSpec("vit_huge_patch14_gap_224.in1k_ijepa", 1280, "jepa"),
    "clip-vit-L": EncoderSpec("vit_large_patch14_clip_quickgelu_224.openai", 1024, "clip"),
    "siglip-vit-L": EncoderSpec("vit_large_patch16_siglip_256.webli", 1024, "siglip"),
    "siglip2-vit-L": EncoderSpec("vit_large_patch16_siglip_256.v2_webli", 1024, "siglip"),
    "dinov3-vit-s": EncoderSpec("vit_small_patch16_dinov3.lvd1689m", 384, "dinov3"),
    "dinov3-vit-b": EncoderSpec("vit_base_patch16_dinov3.lvd1689m", 768, "dinov3"),
    "dinov3-vit-l": EncoderSpec("vit_large_patch16_dinov3.lvd1689m", 1024, "dinov3"),
}

# Test stand-ins: a family's architecture at width 32 and depth 2, random weights (seeded).
TINY = (("embed_dim", 32), ("depth", 2), ("num_heads", 2))
ENCODER_STANDIN = "dinov2-vit-tiny-random"


def _standin(like: str) -> EncoderSpec:
    real = ENCODERS[like]
    return replace(real, timm_name=real.architecture, dim=32, arch=(*real.arch, *TINY))


STANDINS: dict[str, EncoderSpec] = {
    ENCODER_STANDIN: _standin("dinov2-vit-s"),
    "dinov2-vit-tiny-random_reg": _standin("dinov2-vit-s_reg"),
    "dinov1-vit-tiny-random": _standin("dinov1-vit-b"),
    "mocov3-vit-tiny-random": _standin("mocov3-vit-s"),
    "mae-vit-tiny-random": _standin("mae-vit-l"),
    "jepa-vit-tiny-random": _standin("jepa-vit-h"),
    "clip-vit-tiny-random": _standin("clip-vit-L"),
    "siglip-vit-tiny-random": _standin("siglip-vit-L"),
    "dinov3-vit-tiny-random": _standin("dinov3-vit-s"),
}
ALL_ENCODERS = {**ENCODERS, **STANDINS}


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ALL_ENCODERS:
        raise InputError(
            f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)} "
            f"(or a test stand-in: {', '.join(STANDINS)})"
        )
    return ALL_ENCODERS[name]


def encoder_dim(name: str) -> int:
    return encoder_spec(name).dim


def parse_encoder_list(enc_type: str) -> list[str]:
    """`--enc-type dinov2-vit-b,mae-vit-l` -> names, each checked."""
    names = [n.strip() for n in enc_type.split(",") if n.strip()]
    for n in names:
        encoder_spec(n)  # raises on unknown names
    return names


def check_resolution(name: str, resolution: int) -> None:
    """REPA trains with 512-px images only with DINOv2 encoders (DINOv3 too, here)."""
    family = encoder_spec(name).family
    limit = FAMILIES[family].max_resolution
    if limit is not None and resolution > limit:
        raise InputError(
            f"{name} runs at up to {limit} px, as in REPA (which pairs 512-px images with DINOv2 "
            f"only); pick a dinov2 or dinov3 encoder for --resolution {resolution}"
        )


def patch_size(name: str) -> int:
    return 14 if "patch14" in encoder_spec(name).timm_name else 16


def encoder_input_size(resolution: int, name: str = ENCODER_STANDIN) -> int:
    """Side of the square image the encoder sees: one patch per 16 px of image, so 224 px per
    256 px for 14-px patches (REPA's resize) and the image itself for 16-px patches."""
    return patch_size(name) * resolution // TOKEN_STRIDE


def encoder_grid(resolution: int) -> int:
    """Side of every encoder's token grid at `resolution` px: 16 at 256 px, 32 at 512 px."""
    return resolution // TOKEN_STRIDE


#################################################################################
#                                  The module                                   #
#################################################################################


class RepresentationEncoder(nn.Module):
    """A frozen encoder producing alignment targets: uint8 images -> the tokens REPA aligns to.

    Preprocessing as REPA's `preprocess_raw_image`: pixels / 255, the family's mean/std and, for
    14-px patches, a bicubic resize to 224 px per 256 (CLIP resizes before normalising, the
    others after); class and register tokens dropped.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, vit: Any, name: str, resolution: int = 256):
        super().__init__()
        self.vit: Any = vit.eval().requires_grad_(False)  # timm VisionTransformer / Eva (untyped)
        self.name = name
        self.family = FAMILIES[encoder_spec(name).family]
        self.input_size = encoder_input_size(resolution, name)
        self.register_buffer("mean", torch.tensor(self.family.mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(self.family.std).view(1, 3, 1, 1), False)

    @property
    def grid_size(self) -> int:
        return self.input_size // self.vit.patch_embed.patch_size[0]

    def resize(self, x: Tensor) -> Tensor:
        if x.shape[-1] == self.input_size:
            return x  # 16-px patches: REPA feeds the image as it is
        return F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """uint8 or [0, 255] float (N, 3, H, W) -> (N, grid², D) tokens."""
        x = images.float() / 255
        if self.family.resize_first:
            x = (self.resize(x) - self.mean) / self.std
        else:
            x = self.resize((x - self.mean) / self.std)
        tokens = self.vit.forward_features(x.to(self.mean.dtype))  # (N, prefix + grid², D)
        return tokens[:, self.vit.num_prefix_tokens :]


#################################################################################
#                                    Loading                                    #
#################################################################################

# What --enc-weights FILE must hold, said by every error about such a file.
RELEASE_HINT = (
    "pass the encoder's release checkpoint (docs/encoders.md lists them) or a timm state dict"
)

# Parameters that never reach the tokens (classifier and pooling heads): a checkpoint may hold
# them or not.
UNUSED_PREFIXES = ("head.", "attn_pool.", "fc_norm.")


def build_vit(name: str, resolution: int, pretrained: str | None = None) -> Any:
    """timm's model of `name` for the grid at `resolution`: random weights, or the library's
    `pretrained` weights (`architecture.tag`, resampled by timm to that grid)."""
    import timm

    spec = encoder_spec(name)
    kwargs = dict(spec.arch, img_size=encoder_input_size(resolution, name), num_classes=0)
    if spec.family == "dinov3":
        kwargs["dynamic_img_size"] = False  # one grid, built once, as for the others
    return timm.create_model(pretrained or spec.timm_name, pretrained=bool(pretrained), **kwargs)


def read_checkpoint(path: str) -> dict[str, Any]:
    """A weight file as a dict: safetensors, a torch.save file (weights_only) or a TorchScript
    archive (OpenAI's CLIP releases; it holds no pickled Python objects). A file that none of
    them reads is a one-line error."""
    try:
        checkpoint = _read_weight_file(path)
    except InputError:
        raise
    except Exception as err:  # each reader fails its own way on garbage: pickle, zip, Rust
        raise InputError(
            f"could not read --enc-weights {path}: truncated, corrupt or not a weight file "
            f"({type(err).__name__}); {RELEASE_HINT}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise InputError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict; {RELEASE_HINT}"
        )
    return checkpoint


def _read_weight_file(path: str) -> Any:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith("/constants.pkl") for n in archive.namelist()):
                with warnings.catch_warnings():  # torch deprecates TorchScript, not its files
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return dict(torch.jit.load(path, map_location="cpu").state_dict())
    return torch.load(path, map_location="cpu", weights_only=True)


def timm_filter(vit: Any) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """timm's converter of its model's module (release layouts -> timm's, position embeddings
    resampled to the model's grid)."""
    import importlib

    filter_fn: Callable[[dict[str, Any], Any], dict[str, Any]]
    filter_fn = importlib.import_module(type(vit).__module__).checkpoint_filter_fn
    return filter_fn


def load_weight_file(vit: Any, name: str, path: str) -> None:
    """Load a release (or timm) checkpoint into `vit`, converting keys; every parameter that
    reaches the tokens must be in it."""
    checkpoint = read_checkpoint(path)
    convert = FAMILIES[encoder_spec(name).family].convert
    try:
        state = timm_filter(vit)(convert(checkpoint) if convert else checkpoint, vit)
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as err:  # shapes of another architecture
        raise InputError(f"{path} does not hold {name}'s weights ({err}); {RELEASE_HINT}") from err
    missing = [k for k in missing if not k.startswith(UNUSED_PREFIXES)]
    unexpected = [k for k in unexpected if not k.startswith(UNUSED_PREFIXES)]
    if missing or unexpected:
        raise InputError(
            f"{path} does not hold {name}'s weights (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); {RELEASE_HINT}"
        )


def library_weights(name: str, weights: str | None) -> str:
    """The timm pretrained name to download: --enc-weights' name, else the encoder's."""
    import timm

    spec = encoder_spec(name)
    if weights and not timm.list_pretrained(weights):
        raise InputError(f"--enc-weights {weights!r} is neither a file nor a timm pretrained name")
    if not weights and not spec.library:
        raise WeightsUnavailable(
            f"timm has no {name} weights: download the authors' checkpoint (MoCo v3's, or RCG's "
            "for ViT-B/L as REPA uses) and pass it with --enc-weights FILE"
        )
    return weights or spec.timm_name


def load_encoder(
    name: str = "dinov2-vit-b",
    resolution: int = 256,
    weights: str | None = None,
    device: torch.device | str = "cpu",
) -> RepresentationEncoder:
    """An encoder at the input size for `resolution`. Weights: a local file (`weights`: the
    authors' release or timm's), a timm pretrained name (`weights`), else the library's default;
    a test stand-in has random weights unless `weights` names a file."""
    spec = encoder_spec(name)
    check_resolution(name, resolution)
    if name in STANDINS and weights and not os.path.isfile(weights):
        raise InputError(
            f"{name} is a test stand-in: --enc-weights must be a file, not {weights!r}"
        )
    if name in STANDINS or (weights and os.path.isfile(weights)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vit = build_vit(name, resolution)
        if weights:
            load_weight_file(vit, name, weights)
    else:
        source = library_weights(name, weights)
        try:
            vit = build_vit(name, resolution, pretrained=source)
        except Exception as err:  # network errors come in many types; all mean "not available"
            raise WeightsUnavailable(
                offline_hint(f"encoder {name}", f"timm/{source}", "--enc-weights PATH")
            ) from err
        if vit.embed_dim != spec.dim:
            raise InputError(f"--enc-weights {source} gives {vit.embed_dim}-d tokens, not {name}'s")
    if not FAMILIES[spec.family].final_norm:
        vit.norm = nn.Identity()  # REPA aligns to the last block's output here
    return RepresentationEncoder(vit, name, resolution).to(device)

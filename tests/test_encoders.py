"""The target encoders against an independent construction of REPA's path.

For each family, random weights are written in the layout the encoder's authors release (DINOv2's
hub file, DINO's, MoCo v3's training checkpoint, MAE's, I-JEPA's, OpenAI CLIP's TorchScript
archive, open_clip's SigLIP file), loaded through `load_encoder(..., weights=FILE)`, and the tokens
compared with a plain-torch ViT forward written here from REPA's `preprocess_raw_image`,
`load_encoders` and model wrappers: REPA's resize and normalisation, REPA's position-embedding
resampling, REPA's choice of tokens.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from conftest import RES, prepare_flags

import train
from dataset import LatentDataset
from preprocessing.prepare import main as prepare_main
from preprocessing.prepare import parse_args as prepare_args
from urepa.checkpoints import load_checkpoint
from urepa.encoders import (
    ENCODERS,
    STANDINS,
    WeightsUnavailable,
    build_vit,
    encoder_dim,
    encoder_grid,
    load_encoder,
    mocov3_state_dict,
    parse_encoder_list,
)
from urepa.utils import InputError

D, DEPTH, HEADS = 32, 2, 2  # the stand-ins' width, depth and heads
TINY_MODEL = '{"hidden_size": 32, "depths": [1, 2, 1], "num_heads": 2, "projector_dim": 32}'
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


# --------------------------------------------------------------------------------------------
# Release-format checkpoints with random weights
# --------------------------------------------------------------------------------------------


def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape) * scale


def vit_blocks(layer_scale: bool = False) -> dict[str, torch.Tensor]:
    """timm-style block keys (the layout of DINO, DINOv2, MAE, MoCo v3, I-JEPA releases)."""
    sd = {}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[b + norm + ".weight"], sd[b + norm + ".bias"] = 1 + rand(D), rand(D)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = rand(3 * D, D), rand(3 * D)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rand(D, D), rand(D)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rand(4 * D, D), rand(4 * D)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rand(D, 4 * D), rand(D)
        if layer_scale:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = 1 + rand(D), 1 + rand(D)
    return sd


def vit_release(patch: int, grid: int, cls: bool = True, **blocks) -> dict[str, torch.Tensor]:
    sd = {
        "patch_embed.proj.weight": rand(D, 3, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rand(D),
        "pos_embed": rand(1, grid * grid + cls, D),
        "norm.weight": 1 + rand(D),
        "norm.bias": rand(D),
        **vit_blocks(**blocks),
    }
    if cls:
        sd["cls_token"] = rand(1, 1, D)
    return sd


def dinov2_release(registers: bool) -> dict:
    sd = vit_release(14, 37, layer_scale=True)  # the hub models are built for 518 px: 37×37
    sd["mask_token"] = rand(1, D)
    if registers:
        sd["register_tokens"] = rand(1, 4, D)
    return sd


def mocov3_release() -> dict:
    """MoCo v3's training checkpoint: base and momentum encoders, projector heads, predictor."""
    base = {**vit_release(16, 14), "head.0.weight": rand(64, D)}
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state |= {f"module.momentum_encoder.{k}": v + 1 for k, v in base.items()}
    state["module.predictor.0.weight"] = rand(64, 64)
    return {"epoch": 300, "arch": "vit_small", "state_dict": state}


def jepa_release() -> dict:
    encoder = {f"module.{k}": v for k, v in vit_release(14, 16, cls=False).items()}
    target = {k: v + 1 for k, v in encoder.items()}
    return {"encoder": encoder, "target_encoder": target, "predictor": {}, "epoch": 300}


def clip_release() -> dict:
    """OpenAI CLIP's state dict: the image tower under visual., the text tower beside it."""
    sd = {
        "visual.class_embedding": rand(D),
        "visual.positional_embedding": rand(16 * 16 + 1, D),
        "visual.conv1.weight": rand(D, 3, 14, 14, scale=0.05),
        "visual.proj": rand(D, 16),
        "positional_embedding": rand(77, D),
        "text_projection": rand(D, 16),
        "logit_scale": torch.tensor(4.6),
    }
    for norm in ("ln_pre", "ln_post"):
        sd[f"visual.{norm}.weight"], sd[f"visual.{norm}.bias"] = 1 + rand(D), rand(D)
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.in_proj", "attn.proj":
             "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for key, value in vit_blocks().items():
        i, rest = key.split(".", 2)[1:]
        module, param = rest.rsplit(".", 1)
        sep = "_" if module == "attn.qkv" else "."  # nn.MultiheadAttention's in_proj_weight
        sd[f"visual.transformer.resblocks.{i}.{names[module]}{sep}{param}"] = value
    return sd


def save_torchscript(state: dict, path: str) -> None:
    """A TorchScript archive holding `state` as parameters, as OpenAI's CLIP releases are."""

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in state.items():
        *path_, leaf = key.split(".")
        module = root
        for part in path_:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    with warnings.catch_warnings():  # torch deprecates TorchScript; CLIP's files are in it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(root, torch.zeros(1)).save(path)


# --------------------------------------------------------------------------------------------
# REPA's path, written independently
# --------------------------------------------------------------------------------------------


def repa_preprocess(x: torch.Tensor, family: str) -> torch.Tensor:
    """REPA's `preprocess_raw_image` (SigLIP: its own mean/std, no resize at 256 px)."""
    resolution = x.shape[-1]
    x = x / 255.0
    size = 224 * (resolution // 256)

    def normalise(x, stats):
        return (x - torch.tensor(stats[0]).view(1, 3, 1, 1)) / torch.tensor(stats[1]).view(
            1, 3, 1, 1
        )

    if family == "clip":
        return normalise(F.interpolate(x, size, mode="bicubic"), CLIP)
    if family == "siglip":
        return (x - 0.5) / 0.5
    x = normalise(x, IMAGENET)
    return F.interpolate(x, size, mode="bicubic") if family in ("dinov2", "jepa") else x


def resample(pos: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """REPA's pos-embed resampling (timm's resample_abs_pos_embed): bicubic, antialiased."""
    old = math.isqrt(pos.shape[1] - prefix)
    if old == grid:
        return pos
    patches = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([pos[:, :prefix], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)


def layer_norm(x, sd, key, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], eps)


def block(x, sd, b, eps, act):
    """A pre-norm ViT block: attention written out (softmax(q·kᵀ/√d)·v), then the MLP."""
    n, t, _ = x.shape
    h = layer_norm(x, sd, b + "norm1", eps)
    qkv = (h @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(n, t, 3, HEADS, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    h = (attn @ v).transpose(1, 2).reshape(n, t, D) @ sd[b + "attn.proj.weight"].T
    h = h + sd[b + "attn.proj.bias"]
    x = x + h * sd.get(b + "ls1.gamma", 1)
    h = act(
        layer_norm(x, sd, b + "norm2", eps) @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]
    )
    h = h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return x + h * sd.get(b + "ls2.gamma", 1)


def repa_tokens(sd: dict, x: torch.Tensor, grid: int, *, eps=1e-6, act=F.gelu, final_norm=True,
                ln_pre=False) -> torch.Tensor:  # fmt: skip
    """Patch embedding, [class +] position embedding [, registers], blocks [, final norm]; the
    patch tokens."""
    w = sd["patch_embed.proj.weight"]
    h = (
        F.conv2d(x, w, sd.get("patch_embed.proj.bias"), stride=w.shape[-1])
        .flatten(2)
        .transpose(1, 2)
    )
    cls = "cls_token" in sd
    if cls:
        h = torch.cat([sd["cls_token"].expand(len(h), -1, -1), h], 1)
    h = h + resample(sd["pos_embed"], grid, int(cls))
    if "register_tokens" in sd:  # DINOv2: after the position embedding, behind the class token
        h = torch.cat([h[:, :1], sd["register_tokens"].expand(len(h), -1, -1), h[:, 1:]], 1)
    if ln_pre:
        h = layer_norm(h, sd, "ln_pre", eps)
    for i in range(DEPTH):
        h = block(h, sd, f"blocks.{i}.", eps, act)
    if final_norm:
        h = layer_norm(h, sd, "norm", eps)
    return h[:, h.shape[1] - grid * grid :]


CLIP_NAMES = [("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.in_proj_", "attn.qkv."),
              ("attn.out_proj", "attn.proj"), ("c_fc", "fc1"), ("c_proj", "fc2")]  # fmt: skip


def clip_as_vit(sd: dict) -> dict:
    """OpenAI's CLIP keys read as the generic ViT keys `repa_tokens` uses (test-side)."""
    out = {"cls_token": sd["visual.class_embedding"].view(1, 1, -1),
           "pos_embed": sd["visual.positional_embedding"][None],
           "patch_embed.proj.weight": sd["visual.conv1.weight"].half().float()}  # fmt: skip
    out |= {k.replace("visual.", ""): v for k, v in sd.items() if k.startswith("visual.ln_pre")}
    for key, value in sd.items():
        if key.startswith("visual.transformer.resblocks."):
            i, rest = key.split(".")[3], ".".join(key.split(".")[4:])
            for a, b in CLIP_NAMES:
                rest = rest.replace(a, b)
            # clip.load keeps linear and attention weights in fp16 (REPA casts back to fp32)
            out[f"blocks.{i}.{rest}"] = value if "norm" in rest else value.half().float()
    return out


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


# --------------------------------------------------------------------------------------------
# Each family's tokens against REPA's path
# --------------------------------------------------------------------------------------------


def unprefixed(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def mae_case():
    sd = vit_release(16, 14)
    return {"model": sd}, sd


def siglip_case():
    sd = vit_release(16, 16, cls=False)  # open_clip's file: timm's keys under visual.trunk.
    return {**{f"visual.trunk.{k}": v for k, v in sd.items()}, "text.proj": rand(4, 4)}, sd


# name, checkpoint builder -> (release checkpoint, the weights REPA's model holds), file name,
# REPA's family, keyword arguments of the reference forward, resolutions
CASES = [
    ("dinov2-vit-tiny-random", lambda: (dinov2_release(False),) * 2, "dinov2_vits14_pretrain.pth",
     "dinov2", {}, (256, 512)),
    ("dinov2-vit-tiny-random_reg", lambda: (dinov2_release(True),) * 2,
     "dinov2_vits14_reg4_pretrain.pth", "dinov2", {}, (256, 512)),
    ("dinov1-vit-tiny-random", lambda: (vit_release(16, 14),) * 2, "dino_vitbase16_pretrain.pth",
     "dinov1", {}, (256,)),
    ("mocov3-vit-tiny-random", lambda: (lambda c: (c, unprefixed(c["state_dict"],
     "module.base_encoder.")))(mocov3_release()), "vit-s-300ep.pth.tar", "mocov3", {}, (256,)),
    ("mae-vit-tiny-random", mae_case, "mae_pretrain_vit_large.pth", "mae",
     {"final_norm": False}, (256,)),
    ("jepa-vit-tiny-random", lambda: (lambda c: (c, unprefixed(c["encoder"], "module.")))(
     jepa_release()), "IN1K-vit.h.14-300e.pth.tar", "jepa", {}, (256,)),
    ("clip-vit-tiny-random", lambda: (lambda c: (c, clip_as_vit(c)))(clip_release()),
     "ViT-L-14.pt", "clip", {"eps": 1e-5, "act": quick_gelu, "final_norm": False, "ln_pre": True},
     (256,)),
    ("siglip-vit-tiny-random", siglip_case, "open_clip_pytorch_model.bin", "siglip", {}, (256,)),
]  # fmt: skip


@pytest.mark.parametrize(
    "name,build,file,family,forward,resolutions", CASES, ids=[c[0] for c in CASES]
)
def test_release_checkpoint_gives_repas_tokens(name, build, file, family, forward, resolutions,
                                               tmp_path):  # fmt: skip
    torch.manual_seed(0)
    checkpoint, weights = build()
    path = str(tmp_path / file)
    if family == "clip":
        save_torchscript(checkpoint, path)
    else:
        torch.save(checkpoint, path)
    for resolution in resolutions:
        x = torch.randint(0, 256, (2, 3, resolution, resolution), dtype=torch.uint8)
        tokens = load_encoder(name, resolution, weights=path)(x)
        grid = resolution // 16
        expected = repa_tokens(weights, repa_preprocess(x, family), grid, **forward)
        assert tokens.shape == (2, grid * grid, D)
        torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)


def test_mocov3_conversion_fixes_rcgs_misnamed_keys():
    prefix = "module.base_encoder."
    release = {"state_dict": {
        prefix + "blocks.13.norm13.weight": torch.ones(1), prefix + "blocks.13.mlp.fc13.bias":
        torch.ones(2), prefix + "blocks.14.norm14.bias": torch.ones(3), prefix +
        "blocks.14.mlp.fc14.weight": torch.ones(4), prefix + "head.0.weight": torch.ones(5),
        prefix + "cls_token": torch.ones(6), "module.momentum_encoder.cls_token": torch.ones(7),
    }}  # fmt: skip
    sizes = {k: v.numel() for k, v in mocov3_state_dict(release).items()}
    expected = {"blocks.13.norm1.weight": 1, "blocks.13.mlp.fc1.bias": 2, "blocks.14.norm2.bias": 3,
                "blocks.14.mlp.fc2.weight": 4, "cls_token": 6}  # fmt: skip
    assert sizes == expected


def test_timm_state_dicts_load_too(tmp_path):
    """A timm-layout file (DINOv3's, SigLIP 2's library layout) loads as it is."""
    for name in ("dinov3-vit-tiny-random", "siglip-vit-tiny-random"):
        torch.manual_seed(1)
        vit = build_vit(name, 256)
        torch.save(vit.state_dict(), tmp_path / "w.pth")
        x = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
        tokens = load_encoder(name, 256, weights=str(tmp_path / "w.pth"))(x)
        mean = 0.5 if name.startswith("siglip") else torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)
        std = 0.5 if name.startswith("siglip") else torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
        expected = vit.eval().forward_features((x / 255 - mean) / std)[:, vit.num_prefix_tokens :]
        torch.testing.assert_close(tokens, expected)


# --------------------------------------------------------------------------------------------
# Names, grids, dimensions, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_name_builds_its_architecture_at_256_and_512(name):
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        for resolution in (256, 512) if name.startswith(("dinov2", "dinov3")) else (256,):
            vit = build_vit(name, resolution)
            assert vit.embed_dim == encoder_dim(name)
            assert tuple(vit.patch_embed.grid_size) == (encoder_grid(resolution),) * 2


@pytest.mark.parametrize("name", list(STANDINS))
def test_standins_grid_at_256_and_512_and_repas_512_rule(name):
    x = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    assert load_encoder(name, 256)(x).shape == (1, 256, 32)
    if name.startswith(("dinov2", "dinov3")):
        x = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
        assert load_encoder(name, 512)(x).shape == (1, 1024, 32)
    else:
        with pytest.raises(InputError, match="512-px images with DINOv2"):
            load_encoder(name, 512)


def test_weights_errors_say_what_to_do(tmp_path):
    with pytest.raises(WeightsUnavailable, match="--enc-weights FILE"):
        load_encoder("mocov3-vit-b")
    with pytest.raises(InputError, match="neither a file nor a timm pretrained name"):
        load_encoder("mae-vit-l", weights="mae_pretrain_vit_large.pth")
    torch.save(vit_release(16, 14), tmp_path / "dino.pth")
    with pytest.raises(InputError, match="does not hold jepa-vit-tiny-random's weights.*; pass"):
        load_encoder("jepa-vit-tiny-random", weights=str(tmp_path / "dino.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(InputError, match="holds a list, not a state dict; pass the encoder's"):
        load_encoder("dinov1-vit-tiny-random", weights=str(tmp_path / "list.pth"))
    with pytest.raises(InputError, match="--enc-weights must be a file"):
        load_encoder("mae-vit-tiny-random", weights="vit_large_patch16_224.mae")
    with pytest.raises(InputError, match="unknown encoder"):
        parse_encoder_list("dinov2-vit-b,clip-vit-B")
    assert parse_encoder_list("mocov3-vit-l, clip-vit-L,dinov2-vit-g_reg") == [
        "mocov3-vit-l", "clip-vit-L", "dinov2-vit-g_reg"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Several encoders at once, end to end
# --------------------------------------------------------------------------------------------

SEVERAL = "dinov2-vit-tiny-random,mae-vit-tiny-random,clip-vit-tiny-random"


def test_several_encoders_prepare_and_train_online(toy_images, tmp_path):
    """REPA's comma list: prepare.py stores each encoder's tokens, the same tokens the encoders
    give online on the stored pixels, and training runs with the encoders online."""
    data = str(tmp_path / "data")
    prepare_main(prepare_args(prepare_flags(toy_images, data, "--enc-type", SEVERAL)))
    sample = LatentDataset(data, encoders=SEVERAL.split(","), pixels=True)[0]
    for name, stored in zip(SEVERAL.split(","), sample["features"], strict=True):
        online = load_encoder(name, RES)(sample["pixels"][None])[0]  # (16, 32): 4×4 at 64 px
        torch.testing.assert_close(stored.float(), online, rtol=1e-3, atol=1e-3)
    AcceleratorState._reset_state(reset_partial_state=True)
    args = train.parse_args([
        "--data-dir", data, "--resolution", str(RES), "--output-dir", str(tmp_path),
        "--exp-name", "online", "--model", "SiTDown", "--model-config", TINY_MODEL,
        "--enc-type", SEVERAL, "--vae", "tiny-random", "--batch-size", "8",
        "--max-train-steps", "1", "--checkpointing-steps", "1", "--sampling-steps", "0",
        "--num-workers", "0", "--mixed-precision", "no", "--encoder-mode", "online",
    ])  # fmt: skip
    train.main(args)
    state = load_checkpoint(str(tmp_path / "online" / "checkpoints" / "0000001.pt"))
    assert state["model_kwargs"]["z_dims"] == [32, 32, 32] and state["step"] == 1
    assert len([k for k in state["model"] if k.endswith("projectors.2.0.weight")]) == 1


def test_512_px_with_a_non_dino_encoder_is_a_usage_error(capsys):
    for parse, flags in [(train.parse_args, ["--data-dir", "d", "--exp-name", "x"]),
                         (prepare_args, ["--source", "s", "--dest", "d"])]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            parse([*flags, "--resolution", "512", "--enc-type", "dinov2-vit-b,mae-vit-l"])
        assert exit_info.value.code == 2
        assert "mae-vit-l runs at up to 256 px" in capsys.readouterr().err
        parse([*flags, "--resolution", "512", "--enc-type", "dinov2-vit-b,dinov3-vit-b"])

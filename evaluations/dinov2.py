"""DINOv2 features for FD-DINOv2 (Stein et al. 2023), the Fréchet distance that EDM2 reports.

The network and preprocessing are dgm-eval's and EDM2's (`calculate_metrics.py`,
`DINOv2Detector`): DINOv2 ViT-L/14, uint8 images resized to 224×224 by bicubic interpolation with
antialiasing (EDM2's `resize_mode='torch'`; dgm-eval resizes with PIL's bicubic filter, which EDM2
reports as giving almost the same numbers), scaled to [0, 1], normalised with ImageNet's mean and
std, and the 1024-d class token after the final norm. The weights are timm's copy of Meta's
release (`vit_large_patch14_dinov2.lvd142m`), built at 224 px: timm resamples the 37×37 position
embeddings to 16×16 once at load, where Meta's hub model interpolates them at each call (both
bicubic), so the features agree up to that resampling's rounding. The distance is the same
`frechet_distance` as FID's, on these features.

`random_weights_for_tests=True` builds a tiny DINOv2-shaped network (width 32, 2 blocks, random
weights): its numbers mean nothing, it exists for tests only.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from evaluations.commands import Unavailable
from evaluations.metrics import GaussianAccumulator

TIMM_NAME = "vit_large_patch14_dinov2.lvd142m"
WEIGHTS_SOURCE = f"https://huggingface.co/timm/{TIMM_NAME}"
INPUT_SIZE = 224
TEST_FEATURE_DIM = 32  # the stand-in's width
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Features(nn.Module):
    """uint8 (N, H, W, 3) images → (N, D) DINOv2 class tokens (after the final norm)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.mean: torch.Tensor  # (1, 3, 1, 1), on the pixel scale [0, 255]
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def feature_dim(self) -> int:
        return int(self.vit.num_features)  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x,
                size=(INPUT_SIZE, INPUT_SIZE),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
        x = (x - self.mean) / self.std  # x/255, then ImageNet's normalisation
        tokens = self.vit.forward_features(x)  # type: ignore[operator]  # (N, 1 + T, D), normed
        return tokens[:, 0]  # the class token


def _tiny_vit() -> nn.Module:
    """DINOv2's architecture at width 32 and depth 2. DINOv2's initialisation (layer scales of
    1e-5, weights of std 0.02) would give nearly the same class token for every image; layer
    scales of 1 and weights of std fan_in^-½ make it vary."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=INPUT_SIZE,
            embed_dim=TEST_FEATURE_DIM, depth=2, num_heads=2, init_values=1.0,
        )  # fmt: skip
        for name, param in vit.named_parameters():
            if param.dim() > 1 and "pos_embed" not in name and "cls_token" not in name:
                nn.init.normal_(param, std=param[0].numel() ** -0.5)
    return vit


def build_dinov2(
    weights: str | Path | None = None, *, random_weights_for_tests: bool = False
) -> DinoV2Features:
    """DINOv2 ViT-L/14 from a local timm weights file (`weights`: .safetensors or .bin), else
    from the Hugging Face hub (cached after the first download); or the test stand-in."""
    import timm

    if random_weights_for_tests:
        if weights is not None:
            raise ValueError("give either DINOv2 weights or random_weights_for_tests, not both")
        return DinoV2Features(_tiny_vit())
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"DINOv2 weights {weights} not found; download {WEIGHTS_SOURCE}")
    overlay = {"file": str(weights)} if weights else None
    try:
        vit = timm.create_model(
            TIMM_NAME, pretrained=True, img_size=INPUT_SIZE, pretrained_cfg_overlay=overlay
        )
    except Exception as err:  # network errors come in many types; all mean "not available"
        raise Unavailable(
            f"could not load the DINOv2 ViT-L/14 weights ({type(err).__name__}: {err}). On a "
            f"machine with internet access download model.safetensors from {WEIGHTS_SOURCE}, "
            "then pass its path with --dinov2-weights PATH"
        ) from err
    return DinoV2Features(vit)


def add_dinov2_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fd-dinov2",
        action="store_true",
        help="also compute FD-DINOv2 (DINOv2 ViT-L/14 features; see evaluations/dinov2.py)",
    )
    parser.add_argument(
        "--dinov2-weights",
        metavar="PATH",
        help=f"timm's {TIMM_NAME} weights file (default: the Hugging Face hub, cached)",
    )


def dinov2_from_args(args: argparse.Namespace, device: torch.device) -> DinoV2Features | None:
    """With --fd-dinov2, the DINOv2 network (the test stand-in with --random-weights-for-tests)."""
    if not args.fd_dinov2:
        return None
    tests = args.random_weights_for_tests
    return build_dinov2(args.dinov2_weights, random_weights_for_tests=tests).to(device)


@torch.inference_mode()
def dinov2_statistics(
    net: DinoV2Features, batches: Iterable[np.ndarray], num_images: int, desc: str = "DINOv2"
) -> tuple[np.ndarray, np.ndarray]:
    """(D,) mean and (D, D) covariance of the DINOv2 features of uint8 (B, H, W, 3) batches."""
    stats = GaussianAccumulator()
    with tqdm(total=num_images, desc=desc, unit="img") as bar:
        for batch in batches:
            stats.update(net(torch.from_numpy(batch).to(net.device)))
            bar.update(len(batch))
    return stats.mean_and_covariance()

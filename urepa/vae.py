"""The autoencoder of the latent space: the SD-VAE, its pixel-space stand-ins, and sampling
latents from the stored moments. (The representation encoders are in encoders.py.)

Used by `preprocessing/` (encoding), `train.py` (preview decoding) and `generate.py` (decoding).
Pretrained weights load through diffusers' `from_pretrained` or from a local folder. Without
network access and without a local copy, loading fails with a message that says how to provide
the weights.

Tests never download: `load_vae("tiny-random")` builds a tiny, randomly initialised AutoencoderKL
through the same wrapper, selected by name, explicitly; nothing falls back to it silently.
`load_vae("pixels")` is the identity "autoencoder" (pixel space, 3 channels, factor 1), and
`load_vae("pixels-2x")` the same at half the resolution (factor 2: 2×2 average pooling, decoded
by repeating each pixel), which the quickstart uses when the SD-VAE cannot be fetched: decoded
samples are real images, not random-decoder noise.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from urepa.encoders import WeightsUnavailable, offline_hint
from urepa.utils import InputError

# SD-VAE latent normalisation (LDM/DiT/REPA): z = 0.18215 · (mean + std · ε), bias 0.
VAE_SCALE = 0.18215
SD_VAE_FACTOR = 8  # image pixels per latent pixel (each side)
VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_STANDIN = "tiny-random"
VAE_PIXELS = "pixels"
VAE_PIXELS_2X = "pixels-2x"
PIXEL_VAES = {1: VAE_PIXELS, 2: VAE_PIXELS_2X}  # downsampling factor -> --vae name


#################################################################################
#                                   SD-VAE                                      #
#################################################################################


class LatentAutoencoder(nn.Module):
    """diffusers `AutoencoderKL` with the latent conventions of the paper.

    `encode_moments` returns the posterior's mean and std (what preprocessing stores);
    `sample_latents` draws `VAE_SCALE · (mean + std · ε)` (a fresh draw every training step);
    `decode` takes such scaled latents back to images in [-1, 1].
    """

    def __init__(self, vae: Any, name: str):
        super().__init__()
        self.vae: Any = vae.eval().requires_grad_(False)  # diffusers AutoencoderKL (untyped)
        self.name = name
        self.latent_channels: int = vae.config.latent_channels
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) images -> (N, 2·C_lat, H/f, W/f) posterior [mean, std], fp32."""
        x = images.to(self.vae.dtype) / 127.5 - 1
        dist = self.vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (N, C_lat, h, w) -> images in [-1, 1], (N, 3, h·f, w·f)."""
        return self.vae.decode(latents.to(self.vae.dtype) / VAE_SCALE).sample.float()


def sample_latents(
    moments: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """(N, 2·C, h, w) stored [mean, std] -> scaled latents VAE_SCALE · (mean + std · ε).

    ε is drawn from `generator` unless given as `noise` (N, C, h, w)."""
    mean, std = moments.float().chunk(2, dim=1)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * VAE_SCALE


class PixelAutoencoder(LatentAutoencoder):
    """Pixel space in the latent conventions: 3 "latent" channels, no network; `factor` 1 (the
    image itself) or 2 (the image average-pooled 2×2, decoded by repeating each pixel 2×2).

    The stored mean is the (pooled) image in [-1, 1] divided by VAE_SCALE and the std is 0, so
    that `sample_latents` returns the image itself (data of std ≈ 0.5, as in pixel diffusion,
    rather than ≈ 0.1). At factor 2, patch 8 gives the token grid that SD-VAE's factor 8 and
    patch 2 give (4×4 at 64 px), and the encoder's grid is that grid, as with SD-VAE and DINOv2.
    """

    def __init__(self, factor: int = 1) -> None:
        nn.Module.__init__(self)  # no diffusers network to wrap: LatentAutoencoder's init needs one
        self.name = PIXEL_VAES[factor]
        self.latent_channels = 3
        self.downsample_factor = factor

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> (N, 6, H/f, W/f) [image / VAE_SCALE, 0], fp32."""
        x = F.avg_pool2d(images.float() / 127.5 - 1, self.downsample_factor)
        return torch.cat([x / VAE_SCALE, torch.zeros_like(x)], dim=1)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(N, 3, h, w) sampled pixels -> (N, 3, h·f, w·f), each pixel repeated f×f, fp32."""
        return F.interpolate(latents.float(), scale_factor=self.downsample_factor, mode="nearest")


def latent_geometry(spec: str) -> tuple[int, int]:
    """(latent channels, downsample factor) of `--vae spec`, known without loading it."""
    factor = next((f for f, name in PIXEL_VAES.items() if name == spec), None)
    return (4, SD_VAE_FACTOR) if factor is None else (3, factor)


def resolve_vae(flag: str | None, trained_with: str | None, what: str) -> str:
    """--vae for a model or dataset whose latents came from `trained_with` (None: not
    recorded): that VAE when the flag is not given (ema when nothing is recorded); the flag
    when its latents have the same shape (ema, mse and a local SD-VAE share SD-VAE's); else
    an InputError. `what` names the model or dataset, e.g. "the checkpoint was trained"."""
    if flag is None:
        return trained_with or "ema"
    if trained_with is not None and latent_geometry(flag) != latent_geometry(trained_with):
        channels, factor = latent_geometry(trained_with)
        raise InputError(
            f"--vae {flag} does not fit: {what} with --vae {trained_with}, whose latents "
            f"({channels} channels, 1/{factor} of the image side) {flag} does not decode; leave "
            f"--vae out to use {trained_with}"
        )
    return flag


def tiny_autoencoder_kl() -> nn.Module:
    """An SD-VAE-shaped AutoencoderKL (factor 8, 4 latent channels) with ~25K random weights."""
    from diffusers.models import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )


def load_vae(
    spec: str = "ema", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LatentAutoencoder:
    """`ema` / `mse` (Stability's fine-tuned SD-VAEs), a local diffusers folder, the test
    stand-in `tiny-random` (random weights, seeded, for tests only), `pixels` (identity) or
    `pixels-2x` (pixels at half the resolution)."""
    for factor, name in PIXEL_VAES.items():
        if spec == name:
            return PixelAutoencoder(factor).to(device)
    if spec == VAE_STANDIN:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = tiny_autoencoder_kl()
    else:
        from diffusers.models import AutoencoderKL

        source = VAE_IDS.get(spec, spec)
        if spec not in VAE_IDS and not os.path.isdir(spec):
            raise InputError(
                f"--vae must be one of {sorted(VAE_IDS)}, a local diffusers folder, "
                f"{VAE_PIXELS!r} (identity), {VAE_PIXELS_2X!r} (half resolution) or "
                f"{VAE_STANDIN!r} (test stand-in); got {spec!r}"
            )
        try:
            with warnings.catch_warnings():
                # diffusers passes huggingface_hub an argument it deprecated; nothing to act on
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
        except Exception as err:  # network errors come in many types; all mean "not available"
            raise WeightsUnavailable(offline_hint("the SD-VAE", source, "--vae PATH")) from err
    if dtype != torch.float32 and spec == VAE_STANDIN:
        vae = vae.to(dtype)  # (diffusers warns about any .to(dtype), even float32's)
    return LatentAutoencoder(vae.to(device), spec)

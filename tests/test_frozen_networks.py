"""Frozen networks: SD-VAE and DINOv2 wrappers, through tiny random stand-ins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from urepa.encoders import (
    ENCODER_STANDIN,
    encoder_dim,
    encoder_grid,
    encoder_input_size,
    load_encoder,
    parse_encoder_list,
)
from urepa.vae import VAE_SCALE, latent_geometry, load_vae, sample_latents


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_vae_standin_moments_latents_and_decode():
    vae = load_vae("tiny-random")
    moments = vae.encode_moments(images())
    assert moments.shape == (2, 8, 4, 4) and moments.dtype == torch.float32
    mean, std = moments.chunk(2, dim=1)
    assert (std > 0).all()
    # the posterior is the one diffusers computes on pixels scaled to [-1, 1]
    dist = vae.vae.encode(images().float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.std)
    gen = torch.Generator().manual_seed(3)
    z = sample_latents(moments, gen)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (mean + std * eps) * VAE_SCALE)
    out = vae.decode(z)
    torch.testing.assert_close(out, vae.vae.decode(z / VAE_SCALE).sample)
    assert out.shape == (2, 3, 32, 32)


def test_pixel_autoencoder_is_the_identity_in_latent_conventions():
    vae = load_vae("pixels")
    assert (vae.latent_channels, vae.downsample_factor) == latent_geometry("pixels") == (3, 1)
    assert latent_geometry("ema") == (4, 8)
    x = images()
    moments = vae.encode_moments(x)
    assert moments.shape == (2, 6, 32, 32) and moments.dtype == torch.float32
    assert (moments[:, 3:] == 0).all()  # no posterior noise
    # the "latent" a training step draws is the image in [-1, 1], whatever the noise
    z = sample_latents(moments, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, x.float() / 127.5 - 1)
    torch.testing.assert_close(vae.decode(z), z)
    # generate.py's uint8 conversion truncates, so float rounding can cost one level
    back = torch.clamp(255 * (vae.decode(z) + 1) / 2, 0, 255).to(torch.uint8)
    assert (back.int() - x.int()).abs().max() <= 1


def test_standins_are_deterministic_and_frozen():
    a, b = load_vae("tiny-random"), load_vae("tiny-random")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not any(p.requires_grad for p in a.parameters())
    enc = load_encoder(ENCODER_STANDIN)
    assert not any(p.requires_grad for p in enc.parameters())


def test_encoder_standin_matches_repa_preprocessing():
    enc = load_encoder(ENCODER_STANDIN, resolution=256)
    x = images(size=256)
    tokens = enc(x)
    assert tokens.shape == (2, 256, encoder_dim(ENCODER_STANDIN))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    manual = F.interpolate((x / 255.0 - mean) / std, 224, mode="bicubic")
    manual = enc.vit.forward_features(manual)[:, enc.vit.num_prefix_tokens :]
    torch.testing.assert_close(tokens, manual)


def test_encoder_grid_follows_resolution():
    enc = load_encoder(ENCODER_STANDIN, resolution=512)
    assert enc.input_size == 448 and enc.grid_size == 32


@pytest.mark.parametrize("resolution", [32, 64, 256, 512])
def test_encoder_grid_rule_matches_the_built_encoder(resolution):
    # 224 px per 256 px (REPA), 14-px patches: the SD-VAE latent side / 2 = resolution / 16.
    assert encoder_input_size(resolution) == 224 * resolution // 256
    assert encoder_grid(resolution) == resolution // 16
    enc = load_encoder(ENCODER_STANDIN, resolution=resolution)
    assert enc.input_size == encoder_input_size(resolution)
    assert enc.grid_size == encoder_grid(resolution)
    # timm builds the position embedding for that grid once, at creation.
    grid = encoder_grid(resolution)
    assert tuple(enc.vit.patch_embed.grid_size) == (grid, grid)
    assert enc.vit.pos_embed.shape[1] == grid * grid + enc.vit.num_prefix_tokens


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="--vae must be one of"):
        load_vae("sd-vae-ft-xyz")
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder("dinov9-vit-b")
    with pytest.raises(ValueError, match="unknown encoder"):
        parse_encoder_list("dinov2-vit-b,clip")
    assert parse_encoder_list("dinov2-vit-b, dinov2-vit-l_reg") == [
        "dinov2-vit-b",
        "dinov2-vit-l_reg",
    ]
    assert encoder_dim("dinov2-vit-g") == 1536


@pytest.mark.parametrize(
    "call,flag",
    [("load_vae('ema')", "--vae PATH"), ("load_encoder('dinov2-vit-s')", "--enc-weights PATH")],
)
def test_offline_pretrained_load_says_how_to_provide_weights(call, flag, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = f"from urepa.vae import load_vae\nfrom urepa.encoders import load_encoder\n{call}"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=120,
    )
    assert result.returncode != 0
    assert "WeightsUnavailable" in result.stderr and flag in result.stderr  # a RuntimeError


def test_half_resolution_pixel_space_pools_and_repeats():
    """--vae pixels-2x: 2×2 average pooling, decoded by repeating each pixel; an image made of
    2×2 blocks comes back exactly, and `latent_geometry` knows it without loading it."""
    vae = load_vae("pixels-2x")
    assert (vae.latent_channels, vae.downsample_factor) == latent_geometry("pixels-2x") == (3, 2)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 3, 4, 4), generator=g, dtype=torch.uint8)
    images = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (2, 3, 8, 8)
    moments = vae.encode_moments(images)
    mean, std = moments.chunk(2, dim=1)
    assert moments.shape == (2, 6, 4, 4) and (std == 0).all()
    torch.testing.assert_close(mean * VAE_SCALE, blocks.float() / 127.5 - 1)
    decoded = vae.decode(sample_latents(moments))
    torch.testing.assert_close(decoded, images.float() / 127.5 - 1)


@pytest.mark.parametrize("latent_side", [4, 8, 16, 32, 64])
def test_the_models_default_encoder_grid_is_the_encoders_grid_on_the_decoded_image(latent_side):
    """models/ states the geometry itself (it imports neither the VAE nor the encoders): the
    encoder's token grid on the image that SD-VAE latents of this side decode to."""
    from models.base import default_encoder_grid
    from urepa.vae import SD_VAE_FACTOR

    assert default_encoder_grid(latent_side) == encoder_grid(SD_VAE_FACTOR * latent_side)

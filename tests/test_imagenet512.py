"""REPA appendix J (ImageNet 512×512): the sizes the 512 path derives, from the preprocessing
flags to the model, and the launcher's commands. Shapes only, which need no weights: the whole
path (prepare, online-encoder training, generation) was run once by hand on CPU with stand-ins."""

from __future__ import annotations

import torch
from test_readme_commands import dry_run

from models import build_model
from preprocessing.prepare import build_modalities, parse_args
from urepa.encoders import encoder_grid, encoder_input_size


def test_512_px_gives_64_latents_dinov2_at_448_and_a_32_grid():
    args = parse_args(["--source", "s", "--dest", "d", "--resolution", "512",
                       "--enc-type", "dinov2-vit-b"])  # fmt: skip
    modalities = {m.name: m for m in build_modalities(args)}
    assert modalities["moments"].shape == (8, 64, 64)
    features = modalities["features-dinov2-vit-b"]
    assert features.shape == (32 * 32, 768) and dict(features.info)["input_size"] == 448
    assert encoder_input_size(512, "dinov2-vit-b") == 448 and encoder_grid(512) == 32


def test_sit_xl_on_64_latents_aligns_its_32_grid_without_resampling():
    with torch.device("meta"):
        model = build_model("SiT-XL/2", input_size=64, z_dims=[768], encoder_depth=8)
    assert model.pos_embed.shape == (1, 1024, 1152)
    assert model.tap_grid_size == model.encoder_grid == 32
    assert all(head.scale == 1 for head in model.projectors)


def test_launcher_trains_at_512_and_evaluates_against_adms_512_batch():
    train, sample, evaluate = dry_run("scripts/imagenet512.sh", ["200"], NPROC="8")
    assert "--resolution 512" in train and "--encoder-mode online" in train
    assert "--max-train-steps 1000800" in train and "--model SiT-XL/2" in train
    assert "--cfg-scale 1.35" in sample and "1000800.pt" in sample
    assert evaluate.startswith("python evaluations/evaluator.py VIRTUAL_imagenet512.npz")
    prepare, fetch = dry_run("scripts/imagenet512.sh", ["prepare"], REF="/nonexistent.npz")
    assert "--resolution 512" in prepare and "--save-pixels" in prepare
    assert fetch.endswith("imagenet/512/VIRTUAL_imagenet512.npz")

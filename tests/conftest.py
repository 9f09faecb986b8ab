"""Fixtures shared by the training tests (test_train.py, test_faults.py): a toy image folder and
the tiny dataset that preprocessing/prepare.py writes from it with the stand-in VAE and encoder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocessing.prepare import main as prepare_main
from preprocessing.prepare import parse_args as prepare_args
from urepa.encoders import ENCODER_STANDIN

RES = 64  # 8×8 latents; SiT↓'s middle stage runs on 4×4 tokens, DINOv2's grid is 4×4
NUM_IMAGES = 32


def prepare_flags(images: str, dest: str, *extra: str) -> list[str]:
    """preprocessing/prepare.py's flags for the toy set; `extra` adds to them."""
    return [
        "--source", images, "--dest", dest, "--vae", "tiny-random",
        "--enc-type", ENCODER_STANDIN, "--resolution", str(RES), "--save-pixels",
        "--num-workers", "0", "--batch-size", "16", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def toy_images(tmp_path_factory) -> str:
    """32 smooth 64×64 images in 4 classes, as an ImageFolder."""
    root = tmp_path_factory.mktemp("toy-images")
    for k in range(NUM_IMAGES):
        yy, xx = np.mgrid[0:RES, 0:RES]
        rgb = np.stack([np.sin(xx / (3 + c + k % 4) + yy / (5 + c) + k) for c in range(3)], -1)
        folder = root / f"class{k % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((rgb * 0.4 + 0.5) * 255).astype(np.uint8)).save(folder / f"{k}.png")
    return str(root)


@pytest.fixture(scope="session")
def data_dir(toy_images, tmp_path_factory) -> str:
    """The toy images -> VAE moments, DINOv2 stand-in features and pixels."""
    dest = str(tmp_path_factory.mktemp("train-data") / "data")
    prepare_main(prepare_args(prepare_flags(toy_images, dest)))
    return dest

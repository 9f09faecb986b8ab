"""sample.py end to end: a tiny stand-in checkpoint -> a grid PNG whose tiles are the sampler's
images of the asked classes, computed here again by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models import build_model
from samplers import VelocityOnly, euler_sampler
from urepa.checkpoints import checkpoint_state, save_checkpoint
from urepa.text_encoders import TEXT_ENCODER_STANDIN, load_text_encoder
from urepa.utils import InputError
from urepa.vae import load_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KWARGS = dict(input_size=8, hidden_size=32, depths=(1, 1, 1), num_heads=2, num_classes=4,
              z_dims=[16], projector_dim=16)  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("SiTDown", **KWARGS)
    for p in model.parameters():  # random weights, so that the velocity is not zero
        p.data.normal_(0, 0.1)
    path = str(tmp_path_factory.mktemp("ckpt") / "0000100.pt")
    args = {"vae": "tiny-random", "path_type": "linear", "resolution": 64}
    save_checkpoint(path, checkpoint_state(model, model, step=100, args=args))
    return path, model.eval()


def tiles(path, rows, columns, size=64, pad=2):
    """The (rows, columns, size, size, 3) images of a torchvision grid with `pad` pixels."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (rows * (size + pad) + pad, columns * (size + pad) + pad, 3)
    return np.stack([
        np.stack([grid[pad + r * (size + pad):][:size, pad + c * (size + pad):][:, :size]
                  for c in range(columns)])
        for r in range(rows)
    ])  # fmt: skip


def ablation_grid(net, y, seed: int) -> np.ndarray:
    """The (2, 2, 64, 64, 3) uint8 tiles of the ablation preset (Euler ODE, 50 steps, cfg 1.8 on
    t <= 0.7) for 4 labels `y`, noise drawn in row order after seeding, decoded by the VAE the
    checkpoints record."""
    torch.manual_seed(seed)
    z = torch.randn(4, 4, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only wait on each other
    try:
        with torch.no_grad():
            latents = euler_sampler(net, z, y, num_steps=50, cfg_scale=1.8, guidance_high=0.7)
            images = load_vae("tiny-random").decode(latents.float())
    finally:
        torch.set_num_threads(threads)
    expected = ((images + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return expected.permute(0, 2, 3, 1).numpy().reshape(2, 2, 64, 64, 3)


def test_sample_py_writes_the_sampler_images_of_each_class_as_rows(ckpt, tmp_path):
    path, model = ckpt
    out = str(tmp_path / "grid.png")
    command = [sys.executable, "sample.py", "--ckpt", path, "--classes", "3", "1", "--per-class",
               "2", "--preset", "ablation", "--seed", "5", "--out", out]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # tiny: one thread
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    # By hand: the sampler of the ablation preset on the asked classes.
    expected = ablation_grid(VelocityOnly(model), torch.tensor([3, 3, 1, 1]), seed=5)
    got = tiles(out, rows=2, columns=2)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(got[0].astype(int) - got[1].astype(int)).mean() > 0  # the classes differ


def test_sample_py_refuses_a_class_the_model_does_not_have(ckpt, tmp_path):
    args = sample.parse_args(["--ckpt", ckpt[0], "--classes", "0", "4", "--out",
                              str(tmp_path / "g.png")])  # fmt: skip
    with pytest.raises(InputError, match=r"--classes must lie in \[0, 4\), got \[0, 4\]"):
        sample.main(args)
    assert not os.path.exists(tmp_path / "g.png")


def test_sample_py_stays_short():
    with open(os.path.join(REPO, "sample.py")) as f:
        lines = [line for line in f if line.strip()]
    assert len(lines) <= 40  # blank lines aside


@pytest.fixture(scope="module")
def t2i_ckpt(tmp_path_factory):
    """A toy MMDiT trained (as its flags say) on captions of the tiny stand-in text encoder."""
    torch.manual_seed(1)
    model = build_model("MMDiT", input_size=8, depth=2, context_dim=32, z_dims=[16],
                        encoder_depth=1, projector_dim=16)  # fmt: skip
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    path = str(tmp_path_factory.mktemp("t2i") / "0000100.pt")
    args = {"vae": "tiny-random", "path_type": "linear", "resolution": 64,
            "text_encoder": TEXT_ENCODER_STANDIN}  # fmt: skip
    save_checkpoint(path, checkpoint_state(model, model, step=100, args=args))
    return path, model.eval()


def test_sample_py_writes_a_row_per_prompt_guided_by_the_empty_caption(t2i_ckpt, tmp_path):
    path, model = t2i_ckpt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square on grey\n")  # a blank line is skipped
    out = str(tmp_path / "grid.png")
    argv = ["--ckpt", path, "--prompts", str(prompts), "--per-class", "2", "--preset", "ablation",
            "--seed", "5", "--out", out]  # fmt: skip
    sample.main(sample.parse_args(argv))
    # By hand: the recorded text encoder's features of the prompts and of "" (the null row of
    # guidance), rounded to float16 as stored for training; model(x, t, context) called directly.
    encoder = load_text_encoder(TEXT_ENCODER_STANDIN)
    contexts = encoder(["a red circle", "a blue square on grey"]).half().float()
    empty = encoder([""]).half().float()

    class ByCaption:  # labels 0, 1: the prompts; 2: the empty caption
        num_classes = 2

        def __call__(self, x, t, y):
            table = torch.cat([contexts, empty])
            return model(x, t, table[y], return_zs=False)

    expected = ablation_grid(ByCaption(), torch.tensor([0, 0, 1, 1]), seed=5)
    got = tiles(out, rows=2, columns=2)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(got[0].astype(int) - got[1].astype(int)).mean() > 0  # the prompts differ


def test_sample_py_matches_prompts_to_text_to_image_checkpoints(ckpt, t2i_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = str(tmp_path / "g.png")
    with pytest.raises(InputError, match="--prompts FILE .* SiTDown is class-conditional"):
        sample.main(sample.parse_args(["--ckpt", ckpt[0], "--prompts", str(prompts), "--out", out]))
    with pytest.raises(InputError, match="--prompts FILE .* MMDiT is text-to-image"):
        sample.main(sample.parse_args(["--ckpt", t2i_ckpt[0], "--out", out]))
    prompts.write_text("\n \n")
    with pytest.raises(InputError, match="holds no prompt: write one per line"):
        sample.main(sample.parse_args(["--ckpt", t2i_ckpt[0], "--prompts", str(prompts),
                                       "--out", out]))  # fmt: skip
    assert not os.path.exists(out)

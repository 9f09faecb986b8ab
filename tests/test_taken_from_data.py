"""What a dataset or checkpoint records is taken from it, not asked again: train.py reads the
resolution, the encoder, the VAE and the latent channels from the dataset, generate.py and
sample.py the VAE from the checkpoint; a flag that contradicts them is a one-line error. A run
that failed before its first checkpoint does not block the corrected command."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import prepare_flags

import generate
import train
from models import build_model
from preprocessing.prepare import main as prepare_main
from preprocessing.prepare import parse_args as prepare_args
from urepa.checkpoints import TrainingError, checkpoint_state, load_checkpoint, save_checkpoint
from urepa.utils import InputError, ReportedError

# The docs' small CPU run: a bare class sized by --model-config, nothing about the data.
SMALL = json.dumps({"hidden_size": 32, "depths": [1, 1, 1], "num_heads": 2, "projector_dim": 32})


@pytest.fixture(scope="module")
def pixel_data(toy_images, tmp_path_factory) -> str:
    """The quickstart's stand-in data: 64-px images pooled to 3×32×32 "latents" (pixels-2x)."""
    dest = str(tmp_path_factory.mktemp("pixel-data") / "data")
    prepare_main(prepare_args(prepare_flags(toy_images, dest, "--vae", "pixels-2x")))
    return dest


def small_run(data_dir: str, out: str, *extra: str) -> list[str]:
    return ["--data-dir", data_dir, "--output-dir", out, "--exp-name", "small",
            "--model", "SiTDown", "--model-config", SMALL, "--batch-size", "8",
            "--max-train-steps", "2", "--checkpointing-steps", "2", "--sampling-steps", "0",
            "--num-workers", "0", *extra]  # fmt: skip


def run(argv: list[str]) -> int:
    AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its Accelerator
    try:
        return train.main(train.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_small_run_on_pixel_data_takes_everything_from_the_dataset(pixel_data, tmp_path):
    assert run(small_run(pixel_data, str(tmp_path))) == 0
    ckpt = load_checkpoint(str(tmp_path / "small" / "checkpoints" / "0000002.pt"))
    kwargs, args = ckpt["model_kwargs"], ckpt["args"]
    # 3 channels; one token per encoder patch: 32 / 4 = patch 8, 4×4 tokens, the 2×2 middle
    # stage upsampled to the stand-in encoder's 4×4 grid at 64 px
    assert (kwargs["in_channels"], kwargs["patch_size"], kwargs["encoder_grid"]) == (3, 8, 4)
    assert (args["resolution"], args["vae"], args["enc_type"]) == (
        64, "pixels-2x", "dinov2-vit-tiny-random"
    )  # fmt: skip
    assert ckpt["ema"]["x_embedder.proj.weight"].shape == (32, 3, 8, 8)


def test_sd_vae_data_records_the_model_arguments_it_always_did(data_dir, tmp_path):
    """SD-VAE-shaped latents (the tiny stand-in): 4 channels, patch 2 and SD-VAE's grid are the
    constructor's defaults, so the checkpoint records none of them (and old runs resume)."""
    assert run(small_run(data_dir, str(tmp_path))) == 0
    ckpt = load_checkpoint(str(tmp_path / "small" / "checkpoints" / "0000002.pt"))
    assert not {"in_channels", "patch_size", "encoder_grid"} & set(ckpt["model_kwargs"])
    assert ckpt["args"]["vae"] == "tiny-random"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model-config", json.dumps({**json.loads(SMALL), "in_channels": 4})],
         "--model-config in_channels 4 contradicts"),
        (["--vae", "ema"], "--vae ema does not fit"),
        (["--resolution", "32"], "holds 64-px data but --resolution is 32"),
    ],
)  # fmt: skip
def test_a_flag_that_contradicts_the_dataset_is_one_line(pixel_data, tmp_path, extra, message):
    with pytest.raises(ReportedError, match=message) as err:
        run(small_run(pixel_data, str(tmp_path), *extra))
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "small")  # refused before anything was written


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(
    pixel_data, tmp_path, monkeypatch
):
    def fail(*args, **kwargs):
        raise RuntimeError("crash at step 1")

    with monkeypatch.context() as patch:
        patch.setattr(train, "train", fail)
        with pytest.raises(RuntimeError, match="crash at step 1"):
            run(small_run(pixel_data, str(tmp_path)))
    assert os.path.isdir(tmp_path / "small")  # it got as far as its run directory
    assert run(small_run(pixel_data, str(tmp_path))) == 0  # the same command, no --resume
    assert os.path.exists(tmp_path / "small" / "checkpoints" / "0000002.pt")


def test_a_folder_without_checkpoints_but_more_says_what_to_delete(pixel_data, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=f"holds no checkpoint: delete it \\(rm -r {folder}"):
        run(small_run(pixel_data, str(tmp_path)))
    assert (folder / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- generate.py


def pixel_checkpoint(path: str, args: dict) -> None:
    torch.manual_seed(0)
    kwargs = dict(input_size=16, in_channels=3, patch_size=4, hidden_size=32, depths=(1, 1, 1),
                  num_heads=2, num_classes=4, z_dims=[16], projector_dim=16)  # fmt: skip
    model = build_model("SiTDown", **kwargs)
    save_checkpoint(path, checkpoint_state(model, model, step=1, args=args))


@pytest.mark.parametrize(
    "recorded",
    [
        {"vae": "pixels-2x", "resolution": 32},
        {"vae": "ema", "resolution": 32},  # before train.py took the VAE from the data
    ],
)
def test_generate_decodes_with_the_vae_the_checkpoint_was_trained_with(tmp_path, recorded):
    ckpt = str(tmp_path / "pixels.pt")
    pixel_checkpoint(ckpt, {"path_type": "linear", **recorded})
    sample_dir = str(tmp_path / "samples")
    generate.main(generate.parse_args(["--ckpt", ckpt, "--sample-dir", sample_dir,
                                       "--num-fid-samples", "2", "--num-steps", "2"]))  # fmt: skip
    with np.load(f"{sample_dir}.npz") as f:
        images = f["arr_0"]
    assert images.shape == (2, 32, 32, 3)  # 16×16 pixels repeated 2×2: pixels-2x
    assert (images[:, ::2, ::2] == images[:, 1::2, 1::2]).all()
    with open(os.path.join(sample_dir, "settings.json")) as f:
        assert json.load(f)["vae"] == "pixels-2x"


def test_generate_refuses_a_vae_of_other_latents_in_one_line(tmp_path):
    ckpt = str(tmp_path / "pixels.pt")
    pixel_checkpoint(ckpt, {"vae": "pixels-2x", "resolution": 32})
    args = generate.parse_args(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "s"), "--vae",
                                "tiny-random", "--num-fid-samples", "2"])  # fmt: skip
    with pytest.raises(InputError, match="--vae tiny-random does not fit") as err:
        generate.main(args)
    assert "\n" not in str(err.value)


def test_the_docs_small_cpu_run_works_on_the_quickstarts_data(pixel_data, tmp_path, monkeypatch):
    """docs/training.md's small run on a CPU, as written, on the quickstart's stand-in data
    (3-channel pixels-2x), fewer steps and samples only; then sample.py on its checkpoint."""
    from test_readme_commands import doc_commands, split

    import sample

    commands = [c for c in doc_commands("docs/training.md") if "small-cpu" in c]
    assert [split(c)[1][1] for c in commands] == ["train.py", "sample.py"]
    (tmp_path / "quickstart-out").mkdir()
    os.symlink(pixel_data, tmp_path / "quickstart-out" / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # trackers are optional: training without
    env, words = split(commands[0])
    assert env == {"ACCELERATE_USE_CPU": "1"}
    shorter = ["--max-train-steps", "4", "--checkpointing-steps", "2", "--num-workers", "0"]
    assert run([*words[2:], *shorter]) == 0
    ckpt = load_checkpoint("exps/small-cpu/checkpoints/0000004.pt")
    assert (ckpt["model_kwargs"]["in_channels"], ckpt["args"]["vae"]) == (3, "pixels-2x")
    words = split(commands[1])[1]
    words[words.index("--ckpt") + 1] = "exps/small-cpu/checkpoints/0000004.pt"
    sample.main(sample.parse_args(words[2:]))
    assert os.path.getsize("samples/small-cpu.png") > 0


def test_report_to_wandb_without_it_is_one_line_saying_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    missing = lambda name, *rest: None if name == "wandb" else real(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(SystemExit):
        train.parse_args(["--data-dir", "d", "--exp-name", "x", "--report-to", "wandb"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("--report-to wandb needs the wandb package, an optional extra: pip "
                          "install -r requirements-trackers.txt (or pip install wandb; or "
                          "--report-to none)")  # fmt: skip
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "requirements.txt")) as f:
        packages = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
    assert not {p for p in packages if p.startswith(("wandb", "tensorboard"))}

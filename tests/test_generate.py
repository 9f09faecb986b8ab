"""generate.py end to end on CPU: a tiny SiT↓, the tiny VAE stand-in (8×8 latents -> 64×64
images), batch-size and process-count invariance, resume, settings guard, presets."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from generate import main, parse_args
from models import build_model
from urepa import sampling
from urepa.checkpoints import (
    checkpoint_state,
    export_ema_safetensors,
    load_model_for_sampling,
    save_checkpoint,
)
from urepa.encoders import WeightsUnavailable
from urepa.sampling import balanced_labels
from urepa.utils import InputError, ReportedError, hash_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_KWARGS = dict(input_size=8, hidden_size=32, depths=(1, 1, 1), num_heads=2, num_classes=4,
                   z_dims=[16], projector_dim=16)  # fmt: skip
N = 8
# SDE with guidance on part of the path: exercises per-sample SDE noise and the batch doubling.
FLAGS = ["--vae", "tiny-random", "--num-fid-samples", str(N), "--mode", "sde", "--num-steps", "4",
         "--cfg-scale", "2.0", "--guidance-high", "0.7", "--label-sampling", "balanced",
         "--precision", "fp32", "--global-seed", "3"]  # fmt: skip


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("SiTDown", **TINY_KWARGS)
    for p in model.parameters():  # random weights, so that the velocity is not zero
        p.data.normal_(0, 0.1)
    return model


def save_tiny_checkpoint(path, seed=0):
    model = tiny_model(seed)
    save_checkpoint(str(path), checkpoint_state(model, model, step=100,
                                                args={"path_type": "linear"}))  # fmt: skip
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    path = str(folder / "0000100.pt")
    model = save_tiny_checkpoint(path)
    export_ema_safetensors(str(folder / "ema.safetensors"), model.state_dict(), "SiTDown",
                           TINY_KWARGS, {"path_type": "linear"})  # fmt: skip
    return path


def run(ckpt, sample_dir, batch=4, extra=()):
    main(parse_args(["--ckpt", ckpt, "--sample-dir", str(sample_dir),
                     "--per-proc-batch-size", str(batch), *FLAGS, *extra]))  # fmt: skip
    return f"{sample_dir}.npz"


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """One uninterrupted run, batch 4."""
    sample_dir = tmp_path_factory.mktemp("ref") / "samples"
    return sample_dir, run(ckpt, sample_dir)


def read(path):
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- flags


def test_presets_and_explicit_overrides():
    base = ["--ckpt", "c.pt", "--sample-dir", "s"]
    main_ = parse_args(base + ["--preset", "paper-main"])
    assert (main_.mode, main_.num_steps, main_.cfg_scale) == ("sde", 250, 1.65)
    assert (main_.guidance_low, main_.guidance_high, main_.heun) == (0.0, 0.7, False)
    ablation = parse_args(base + ["--preset", "ablation"])
    assert (ablation.mode, ablation.num_steps, ablation.heun, ablation.cfg_scale) == (
        "ode", 50, False, 1.8)  # fmt: skip
    assert (ablation.guidance_low, ablation.guidance_high) == (0.0, 0.7)
    override = parse_args(base + ["--preset", "paper-main", "--cfg-scale", "1",
                                  "--num-steps", "100"])  # fmt: skip
    assert (override.mode, override.num_steps, override.cfg_scale) == ("sde", 100, 1.0)
    assert override.guidance_high == 0.7
    plain = parse_args(base)  # REPA's paper protocol: SDE 250 steps, no guidance
    assert (plain.mode, plain.num_steps, plain.cfg_scale) == ("sde", 250, 1.0)
    assert plain.guidance_high == 1.0
    assert parse_args(base + ["--guidance_high", "0.5"]).guidance_high == 0.5  # REPA's spelling
    assert plain.path_type is None  # taken from the checkpoint's training args


@pytest.mark.parametrize(
    "bad",
    [
        ["--mode", "sde", "--heun"],
        ["--guidance-low", "0.8", "--guidance-high", "0.7"],
        ["--per-proc-batch-size", "0"],
        ["--model", "SiT-XXL/2"],  # not a registered name: a usage error, not a traceback
    ],
)
def test_invalid_flags_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_args(["--ckpt", "c.pt", "--sample-dir", "s", *bad])


def test_balanced_labels_and_sample_seeds():
    labels = balanced_labels(1000, 10, global_seed=0)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 100))
    assert torch.equal(labels, balanced_labels(1000, 10, global_seed=0))
    assert not torch.equal(labels, balanced_labels(1000, 10, global_seed=1))
    with pytest.raises(ValueError, match="divisible"):
        balanced_labels(1001, 10, global_seed=0)
    seeds = {hash_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**64 for s in seeds)


# --------------------------------------------------------------------------- outputs


def test_npz_holds_the_pngs_and_settings_are_recorded(reference, ckpt):
    sample_dir, npz = reference
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 64, 64, 3)
    pngs = np.stack([np.asarray(Image.open(sample_dir / f"{i:06d}.png")) for i in range(N)])
    assert np.array_equal(arr, pngs)
    assert len({arr[i].tobytes() for i in range(N)}) == N  # every image differs
    assert arr.std() > 1  # not a constant image
    settings = json.loads((sample_dir / "settings.json").read_text())
    assert settings["ckpt"] == os.path.abspath(ckpt) and settings["model_name"] == "SiTDown"
    assert (settings["mode"], settings["cfg_scale"]) == ("sde", 2.0)
    assert settings["path_type"] == "linear"  # from the checkpoint's training args
    assert sorted(os.listdir(sample_dir)) == [f"{i:06d}.png" for i in range(N)] + ["settings.json"]


@pytest.mark.parametrize("batch", [3, 8])
def test_images_do_not_depend_on_the_batch_size(reference, ckpt, tmp_path, batch):
    # Same noise and labels per sample; kernels for other shapes may round differently, which
    # may move a rare pixel by one level (on this CPU, batches 4 and 8 agree bit for bit).
    images = np.load(run(ckpt, tmp_path / f"b{batch}", batch=batch))["arr_0"].astype(int)
    diff = np.abs(images - np.load(reference[1])["arr_0"])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_images_do_not_depend_on_the_number_of_processes(reference, ckpt, tmp_path):
    sample_dir = tmp_path / "two-procs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "generate.py", "--ckpt", ckpt, "--sample-dir", str(sample_dir),
           "--per-proc-batch-size", "4", *FLAGS]  # fmt: skip
    # torchrun would set one thread per process; CPU kernels split their sums by thread count,
    # so keep this process's count (the world size itself changes nothing).
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert read(f"{sample_dir}.npz") == read(reference[1])  # byte-identical


def test_noise_drawn_step_by_step_gives_the_same_npz(reference, ckpt, tmp_path):
    # The default draws each batch's SDE noise at once, in a background thread.
    assert read(run(ckpt, tmp_path / "stepwise", extra=["--no-predraw-noise"])) == read(
        reference[1]
    )


def test_safetensors_export_gives_the_same_images(reference, ckpt, tmp_path):
    st = os.path.join(os.path.dirname(ckpt), "ema.safetensors")
    npz = run(st, tmp_path / "st")
    assert np.array_equal(np.load(npz)["arr_0"], np.load(reference[1])["arr_0"])


# --------------------------------------------------------------------------- resume


def test_resume_after_a_crash_gives_the_same_npz(reference, ckpt, tmp_path, monkeypatch):
    sample_dir = tmp_path / "crash"
    real_save, saved = generate.save_png, []

    def crash_after_five(image, folder, index):
        if len(saved) == 5:  # the job dies while writing the sixth PNG
            with open(os.path.join(folder, f".{index:06d}.png.x1y2z3.tmp"), "wb") as f:
                f.write(b"half a png")
            raise KeyboardInterrupt
        real_save(image, folder, index)
        saved.append(index)

    monkeypatch.setattr(generate, "save_png", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, sample_dir)
    assert not os.path.exists(f"{sample_dir}.npz")
    monkeypatch.setattr(generate, "save_png", real_save)

    sampled = []
    real_draw = sampling.draw_inputs
    monkeypatch.setattr(sampling, "draw_inputs",
                        lambda indices, *a, **k: sampled.extend(indices)
                        or real_draw(indices, *a, **k))  # fmt: skip
    npz = run(ckpt, sample_dir)  # the same command
    assert sorted(sampled) == sorted(set(range(N)) - set(saved))  # only the missing ones
    assert read(npz) == read(reference[1])
    assert not [n for n in os.listdir(sample_dir) if n.endswith(".tmp")]


@pytest.mark.parametrize(
    "moved, extra",
    [(False, []), (True, []), (False, ["--model", "SiTDown"])],
    ids=["same-path", "checkpoint-moved", "model-flag-agrees"],
)
def test_resume_after_deleting_pngs(reference, ckpt, tmp_path, moved, extra):
    # The folder is tied to the weights, not to where the checkpoint lies.
    if moved:
        ckpt = str(shutil.copy(ckpt, tmp_path / "moved.pt"))
    sample_dir = tmp_path / "copy"
    shutil.copytree(reference[0], sample_dir)
    for i in (0, 5, 7):
        os.remove(sample_dir / f"{i:06d}.png")
    assert read(run(ckpt, sample_dir, extra=extra)) == read(reference[1])


def test_other_settings_are_refused_not_mixed(reference, ckpt, tmp_path):
    sample_dir = tmp_path / "mixed"
    shutil.copytree(reference[0], sample_dir)
    with pytest.raises(ValueError, match=r"other settings \(cfg_scale: 2.0 there, 1.5 now\)"):
        run(ckpt, sample_dir, extra=["--cfg-scale", "1.5"])
    os.remove(sample_dir / "settings.json")
    with pytest.raises(ValueError, match="no settings.json"):
        run(ckpt, sample_dir)


@pytest.mark.parametrize("entry, now", [("sample_seed", "'hash_seed"), ("weights_sha256", "'")])
def test_folders_older_than_an_entry_are_refused(reference, ckpt, tmp_path, entry, now):
    # A folder whose settings do not record the seeding rule was sampled under an older one; one
    # that does not record the weights may hold another checkpoint's images.
    sample_dir = tmp_path / "old-settings"
    shutil.copytree(reference[0], sample_dir)
    settings = json.loads((sample_dir / "settings.json").read_text())
    del settings[entry]
    (sample_dir / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=rf"other settings \({entry}: None there, {now}"):
        run(ckpt, sample_dir)


def test_ode_heun_bf16_random_labels(ckpt, tmp_path):
    npz = run(ckpt, tmp_path / "ode", batch=4,
              extra=["--mode", "ode", "--heun", "--precision", "bf16", "--label-sampling", "random",
                     "--num-fid-samples", "5"])  # fmt: skip
    assert np.load(npz)["arr_0"].shape == (5, 64, 64, 3)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(str(tmp_path / "none.pt"), tmp_path / "s")


# --------------------------------------------------------------------------- the checkpoint


def test_weights_hash_names_the_weights_not_the_file(ckpt, tmp_path):
    export = os.path.join(os.path.dirname(ckpt), "ema.safetensors")
    save_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    hashes = [
        generate.weights_sha256(load_model_for_sampling(path))
        for path in (ckpt, export, str(tmp_path / "other.pt"))
    ]
    assert hashes[0] == hashes[1] != hashes[2]  # a .pt and its export hold the same weights


def test_another_checkpoint_at_the_same_path_is_refused(tmp_path):
    path, sample_dir = tmp_path / "checkpoint.pt", tmp_path / "samples"
    save_tiny_checkpoint(path, seed=0)
    run(str(path), sample_dir, extra=["--num-fid-samples", "4"])
    save_tiny_checkpoint(path, seed=1)  # another model written over it
    os.remove(sample_dir / "000003.png")
    with pytest.raises(
        InputError, match=r"other settings \(weights_sha256: '[0-9a-f]{64}' there"
    ) as refused:
        run(str(path), sample_dir, extra=["--num-fid-samples", "4"])
    assert "\n" not in str(refused.value)
    assert not os.path.exists(sample_dir / "000003.png")  # nothing sampled from the other


@pytest.mark.parametrize("name", ["0000100.pt", "ema.safetensors"])
def test_model_flag_that_disagrees_with_the_checkpoint_is_refused(ckpt, tmp_path, name):
    path = os.path.join(os.path.dirname(ckpt), name)
    with pytest.raises(InputError, match=r"holds a SiTDown, not a SiT-B/2$"):
        run(path, tmp_path / "s", extra=["--model", "SiT-B/2"])
    assert not os.path.exists(tmp_path / "s")


# --------------------------------------------------------------------------- a failed first run


@pytest.mark.parametrize(
    "loader, error, extra",
    [
        ("load_vae", WeightsUnavailable("offline: could not load the SD-VAE"), []),
        ("load_pretrained", InputError("corrupt checkpoint"), []),
        (None, None, ["--vae", "no-such-vae"]),  # the real load_vae refuses the name
    ],
    ids=["vae-offline", "model-unreadable", "unknown-vae"],
)
def test_a_run_that_cannot_load_writes_nothing(
    reference, ckpt, tmp_path, monkeypatch, loader, error, extra
):
    def fail(*args, **kwargs):
        raise error

    sample_dir = tmp_path / "samples"
    with monkeypatch.context() as patch:
        if loader:
            patch.setattr(generate, loader, fail)
        with pytest.raises(ReportedError):
            run(ckpt, sample_dir, extra=extra)
    assert not os.listdir(tmp_path)  # no folder, no settings, no .npz
    assert read(run(ckpt, sample_dir)) == read(reference[1])  # the corrected command


def test_a_run_that_fails_before_its_first_image_leaves_the_folder_free(
    reference, ckpt, tmp_path, monkeypatch
):
    # Its settings.json is written, but with no PNG there is nothing to mix: another command,
    # with other settings, starts over in the same folder.
    def unsupported(*args, **kwargs):
        raise ReportedError("--precision bf16 is not supported on this GPU")

    sample_dir = tmp_path / "samples"
    with monkeypatch.context() as patch:
        patch.setattr(sampling, "sample_batch", unsupported)
        with pytest.raises(ReportedError, match="bf16"):
            run(ckpt, sample_dir, extra=["--precision", "bf16"])
    assert read(run(ckpt, sample_dir)) == read(reference[1])  # --precision fp32


# --------------------------------------------------------------------------- file modes


def test_npz_png_and_settings_get_the_umask_mode(ckpt, tmp_path):
    """0644 under umask 022, as any file written with open(). Needs `utils.atomic_write` to set
    its temporary file's mode (tempfile.mkstemp makes it 0600, and the rename keeps it)."""
    old = os.umask(0o022)
    try:
        npz = run(ckpt, tmp_path / "s", extra=["--num-fid-samples", "4"])
    finally:
        os.umask(old)
    for path in (npz, tmp_path / "s" / "000000.png", tmp_path / "s" / "settings.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path

"""Checkpoints: atomic writes, weights_only round trips, safetensors export, REPA's layout."""

from __future__ import annotations

import datetime
import hashlib
import os
import random

import numpy as np
import pytest
import torch

from models import build_model
from urepa import checkpoints
from urepa.checkpoints import (
    checkpoint_state,
    export_ema_safetensors,
    infer_repa_config,
    load_checkpoint,
    load_model_for_sampling,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

TINY_KWARGS = dict(input_size=8, hidden_size=32, depths=(1, 1, 1), num_heads=2, num_classes=4,
                   z_dims=[16], projector_dim=16)  # fmt: skip


def tiny_model(seed=0):
    """A tiny SiT↓ with random (not zero-initialised) weights, rebuildable from its config."""
    torch.manual_seed(seed)
    model = build_model("SiTDown", **TINY_KWARGS)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model(x, torch.tensor([0.3, 0.9]), torch.tensor([1, 4]))[0]


def training_state(model, ema):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))[0].sum().backward()
    opt.step()
    args = {"model": "SiTDown", "path_type": "linear", "proj_coeff": 0.5, "note": None}
    return checkpoint_state(model, ema, step=1234, args=args, opt=opt, rng=rng_state(),
                            data={"epoch": 3, "position": 17})  # fmt: skip


def test_round_trip_with_weights_only(tmp_path):
    model, ema = tiny_model(0), tiny_model(1)
    path = str(tmp_path / "ckpt" / "0001234.pt")
    save_checkpoint(path, training_state(model, ema))
    state = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert state["format"] == "u-repa/2" and state["step"] == 1234
    assert state["model_name"] == "SiTDown" and state["model_kwargs"] == TINY_KWARGS
    assert state["args"]["path_type"] == "linear" and state["data"] == {"epoch": 3, "position": 17}
    for key, value in ema.state_dict().items():
        assert torch.equal(state["ema"][key], value)
    assert state["opt"]["state"]  # AdamW moments survived
    # no temporary files left; the checksum beside it
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["0001234.pt", "0001234.pt.sha256"]


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    # The global NumPy generator is exactly what rng_state saves, hence the legacy calls.
    torch.manual_seed(5), np.random.seed(5), random.seed(5)  # noqa: NPY002
    model = tiny_model()
    save_checkpoint(str(tmp_path / "c.pt"), checkpoint_state(model, model, 0, rng=rng_state()))
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    set_rng_state(load_checkpoint(str(tmp_path / "c.pt"))["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])  # noqa: NPY002
    assert random.random() == expected[2]


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model = tiny_model()
    save_checkpoint(str(path), checkpoint_state(model, model, step=1))
    before = path.read_bytes()

    def crash(obj, f):  # writes part of the file, then the job dies
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(path), checkpoint_state(model, model, step=2))
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "last.pt.sha256"]  # the partial file is gone
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path / "new.pt"), checkpoint_state(model, model, step=2))
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "last.pt.sha256"]  # no partial new file


def test_clear_errors_for_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    model = tiny_model()
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), checkpoint_state(model, model, step=1))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_checkpoint(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(ValueError, match="not a u-repa/2 checkpoint"):
        load_checkpoint(str(foreign))
    pickled = tmp_path / "pickled.pt"
    torch.save({"ema": {}, "when": datetime.date(2025, 1, 1)}, pickled)  # a Python object
    with pytest.raises(ValueError, match="other than tensors"):
        load_checkpoint(str(pickled))
    with pytest.raises(ValueError, match="checkpoint_state"):
        save_checkpoint(str(tmp_path / "x.pt"), {"ema": {}})


def test_sampling_model_from_checkpoint_and_safetensors_export(tmp_path):
    model, ema = tiny_model(0), tiny_model(1)
    pt = tmp_path / "c.pt"
    save_checkpoint(str(pt), training_state(model, ema))
    loaded = load_model_for_sampling(str(pt))
    assert not loaded.training and loaded.checkpoint_args["path_type"] == "linear"
    torch.testing.assert_close(outputs(loaded), outputs(ema.eval()), rtol=0, atol=0)  # EMA

    st = tmp_path / "ema.safetensors"
    args = {"path_type": "cosine"}
    export_ema_safetensors(str(st), ema.state_dict(), "SiTDown", TINY_KWARGS, args)
    from_st = load_model_for_sampling(str(st))
    torch.testing.assert_close(outputs(from_st), outputs(ema.eval()), rtol=0, atol=0)
    assert from_st.model_kwargs == {**TINY_KWARGS, "depths": [1, 1, 1]}  # JSON round trip
    assert from_st.checkpoint_args == {"path_type": "cosine"}


def test_registry_models_round_trip_and_name_check(tmp_path):
    model = build_model("SiT-S/8", input_size=8, num_classes=4, z_dims=[16], projector_dim=16)
    path = str(tmp_path / "s8.pt")
    save_checkpoint(path, checkpoint_state(model, model, step=0))
    assert load_model_for_sampling(path, model_name="SiT-S/8").model_name == "SiT-S/8"
    with pytest.raises(ValueError, match="holds a SiT-S/8, not a SiT-B/8"):
        load_model_for_sampling(path, model_name="SiT-B/8")


def repa_sit_s8():
    """A SiT-S/8 (registry size, tiny input) with REPA's layout, as REPA's train.py saves it."""
    torch.manual_seed(0)
    model = build_model("SiT-S/8", input_size=16, num_classes=6, z_dims=[24, 40], projector_dim=32)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("layout", ["bare", "train.py"])
def test_repa_checkpoint_variant_is_inferred_from_shapes(tmp_path, layout):
    import argparse

    model = repa_sit_s8()
    state = model.state_dict()
    if layout == "train.py":  # REPA: {"model", "ema", "opt", "args": Namespace, "steps"}
        state = {"model": state, "ema": state, "opt": {}, "steps": 4,
                 "args": argparse.Namespace(path_type="cosine", model="SiT-S/8")}  # fmt: skip
    path = str(tmp_path / "repa.pt")
    torch.save(state, path)
    loaded = load_model_for_sampling(path)  # no model name
    assert loaded.model_name == "SiT-S/8"
    assert loaded.model_kwargs["input_size"] == 16 and loaded.model_kwargs["num_classes"] == 6
    assert loaded.model_kwargs["z_dims"] == [24, 40]
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.2, 0.7]), torch.tensor([0, 6])
    torch.testing.assert_close(loaded(x, t, y)[0], model.eval()(x, t, y)[0], rtol=0, atol=0)
    if layout == "train.py":
        assert loaded.checkpoint_args["path_type"] == "cosine"


def test_repa_xl2_shapes_are_recognised():
    with torch.device("meta"):  # REPA's released SiT-XL/2: 1000 classes, one DINOv2-B projector
        model = build_model("SiT-XL/2", input_size=32, num_classes=1000, z_dims=[768])
    name, kwargs = infer_repa_config(model.state_dict())
    assert name == "SiT-XL/2"
    assert kwargs == {"input_size": 32, "in_channels": 4, "num_classes": 1000, "z_dims": [768],
                      "encoder_depth": 8, "projector_dim": 2048}  # fmt: skip


def test_repa_legacy_decoder_blocks_are_renumbered(tmp_path):
    model = repa_sit_s8()
    legacy = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= 8:
            _, index, rest = key.split(".", 2)
            key = f"decoder_blocks.{int(index) - 8}.{rest}"
        legacy[key] = value
    torch.save({"ema": legacy}, tmp_path / "legacy.pt")
    loaded = load_model_for_sampling(str(tmp_path / "legacy.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_unknown_variant_needs_a_name_and_other_models_fail_clearly(tmp_path):
    sit = build_model("SiT", input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                      z_dims=[16], encoder_depth=1, projector_dim=16)  # fmt: skip
    torch.save(sit.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="pass the model name"):
        load_model_for_sampling(str(tmp_path / "odd.pt"))
    # Naming a variant that does not fit: strict loading fails with the reason.
    mismatch = "does not fit SiT-S/2.*missing keys: blocks.2.*shape mismatches"
    with pytest.raises(ValueError, match=mismatch):
        load_model_for_sampling(str(tmp_path / "odd.pt"), model_name="SiT-S/2")
    # A SiT↓ state dict is not a SiT's; a state dict of something else is neither.
    torch.save(tiny_model().state_dict(), tmp_path / "down.pt")
    with pytest.raises(ValueError, match="not a SiT's"):
        load_model_for_sampling(str(tmp_path / "down.pt"))
    torch.save({"ema": {"conv.weight": torch.ones(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SiT's"):
        load_model_for_sampling(str(tmp_path / "other.pt"))
    # Our checkpoint whose weights do not fit its recorded config.
    model = tiny_model()
    state = checkpoint_state(model, model, step=0)
    state["ema"] = {k: v for k, v in state["ema"].items() if not k.startswith("final_layer")}
    save_checkpoint(str(tmp_path / "bad.pt"), state)
    with pytest.raises(ValueError, match="does not fit SiTDown.*4 missing keys: final_layer"):
        load_model_for_sampling(str(tmp_path / "bad.pt"))


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.mark.parametrize(
    "name", ["u-repa-1_sitdown-tiny.pt", "u-repa-1_sitdown-tiny-ema.safetensors"]
)
def test_format_1_files_written_by_the_first_release_still_load(name):
    """A checkpoint and an EMA export written by earlier code load and give its outputs (to
    fp32 rounding: the outputs were computed by another torch release, whose kernels may round
    differently)."""
    reference = torch.load(os.path.join(FIXTURES, "u-repa-1_sitdown-tiny-outputs.pt"),
                           weights_only=True)  # fmt: skip
    model = load_model_for_sampling(os.path.join(FIXTURES, name))
    v, zs = model(reference["x"], reference["t"], reference["y"])
    torch.testing.assert_close(v, reference["v"], rtol=1e-5, atol=1e-12)
    assert len(zs) == len(reference["zs"]) == 1
    torch.testing.assert_close(zs[0], reference["zs"][0], rtol=1e-5, atol=1e-6)


def test_format_1_lognormal_reads_as_the_distribution_it_drew(tmp_path):
    """u-repa/1's `--weighting lognormal` was EDM's log-normal: read as `lognormal-edm`, so a
    resume with today's `lognormal` (REPA's N(0, 1)) is refused instead of switching silently."""
    state = torch.load(os.path.join(FIXTURES, "u-repa-1_sitdown-tiny.pt"), weights_only=True)
    assert state["format"] == "u-repa/1" and state["args"]["weighting"] == "uniform"
    for weighting, read_as in [("lognormal", "lognormal-edm"), ("uniform", "uniform")]:
        state["args"]["weighting"] = weighting
        torch.save(state, tmp_path / "old.pt")
        loaded = load_checkpoint(str(tmp_path / "old.pt"))
        assert loaded["format"] == "u-repa/2" and loaded["args"]["weighting"] == read_as
        model = load_model_for_sampling(str(tmp_path / "old.pt"))
        assert model.checkpoint_args["weighting"] == read_as


def test_a_file_is_hashed_while_it_is_written_or_read_back_if_it_was_replaced(tmp_path):
    path = str(tmp_path / "f.bin")
    open(path, "wb").close()
    data = os.urandom(3 * checkpoints.HASH_BLOCK + 5)

    def write_in_place() -> None:
        with open(path, "r+b") as f:
            for start in range(0, len(data), 1 << 20):
                f.write(data[start : start + (1 << 20)])
                f.flush()

    def replace() -> None:
        other = str(tmp_path / "other.bin")
        with open(other, "wb") as f:
            f.write(data)
        os.replace(other, path)

    for write in (write_in_place, replace):
        assert checkpoints.hashed_while_written(path, write) == hashlib.sha256(data).hexdigest()

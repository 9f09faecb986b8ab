"""Typed settings (urepa/settings.py): built from the flags by name, frozen, and built alike from
the flags a checkpoint written by the first release records."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

import generate
import train
from urepa.checkpoints import load_checkpoint, load_model_for_sampling
from urepa.model_setup import create_model
from urepa.sampling import draw_inputs, sample_batch
from urepa.settings import (
    EvalSettings,
    ModelSettings,
    SamplerSettings,
    TrainSettings,
    flag_values,
)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "u-repa-1_sitdown-tiny.pt")  # fmt: skip
TRAIN_FLAGS = ["--data-dir", "d", "--exp-name", "x"]


def test_every_field_is_read_from_the_flag_of_its_name():
    args = train.parse_args([*TRAIN_FLAGS, "--learning-rate", "3e-4", "--ema-every", "2",
                             "--eval-preset", "paper-main", "--eval-num-steps", "7"])  # fmt: skip
    settings = TrainSettings.from_flags(vars(args))
    assert settings.optimizer.learning_rate == 3e-4 and settings.optimizer.ema_every == 2
    assert settings.schedule.batch_size == args.batch_size
    assert settings.flags == vars(args) and settings.flags is not vars(args)
    evaluation = EvalSettings.from_flags(vars(args))
    assert (evaluation.sampler.mode, evaluation.sampler.num_steps) == ("sde", 7)
    assert evaluation.sampler.cfg_scale == 1.65 and evaluation.sampler.guidance_high == 0.7
    sampler = SamplerSettings.from_flags(
        vars(
            generate.parse_args(
                ["--ckpt", "c", "--sample-dir", "s", "--preset", "ablation", "--num-steps", "9"]
            )
        )
    )
    assert (sampler.mode, sampler.num_steps, sampler.cfg_scale) == ("ode", 9, 1.8)


def test_settings_are_frozen_and_a_missing_flag_is_named():
    settings = TrainSettings.from_flags(vars(train.parse_args(TRAIN_FLAGS)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.optimizer.learning_rate = 1.0  # type: ignore[misc]
    flags = {**vars(train.parse_args(TRAIN_FLAGS))}
    del flags["ema_decay"]
    with pytest.raises(ValueError, match="the flags lack ema_decay"):
        TrainSettings.from_flags(flags)
    with pytest.raises(ValueError, match="lack num_steps, heun"):
        flag_values(SamplerSettings, {"mode": "sde"})


def test_settings_from_the_flags_a_first_release_checkpoint_records():
    """The u-repa/1 fixture records its flags; today's defaults fill the flags added since.
    The settings built from them rebuild the recorded model exactly (its weights load
    strictly and give the loaded model's samples), and the training settings are the run's."""
    ckpt = load_checkpoint(FIXTURE)
    flags = {**vars(train.parse_args(TRAIN_FLAGS)), **ckpt["args"]}
    settings = TrainSettings.from_flags(flags)
    assert settings.optimizer.learning_rate == ckpt["args"]["learning_rate"] == 1e-4
    assert settings.schedule.batch_size == ckpt["data"]["global_batch"] == 8
    assert settings.objective.weighting == ckpt["args"]["weighting"]
    assert settings.flags == flags  # what a checkpoint would record again

    model_settings = ModelSettings.from_flags(flags)
    size = ckpt["model_kwargs"]["input_size"]
    manifest = {"modalities": {"moments": {"shape": [8, size, size]}}}  # SD-VAE latents
    data = SimpleNamespace(num_classes=ckpt["model_kwargs"]["num_classes"], manifest=manifest)
    model = create_model(model_settings, data, {"moments": torch.empty(8, size, size)})
    assert (model.model_name, model.model_kwargs) == (ckpt["model_name"], ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema"], strict=True)
    model.eval()

    sampler = dataclasses.replace(SamplerSettings.from_flags(vars(generate.parse_args(
        ["--ckpt", FIXTURE, "--sample-dir", "s", "--preset", "ablation", "--num-steps", "3",
         "--per-proc-batch-size", "2"]))), path_type=flags["path_type"])  # fmt: skip
    loaded = load_model_for_sampling(FIXTURE)
    inputs = draw_inputs([0, 1], sampler, None, model.num_classes, model.latent_shape)
    cpu = torch.device("cpu")
    rebuilt = sample_batch(model, inputs, sampler, cpu)
    torch.testing.assert_close(rebuilt, sample_batch(loaded, inputs, sampler, cpu), rtol=0, atol=0)

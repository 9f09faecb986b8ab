"""Typed settings: what the library reads of the command line, as small frozen dataclasses.

The entry points (train.py, generate.py, bench/) parse their flags, then build these; the library
takes them and never a flag namespace, so a renamed flag fails here, at one place, not deep in
the loop. Each class is built from a flags dict by `from_flags(vars(args))`, which takes its
fields by name: the same call builds them from the flags a checkpoint records (`ckpt["args"]`,
which keeps its format). A flag missing from the dict is an error that names it.

* `SamplerSettings`: one sampler run (`sampling.py`): mode, steps, guidance, seed, batch, precision.
* `SamplingSpeed`: how the model is prepared for sampling (bf16 weights, compile, CUDA graphs).
* `ModelSettings`: the flags that decide the model's constructor arguments (`model_setup.py`).
* `TrainSettings`: the training loop's (`trainer.py`), by concern: objective, optimiser (AdamW,
  clipping, EMA), schedule (batch, steps, cadence of logs, checkpoints and previews), speed.
* `EvalSettings`: the evaluation during training (`periodic_eval.py`), with its sampler.

This module is a leaf (no torch): `curves.py` reads the evaluation's file name and presets here
without loading the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Explicit flags override a preset; a preset overrides these defaults (REPA's paper protocol:
# SDE Euler-Maruyama with 250 steps, no guidance).
SAMPLING_DEFAULTS: dict[str, Any] = {
    "mode": "sde", "num_steps": 250, "heun": False,
    "cfg_scale": 1.0, "guidance_low": 0.0, "guidance_high": 1.0,
}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # U-REPA Table 4 (and REPA's convention): SDE, 250 steps, cfg 1.65 on t in [0, 0.7].
    "paper-main": {"mode": "sde", "num_steps": 250, "cfg_scale": 1.65, "guidance_high": 0.7},
    # U-REPA Tables 5-10: "the default setting of the official REPA codebase": Euler ODE with
    # 50 steps, cfg 1.8 on t in [0, 0.7].
    "ablation": {"mode": "ode", "num_steps": 50, "heun": False, "cfg_scale": 1.8,
                 "guidance_high": 0.7},
}  # fmt: skip

EVAL_FILE = "eval.jsonl"  # the evaluation's rows, in the run directory
EVAL_SEED = 0  # generate.py's default --global-seed
# The sampler of each --eval-preset (generate.py's presets; no-guidance: generate.py's defaults,
# REPA's protocol without guidance, SDE 250 steps, as U-REPA's Table 3).
EVAL_PRESETS: dict[str, dict[str, Any]] = {**PRESETS, "no-guidance": {}}


def flag_values(
    cls: type, flags: Mapping[str, Any], derived: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The values of `cls`'s fields, each read from the flag of the same name (but the fields
    `derived` from several flags)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in derived]
    missing = [name for name in names if name not in flags]
    if missing:
        raise ValueError(f"the flags lack {', '.join(missing)} (needed by {cls.__name__})")
    return {name: flags[name] for name in names}


Settings = TypeVar("Settings", bound="FromFlags")


class FromFlags:
    """`from_flags(flags)`: the dataclass whose fields are the flags of the same names."""

    @classmethod
    def from_flags(cls: type[Settings], flags: Mapping[str, Any]) -> Settings:
        return cls(**flag_values(cls, flags))


#################################################################################
#                                    Sampling                                   #
#################################################################################


@dataclass(frozen=True)
class SamplerSettings(FromFlags):
    """One sampler run: the sampler, the seed of the samples, the batch, the precision."""

    mode: str  # "sde" (Euler-Maruyama) or "ode" (Euler, or Heun with `heun`)
    num_steps: int
    heun: bool
    cfg_scale: float  # 1: no guidance
    guidance_low: float  # guidance for t in [guidance_low, guidance_high] only
    guidance_high: float
    path_type: str  # the interpolant the model was trained on
    global_seed: int  # with the index, decides each sample's label and noise
    per_proc_batch_size: int
    predraw_noise: bool  # SDE: each sample's noise stream drawn once per batch
    precision: str  # "fp32", "tf32" or "bf16" (autocast)


@dataclass(frozen=True)
class SamplingSpeed(FromFlags):
    """How the model is prepared for sampling (`speed.prepare_model_for_sampling`)."""

    compile: bool
    cuda_graphs: bool
    bf16_weights: bool


#################################################################################
#                                      Model                                    #
#################################################################################


@dataclass(frozen=True)
class ModelSettings(FromFlags):
    """The flags that decide the model's constructor arguments (with the data's geometry)."""

    model: str  # registry name, or a bare class sized by model_config
    model_config: dict[str, Any]  # further constructor arguments
    encoder_depth: int | None  # None: the model's default tap
    projector_upsample: str
    projector_kernel: str
    align_resolution: str
    time_aware_projector: bool
    encoders: list[str]  # the alignment targets' encoders ([]: no alignment)
    cfg_prob: float  # the label dropout, the constructor's class_dropout_prob
    resolution: int
    seed: int  # the initialisation's
    data_dir: str  # named in messages


#################################################################################
#                                    Training                                   #
#################################################################################


@dataclass(frozen=True)
class ObjectiveSettings(FromFlags):
    """The loss (Eq. 5) and the per-step draws of t, noise and label dropout."""

    path_type: str
    weighting: str
    proj_coeff: float
    manifold_coeff: float
    manifold_mode: str
    lambda_schedule: str
    cfg_prob: float


@dataclass(frozen=True)
class OptimizerSettings(FromFlags):
    """AdamW, the gradient clipping, the EMA, and what a non-finite loss does."""

    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    fused_optimizer: bool
    max_grad_norm: float
    ema_decay: float
    ema_every: int  # the EMA moves every this many steps
    compile_update: bool  # clipping + AdamW + EMA in one compiled pass
    on_nonfinite: str  # "stop" or "skip"


@dataclass(frozen=True)
class ScheduleSettings(FromFlags):
    """The batch, the steps, and the cadence of logs, checkpoints and previews."""

    seed: int
    batch_size: int  # global
    gradient_accumulation_steps: int
    max_train_steps: int
    num_workers: int
    log_every: int
    checkpointing_steps: int
    keep_last: int
    milestone_every: int
    sampling_steps: int  # previews every this many steps (0: none)
    preview_images: int


@dataclass(frozen=True)
class SpeedSettings(FromFlags):
    """Precision, sharding and compilation (none changes what is computed beyond rounding)."""

    mixed_precision: str
    fsdp: str
    compile: bool
    compile_check: bool


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop reads, by concern; `flags`: the run's flags, recorded verbatim in
    every checkpoint (the format older and newer code read)."""

    objective: ObjectiveSettings
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    speed: SpeedSettings
    flags: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> TrainSettings:
        return cls(
            objective=ObjectiveSettings.from_flags(flags),
            optimizer=OptimizerSettings.from_flags(flags),
            schedule=ScheduleSettings.from_flags(flags),
            speed=SpeedSettings.from_flags(flags),
            flags=dict(flags),
        )


#################################################################################
#                          Evaluation during training                           #
#################################################################################


@dataclass(frozen=True)
class EvalSettings:
    """--eval-every's evaluation: what it samples (`sampler`), how many, against which
    reference, with which feature networks."""

    eval_every: int  # 0: off
    eval_samples: int
    eval_preset: str
    eval_batch_size: int
    eval_ref: str | None
    eval_captions_from: str | None  # a text-to-image run's captions (a prepared captioned set)
    eval_fd_dinov2: bool
    inception_weights: str | None
    dinov2_weights: str | None
    eval_standins_for_tests: bool
    resolution: int  # of the samples, which the reference's images must match
    batch_size: int  # the global training batch (images seen per step)
    sampler: SamplerSettings

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> EvalSettings:
        return cls(**flag_values(cls, flags, derived=("sampler",)), sampler=eval_sampler(flags))


def eval_sampler(flags: Mapping[str, Any]) -> SamplerSettings:
    """The sampler of --eval-preset (and --eval-num-steps), seeded as generate.py's default, with
    bf16 autocast if training uses it."""
    preset = EVAL_PRESETS[flags["eval_preset"]]
    settings = {key: preset.get(key, default) for key, default in SAMPLING_DEFAULTS.items()}
    if flags["eval_num_steps"] is not None:
        settings["num_steps"] = flags["eval_num_steps"]
    return SamplerSettings(
        **settings,
        path_type=flags["path_type"],
        global_seed=EVAL_SEED,
        per_proc_batch_size=flags["eval_batch_size"],
        predraw_noise=True,
        # the EMA itself, eagerly, under autocast (`sampling.sampling_model` is not called: its
        # bf16 copy or compiled copy would be made again at every evaluation); autocast rounds
        # the weights to bf16 at each call as generate.py's --bf16-weights does once
        precision="bf16" if flags["mixed_precision"] == "bf16" else "tf32",
    )

"""REPA's own code, imported from a checkout of its repository, timed beside ours.

`--repa-src PATH` of `bench.train_speed` and `bench.sample_speed` points at a clone of
github.com/sihyun-yu/REPA; nothing of it is copied into this repository. What is imported:
`models/sit.py` (SiT_models, SiT), `loss.py` (SILoss: its projection loss loops over samples
in Python), `samplers.py` (euler_sampler, euler_maruyama_sampler), and from `train.py` the
functions `update_ema` (a loop of mul_ and add_ per tensor) and `sample_posterior`. train.py
imports wandb, diffusers and its dataset at module level, which the step does not need, so
those two functions are taken from its source (`ast`) and run alone.

The training step is REPA's loop body (train.py, one iteration of `for raw_image, x, y in
train_dataloader`) calling those pieces: blocking copies of the batch from pinned memory, the
posterior sample, SILoss (its CPU draws of t copied to the device every step), backward under
accelerate's autocast (fp16 and loss scaling by default), clipping, PyTorch's default AdamW,
`update_ema`, and the logs gathered and read on the host every step. One difference: REPA runs
DINOv2-B from torch.hub on the pixels every step; here the targets are precomputed random
features of the encoder's shape (nothing is downloaded), so REPA's step is timed without its
encoder: a lower bound of its time, hence a ratio ours / REPA that errs in REPA's favour.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import Tensor

from urepa.cli import json_object
from urepa.utils import InputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPA_MODULES = {"sit": "models/sit.py", "loss": "loss.py", "samplers": "samplers.py"}
REPA_TRAIN_FUNCTIONS = ("update_ema", "sample_posterior")
SD_VAE_SCALE = 0.18215  # REPA's latents_scale (latents_bias is 0)
# Module names REPA shares with this repository: hidden while REPA's files run
SHARED_NAMES = ("models", "loss", "samplers", "dataset", "train", "generate")


@dataclass
class RepaCode:
    sit: ModuleType  # models/sit.py
    loss: ModuleType  # loss.py
    samplers: ModuleType  # samplers.py
    update_ema: Callable[..., None]  # train.py
    sample_posterior: Callable[..., Tensor]  # train.py
    path: str


def add_repa_source_args(parser: argparse.ArgumentParser, timed: str) -> None:
    """--repa-src, --repa-model and --repa-model-config; `timed` says what of REPA is timed."""
    parser.add_argument(
        "--repa-src",
        default=None,
        metavar="PATH",
        help=f"a clone of github.com/sihyun-yu/REPA: also time {timed}",
    )
    parser.add_argument("--repa-model", default="SiT-XL/2", help="REPA's SiT_models entry")
    parser.add_argument("--repa-model-config", type=json_object, default={},
                        help="JSON keyword arguments of REPA's SiT class instead of --repa-model "
                             "(tiny tests)")  # fmt: skip


@contextmanager
def isolated_imports(path: str) -> Iterator[None]:
    """While REPA's files run: its directory on sys.path instead of this repository's, and our
    same-named modules out of sys.modules (REPA's `models` has no __init__.py: a regular
    package of the same name anywhere on the path would win over it). Both restored after."""
    saved_path = list(sys.path)
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in SHARED_NAMES}
    for name in saved:
        del sys.modules[name]
    sys.path[:] = [path] + [p for p in saved_path if os.path.abspath(p or ".") != REPO_ROOT]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [k for k in sys.modules if k.split(".")[0] in SHARED_NAMES]:
            del sys.modules[name]
        sys.modules.update(saved)


def import_file(name: str, file: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def functions_from_source(file: str, names: tuple[str, ...]) -> dict[str, Callable[..., Any]]:
    """The top-level functions `names` of a Python file, run without its module-level code."""
    with open(file) as f:
        tree = ast.parse(f.read(), filename=file)
    found: list[ast.stmt] = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names
    ]
    missing = set(names) - {n.name for n in found if isinstance(n, ast.FunctionDef)}
    if missing:
        raise InputError(f"--repa-src: {file} defines no {', '.join(sorted(missing))}; "
                         "give a checkout of github.com/sihyun-yu/REPA")  # fmt: skip
    namespace: dict[str, Any] = {"torch": torch, "OrderedDict": OrderedDict}
    exec(compile(ast.Module(body=found, type_ignores=[]), file, "exec"), namespace)
    return {name: namespace[name] for name in names}


def load_repa(path: str) -> RepaCode:
    """REPA's modules from a checkout at `path` (InputError if something is missing)."""
    path = os.path.abspath(path)
    wanted = [*REPA_MODULES.values(), "train.py"]
    missing = [f for f in wanted if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise InputError(f"--repa-src {path}: no {', '.join(missing)} there; give the folder of "
                         "a clone of github.com/sihyun-yu/REPA")  # fmt: skip
    with isolated_imports(path):
        modules = {
            key: import_file(f"repa_src_{key}", os.path.join(path, file))
            for key, file in REPA_MODULES.items()
        }
    functions = functions_from_source(os.path.join(path, "train.py"), REPA_TRAIN_FUNCTIONS)
    return RepaCode(
        sit=modules["sit"],
        loss=modules["loss"],
        samplers=modules["samplers"],
        update_ema=functions["update_ema"],
        sample_posterior=functions["sample_posterior"],
        path=path,
    )


# --------------------------------------------------------------------------------------------
# REPA's model
# --------------------------------------------------------------------------------------------


def build_repa_model(
    code: RepaCode,
    name: str,
    config: dict[str, Any],
    resolution: int,
    z_dim: int,
    fused_attn: bool,
) -> Any:
    """REPA's SiT as its train.py builds it (`config`, if given, replaces the registry entry:
    the keyword arguments of its SiT class, for tiny test models)."""
    kwargs: dict[str, Any] = {
        "input_size": resolution // 8,
        "num_classes": 1000,  # REPA's samplers hard-code 1000 as the null label
        "use_cfg": True,  # REPA: cfg_prob 0.1 > 0
        "z_dims": [z_dim],
        "encoder_depth": 8,
        "fused_attn": fused_attn,
        "qk_norm": False,
        **config,
    }
    if config:
        return code.sit.SiT(**kwargs)
    if name not in code.sit.SiT_models:
        raise InputError(f"--repa-model {name}: REPA has {', '.join(code.sit.SiT_models)}")
    return code.sit.SiT_models[name](**kwargs)


def repa_forward_macs(model: Any) -> int:
    """Forward MACs per image of REPA's SiT, projector excluded (Table 2's convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    meta.projectors = torch.nn.ModuleList()
    size = meta.x_embedder.img_size[0]
    x = torch.zeros(1, meta.in_channels, size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x, torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    return counter.get_total_flops() // 2


def nonzero_velocity(model: Any) -> Any:
    """Random weights whose velocity is not zero: REPA zero-initialises adaLN and the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                torch.nn.init.normal_(module.weight, std=0.02)
    return model


# --------------------------------------------------------------------------------------------
# REPA's training step
# --------------------------------------------------------------------------------------------


@dataclass
class RepaTrainer:
    code: RepaCode
    accelerator: Accelerator
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Any
    batch: dict[str, Tensor]  # CPU, pinned on a GPU machine: raw_image, x (moments), y
    features: Tensor  # (N, T, z_dim) on the device: stands in for DINOv2-B's patch tokens
    proj_coeff: float
    max_grad_norm: float


def build_repa_trainer(
    code: RepaCode, model: torch.nn.Module, batch_size: int, mixed_precision: str,
    resolution: int, z_dim: int, cpu: bool,
) -> RepaTrainer:  # fmt: skip
    """REPA's train.py setup with its defaults (AdamW lr 1e-4, eps 1e-8, no weight decay;
    clipping at 1; proj-coeff 0.5; linear path, uniform t) for one process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    device = accelerator.device
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999),
                                  weight_decay=0.0, eps=1e-8)  # fmt: skip
    code.update_ema(ema, model, decay=0)
    model.train()
    ema.eval()
    model, optimizer = accelerator.prepare(model, optimizer)
    scale = torch.full((1, 4, 1, 1), SD_VAE_SCALE, device=device)
    loss_fn = code.loss.SILoss(
        prediction="v",
        path_type="linear",
        encoders=[],
        accelerator=accelerator,
        latents_scale=scale,
        latents_bias=torch.zeros_like(scale),
        weighting="uniform",
    )
    latent = resolution // 8
    tokens = (latent // accelerator.unwrap_model(model).patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    batch = {
        "raw_image": torch.randint(0, 256, (batch_size, 3, resolution, resolution),
                                   generator=g, dtype=torch.uint8),
        "x": torch.randn(batch_size, 1, 8, latent, latent, generator=g),
        "y": torch.randint(1000, (batch_size,), generator=g),
    }  # fmt: skip
    if device.type == "cuda":  # REPA's DataLoader has pin_memory=True
        batch = {k: v.pin_memory() for k, v in batch.items()}
    features = torch.randn(batch_size, tokens, z_dim, generator=g).to(device)
    return RepaTrainer(code, accelerator, model, ema, optimizer, loss_fn, batch, features,
                       proj_coeff=0.5, max_grad_norm=1.0)  # fmt: skip


def repa_train_step(tr: RepaTrainer) -> dict[str, float]:
    """One iteration of REPA's training loop (train.py), its encoder replaced by `features`."""
    acc, device = tr.accelerator, tr.accelerator.device
    raw_image = tr.batch["raw_image"].to(device)  # REPA runs DINOv2 on it; unused here
    x = tr.batch["x"].squeeze(dim=1).to(device)
    y = tr.batch["y"].to(device)
    del raw_image
    with torch.no_grad():
        scale, bias = tr.loss_fn.latents_scale, tr.loss_fn.latents_bias
        x = tr.code.sample_posterior(x, latents_scale=scale, latents_bias=bias)
        zs = [tr.features]  # REPA: encoder.forward_features(...)["x_norm_patchtokens"]
    with acc.accumulate(tr.model):
        loss, proj_loss = tr.loss_fn(tr.model, x, dict(y=y), zs=zs)
        loss_mean = loss.mean()
        proj_loss_mean = proj_loss.mean()
        loss = loss_mean + proj_loss_mean * tr.proj_coeff
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(tr.model.parameters(), tr.max_grad_norm)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.code.update_ema(tr.ema, tr.model)
    return {  # REPA's per-step logs: gathered and read on the host
        "loss": acc.gather(loss_mean).mean().detach().item(),
        "proj_loss": acc.gather(proj_loss_mean).mean().detach().item(),
        "grad_norm": acc.gather(grad_norm).mean().detach().item(),
    }

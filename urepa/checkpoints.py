"""Checkpoints and runs: one self-describing format, a run directory, resuming, and loading a
model for sampling. Everything that reads or writes a checkpoint goes through this module.

A training checkpoint (`.pt`, written by `train.py`) is a dict

    {"format": "u-repa/2", "model_name", "model_kwargs", "args", "step",
     "model", "ema", "opt", "scaler", "rng", "data"}

holding only tensors and plain containers (dict, list, tuple, str, int, float, bool, None), so
that it loads with `torch.load(weights_only=True)`: loading never runs code from the file.
`model_name` and `model_kwargs` are what `models.build_model` recorded; with them `generate.py`
rebuilds the model from the checkpoint alone. `model_name` is a registry name (`SiTDown-XL/2`)
or, for models built from a class directly (tiny test models), the class name (`SiT`, `SiTDown`)
with the full constructor arguments.

Formats: `u-repa/2` is written; `u-repa/1` (the first release) is read too, its arguments
translated to today's meaning (`upgrade_args`): there, `--weighting lognormal` drew EDM's
log-normal times, which today's flags call `lognormal-edm`. So a first-release run resumes with
the distribution it was trained with, and a flag whose meaning changed never slips through the
resume check.

`export_ema_safetensors` writes the EMA weights alone, with the model config in the metadata.
`load_model_for_sampling` reads either, and also REPA's released SiT checkpoints, which carry no
config: their SiT variant is inferred from the shapes of the state dict.

A run directory `OUTPUT_DIR/EXP_NAME` holds `checkpoints/{step:07d}.pt` (the last `--keep-last`
and the milestones) and `checkpoints/{step:07d}-ema.safetensors` (milestones and the final step).
`resolve_run` decides whether a run starts or resumes, `check_resumable` refuses a checkpoint of
another setup (model, flags, and data: its size and the identity of its content, the checkpoint's
`data` entry), `save_run_checkpoint` / `restore_run_state` write and read a run's state from
explicit objects (model, EMA, optimiser, loss scaler); sharded ones (FSDP2) are gathered into
whole tensors and distributed again on loading, so that a checkpoint resumes on any number of
processes, sharded or not. `save_run_checkpoint` checks the free space
first, and a failed write says what was kept. After a kill, `remove_interrupted_saves` and
`write_missing_exports` clear up what the interrupted saves left and lost.

Every checkpoint and export has its SHA-256 beside it (`NAME.sha256`), compared whenever it is
read; `resume_checkpoint` passes over a damaged latest checkpoint for the one before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from models import SiT_models, build_model, canonical_name, model_config
from models.base import AlignedDiffusionTransformer
from urepa import utils
from urepa.utils import InputError, ReportedError, atomic_write, dict_differences, file_sha256
from urepa.vae import PIXEL_VAES, latent_geometry

CHECKPOINT_FORMAT = "u-repa/2"
READABLE_FORMATS = ("u-repa/1", CHECKPOINT_FORMAT)
CHECKPOINT_KEYS = (
    "format", "model_name", "model_kwargs", "args", "step",
    "model", "ema", "opt", "scaler", "rng", "data",
)  # fmt: skip


class TrainingError(ReportedError, RuntimeError):
    """A problem with a run's setup, directory or state, reported as a message without a
    traceback (train.py exits with it)."""


#################################################################################
#                               Writing                                         #
#################################################################################


def checkpoint_state(
    model: nn.Module,
    ema: nn.Module,
    step: int,
    args: dict[str, Any] | None = None,
    opt: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    rng: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of the module docstring. `model` must come from `build_model`;
    `args` is a plain dict (e.g. `vars(args)`). Sharded (FSDP2) model and EMA are gathered
    whole: then every process must call this, and only the main process's dict holds them."""
    name, kwargs = model_config(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": name,
        "model_kwargs": kwargs,
        "args": dict(args or {}),
        "step": int(step),
        "model": full_state_dict(model),
        "ema": full_state_dict(ema),
        "opt": full_optimizer_state(model, opt) if opt is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "data": data,
    }


#################################################################################
#               Consolidation: sharded (FSDP2) states <-> whole tensors            #
#################################################################################

# Checkpoints hold whole tensors, as one process writes them, whatever the number of processes
# and whether they were sharded: a run resumes on any number of processes, sharded or not.
# Gathering and distributing the shards is `torch.distributed.checkpoint.state_dict`'s work.
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole, on the main process


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is sharded over processes by FSDP2 (`fully_shard`)."""
    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with whole tensors (sharded: gathered, on the main process only,
    a collective that every process calls)."""
    if not is_sharded(module):
        return module.state_dict()
    state: Any = get_model_state_dict(module, options=WHOLE)
    return state


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors strictly; a sharded `module` keeps its process's shard of each."""
    if is_sharded(module):
        whole: Any = state
        set_model_state_dict(module, whole, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


def optimizer_keys(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names of `optimizer`'s parameters in the order `Optimizer.state_dict`
    numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with whole tensors. Sharded: gathered (a collective, the main
    process's dict holds them), and numbered as an unsharded optimiser numbers them."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if not is_sharded(model):
        return inner.state_dict()
    state: Any = get_optimizer_state_dict(model, inner, options=WHOLE)
    if not state:  # not the main process: the whole state is the main process's alone
        return {}
    index = {name: i for i, name in enumerate(optimizer_keys(model, inner))}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what `full_optimizer_state` returns into `optimizer` (sharded: its shards)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_sharded(model):
        inner.load_state_dict(state)
        return
    keys = optimizer_keys(model, inner)
    named: Any = {
        "state": {keys[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [keys[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, inner, named, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write a checkpoint dict (see `checkpoint_state`) atomically, with its checksum file."""
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing or state["format"] != CHECKPOINT_FORMAT:
        raise InputError(
            f"not a {CHECKPOINT_FORMAT} checkpoint dict (missing {missing}); build it with "
            "checkpoints.checkpoint_state"
        )

    def write(tmp: str) -> None:
        write_checksum(path, hashed_while_written(tmp, lambda: torch.save(state, tmp)))

    atomic_write(path, write)


#################################################################################
#              Checksums: a SHA-256 file beside every checkpoint and export        #
#################################################################################

# `0000006.pt.sha256` holds "HEX  0000006.pt" (sha256sum's format: `sha256sum -c` checks it).
# It is written after the data, before the checkpoint is renamed into place: a checkpoint
# written by this code always has one. One without (earlier code, or copied alone) loads
# with a warning that it could not be verified.
CHECKSUM_SUFFIX = ".sha256"
logger = logging.getLogger("u-repa.checkpoints")


class DamagedCheckpoint(InputError):
    """A checkpoint or export whose bytes differ from its recorded SHA-256."""


class FileFollower(threading.Thread):
    """Hashes a file as another thread writes it, front to back: reads what has been written
    so far (from the page cache), waits for more, and ends once told the writer has finished."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path, self.digest = path, hashlib.sha256()
        self.writer_done = threading.Event()
        self.error: BaseException | None = None
        self.followed: tuple[int, int] = (-1, 0)  # (inode, bytes hashed)

    def run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                while True:
                    finished = self.writer_done.is_set()  # before the read: nothing is missed
                    if block := f.read(HASH_BLOCK):
                        self.digest.update(block)  # hashlib releases the GIL on large blocks
                        self.followed = (inode, self.followed[1] + len(block))
                    elif finished:
                        self.followed = (inode, self.followed[1])
                        return
                    else:
                        time.sleep(0.005)
        except BaseException as err:  # raised in the writer's thread by `hashed_while_written`
            self.error = err


HASH_BLOCK = 16 << 20


def hashed_while_written(path: str, write: Callable[[], None]) -> str:
    """Run `write()`, which writes the existing file `path` in place, front to back (torch.save
    does; safetensors replaces the file), and return the file's SHA-256, computed by a thread
    while it is written: the hash overlaps the write instead of following it."""
    follower = FileFollower(path)
    follower.start()
    try:
        write()
    finally:
        follower.writer_done.set()
        follower.join()
    if follower.error is not None:
        raise follower.error
    written = os.stat(path)
    if follower.followed != (written.st_ino, written.st_size):  # replaced, not written in place
        return file_sha256(path)
    return follower.digest.hexdigest()


def checksum_path(path: str) -> str:
    return path + CHECKSUM_SUFFIX


def write_checksum(path: str, hexdigest: str) -> None:
    """Record the SHA-256 of the file `path` (atomically, durably) in `path`.sha256."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(f"{hexdigest}  {os.path.basename(path)}\n")

    atomic_write(checksum_path(path), write)


def verify_checksum(path: str) -> bool:
    """Compare the file `path` with its recorded SHA-256: True if they agree, False if none is
    recorded; a DamagedCheckpoint if they differ. Reads and hashes the whole file (2 to 4 s per
    GiB on a loaded 2-core CPU, docs/reliability.md)."""
    recorded = checksum_path(path)
    if not os.path.exists(recorded):
        return False
    with open(recorded) as f:
        expected = f.read().split(maxsplit=1)[0] if os.path.getsize(recorded) else ""
    actual = file_sha256(path)
    if actual != expected:
        raise DamagedCheckpoint(
            f"{path} is damaged: its SHA-256 is {actual[:16]}..., {recorded} records "
            f"{expected[:16] or 'nothing'}... (changed on disk since it was written); use "
            "another checkpoint"
        )
    return True


def warn_unverified(path: str) -> None:
    """Say, once it has loaded, that a U-REPA file had no SHA-256 to be checked against."""
    logger.warning(f"{path} has no {CHECKSUM_SUFFIX} file beside it (written by earlier code, "
                   "or copied alone): it was read without being verified")  # fmt: skip


def remove_checkpoint(path: str) -> list[str]:
    """Delete a checkpoint or export and its checksum file; returns what was there."""
    doomed = [p for p in (path, checksum_path(path)) if os.path.exists(p)]
    for p in doomed:
        os.remove(p)
    return doomed


def export_ema_safetensors(
    path: str,
    ema_state_dict: dict[str, torch.Tensor],
    model_name: str,
    model_kwargs: dict[str, Any],
    args: dict[str, Any] | None = None,
) -> None:
    """EMA weights as safetensors, with the model config (JSON) in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in ema_state_dict.items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "model_kwargs": json.dumps(model_kwargs),
        "args": json.dumps(args or {}, default=str),
    }

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)  # replaces the file: not followed as written
        write_checksum(path, file_sha256(tmp))  # read back from the page cache (milestones only)

    atomic_write(path, write)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) RNG states, as weights_only-safe
    values (NumPy's key array becomes a tensor)."""
    # The legacy global generator is what user code and libraries draw from, so it is saved.
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    assert isinstance(keys, np.ndarray)  # the legacy layout: (name, keys, pos, has_gauss, cached)
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#################################################################################
#                               Reading                                         #
#################################################################################


def torch_load(path: str) -> Any:
    """`torch.load(weights_only=True)` on CPU with clear errors. REPA's training checkpoints
    store `args` as an argparse.Namespace, a plain attribute bag we allow."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            # mmap: the ranks of a node share the file's pages instead of each reading a copy
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "Weights only" in str(err):
            raise InputError(
                f"{path!r} holds Python objects other than tensors and plain containers, so it is "
                "not a U-REPA or REPA checkpoint; it is not loaded (loading could run its code)"
            ) from err
        raise InputError(
            f"could not read {path!r}: the file is truncated, corrupt or not a PyTorch checkpoint"
        ) from err


def upgrade_args(args: dict[str, Any], file_format: str) -> dict[str, Any]:
    """The training arguments of a `file_format` checkpoint, in today's flag meanings."""
    args = dict(args)
    if file_format == "u-repa/1" and args.get("weighting") == "lognormal":
        args["weighting"] = "lognormal-edm"  # u-repa/1's log-normal was EDM's (-1.2, 1.2)
    return args


def load_checkpoint(path: str, verify: bool = True) -> dict[str, Any]:
    """Read a training checkpoint written by `save_checkpoint` (weights_only), in the current
    format (an older one is upgraded, see the module docstring). `verify`: check its SHA-256
    first (False: the caller has)."""
    if verify and os.path.isfile(path):
        checked = verify_checksum(path)
    else:  # compared by the caller, if it was there
        checked = os.path.exists(checksum_path(path))
    state = torch_load(path)
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputError(
            f"{path!r} is not a {CHECKPOINT_FORMAT} checkpoint (format: {found!r}); "
            "generate.py also reads safetensors exports and REPA's SiT checkpoints"
        )
    state["args"] = upgrade_args(state["args"], state["format"])
    state["format"] = CHECKPOINT_FORMAT
    if not checked:
        warn_unverified(path)
    return state


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DDP (`module.`) or torch.compile (`_orig_mod.`) prefix carried by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _legacy_repa_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """REPA's early checkpoints split the blocks into `blocks` (up to the tap) and
    `decoder_blocks`; renumber them into one `blocks` list as REPA's `--legacy` does."""
    if not any(k.startswith("decoder_blocks.") for k in state_dict):
        return state_dict
    encoder_depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("decoder_blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{int(index) + encoder_depth}.{rest}"
        renamed[key] = value
    return renamed


def infer_repa_config(
    state_dict: dict[str, torch.Tensor], model_name: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(registry name, kwargs) of the SiT that a REPA state dict fits, from tensor shapes.

    hidden size, patch size and input channels come from `x_embedder.proj.weight`, depth from
    the `blocks.{i}` indices, input size from `pos_embed`, classes from the label table (one
    row is the null class), z_dims and projector width from `projectors.{k}`. The number of
    heads is not visible in any shape, so the variant is the registry entry with this width,
    depth and patch size; `model_name` names it when none matches. The alignment depth does
    not change the velocity and is not recorded either: REPA's default, 8, is used.
    """
    required = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight")
    if not all(key in state_dict for key in required):
        raise InputError(
            "this state dict is not a SiT's (no x_embedder.proj.weight / pos_embed / "
            "y_embedder.embedding_table.weight): it is neither a U-REPA checkpoint nor REPA's"
        )
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    grid = round(state_dict["pos_embed"].shape[1] ** 0.5)
    num_projectors = len({k.split(".")[1] for k in state_dict if k.startswith("projectors.")})
    kwargs: dict[str, Any] = {
        "input_size": grid * patch,
        "in_channels": in_channels,
        "num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "z_dims": [state_dict[f"projectors.{k}.4.weight"].shape[0] for k in range(num_projectors)],
        "encoder_depth": min(8, depth),
    }
    if num_projectors:
        kwargs["projector_dim"] = state_dict["projectors.0.0.weight"].shape[0]
    if model_name is not None:
        return canonical_name(model_name), kwargs
    for name in SiT_models:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            candidate = build_model(name, **kwargs)
        if (candidate.hidden_size, candidate.depth, candidate.patch_size) == (hidden, depth, patch):
            return name, kwargs
    raise InputError(
        f"no registered SiT has width {hidden}, depth {depth} and patch size {patch}; pass the "
        f"model name (--model) to load this REPA checkpoint"
    )


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path, device="cpu"), metadata
    except Exception as err:
        raise InputError(f"could not read {path!r} as safetensors (truncated or corrupt?)") from err


def read_sampling_weights(
    path: str, model_name: str | None = None
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], dict[str, Any]]:
    """(EMA state dict, model_name, model_kwargs, training args) from any supported file, or a
    checkpoint folder in the Hub's layout."""
    if os.path.isdir(path):
        return read_model_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    checked = verify_checksum(path)  # REPA's files have none
    if path.endswith(".safetensors"):
        state_dict, metadata = _read_safetensors(path)
        if metadata.get("format") in READABLE_FORMATS:
            if not checked:
                warn_unverified(path)
            kwargs = json.loads(metadata["model_kwargs"])
            args = upgrade_args(json.loads(metadata["args"]), metadata["format"])
            return state_dict, metadata["model_name"], kwargs, args
        name, kwargs = infer_repa_config(state_dict, model_name)  # a bare SiT state dict
        return state_dict, name, kwargs, {}
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") in READABLE_FORMATS:
        if not checked:
            warn_unverified(path)
        args = upgrade_args(obj["args"], obj["format"])
        return _strip_prefixes(obj["ema"]), obj["model_name"], obj["model_kwargs"], args
    return _read_repa_checkpoint(obj, path, model_name)


# A checkpoint folder in the Hugging Face Hub's layout (`python share.py export` writes it,
# urepa/model_card.py): the EMA weights, and a config.json that rebuilds the model and records
# the weights' SHA-256, so that weights from another download or revision are refused.
HUB_FORMAT = "u-repa-hub/1"
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"


def read_model_folder(
    folder: str,
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], dict[str, Any]]:
    """(EMA state dict, model_name, model_kwargs, training args) of a checkpoint folder."""
    config_path, weights = os.path.join(folder, HUB_CONFIG), os.path.join(folder, HUB_WEIGHTS)
    if not (os.path.isfile(config_path) and os.path.isfile(weights)):
        raise InputError(
            f"{folder!r} is not a checkpoint folder: it needs {HUB_CONFIG} and {HUB_WEIGHTS} "
            "(python share.py export writes them from a run)"
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"could not read {config_path} as JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != HUB_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise InputError(f"{config_path} is not a {HUB_FORMAT} config (format: {found!r}): "
                         "not a checkpoint folder of this code")  # fmt: skip
    digest = file_sha256(weights)
    if digest != config["weights_sha256"]:
        raise DamagedCheckpoint(
            f"{weights} has SHA-256 {digest[:16]}..., {config_path} records "
            f"{config['weights_sha256'][:16]}... (a partial or mixed download, or a changed "
            "file): download the folder again"
        )
    state_dict, args = _read_safetensors(weights)[0], config["training_args"]
    return state_dict, config["model_name"], config["model_kwargs"], args


def trained_vae(model: AlignedDiffusionTransformer) -> str | None:
    """The --vae whose latents the checkpoint's model was trained on, as its training args
    record it, or None where they do not (REPA's checkpoints); a pixel space where the model
    has 3 channels but the record says otherwise (train.py once took --vae for its previews
    only, without reading the dataset's)."""
    args = model.checkpoint_args
    recorded = args.get("vae")
    if model.in_channels == 3 and latent_geometry(recorded or "ema")[0] != 3:
        side = model.latent_shape[-1]
        return PIXEL_VAES.get(args.get("resolution", side) // side, recorded)
    return recorded


def _read_repa_checkpoint(
    obj: Any, path: str, model_name: str | None
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], dict[str, Any]]:
    """REPA's train.py saves {"model", "ema", "opt", "args", ...}; a bare EMA state dict too."""
    repa_args: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        if isinstance(obj.get("args"), argparse.Namespace):
            repa_args = dict(vars(obj["args"]))
        obj = obj["ema"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"{path!r} is neither a {CHECKPOINT_FORMAT} checkpoint, a safetensors export, nor a "
            "REPA SiT checkpoint (a state dict, or a dict with an 'ema' state dict)"
        )
    state_dict = _legacy_repa_keys(_strip_prefixes(obj))
    name, kwargs = infer_repa_config(state_dict, model_name)
    return state_dict, name, kwargs, repa_args


def state_dict_mismatch(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], show: int = 5
) -> str:
    """What keeps `found` from loading strictly into a model with `expected`: "" if nothing."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} {tuple(found[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", reshaped)):  # fmt: skip
        if keys:
            more = f" and {len(keys) - show} more" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)


def load_model_for_sampling(
    path: str, device: torch.device | str = "cpu", model_name: str | None = None
) -> AlignedDiffusionTransformer:
    """The EMA model of a U-REPA checkpoint (`.pt` or safetensors export) or of REPA's released
    SiT checkpoint, in eval mode on `device`, loaded with `strict=True`.

    `model_name` is needed only for a REPA checkpoint whose variant cannot be inferred; for our
    checkpoints it must agree with the stored name. The training args (empty for REPA's) are
    kept as `model.checkpoint_args`, e.g. for the path type the model was trained with.
    """
    state_dict, name, kwargs, args = read_sampling_weights(path, model_name)
    try:
        canonical_name(name)
    except KeyError as err:
        raise InputError(f"{path!r} holds a model this code does not know: {err.args[0]} "
                         "(update the code to the version that wrote it)") from err  # fmt: skip
    if model_name is not None and canonical_name(model_name) != canonical_name(name):
        raise InputError(f"{path!r} holds a {name}, not a {model_name}")
    with torch.device(device):
        model = build_model(name, **kwargs)
    problems = state_dict_mismatch(model.state_dict(), state_dict)
    if problems:
        raise InputError(
            f"{path!r} does not fit {name} {kwargs} (a checkpoint of another model?): {problems}"
        )
    model.load_state_dict(state_dict, strict=True)
    model.checkpoint_args = dict(args)
    return model.eval().requires_grad_(False)


#################################################################################
#                               A run directory                                 #
#################################################################################

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")  # checkpoints/0050000.pt; temporary files differ


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def ema_export_path(checkpoint_path: str) -> str:
    """checkpoints/0400000.pt -> checkpoints/0400000-ema.safetensors"""
    return checkpoint_path.removesuffix(".pt") + "-ema.safetensors"


def list_checkpoints(run_dir: str) -> dict[int, str]:
    """{step: path} of the run's complete checkpoints, in step order."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found = {int(m[1]): os.path.join(folder, n) for n in names if (m := CHECKPOINT_NAME.match(n))}
    return dict(sorted(found.items()))


def latest_checkpoint(run_dir: str) -> str | None:
    """The path of the run's last complete checkpoint, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[max(checkpoints)] if checkpoints else None


def prune_checkpoints(run_dir: str, keep_last: int, milestone_every: int) -> list[str]:
    """Delete the checkpoints (and EMA exports) that are neither among the last `keep_last`
    nor milestones."""
    checkpoints = list_checkpoints(run_dir)
    keep = set(list(checkpoints)[-keep_last:])
    keep |= {s for s in checkpoints if milestone_every and s % milestone_every == 0}
    removed = []
    for step, path in checkpoints.items():
        if step not in keep:
            removed += remove_checkpoint(path) + remove_checkpoint(ema_export_path(path))
    return removed


def export_due(step: int, milestone_every: int, final_step: int) -> bool:
    """Whether the checkpoint of `step` has an EMA export: milestones and the final step."""
    return bool(milestone_every) and step % milestone_every == 0 or step == final_step


def write_ema_export(path: str, state: dict[str, Any]) -> str:
    """Export the EMA of training checkpoint `state` (saved at `path`) beside it, with its model
    config and training flags (generate.py samples by its path type); returns the export's path."""
    export = ema_export_path(path)
    name, kwargs = state["model_name"], state["model_kwargs"]
    export_ema_safetensors(export, state["ema"], name, kwargs, state["args"])
    return export


# What a write that meets a full disk (or another I/O failure) raises: torch.save a RuntimeError
# ("PytorchStreamWriter failed writing file ..."), safetensors a SafetensorError, open and fsync
# an OSError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# Room asked for beyond the tensors' bytes: the containers' structure, and the file system's.
FREE_SPACE_MARGIN = 64 * 2**20


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in nested dicts, lists and tuples, each storage once (as
    torch.save writes them)."""
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return sum(storages.values())


def previous_checkpoint(run_dir: str, step: int) -> str:
    earlier = [path for s, path in list_checkpoints(run_dir).items() if s < step]
    return earlier[-1] if earlier else "none"


def check_free_space(run_dir: str, state: dict[str, Any], export_ema: bool) -> None:
    """Refuse to start a save that the disk cannot hold: a checkpoint is as large as its tensors
    (and its EMA export as the EMA's); writing it until the disk is full would fail anyway, and
    fill the disk for everything else."""
    needed = tensor_bytes(state) + (tensor_bytes(state["ema"]) if export_ema else 0)
    needed += FREE_SPACE_MARGIN
    folder = os.path.dirname(checkpoint_path(run_dir, state["step"]))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise TrainingError(
            f"not enough free space for the checkpoint of step {state['step']} in {folder}: it "
            f"needs {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free. Nothing was "
            f"written; the previous checkpoint ({previous_checkpoint(run_dir, state['step'])}) "
            "is intact: make room and resume with --resume auto (the steps after it run again)"
        )


def save_run_checkpoint(
    run_dir: str, state: dict[str, Any], export_ema: bool, keep_last: int, milestone_every: int
) -> tuple[str, list[str]]:
    """Write `state` (see `checkpoint_state`) as checkpoints/{step:07d}.pt, its EMA as a
    safetensors export if `export_ema`, then prune old checkpoints. Returns (path, removed).

    A save the disk cannot hold, or a failed write, raises a TrainingError that says what was
    kept: the previous checkpoints are left as they were."""
    step, path = state["step"], checkpoint_path(run_dir, state["step"])
    check_free_space(run_dir, state, export_ema)
    try:
        save_checkpoint(path, state)
    except WRITE_ERRORS as err:
        raise TrainingError(
            f"could not write the checkpoint of step {step} to {path}: {err}. The previous "
            f"checkpoint ({previous_checkpoint(run_dir, step)}) is intact: make room and resume "
            "with --resume auto (the steps after it run again)"
        ) from err
    if export_ema:
        try:
            write_ema_export(path, state)
        except WRITE_ERRORS as err:
            raise TrainingError(
                f"the checkpoint of step {step} is saved ({path}), but its EMA export "
                f"{ema_export_path(path)} could not be written: {err}. Make room and resume "
                "with --resume auto: it writes the export again"
            ) from err
    return path, prune_checkpoints(run_dir, keep_last, milestone_every)


def remove_interrupted_saves(run_dir: str) -> list[str]:
    """Delete what saves that a kill stopped midway left in the run directory: temporary files
    (`utils.atomic_write`'s, as large as a checkpoint), and checksum files of checkpoints that
    were never renamed into place. Returns their paths."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    orphans = [
        os.path.join(folder, name)
        for name in names
        if name.endswith(CHECKSUM_SUFFIX) and name.removesuffix(CHECKSUM_SUFFIX) not in names
    ]
    for path in orphans:
        os.remove(path)
    return [*utils.remove_temporaries(run_dir), *utils.remove_temporaries(folder), *orphans]


def write_missing_exports(run_dir: str, milestone_every: int, final_step: int) -> list[str]:
    """Write the EMA export of every kept checkpoint that should have one (`export_due`) but
    has none: a kill or a full disk came between the checkpoint and its export. A damaged
    checkpoint is skipped (the resume has said so). Returns the exports written."""
    written = []
    for step, path in list_checkpoints(run_dir).items():
        if export_due(step, milestone_every, final_step) and not os.path.exists(
            ema_export_path(path)
        ):
            try:
                written.append(write_ema_export(path, load_checkpoint(path)))
            except DamagedCheckpoint:
                continue
    return written


def resume_checkpoint(run_dir: str, resume: str | None) -> str | None:
    """The checkpoint to resume from (see `resolve_run`), checked against its SHA-256. With
    --resume auto, a damaged latest checkpoint is passed over, with a warning, for the one
    before it (the steps after that run again); a named one must be intact."""
    path = resolve_run(run_dir, resume)
    if path is None or resume != "auto":
        if path is not None and os.path.isfile(path):
            verify_checksum(path)
        return path
    candidates = list(list_checkpoints(run_dir).values())[::-1]  # the latest first
    for path in candidates:
        try:
            verify_checksum(path)
        except DamagedCheckpoint as err:
            logger.warning(f"{err}: resuming from the checkpoint before it")
            continue
        return path
    raise TrainingError(
        f"every checkpoint of {run_dir} is damaged (see above): resume from a copy with "
        "--resume PATH, or start a new run with another --exp-name"
    )


#################################################################################
#                                   Resuming                                    #
#################################################################################

# Flags that may change when a run is resumed: where things are, how the run reports, and how
# the global batch is computed (accumulation, like the process count, leaves the samples and
# draws of every step as they were), and how the update is computed (the AdamW kernel, sharding,
# an EMA every k steps with decay^k: the same average up to float rounding and a lag of at most
# k - 1 steps). Any other difference is refused.
RESUMABLE_CHANGES = frozenset(
    {
        "max_train_steps", "checkpointing_steps", "keep_last", "milestone_every",
        "sampling_steps", "preview_images", "log_every", "report_to", "num_workers",
        "data_dir", "output_dir", "exp_name", "resume", "dry_run", "debug", "compile",
        "compile_check",
        "peak_tflops", "fused_optimizer", "compile_update", "sdpa_backend", "fsdp", "ema_every",
        "vae", "enc_weights", "on_nonfinite", "gradient_accumulation_steps",
        # evaluation during training reads the EMA, never changes training
        "eval_every", "eval_samples", "eval_ref", "eval_preset", "eval_num_steps",
        "eval_batch_size", "eval_fd_dinov2", "inception_weights", "dinov2_weights",
        "eval_standins_for_tests",
        # a captioned dataset's text encoder, recorded by train.py: the dataset's identity holds it
        "text_encoder",
    }
)  # fmt: skip


def resolve_run(run_dir: str, resume: str | None) -> str | None:
    """The checkpoint a run resumes from (None: it starts), checked against its directory
    before anything is written. `resume`: None, "auto" or a checkpoint path (--resume)."""
    if resume is None:
        if os.path.exists(run_dir) and not never_checkpointed(run_dir):
            if latest_checkpoint(run_dir) is None:
                raise TrainingError(
                    f"the run directory {run_dir} already exists and holds no checkpoint: "
                    f"delete it (rm -r {run_dir}) to start again, or choose another --exp-name"
                )
            raise TrainingError(
                f"the run directory {run_dir} already exists: pass --resume auto to continue "
                "that run, or choose another --exp-name (runs are never overwritten)"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return resume


# What a run writes before its first checkpoint (train.start_run_directory).
FIRST_FILES = {"checkpoints", "samples", "log.txt", "args.json", "metrics.jsonl"}


def never_checkpointed(run_dir: str) -> bool:
    """Whether `run_dir` holds only what a run that failed before its first checkpoint and
    preview left (nothing to resume, nothing to lose): a new run may start there."""
    if not os.path.isdir(run_dir) or not set(os.listdir(run_dir)) <= FIRST_FILES:
        return False
    folders = (os.path.join(run_dir, name) for name in ("checkpoints", "samples"))
    return not any(os.path.isdir(folder) and os.listdir(folder) for folder in folders)


def check_resumable(
    ckpt: dict[str, Any],
    model_name: str,
    model_kwargs: dict[str, Any],
    args: dict[str, Any],
    data: dict[str, Any],
) -> list[str]:
    """Refuse a checkpoint of another model, objective or data, listing every difference.
    `data`: this run's `dataset_size` and `dataset_id` (see `data_differences`). Returns what
    could not be checked, for the log."""
    where = ("in the checkpoint", "now")
    diffs = dict_differences({"model": ckpt["model_name"]}, {"model": model_name}, *where)
    diffs += dict_differences(
        ckpt["model_kwargs"], model_kwargs, *where, name=lambda k: f"model argument {k}"
    )
    old_args = {k: v for k, v in ckpt["args"].items() if k not in RESUMABLE_CHANGES}
    new_args = {k: v for k, v in args.items() if k not in RESUMABLE_CHANGES}
    diffs += dict_differences(old_args, new_args, *where, name=lambda k: "--" + k.replace("_", "-"))
    diffs += data_differences(ckpt["data"], data)
    if diffs:
        raise TrainingError(
            "cannot resume: the checkpoint was trained with a different setup:\n  "
            + "\n  ".join(diffs)
            + "\nRun the checkpoint's own command (its flags are in the run's args.json), or "
            "start a new run with another --exp-name."
        )
    if ckpt["data"].get("dataset_id") is None or data["dataset_id"] is None:
        return [
            "the checkpoint records no identity of its dataset (it was written by earlier "
            "code): could not check that --data-dir holds the data it was trained on, only "
            f"its size ({data['dataset_size']})"
        ]
    return []


def data_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the data of a checkpoint (its `data` entry) and of this run differ: in size, or, at
    the same size, in content (`dataset_id`, a hash of the data that does not depend on where
    it is; None where unknown, as in checkpoints of earlier code)."""
    if saved["dataset_size"] != now["dataset_size"]:
        return [
            f"dataset size: {saved['dataset_size']} in the checkpoint, "
            f"{now['dataset_size']} now (the data order would differ)"
        ]
    before, after = saved.get("dataset_id"), now["dataset_id"]
    if before is not None and after is not None and before != after:
        return [
            f"dataset content: {before[:16]} in the checkpoint, {after[:16]} now (another "
            "dataset of the same size: its manifest records other shard files)"
        ]
    return []


def restore_run_state(
    ckpt: dict[str, Any],
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
) -> int:
    """Load model, EMA, optimiser and loss-scaler states from a training checkpoint (sharded
    ones keep their process's shards); returns its step. The RNG states (one per process) are
    the caller's: `ckpt["rng"]`."""
    load_full_state_dict(model, ckpt["model"])
    load_full_state_dict(ema, ckpt["ema"])
    # This run's AdamW kernel (--fused-optimizer may change on resume), not the checkpoint's;
    # loading then puts the step counters where that kernel keeps them (device or CPU).
    for saved, group in zip(ckpt["opt"]["param_groups"], optimizer.param_groups, strict=True):
        saved["fused"], saved["foreach"] = group["fused"], group["foreach"]
    load_full_optimizer_state(model, optimizer, ckpt["opt"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["step"])

"""A run's EMA export as a checkpoint folder in the Hugging Face Hub's layout:

    model.safetensors   the EMA weights: the run's `checkpoints/NNNNNNN-ema.safetensors` as is
    config.json         what rebuilds the model (registry name, constructor arguments), the
                        weights' SHA-256, step, images seen, the training flags, the dataset's
                        identity, this step's evaluations (eval.jsonl) and their sampler presets
    README.md           the model card: the Hub's YAML metadata (license, library, tags, datasets,
                        model-index with each metric's sample count and preset), one command to
                        sample, the evaluations, the papers' BibTeX

`build_model_folder` writes it from the run directory's files alone (the trainer is not involved:
any export of any run, old or new, can be shared); `urepa/hub.py` publishes it and loads it back.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from urepa.checkpoints import (
    HUB_CONFIG,
    HUB_FORMAT,
    HUB_WEIGHTS,
    DamagedCheckpoint,
    checksum_path,
    ema_export_path,
    list_checkpoints,
    load_checkpoint,
)
from urepa.run_log import read_jsonl
from urepa.settings import EVAL_FILE, EVAL_PRESETS, SAMPLING_DEFAULTS
from urepa.utils import InputError, file_sha256, write_json

CARD = "README.md"
METRICS = {  # eval.jsonl's key: the card's name
    "fid": "FID", "sfid": "sFID", "inception_score": "Inception Score",
    "precision": "Precision", "recall": "Recall", "fd_dinov2": "FD-DINOv2",
}  # fmt: skip
# The README's BibTeX (U-REPA, then REPA).
BIBTEX = "\n".join([
    "@article{tian2025urepa,",
    "  title={U-REPA: Aligning Diffusion U-Nets to ViTs},",
    "  author={Yuchuan Tian and Hanting Chen and Mengyu Zheng and Yuchen Liang and Chao Xu and "
    "Yunhe Wang},",
    "  journal={arXiv preprint arXiv:2503.18414},",
    "  year={2025},",
    "}",
    "",
    "@inproceedings{yu2025repa,",
    "  title={Representation Alignment for Generation: Training Diffusion Transformers Is Easier "
    "Than You Think},",
    "  author={Sihyun Yu and Sangkyung Kwak and Huiwon Jang and Jongheon Jeong and Jonathan Huang "
    "and Jinwoo Shin and Saining Xie},",
    "  booktitle={International Conference on Learning Representations},",
    "  year={2025},",
    "}",
])  # fmt: skip


def exported_step(run_dir: str, step: int | None) -> tuple[int, str]:
    """(step, its training checkpoint) of the run's EMA export at `step` (None: the latest)."""
    checkpoints = list_checkpoints(run_dir)
    exported = {s: p for s, p in checkpoints.items() if os.path.exists(ema_export_path(p))}
    if not exported:
        raise InputError(
            f"{run_dir} has no EMA export (checkpoints/NNNNNNN-ema.safetensors, "
            "written at milestones and the last step): nothing to share"
        )
    chosen = max(exported) if step is None else step
    if chosen not in exported:
        raise InputError(f"{run_dir} has no EMA export of step {step}; exported steps: "
                         f"{', '.join(map(str, exported))}")  # fmt: skip
    return chosen, exported[chosen]


def evaluations_of(run_dir: str, step: int) -> list[dict[str, Any]]:
    """eval.jsonl's rows of `step` (every preset it was evaluated with); the machine-specific
    entries (the reference's path, wall-clock time) are left out."""
    rows = [row for row in read_jsonl(os.path.join(run_dir, EVAL_FILE))[0] if row["step"] == step]
    private = ("eval_ref", "eval_seconds", "processes")
    return [
        {**{k: v for k, v in row.items() if k not in private},
         "eval_ref": os.path.basename(row.get("eval_ref", ""))}
        for row in rows
    ]  # fmt: skip


def copy_verified(export: str, copy: str) -> str:
    """Copy the export and return the copy's SHA-256, checked against the export's recorded one
    (an export without one, written by earlier code, is copied as it is)."""
    shutil.copyfile(export, copy)
    digest = file_sha256(copy)
    recorded = checksum_path(export)
    if os.path.exists(recorded):
        with open(recorded) as f:
            expected = f.read().split(maxsplit=1)[0]
        if digest != expected:
            os.remove(copy)
            raise DamagedCheckpoint(f"{export} does not match its SHA-256 in {recorded} (damaged "
                                    "on disk): share another step")  # fmt: skip
    return digest


def sampler_preset(name: str, sampler_steps: int) -> dict[str, Any]:
    """The sampler settings of an evaluation preset, with the step count it ran."""
    return {**SAMPLING_DEFAULTS, **EVAL_PRESETS[name], "num_steps": sampler_steps}


def model_config(run_dir: str, step: int, checkpoint: str, weights_sha256: str) -> dict[str, Any]:
    """config.json: the model, the weights' digest, the training, the data, the evaluations."""
    state = load_checkpoint(checkpoint, verify=False)  # memory-mapped: args, data, step only
    args, data = state["args"], state["data"] or {}
    evaluations = evaluations_of(run_dir, step)
    return {
        "format": HUB_FORMAT,
        "model_name": state["model_name"],
        "model_kwargs": state["model_kwargs"],
        "weights_sha256": weights_sha256,
        "step": step,
        "images_seen": step * int(args.get("batch_size", 0)),
        "training_args": args,
        "dataset": {key: data.get(key) for key in ("dataset_id", "dataset_size")},
        "evaluations": evaluations,
        "sampler_presets": {
            row["preset"]: sampler_preset(row["preset"], row["sampler_steps"])
            for row in evaluations
        },
    }


def build_model_folder(
    run_dir: str, out: str, step: int | None = None, repo_id: str | None = None,
    dataset: str | None = None,
) -> list[str]:  # fmt: skip
    """Write the checkpoint folder of the run's export at `step` (None: the latest) into `out`,
    which must be new or empty; returns the files written. `repo_id` names the repository in the
    card's commands; `dataset`, the Hub dataset of its metadata (default: imagenet-1k for a
    model of 1000 classes, else none)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"{out} already exists and is not an empty folder: choose a new --out")
    step, checkpoint = exported_step(run_dir, step)
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, HUB_WEIGHTS)
    digest = copy_verified(ema_export_path(checkpoint), weights)
    config = model_config(run_dir, step, checkpoint, digest)
    write_json(os.path.join(out, HUB_CONFIG), config)
    name = repo_id or os.path.basename(os.path.abspath(run_dir))
    if dataset is None and config["model_kwargs"].get("num_classes") == 1000:
        dataset = "imagenet-1k"
    card = model_card(config, name, repo_id or out, dataset)
    with open(os.path.join(out, CARD), "w") as f:
        f.write(card)
    return [os.path.join(out, n) for n in (HUB_WEIGHTS, HUB_CONFIG, CARD)]


#################################################################################
#                                 The model card                                #
#################################################################################


def metric_label(key: str, num_samples: int) -> str:
    """`FID-10K`, `Precision-50K`: every metric is named with its sample count, so that a
    10K-sample FID is never read as the papers' FID-50K."""
    count = f"{num_samples // 1000}K" if num_samples % 1000 == 0 else str(num_samples)
    return f"{METRICS[key]}-{count}"


def eval_results(config: dict[str, Any], dataset: str | None) -> list[EvalResult]:
    """The model-index entries: one per metric and evaluation, the sample count in the metric's
    type and name, the preset and sampler steps in its config and args."""
    results = []
    for row in config["evaluations"]:
        for key in METRICS:
            if key not in row:
                continue
            label = metric_label(key, row["num_samples"])
            results.append(EvalResult(
                task_type="image-generation", dataset_type=dataset or "custom",
                dataset_name=dataset or "training data",
                metric_type=f"{key.replace('_', '-')}-{label.rsplit('-', 1)[1].lower()}",
                metric_value=row[key],
                metric_name=f"{label} ({row['preset']} preset)",
                metric_config=f"preset={row['preset']},sampler_steps={row['sampler_steps']},"
                              f"num_samples={row['num_samples']}",
                metric_args={"num_samples": row["num_samples"], "preset": row["preset"],
                             "sampler_steps": row["sampler_steps"], "step": row["step"]},
            ))  # fmt: skip
    return results


def objective(args: dict[str, Any]) -> str:
    if not args.get("proj_coeff", 0):
        return "no representation alignment"
    if args.get("manifold_coeff", 0):
        return "U-REPA (REPA's alignment plus the manifold loss)"
    return "REPA"


def card_metadata(config: dict[str, Any], name: str, dataset: str | None) -> str:
    data = ModelCardData(
        license="mit", library_name="u-repa", datasets=[dataset] if dataset else None,
        tags=["diffusion", "flow-matching", "image-generation", "representation-alignment",
              "repa", "u-repa", config["model_name"].split("-")[0].lower()],
        model_name=name, eval_results=eval_results(config, dataset) or None,
    )  # fmt: skip
    return data.to_yaml().rstrip("\n") + "\n"


def evaluations_table(config: dict[str, Any]) -> str:
    if not config["evaluations"]:
        return "No evaluation of this step was recorded (`train.py --eval-every`)."
    lines = ["| metric | value | samples | preset | sampler steps |", "|---|---|---|---|---|"]
    for row in config["evaluations"]:
        for key in (k for k in METRICS if k in row):
            label, count = metric_label(key, row["num_samples"]), row["num_samples"]
            lines.append(f"| {label} | {row[key]:.4g} | {count} | {row['preset']} | "
                         f"{row['sampler_steps']} |")  # fmt: skip
    note = ""
    if any(row["num_samples"] != 50_000 for row in config["evaluations"]):
        note = ("\n\nFID with fewer than 50,000 samples is biased upwards: compare FID-10K with "
                "FID-10K only, never with the papers' FID-50K.")  # fmt: skip
    return "\n".join(lines) + note


def model_card(config: dict[str, Any], name: str, source: str, dataset: str | None) -> str:
    """README.md: YAML front matter, then the card."""
    args = config["training_args"]
    presets = "\n".join(f"- `{p}`: {json.dumps(s)}" for p, s in config["sampler_presets"].items())
    return f"""---
{card_metadata(config, name, dataset)}---

# {name}

{config["model_name"]} trained with {objective(args)} by the U-REPA codebase: step
{config["step"]:,}, {config["images_seen"]:,} images seen, EMA weights (decay
{args.get("ema_decay", 0.9999)}). `config.json` holds the model's arguments, every training flag
and the identity of the training data (`dataset_id`: a SHA-256 of its manifest's content).

## Sampling

```bash
python generate.py --ckpt {source} --sample-dir samples/{name.split("/")[-1]} --preset paper-main
```

or, in Python, `from urepa.hub import from_pretrained; model = from_pretrained("{source}")`.

## Evaluations of this step

{evaluations_table(config)}

{("Sampler presets of these numbers:" + chr(10) + presets) if presets else ""}

## Citation

```bibtex
{BIBTEX}
```
"""

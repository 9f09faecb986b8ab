"""Evaluation during training: FID, sFID, IS, precision, recall (and FD-DINOv2) of the EMA model
every --eval-every steps, on every process, written to `eval.jsonl` in the run directory.

* The same images as generate.py. Sample i's label and noise come from its own generator seeded
  by (EVAL_SEED, i), with balanced labels, through `sampling.py`: the images, and so the curve,
  do not depend on the number of processes or --eval-batch-size (beyond float rounding), and
  every evaluation uses the same noise. `generate.py --global-seed 0 --label-sampling balanced
  --num-fid-samples K` with the same preset samples the same images from a checkpoint's EMA.
  A text-to-image run conditions sample i on the caption of --eval-captions-from that
  `captions.caption_of_sample` gives it, as `generate.py --captions-from` does.
* The metrics are `evaluations/`'s, computed on the main process from the Inception (and DINOv2)
  features of every process, gathered in sample order. No image is written.
* FID-10K is not FID-50K. With fewer samples FID is biased upwards (roughly like 1/N): a
  10K-sample FID is higher than the 50K-sample FID of the same model, so compare curves with
  curves, and papers' numbers with `generate.py` + `evaluations/evaluator.py` at 50K.
* Training is untouched: the RNG states (Python, NumPy, torch CPU and CUDA) are saved before and
  restored after, the model being trained is not used (the EMA is, in eval mode, never wrapped),
  TF32 settings are restored, and the data loader is not touched. Training after an evaluation is
  bit for bit what it would have been without it.
* Resume. A step's row in `eval.jsonl` is written whole (atomically) once its evaluation ends: an
  evaluation killed before that is done again when the run resumes (at once if the checkpoint is
  of that step, else when training reaches it again); one with a row is not repeated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from evaluations.arrays import open_image_array
from evaluations.commands import ReportedError as EvaluationError
from evaluations.dinov2 import DinoV2Features, build_dinov2
from evaluations.evaluator import metrics_from_features
from evaluations.inception import (
    Features,
    InceptionFeatures,
    TinyInceptionForTests,
    build_inception,
    tf32_disabled,
)
from evaluations.inputs import ReferenceStatistics, load_dinov2_statistics
from evaluations.inputs import load_reference_statistics as load_reference
from evaluations.metrics import GaussianAccumulator, frechet_distance
from models.base import AlignedDiffusionTransformer
from models.summary import count_macs
from samplers import guidance_active
from urepa.captions import CaptionFeatures, caption_features, open_caption_set
from urepa.checkpoints import TrainingError, rng_state, set_rng_state
from urepa.run_log import append_jsonl, read_jsonl
from urepa.sampling import balanced_labels, generate_latents, to_uint8
from urepa.settings import EVAL_FILE, EVAL_PRESETS, EVAL_SEED, EvalSettings, SamplerSettings
from urepa.utils import available_memory, require

# Forward MACs per image of the feature networks, for the cost estimate (counted with
# torch.utils.flop_counter on the real layouts: Inception at 299 px, DINOv2 ViT-L/14 at 224 px).
INCEPTION_MACS = 5.71e9
DINOV2_MACS = 77.8e9


def forward_images_per_sample(sampler: SamplerSettings) -> int:
    """Images the denoiser sees per sample: one per evaluation, two where guidance is active
    (as `samplers.py` steps: ODE on linspace(1, 0, n + 1) without its last point, plus Heun's
    corrector; SDE on linspace(1, 0.04, n))."""
    if sampler.mode == "sde":
        times = torch.linspace(1.0, 0.04, sampler.num_steps, dtype=torch.float64)
    else:
        times = torch.linspace(1, 0, sampler.num_steps + 1, dtype=torch.float64)[:-1]
    low, high, scale = sampler.guidance_low, sampler.guidance_high, sampler.cfg_scale
    per_step = [2 if guidance_active(t, scale, low, high) else 1 for t in times]
    heun = sum(per_step[:-1]) if sampler.mode == "ode" and sampler.heun else 0
    return sum(per_step) + heun


def check_eval_settings(settings: EvalSettings, cfg_prob: float) -> None:
    """train.py's checks between the --eval-* flags (the files are checked before training
    starts, by `create_evaluation`)."""
    if not settings.eval_every:
        return
    if settings.eval_ref is None:
        raise ValueError("--eval-every needs --eval-ref REF.npz (ADM's reference batch, or one "
                         "built with evaluations/make_reference.py)")  # fmt: skip
    preset = settings.eval_preset
    if EVAL_PRESETS[preset].get("cfg_scale", 1.0) != 1.0 and cfg_prob == 0:
        raise ValueError(f"--eval-preset {preset} guides, but --cfg-prob 0 trains no "
                         "null class: use --eval-preset no-guidance")  # fmt: skip


def check_eval_captions(settings: EvalSettings, captioned: bool) -> None:
    """A text-to-image run is evaluated on the captions of --eval-captions-from (a validation set
    prepared with preprocessing/prepare.py --captions); a class-conditional one on its labels."""
    flag = settings.eval_captions_from
    if captioned and settings.eval_every and flag is None:
        raise TrainingError("--eval-every on a captioned dataset needs --eval-captions-from "
                            "DATA_DIR, a validation set prepared with preprocessing/prepare.py "
                            "--captions and the training set's text encoder")  # fmt: skip
    if flag is not None and not (captioned and settings.eval_every):
        raise TrainingError("--eval-captions-from is for --eval-every on a captioned dataset "
                            "(text-to-image); drop it")  # fmt: skip


def row_settings(settings: EvalSettings) -> dict[str, Any]:
    """What an evaluation's numbers depend on besides the weights; recorded in each row."""
    assert settings.eval_ref is not None  # (check_eval_settings)
    return {
        "preset": settings.eval_preset,
        "sampler_steps": settings.sampler.num_steps,
        "num_samples": settings.eval_samples,
        "eval_ref": os.path.abspath(settings.eval_ref),
    } | caption_row_settings(settings)


def caption_row_settings(settings: EvalSettings) -> dict[str, Any]:
    """The captions of a text-to-image evaluation, in its rows (none for a class-conditional
    one, whose rows stay as they were)."""
    if settings.eval_captions_from is None:
        return {}
    return {"eval_captions": os.path.abspath(settings.eval_captions_from)}


def read_done_steps(run_dir: str, settings: dict[str, Any]) -> set[int]:
    """The steps of eval.jsonl's rows made with `settings` (rows made with others are kept, but
    their steps are evaluated again with these)."""
    rows = read_jsonl(os.path.join(run_dir, EVAL_FILE))[0]  # damaged lines: see train.py
    return {row["step"] for row in rows if all(row.get(k) == v for k, v in settings.items())}


@contextmanager
def training_state_kept() -> Iterator[None]:
    """Every RNG state as it was (the evaluation's own generators draw nothing from them, but
    libraries might), whatever happens inside."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def gather_rows(rows: torch.Tensor, indices: list[int], total: int, acc: Any) -> np.ndarray | None:
    """(total, D) float32 rows of every process placed at their sample indices, on the main
    process (None elsewhere). Each process passes its (n, D) rows; counts may differ (by a whole
    batch for the reference's images, shared out batch by batch), so they are padded to the
    largest."""
    count = torch.tensor([len(rows)], device=rows.device)
    most = int(acc.gather(count).max())
    padded = rows.new_zeros(most, rows.shape[1])
    padded[: len(rows)] = rows
    where = torch.full((most,), -1, dtype=torch.long, device=rows.device)
    where[: len(indices)] = torch.tensor(indices, dtype=torch.long, device=rows.device)
    all_rows, all_where = acc.gather(padded), acc.gather(where)  # (W·most, D), (W·most,)
    if not acc.is_main_process:
        return None
    keep = all_where >= 0
    out = np.empty((total, rows.shape[1]), dtype=np.float32)
    out[all_where[keep].cpu().numpy()] = all_rows[keep].float().cpu().numpy()
    return out


def gaussian(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stats = GaussianAccumulator()
    stats.update(torch.from_numpy(rows))
    return stats.mean_and_covariance()


@dataclass
class FeatureNets:
    """The feature networks on this process's device."""

    inception: InceptionFeatures | TinyInceptionForTests
    dinov2: DinoV2Features | None

    @property
    def macs(self) -> float:
        """Forward MACs per image (the tests' stand-ins: counted as 0)."""
        if not isinstance(self.inception, InceptionFeatures):
            return 0.0
        return INCEPTION_MACS + (DINOV2_MACS if self.dinov2 is not None else 0.0)

    @property
    def dims(self) -> list[int]:
        """Widths of the features `__call__` returns, in order."""
        dims = [self.inception.pool_dim, self.inception.spatial_dim]
        return dims + ([self.dinov2.feature_dim] if self.dinov2 is not None else [])

    def __call__(self, images: np.ndarray) -> list[torch.Tensor]:
        """uint8 (B, H, W, 3) -> [pool, sFID] (+ [DINOv2]) features, float32 on the device."""
        x = torch.from_numpy(images).to(self.inception.device)
        with tf32_disabled(), torch.inference_mode():
            pool, spatial = self.inception(x)
            out = [pool, spatial] + ([self.dinov2(x)] if self.dinov2 is not None else [])
        return [f.float() for f in out]


def load_feature_nets(settings: EvalSettings, device: torch.device) -> FeatureNets:
    """Inception (and DINOv2 with --eval-fd-dinov2); their tiny stand-ins with the test flag."""
    tests = settings.eval_standins_for_tests
    try:
        inception = (
            TinyInceptionForTests() if tests else build_inception(settings.inception_weights)
        )
        dinov2 = None
        if settings.eval_fd_dinov2:
            weights = settings.dinov2_weights
            dinov2 = build_dinov2(weights, random_weights_for_tests=tests).to(device)
    except EvaluationError as err:  # weights missing offline: one line, before training starts
        raise TrainingError(f"--eval-every: {err}") from err
    return FeatureNets(inception.to(device), dinov2)


class FeatureRows:
    """Feature batches collected on one process: one column per feature kind."""

    def __init__(self, nets: FeatureNets) -> None:
        self.device, self.dims = nets.inception.device, nets.dims
        self.parts: list[list[torch.Tensor]] = [[] for _ in self.dims]

    def add(self, features: list[torch.Tensor]) -> None:
        for part, rows in zip(self.parts, features, strict=True):
            part.append(rows)

    def columns(self) -> list[torch.Tensor]:
        """(n, D) per kind; (0, D) when this process had no batch."""
        return [
            torch.cat(part) if part else torch.zeros(0, dim, device=self.device)
            for part, dim in zip(self.parts, self.dims, strict=True)
        ]


@dataclass
class Reference:
    """The reference batch: its statistics, and (computed at the first evaluation, on the main
    process) its images' pool features for precision/recall and its DINOv2 statistics."""

    path: str
    stats: ReferenceStatistics
    dinov2: tuple[np.ndarray, np.ndarray] | None = None  # stored in the file, else computed
    pool: np.ndarray | None = None

    @classmethod
    def load(cls, path: str, nets: FeatureNets) -> Reference:
        try:
            stats = load_reference(path, nets.inception.pool_dim, nets.inception.spatial_dim)
            dinov2 = None
            if nets.dinov2 is not None:
                dinov2 = load_dinov2_statistics(path, nets.dinov2.feature_dim)
        except EvaluationError as err:
            raise TrainingError(f"--eval-ref: {err}") from err
        return cls(path, stats, dinov2)

    def complete(self, nets: FeatureNets, batch_size: int, acc: Any) -> None:
        """The pool features (and DINOv2 statistics if the file has none) of its images, each
        process taking every W-th batch; on the main process."""
        if self.pool is not None:
            return
        with open_image_array(self.path) as images:
            count, mine, indices = len(images), FeatureRows(nets), list[int]()
            for k, batch in enumerate(images.batches(batch_size)):
                if k % acc.num_processes == acc.process_index:
                    mine.add(nets(batch))
                    indices += range(k * batch_size, k * batch_size + len(batch))
        gathered = [gather_rows(c, indices, count, acc) for c in mine.columns()]
        self.pool = gathered[0] if acc.is_main_process else np.zeros(0)
        if nets.dinov2 is not None and self.dinov2 is None and acc.is_main_process:
            assert gathered[2] is not None
            self.dinov2 = gaussian(gathered[2])


def check_reference_size(path: str, resolution: int) -> None:
    """Refuse a reference whose images are not the samples' size: the feature networks resize
    both, so the metrics would come out, comparing two resolutions without a word."""
    try:
        with open_image_array(path) as images:
            height, width = images.shape[1:3]
    except EvaluationError as err:
        raise TrainingError(f"--eval-ref: {err}") from err
    if (height, width) != (resolution, resolution):
        raise TrainingError(
            f"--eval-ref {path} holds {height}×{width} images, the samples are "
            f"{resolution}×{resolution} (--resolution): use a reference of that size (ADM's "
            f"for ImageNet {resolution}, or one made by evaluations/make_reference.py)"
        )


def fid_name(num_samples: int) -> str:
    """FID-10K, FID-50K, or FID-<n> for other counts."""
    return f"FID-{num_samples // 1000}K" if num_samples % 1000 == 0 else f"FID-{num_samples}"


def training_gpu_hours(run_dir: str, step: int, processes: int) -> float:
    """Training time to `step` × processes, from metrics.jsonl's sec_per_step (which leaves the
    evaluations out), the steps after its last row at that row's rate."""
    seconds, last_step, last_rate = 0.0, 0, 0.0
    for row in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))[0]:
        if row["step"] > step:
            break
        seconds += row.get("sec_per_step", last_rate) * (row["step"] - last_step)
        last_step, last_rate = row["step"], row.get("sec_per_step", last_rate)
    seconds += last_rate * (step - last_step)
    return seconds * processes / 3600


@dataclass
class PeriodicEvaluation:
    """What the training loop calls: `maybe_run(step)` after each step, `catch_up(step)` at the
    start. It samples from the EMA model, which the loop updates in place."""

    settings: EvalSettings
    accelerator: Any  # accelerate's Accelerator
    ema: AlignedDiffusionTransformer  # eval mode, never wrapped
    start_step: int  # the step training starts (or resumes) from
    vae: Any  # LatentAutoencoder, on every process
    run_dir: str
    logger: Any
    nets: FeatureNets
    reference: Reference
    denoiser_macs: int  # forward MACs per image, projector heads left out (sampling skips them)
    captions: CaptionFeatures | None = None  # a text-to-image run's: no labels then
    labels: torch.Tensor | None = field(init=False)
    done: set[int] = field(init=False)
    seconds_per_mac: float | None = None  # measured by the last evaluation
    clock: tuple[float, int] = field(init=False)  # (time, step) since which training ran alone

    def __post_init__(self) -> None:
        samples = self.settings.eval_samples
        self.labels = None
        if self.captions is None:  # class-conditional: balanced labels
            num_classes = self.ema.num_classes
            if samples % num_classes:
                raise TrainingError(f"--eval-samples {samples} is not a multiple of the "
                                    f"{num_classes} classes (the labels are balanced)")  # fmt: skip
        # the features of every sample are gathered on the main process (float32, at least)
        per_sample = 4 * sum(self.nets.dims) + 16
        require(f"--eval-samples {samples}", samples * per_sample,
                available_memory(torch.device("cpu")), "memory for the features of every "
                "sample", "lower --eval-samples (10000: FID-10K)")  # fmt: skip
        if self.captions is None:  # (after the check of their size)
            self.labels = balanced_labels(samples, self.ema.num_classes, EVAL_SEED)
        row = row_settings(self.settings)
        main = self.accelerator.is_main_process
        done = [read_done_steps(self.run_dir, row) if main else None]
        broadcast_object_list(done)  # every process must agree on which steps to evaluate
        self.done = set(done[0] or ())
        self.clock = (time.perf_counter(), self.start_step)

    @property
    def sampler(self) -> SamplerSettings:
        return self.settings.sampler

    def due(self, step: int) -> bool:
        return step > 0 and step % self.settings.eval_every == 0 and step not in self.done

    def catch_up(self, step: int) -> None:
        """The evaluation of the resumed `step`, if a kill interrupted it."""
        self.maybe_run(step)

    def maybe_run(self, step: int) -> float:
        """Evaluate at `step` if it is due; returns the seconds spent (0 if not due)."""
        if not self.due(step):
            return 0.0
        start = time.perf_counter()
        self.logger.info(self.cost(step))
        with training_state_kept():
            metrics = self.evaluate()
        seconds = time.perf_counter() - start
        if self.accelerator.is_main_process:
            assert metrics is not None
            self.record(step, metrics, seconds)
        self.accelerator.wait_for_everyone()
        self.done.add(step)
        self.seconds_per_mac = seconds / self.total_macs()
        self.clock = (time.perf_counter(), step)
        return seconds

    def total_macs(self) -> float:
        """Forward MACs of one evaluation: denoiser, then the feature networks."""
        k = self.settings.eval_samples
        return k * (forward_images_per_sample(self.sampler) * self.denoiser_macs + self.nets.macs)

    def cost(self, step: int) -> str:
        """The log line announcing an evaluation: its forward passes × MACs and expected time."""
        settings = self.settings
        k, per_sample = settings.eval_samples, forward_images_per_sample(self.sampler)
        line = (
            f"evaluation at step {step}: {k} samples ({settings.eval_preset}) × {per_sample} "
            f"denoiser forward images × {self.denoiser_macs / 1e9:.4g} G MACs + {k} VAE decodes "
            f"+ {k} Inception{' + DINOv2' if self.nets.dinov2 is not None else ''} passes = "
            f"{self.total_macs() / 1e15:.4g} PMACs (VAE left out)"
        )
        if self.seconds_per_mac is not None:
            minutes = self.total_macs() * self.seconds_per_mac / 60
            return f"{line}; expected {minutes:.1f} min (the last evaluation's rate)"
        since, since_step = self.clock
        if step > since_step:  # training MACs per second: 3 forwards per image
            macs = (step - since_step) * settings.batch_size * 3 * self.denoiser_macs
            mac_rate = macs / (time.perf_counter() - since)
            minutes = self.total_macs() / mac_rate / 60
            return f"{line}; expected about {minutes:.1f} min (at the training rate)"
        return f"{line}; expected time unknown until an evaluation or training has been timed"

    @torch.no_grad()
    def sample_features(self) -> tuple[FeatureRows, list[int]]:
        """This process's share of the samples (every W-th index), sampled, decoded and
        featurised batch by batch; no image is kept."""
        acc, ema = self.accelerator, self.ema
        assert not ema.training, "the EMA model is kept in eval mode"
        todo = list(range(acc.process_index, self.settings.eval_samples, acc.num_processes))
        rows = FeatureRows(self.nets)
        try:
            for indices, latents in generate_latents(
                ema, ema.latent_shape, todo, self.sampler, self.labels, acc.device, self.captions
            ):
                rows.add(self.nets(to_uint8(self.vae.decode(latents.float()))[: len(indices)]))
        except torch.cuda.OutOfMemoryError as err:
            raise TrainingError(
                f"--eval-batch-size {self.settings.eval_batch_size} does not fit in GPU memory "
                "beside "
                "training (guidance doubles the batch, the VAE decodes it): lower it and resume "
                "with --resume auto; the metrics stay the same up to float rounding"
            ) from err
        return rows, todo

    def evaluate(self) -> dict[str, float] | None:
        """The metrics, on the main process (None elsewhere)."""
        acc, settings = self.accelerator, self.settings
        self.reference.complete(self.nets, settings.eval_batch_size, acc)
        rows, todo = self.sample_features()
        columns = [gather_rows(c, todo, settings.eval_samples, acc) for c in rows.columns()]
        if not acc.is_main_process:
            return None
        pool, spatial = columns[0], columns[1]
        assert pool is not None and spatial is not None and self.reference.pool is not None
        sample = Features(pool, *gaussian(pool), *gaussian(spatial))
        metrics = metrics_from_features(
            self.reference.stats, self.reference.pool, sample, self.nets.inception
        )
        if self.nets.dinov2 is not None:
            assert columns[2] is not None and self.reference.dinov2 is not None
            metrics["fd_dinov2"] = frechet_distance(*gaussian(columns[2]), *self.reference.dinov2)
        return metrics

    def record(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """eval.jsonl's row, the trackers and the log line (main process)."""
        settings, acc = self.settings, self.accelerator
        row = {
            "step": step,
            "images_seen": step * settings.batch_size,
            "gpu_hours": round(training_gpu_hours(self.run_dir, step, acc.num_processes), 6),
            **metrics,
            **row_settings(settings),
            "eval_seconds": round(seconds, 2),
            "processes": acc.num_processes,
        }
        append_jsonl(os.path.join(self.run_dir, EVAL_FILE), row)
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        name = fid_name(settings.eval_samples)
        dino = f", FD-DINOv2 {metrics['fd_dinov2']:.4g}" if "fd_dinov2" in metrics else ""
        note = ""
        if settings.eval_samples != 50_000:
            note = f" {name} is not comparable with papers' FID-50K: fewer samples bias FID up."
        self.logger.info(
            f"evaluation at step {step}: {name} {metrics['fid']:.4g}, sFID {metrics['sfid']:.4g}, "
            f"IS {metrics['inception_score']:.4g}, precision {metrics['precision']:.4g}, recall "
            f"{metrics['recall']:.4g}{dino} ({settings.eval_preset}, {seconds / 60:.2f} min).{note}"
        )


def create_evaluation(
    settings: EvalSettings,
    accelerator: Any,
    ema: AlignedDiffusionTransformer,
    start_step: int,
    vae: Any,
    run_dir: str,
    logger: Any,
) -> PeriodicEvaluation | None:
    """The evaluation of --eval-every (None when off) of the EMA model `ema`, training starting
    at `start_step`: networks and reference loaded and checked now, so that a missing file stops
    the run before training."""
    if not settings.eval_every:
        return None
    assert settings.eval_ref is not None  # (check_eval_settings)
    files = {"--eval-ref": settings.eval_ref, "--inception-weights": settings.inception_weights,
             "--dinov2-weights": settings.dinov2_weights}  # fmt: skip
    for flag, path in files.items():
        if path is not None and not os.path.isfile(path):
            raise TrainingError(f"{flag}: no file {path!r}")
    check_reference_size(settings.eval_ref, settings.resolution)
    nets = load_feature_nets(settings, accelerator.device)
    reference = Reference.load(settings.eval_ref, nets)
    macs = count_macs(ema, ema.latent_shape[-1], include_projectors=False)
    return PeriodicEvaluation(settings, accelerator, ema, start_step, vae, run_dir, logger,
                              nets, reference, macs, eval_captions(settings, ema))  # fmt: skip


def eval_captions(
    settings: EvalSettings, ema: AlignedDiffusionTransformer
) -> CaptionFeatures | None:
    """The captions of --eval-captions-from, checked against the model (None without it)."""
    if settings.eval_captions_from is None:
        return None
    flag = "--eval-captions-from"
    return caption_features(open_caption_set(settings.eval_captions_from, flag, ema))

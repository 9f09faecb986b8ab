"""Sample images for FID: PNGs, then one `.npz` for the ADM evaluator (REPA's `generate.py`).

    torchrun --nproc_per_node=8 generate.py --ckpt exps/run/checkpoints/0400000.pt \
        --sample-dir samples/run-0400000 --preset paper-main

writes `samples/run-0400000/{index:06d}.png`, the settings used (`settings.json`) beside them,
and `samples/run-0400000.npz` (`arr_0`: uint8, N×H×W×3). Also runs as `python generate.py ...`
in a single process (CPU or one GPU). The model is rebuilt from the checkpoint alone (ours:
`.pt` or safetensors export; REPA's released SiT checkpoints too), so there are no model flags
(--model only names a REPA checkpoint's variant where its shapes do not tell).

* Determinism. Sample i draws its label, its initial noise and its SDE noise, in that order,
  from its own torch.Generator (CPU) seeded with a hash of (--global-seed, i): its image depends
  on (seed, i) alone, not on the number of processes, the batch it lands in or its place there.
  Every batch has the same shape (a short last batch is padded), so a resumed run or another
  process count repeats the same arithmetic bit for bit. Another --per-proc-batch-size gives
  the same images up to float rounding: kernels are chosen per shape and sum in their own
  order (so do CPU kernels per thread count; torchrun sets one thread per process), which can
  move a rare pixel by one level. So do --compile, --cuda-graphs and --sdpa-backend (other
  kernels, the same arithmetic): they are not among the settings a resumed folder must match.
* Work split. The indices without a PNG are split strided over ranks (rank r takes every W-th
  one, starting at the r-th), then cut into batches: the split does not depend on batch size.
* Resume. A PNG is written to a temporary name and renamed, so every PNG present is complete;
  re-running the same command generates only the missing ones, and the .npz is then byte for
  byte an uninterrupted run's. A sample folder whose PNGs were made with other settings is
  refused, not mixed; a folder without PNGs (a run that failed before its first image) is
  simply taken over by the new command.
* Which model. The settings identify the checkpoint by a SHA-256 of its EMA weights as loaded,
  not by its path: a checkpoint overwritten by another at the same path is refused, while the
  same weights resume their folder from another path or format (.pt or safetensors export).
  The path is recorded too, for the reader, but not compared.
* Pixels. REPA's convention: uint8 = trunc(clamp(255 · (x + 1) / 2, 0, 255)) for decoded
  x in [-1, 1] (truncation toward zero, as `.to(torch.uint8)` does; ADM's sampler does the same).
  The rounding alternative, clamp(127.5 · x + 128), is brighter by half a level on average.
* The `.npz` is written as an uncompressed zip whose single `arr_0.npy` member is streamed one
  PNG at a time (one image in memory), with a fixed timestamp: the same PNGs give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import zipfile
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset import LatentDataset
from models.base import AlignedDiffusionTransformer
from models.layers import sdpa_backend
from urepa.captions import (
    CaptionFeatures,
    caption_features,
    dataset_captions,
    is_text_to_image,
    open_caption_set,
)
from urepa.checkpoints import trained_vae
from urepa.cli import (
    DefaultsHelpFormatter,
    add_debug_arg,
    add_speed_args,
    add_vae_args,
    model_name,
    nonnegative_float,
    nonnegative_int,
    parse_checked,
    positive_int,
    resolve_speed_args,
    run_main,
    unit_closed,
)
from urepa.hub import load_pretrained
from urepa.sampling import (
    PIXELS,
    SAMPLE_SEED,
    balanced_labels,
    generate_latents,
    sampling_model,
    set_precision,
    to_uint8,
)
from urepa.settings import PRESETS, SAMPLING_DEFAULTS, SamplerSettings, SamplingSpeed
from urepa.shards import dataset_identity
from urepa.speed import report_compile_times
from urepa.utils import (
    InputError,
    ReportedError,
    atomic_write,
    available_memory,
    barrier,
    broadcast_from_rank0,
    close_distributed,
    dict_differences,
    init_distributed,
    remove_temporaries,
    require,
    write_json,
)
from urepa.vae import LatentAutoencoder, load_vae, resolve_vae

SETTINGS_FILE = "settings.json"
# Recorded in the settings for the reader, but not compared: moving a checkpoint keeps its folder.
UNCOMPARED_SETTINGS = ("ckpt",)
PNG_NAME = re.compile(r"^(\d{6,})\.png$")


#################################################################################
#                                     Flags                                     #
#################################################################################


# The flag tables below are formatted by hand, one flag per line or two, as in train.py.
# fmt: off
def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", type=str, required=True,
                       help="our .pt checkpoint, .safetensors export or checkpoint folder, "
                            "REPA's SiT .pt, a release (repa-sit-xl-2) or a Hub repository "
                            "ORG/NAME[@REVISION] (a local path wins; docs/sharing.md)")
    group.add_argument("--model", type=model_name, default=None,
                       help="only for a REPA checkpoint whose SiT variant cannot be inferred; "
                            "a checkpoint that records its model refuses any other name")
    add_vae_args(group, "decodes the samples", recorded_in="the checkpoint")


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler (explicit flags override --preset)")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="paper-main: SDE 250 steps, cfg 1.65, [0, 0.7] (Table 4); "
                            "ablation: Euler ODE 50 steps, cfg 1.8, [0, 0.7] (Tables 5-10)")
    group.add_argument("--mode", choices=["sde", "ode"], default=None, help="default: sde")
    group.add_argument("--num-steps", type=positive_int, default=None, help="default: 250")
    group.add_argument("--heun", action=argparse.BooleanOptionalAction, default=None,
                       help="Heun instead of Euler steps (ODE only); default: off")
    group.add_argument("--cfg-scale", type=nonnegative_float, default=None,
                       help="default: 1 (no guidance)")
    group.add_argument("--guidance-low", "--guidance_low", type=unit_closed, default=None,
                       help="guidance only for t >= this (t = 1 is noise); default: 0")
    group.add_argument("--guidance-high", "--guidance_high", type=unit_closed, default=None,
                       help="guidance only for t <= this; default: 1")
    group.add_argument("--path-type", choices=["linear", "cosine"], default=None,
                       help="default: the path the checkpoint was trained with, else linear")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--sample-dir", type=str, required=True,
                       help="folder of PNGs (and settings.json); the .npz goes beside it")
    group.add_argument("--num-fid-samples", type=positive_int, default=50_000,
                       help="images to generate (50000 for the papers' FID-50K)")
    group.add_argument("--per-proc-batch-size", type=positive_int, default=32,
                       help="images per process per batch; the images are the same up to float "
                            "rounding")
    group.add_argument("--global-seed", type=nonnegative_int, default=0,
                       help="with the index, decides each sample's label and noise")
    group.add_argument("--label-sampling", choices=["random", "balanced"], default="random",
                       help="random: uniform labels; balanced: exactly N/num_classes per class")
    group.add_argument("--captions-from", default=None, metavar="DATA_DIR",
                       help="text-to-image checkpoints: the captioned set whose captions condition "
                            "the samples (COCO val2014 prepared with preprocessing/prepare.py "
                            "--captions); sample i takes image i mod N's caption (i div N) mod "
                            "its count, an order fixed by the data alone; the captions are "
                            "written beside the .npz for CLIP score. U-ViT's and REPA's FID uses "
                            "--num-fid-samples 30000")
    group.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32",
                       help="model precision on GPU: fp32 (TF32 off), tf32 (REPA's default), "
                            "bf16 autocast; the sampler state is float64 and the VAE fp32")


def add_sampling_speed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed (none changes the images beyond float rounding)")
    group.add_argument("--predraw-noise", action=argparse.BooleanOptionalAction, default=True,
                       help="draw each sample's whole SDE noise stream once per batch, in a "
                            "background thread while the previous batch samples (the same "
                            "numbers as step-by-step draws); off: each step draws from every "
                            "sample's generator and copies to the device (a host sync)")
    add_speed_args(group, sampling=True)
# fmt: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sample images for FID (PNGs + one .npz).",
        formatter_class=DefaultsHelpFormatter,
    )
    for add in (add_model_args, add_sampler_args, add_output_args, add_sampling_speed_args):
        add(parser)
    add_debug_arg(parser)
    return parse_checked(parser, argv, validate_args)


def resolve_sampling_args(args: argparse.Namespace) -> None:
    """Fill unset sampler flags from the preset, then from SAMPLING_DEFAULTS."""
    preset = PRESETS[args.preset] if args.preset else {}
    for key, default in SAMPLING_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))


def validate_args(args: argparse.Namespace) -> None:
    """Fill the sampler flags from the preset, then check between flags (each flag's own range
    is checked by its `type`)."""
    resolve_sampling_args(args)
    resolve_speed_args(args)
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        raise ValueError("need 0 <= --guidance-low <= --guidance-high <= 1")
    if args.heun and args.mode == "sde":
        raise ValueError("--heun applies to the ODE sampler only (--mode ode)")


#################################################################################
#                       Sample folder: settings, PNGs, .npz                     #
#################################################################################


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights as loaded: each state-dict entry in key order, its name,
    dtype and shape, then its bytes.

    The hash is of the model, not of the file, so that a .pt, its safetensors export and REPA's
    checkpoint layout of the same weights agree (loading is strict, so every entry comes from
    the file). It costs one pass over the weights: 1.8 to 3.8 s for SiT-XL/2's 683M float32
    parameters (2.7 GB) on a shared 2-core CPU, about 1 GB/s, plus the copy to the CPU when the
    model is on a GPU; small beside sampling 50K images.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # the raw bytes, any dtype
    return digest.hexdigest()


def sampling_settings(
    args: argparse.Namespace, model: AlignedDiffusionTransformer
) -> dict[str, Any]:
    """Everything the images depend on (not the batch size or the number of processes), and the
    checkpoint's path (UNCOMPARED_SETTINGS)."""
    settings = {
        "ckpt": os.path.abspath(args.ckpt) if os.path.exists(args.ckpt) else args.ckpt,
        "weights_sha256": weights_sha256(model),
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "vae": args.vae,
        "num_fid_samples": args.num_fid_samples,
        "mode": args.mode,
        "num_steps": args.num_steps,
        "heun": args.heun,
        "cfg_scale": args.cfg_scale,
        "guidance_low": args.guidance_low,
        "guidance_high": args.guidance_high,
        "path_type": args.path_type,
        "global_seed": args.global_seed,
        "label_sampling": args.label_sampling,
        "precision": args.precision,
        "pixels": PIXELS,
        "sample_seed": SAMPLE_SEED,
    }
    return json.loads(json.dumps(settings))  # as it reads back from disk (tuples -> lists)


def png_path(sample_dir: str, index: int) -> str:
    return os.path.join(sample_dir, f"{index:06d}.png")


def holds_pngs(sample_dir: str) -> bool:
    return os.path.isdir(sample_dir) and any(PNG_NAME.match(n) for n in os.listdir(sample_dir))


def compared(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in UNCOMPARED_SETTINGS}


def check_sample_dir(sample_dir: str, settings: dict[str, Any]) -> None:
    """Refuse a folder whose PNGs were made with other settings (or unknown ones): they would be
    mixed into the .npz. A folder without PNGs holds nothing to mix."""
    if not holds_pngs(sample_dir):
        return
    path = os.path.join(sample_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        raise InputError(
            f"{sample_dir} holds PNGs but no {SETTINGS_FILE}: their settings are unknown, so "
            "they are not mixed with new ones. Use another --sample-dir."
        )
    with open(path) as f:
        existing = json.load(f)
    differences = dict_differences(compared(existing), compared(settings), "there", "now")
    if differences:
        raise InputError(
            f"{sample_dir} holds samples made with other settings ({'; '.join(differences)}). "
            "Use another --sample-dir (or delete this one) instead of mixing them."
        )


def init_sample_dir(sample_dir: str, settings: dict[str, Any]) -> None:
    """Create the folder, drop temporary files left by a crash, and record the settings unless
    PNGs made with them are there already (a resume keeps the first run's record)."""
    os.makedirs(sample_dir, exist_ok=True)
    remove_temporaries(sample_dir)
    parent, npz_name = os.path.split(npz_path_of(sample_dir))
    remove_temporaries(parent or ".", of=npz_name + ".")  # a killed .npz write (as large)
    if not holds_pngs(sample_dir):
        write_json(os.path.join(sample_dir, SETTINGS_FILE), settings)


def npz_path_of(sample_dir: str) -> str:
    """samples/run-0400000/ -> samples/run-0400000.npz (beside the folder)."""
    return f"{os.path.normpath(sample_dir)}.npz"


def missing_indices(sample_dir: str, num_samples: int) -> list[int]:
    done = {int(m.group(1)) for m in map(PNG_NAME.match, os.listdir(sample_dir)) if m}
    return [i for i in range(num_samples) if i not in done]


def save_png(image: np.ndarray, sample_dir: str, index: int) -> None:
    """Write to a temporary name, then rename: a PNG that exists is complete. Not fsynced (50K
    small files): a killed process leaves no partial PNG, though a power loss might."""

    def write(tmp: str) -> None:
        Image.fromarray(image).save(tmp, format="PNG")

    atomic_write(png_path(sample_dir, index), write, durable=False)


def read_png(sample_dir: str, index: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    path = png_path(sample_dir, index)
    with Image.open(path) as img:
        image = np.asarray(img)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"{path} is not an 8-bit RGB image (shape {image.shape}, {image.dtype})")
    if shape is not None and image.shape != shape:
        raise InputError(f"{path} is {image.shape}, the other samples are {shape}")
    return image


def write_npz(sample_dir: str, num_samples: int, npz_path: str) -> tuple[int, ...]:
    """Stream PNGs 0..N-1 into `npz_path` (`arr_0`, uint8, N×H×W×3), one image at a time."""
    first = read_png(sample_dir, 0)
    shape = (num_samples, *first.shape)
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    member = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes

    def write(tmp: str) -> None:
        with (
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
            archive.open(member, "w", force_zip64=True) as f,  # 50K images exceed 4 GiB
        ):
            np.lib.format.write_array_header_1_0(f, header)
            for i in tqdm(range(num_samples), desc="Building .npz", unit="img"):
                f.write(read_png(sample_dir, i, first.shape).tobytes())

    atomic_write(npz_path, write)
    return shape


#################################################################################
#                                   Main                                        #
#################################################################################


def check_model(
    model: AlignedDiffusionTransformer, vae: LatentAutoencoder, args: argparse.Namespace
) -> None:
    if is_text_to_image(model):
        check_text_to_image(model, args)
        has_null_class = model.checkpoint_args.get("cfg_prob", 0.1) > 0  # the empty caption
    else:
        has_null_class = model.y_embedder.embedding_table.num_embeddings > model.num_classes
    if args.cfg_scale != 1.0 and not has_null_class:
        raise InputError("the model has no null class (trained without label dropout), so it "
                         "cannot be guided: use --cfg-scale 1")  # fmt: skip
    if vae.latent_channels != model.in_channels:
        raise InputError(f"the VAE has {vae.latent_channels} latent channels, the model "
                         f"{model.in_channels}")  # fmt: skip


def check_text_to_image(model: AlignedDiffusionTransformer, args: argparse.Namespace) -> None:
    """A text-to-image checkpoint samples from --captions-from, a class-conditional one not."""
    if args.captions_from is None:
        raise InputError(f"{args.ckpt} is a text-to-image model: pass --captions-from, a "
                         "captioned dataset (preprocessing/prepare.py --captions)")  # fmt: skip
    if args.label_sampling != "random":
        raise InputError("--label-sampling applies to class-conditional models only")


def open_captions(
    args: argparse.Namespace, model: AlignedDiffusionTransformer
) -> LatentDataset | None:
    """--captions-from's dataset, checked against the model (None for a class-conditional model,
    which refuses the flag)."""
    if not is_text_to_image(model):
        if args.captions_from is not None:
            raise InputError(f"--captions-from is for text-to-image models; {args.ckpt} is "
                             "class-conditional")  # fmt: skip
        return None
    return open_caption_set(args.captions_from, "--captions-from", model)


def write_captions(dataset: LatentDataset, num_samples: int, npz_path: str) -> str:
    """The caption of every sample, in order, beside the .npz (for CLIP score)."""
    path = npz_path[: -len(".npz")] + ".captions.json"
    write_json(path, dataset_captions(dataset, torch.arange(num_samples)))
    return path


# Host memory per sample before the first image: its balanced label (a permutation and its
# remainders, int64) and its place in the lists of indices to sample.
MEMORY_PER_SAMPLE = 64


def check_room(
    args: argparse.Namespace, model: AlignedDiffusionTransformer, vae: LatentAutoencoder
) -> None:
    """Refuse a --num-fid-samples that the disk or the memory cannot hold, before anything is
    allocated: the .npz alone takes N × H × W × 3 bytes beside the folder."""
    side = model.latent_shape[-1] * vae.downsample_factor
    count = args.num_fid_samples
    folder = os.path.dirname(os.path.abspath(npz_path_of(args.sample_dir)))
    while not os.path.isdir(folder):  # the free space of the disk it will be on
        folder = os.path.dirname(folder)
    advice = "lower --num-fid-samples (50000 for FID-50K)"
    require(f"--num-fid-samples {count}", count * side * side * 3,
            shutil.disk_usage(folder).free, f"disk in {folder} for the .npz of {side}×{side} "
            "images", advice)  # fmt: skip
    require(f"--num-fid-samples {count}", count * MEMORY_PER_SAMPLE,
            available_memory(torch.device("cpu")), "memory", advice)  # fmt: skip


def generate_samples(
    model: AlignedDiffusionTransformer,
    vae: LatentAutoencoder,
    todo: list[int],
    args: argparse.Namespace,
    labels: torch.Tensor | None,
    device: torch.device,
    rank: int,
    captions: CaptionFeatures | None = None,
) -> None:
    """Sample `todo` (this rank's indices) in batches and write their PNGs."""
    progress = tqdm(total=len(todo), unit="img", desc="Sampling (rank 0)", disable=rank != 0)
    sampler, speed = SamplerSettings.from_flags(vars(args)), SamplingSpeed.from_flags(vars(args))
    try:
        with sdpa_backend(args.sdpa_backend):
            for indices, latents in generate_latents(
                sampling_model(model, args.precision, speed),
                model.latent_shape,
                todo,
                sampler,
                labels,
                device,
                captions,
            ):
                images = to_uint8(vae.decode(latents.float()))[: len(indices)]
                for index, image in zip(indices, images, strict=True):
                    save_png(image, args.sample_dir, index)
                progress.update(len(indices))
    except torch.cuda.OutOfMemoryError as err:
        raise ReportedError(
            f"--per-proc-batch-size {args.per_proc_batch_size} does not fit in GPU memory (with "
            "guidance the model runs on twice as many images); lower it: noise and labels stay "
            "the same"
        ) from err
    progress.close()


def main(args: argparse.Namespace) -> None:
    rank, world_size, device = init_distributed()
    set_precision(args.precision)
    if args.compile and rank == 0:
        report_compile_times(print)

    model = load_pretrained(args.ckpt, device, args.model)
    if args.path_type is None:
        args.path_type = model.checkpoint_args.get("path_type", "linear")
    args.vae = resolve_vae(args.vae, trained_vae(model), f"{args.ckpt} was trained")
    vae = load_vae(args.vae, device)
    check_model(model, vae, args)
    check_room(args, model, vae)
    dataset = open_captions(args, model)
    labels = None
    if args.label_sampling == "balanced" and dataset is None:
        labels = balanced_labels(args.num_fid_samples, model.num_classes, args.global_seed)

    # Rank 0 hashes the weights (every rank loaded the same file): one pass, not one per rank.
    settings = broadcast_from_rank0(sampling_settings(args, model) if rank == 0 else None)
    if dataset is not None:  # the captions decide the images as much as the seed does
        settings["captions"] = dataset_identity(dataset.manifest)
    check_sample_dir(args.sample_dir, settings)  # on every rank, so that all stop together
    barrier()
    if rank == 0:
        init_sample_dir(args.sample_dir, settings)
    barrier()

    # Rank 0 lists the missing PNGs once, so that every rank splits the same list.
    missing = broadcast_from_rank0(
        missing_indices(args.sample_dir, args.num_fid_samples) if rank == 0 else None
    )
    if rank == 0:
        done = args.num_fid_samples - len(missing)
        print(
            f"{args.sample_dir}: {done} of {args.num_fid_samples} images present, sampling "
            f"{len(missing)} on {world_size} process(es); settings: {json.dumps(settings)}"
        )
    captions = caption_features(dataset) if dataset is not None else None
    generate_samples(model, vae, missing[rank::world_size], args, labels, device, rank, captions)

    barrier()  # every PNG is written
    if rank == 0:
        npz_path = npz_path_of(args.sample_dir)
        shape = write_npz(args.sample_dir, args.num_fid_samples, npz_path)
        print(f"Saved {npz_path} [arr_0: uint8, shape {shape}].")
        if dataset is not None:
            print(f"Saved {write_captions(dataset, args.num_fid_samples, npz_path)}.")
    close_distributed()


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

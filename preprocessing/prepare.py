"""Prepare a training set: centre-cropped images -> SD-VAE moments, encoder features, labels.

    torchrun --nproc_per_node=8 preprocessing/prepare.py \\
        --source imagenet/train --dest data/imagenet256 --vae ema --enc-type dinov2-vit-b

Runs data-parallel (each process encodes a disjoint set of shards; `python preprocessing/
prepare.py ...` is one process), decodes images in DataLoader workers and writes the format
defined in `urepa/shards.py`. Re-running the same command resumes: completed shards are skipped, and
the manifest is written once every shard is complete. A full disk stops the run before (or while)
a shard is written, saying how much it needs; free space and re-run to resume.

Labels are the index of each class folder among the sorted class folders (ImageNet's synsets
give 0..999), unless --labels is given. A class folder without images keeps its index, so that
the later classes keep theirs: it is reported when the run starts and listed under
`empty_classes` in manifest.json. Links to files and folders are followed; a folder is entered
once per class folder (a link loop is skipped with a warning), and a file reached by two paths
is two samples, as in torchvision's ImageFolder.

MS-COCO for text-to-image (REPA appendix K, U-ViT's protocol): --captions names the split's
captions file, --source its image folder, and each image also stores the CLIP ViT-L/14 text
features of every one of its captions (--text-encoder; 77 tokens × 768 each):

    torchrun --nproc_per_node=8 preprocessing/prepare.py --source coco/train2014 \\
        --captions coco/annotations/captions_train2014.json --dest data/coco256 \\
        --vae ema --enc-type dinov2-vit-b
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from preprocessing.sources import (
    CaptionSource,
    CroppedImages,
    ImageSource,
    collate_cropped,
    exit_with_parent,
)
from urepa import shards
from urepa.cli import (
    RawDescriptionDefaultsHelpFormatter,
    add_debug_arg,
    add_encoder_args,
    add_vae_args,
    encoder_weights,
    nonnegative_int,
    parse_checked,
    parse_encoder_args,
    positive_int,
    run_main,
)
from urepa.encoders import ENCODERS, encoder_dim, encoder_grid, encoder_input_size, load_encoder
from urepa.text_encoders import (
    CONTEXT_LENGTH,
    DEFAULT_TEXT_ENCODER,
    TextEncoder,
    check_text_encoder,
    load_text_encoder,
    text_encoder_dim,
)
from urepa.utils import (
    InputError,
    atomic_write,
    barrier,
    close_distributed,
    dict_differences,
    file_sha256,
    init_distributed,
    remove_temporaries,
    write_json,
)
from urepa.vae import VAE_IDS, VAE_SCALE, latent_geometry, load_vae

logger = logging.getLogger("prepare")

EMPTY_CAPTION = "empty-caption"  # file name stem of the empty caption's features
# One barrier waits for the slowest rank to finish all its shards: allow a long wait.
BARRIER_TIMEOUT = timedelta(hours=48)


#################################################################################
#                                     Flags                                     #
#################################################################################


def crop_size(text: str) -> int:
    """--resolution: the VAE divides it by 8 and every encoder gives one token per 16 px (DINOv2
    sees 224 px per 256 in 14-px patches), so it must be a multiple of 16."""
    size = positive_int(text)
    if size % 16:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of 16 (VAE factor 8, a token per 16 px), got {text}"
        )
    return size


# The flag tables below are formatted by hand, one flag per line or two, as in train.py.
# fmt: off
def add_source_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("source and destination")
    group.add_argument("--source", required=True,
                       help="ImageFolder directory (one sub-folder per class) or a .zip of one; "
                            "labels follow the sorted sub-folder names, empty ones included")
    group.add_argument("--dest", required=True, help="output dataset directory")
    group.add_argument("--labels", default=None,
                       help="labels file instead of class folders: JSON {relative path: label} "
                            "or text lines 'relative/path label'; unlisted images are excluded")
    group.add_argument("--captions", default=None, metavar="FILE",
                       help="MS-COCO captions file (annotations/captions_train2014.json) of the "
                            "--source folder: the images it names, each with the text features "
                            "of all its captions (text-to-image); labels are then all 0")


def add_encoding_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what each image is stored as")
    group.add_argument("--resolution", type=crop_size, default=256,
                       help="centre-crop size in pixels (256 or 512; any multiple of 16)")
    add_vae_args(group, "encodes the images")
    group.add_argument("--moments-dtype", choices=["float32", "float16"], default="float32",
                       help="storage dtype of the VAE posterior [mean, std]")
    add_encoder_args(group, none_means="stores no features")
    group.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                       help="with --captions: the caption encoder, clip-vit-l14 (U-ViT's CLIP "
                            "ViT-L/14 text transformer via transformers, 77 tokens × 768), a "
                            "local folder of it, or clip-text-tiny-random (test stand-in)")
    group.add_argument("--save-pixels", action=argparse.BooleanOptionalAction, default=False,
                       help="also store the cropped pixels (online-encoder mode, previews)")
    group.add_argument("--pixel-format", choices=["png", "npy"], default="png",
                       help="png: lossless, smaller, one PNG decode per read; npy: raw uint8, "
                            "fastest")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--shard-size", type=positive_int, default=10000,
                       help="source images per shard")
    group.add_argument("--batch-size", type=positive_int, default=64,
                       help="images per encoder batch, per process")
    group.add_argument("--num-workers", type=nonnegative_int, default=8,
                       help="decoding workers per process")
    group.add_argument("--dry-run", action="store_true",
                       help="list the source, check --dest, print the plan; load and write nothing")
    group.add_argument("--force", action="store_true",
                       help="delete the dataset that --dest holds (made by this script, from "
                            "another --source or with other settings) and build it anew")
# fmt: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter
    )
    for add in (add_source_args, add_encoding_args, add_run_args):
        add(parser)
    add_debug_arg(parser)
    return parse_checked(parser, argv, check_args)


def check_args(args: argparse.Namespace) -> None:
    """The checks between flags (ValueError, reported in one line)."""
    parse_encoder_args(args)
    if args.captions and args.labels:
        raise ValueError("--captions and --labels exclude each other: captioned images have no "
                         "class labels")  # fmt: skip
    if args.captions:
        check_text_encoder(args.text_encoder)


#################################################################################
#                              Settings and layout                              #
#################################################################################


def build_modalities(args: argparse.Namespace) -> list[shards.Modality]:
    """What every shard stores, with per-sample shapes derived from the settings alone."""
    resolution = args.resolution
    grid = encoder_grid(resolution)
    vae_model = VAE_IDS.get(args.vae, args.vae)
    channels, factor = latent_geometry(args.vae)
    modalities = [
        shards.Modality("labels", "int64", ()),
        shards.Modality(
            "moments",
            args.moments_dtype,
            (2 * channels, resolution // factor, resolution // factor),
            info=(("model", vae_model), ("layout", "[mean, std] on dim 0"), ("scale", VAE_SCALE)),
        ),
    ]
    for name in args.encoders:
        timm_name = ENCODERS[name].timm_name if name in ENCODERS else name
        input_size = encoder_input_size(resolution, name)
        info = (("encoder", name), ("model", timm_name), ("input_size", input_size))
        modalities.append(
            shards.Modality(
                f"features-{name}", "float16", (grid * grid, encoder_dim(name)), info=info
            )
        )
    if args.save_pixels:
        pixels_shape = (3, resolution, resolution)
        modalities.append(shards.Modality("pixels", "uint8", pixels_shape, args.pixel_format))
    return modalities


def caption_modalities(args: argparse.Namespace, source: ImageSource) -> list[shards.Modality]:
    """With --captions: per image, the text features of each of its captions (zero rows after
    its last one, up to the source's most captions per image) and how many it has."""
    if not isinstance(source, CaptionSource):
        return []
    shape = (source.max_captions, CONTEXT_LENGTH, text_encoder_dim(args.text_encoder))
    info = (("text_encoder", args.text_encoder), ("layout", "captions × tokens × width"))
    return [
        shards.Modality(f"text-{text_name(args)}", "float16", shape, info=info),
        shards.Modality("caption_counts", "int64", ()),
    ]


def text_name(args: argparse.Namespace) -> str:
    """The text encoder as it appears in file and modality names (a folder: its base name)."""
    return os.path.basename(os.path.normpath(args.text_encoder))


def open_source(args: argparse.Namespace) -> ImageSource:
    """The images, with their captions when --captions is given."""
    if args.captions:
        return CaptionSource(args.source, args.captions)
    return ImageSource(args.source, args.labels)


def build_settings(args: argparse.Namespace, source: ImageSource) -> dict[str, Any]:
    """Everything that decides the bytes written. A re-run must match it exactly."""
    return {
        "format_version": shards.FORMAT_VERSION,
        "resolution": args.resolution,
        "crop": "adm-center",
        "vae": args.vae,
        "moments_dtype": args.moments_dtype,
        "encoders": args.encoders,
        "features_dtype": "float16",
        "pixels": args.pixel_format if args.save_pixels else None,
        "shard_size": args.shard_size,
        "labels": "captions"
        if args.captions
        else "labels-file"
        if args.labels
        else "class-folders",
        "text_encoder": args.text_encoder if args.captions else None,
        "num_files": len(source),
        "files_sha256": source.fingerprint(),
        "source_identity": source.identity(),
    }


def command_line(args: argparse.Namespace) -> str:
    """The single-process command that (re)builds this dataset, for error messages."""
    flags = [
        "--source",
        args.source,
        "--dest",
        args.dest,
        "--resolution",
        str(args.resolution),
        "--vae",
        args.vae,
        "--enc-type",
        args.enc_type,
        "--shard-size",
        str(args.shard_size),
        "--moments-dtype",
        args.moments_dtype,
    ]
    if args.labels:
        flags += ["--labels", args.labels]
    if args.captions:
        flags += ["--captions", args.captions, "--text-encoder", args.text_encoder]
    if args.save_pixels:
        flags += ["--save-pixels", "--pixel-format", args.pixel_format]
    return " ".join([shards.PREPARE, *map(shlex.quote, flags)])


def check_destination(dest: str, settings: dict[str, Any], force: bool = False) -> bool:
    """True if `dest` already holds (part of) this dataset, False if it is new (or, `force`,
    holds a dataset of this script to build anew); an error if it holds something else."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise InputError(f"--dest {dest!r} exists and is not a directory")
    path = os.path.join(dest, shards.SETTINGS)
    if not os.path.exists(path):
        if os.path.isdir(dest) and os.listdir(dest):
            raise InputError(
                f"--dest {dest!r} is not empty and has no {shards.SETTINGS}: it was "
                "not made by this script. Choose a new or empty directory."
            )
        return False
    if force:
        return False
    on_disk = shards.read_json(path)["settings"]
    if on_disk.get("source_identity") != settings["source_identity"]:
        raise InputError(
            f"--dest {dest!r} was made from another --source (or its files changed since: "
            "their names, sizes or modification times differ); its shards would be mixed "
            "with this one's. Use a new --dest, or pass --force to delete it and build it anew."
        )
    differences = dict_differences(on_disk, settings, "on disk", "now")
    if differences:
        raise InputError(
            f"--dest {dest!r} was built with other settings:\n  "
            + "\n  ".join(differences)
            + f"\nUse a new --dest, re-run with the original settings to resume, or pass "
            f"--force to delete {dest!r} and rebuild it."
        )
    return True


def shard_ranges(num_files: int, shard_size: int) -> list[range]:
    starts = range(0, num_files, shard_size)
    return [range(start, min(start + shard_size, num_files)) for start in starts]


#################################################################################
#                                    Encoding                                   #
#################################################################################


Models = tuple[Any, list[Any], TextEncoder | None]  # SD-VAE, encoders, text encoder


def load_models(args: argparse.Namespace, device: torch.device) -> Models:
    vae = load_vae(args.vae, device=device)
    channels, factor = latent_geometry(args.vae)
    if (vae.latent_channels, vae.downsample_factor) != (channels, factor):
        raise InputError(
            f"--vae {args.vae!r} is not SD-VAE shaped ({channels} latent channels, factor {factor})"
        )
    weights = encoder_weights(args.enc_weights, args.encoders)
    encoders = [
        load_encoder(name, args.resolution, weights=path, device=device)
        for name, path in zip(args.encoders, weights, strict=True)
    ]
    grid = encoder_grid(args.resolution)
    for enc in encoders:  # the shard shapes were derived from the settings alone
        if enc.grid_size != grid:
            raise InputError(
                f"{enc.name} gives a {enc.grid_size}² token grid at "
                f"{args.resolution} px, expected {grid}²"
            )
    text_encoder = load_text_encoder(args.text_encoder, device) if args.captions else None
    return vae, encoders, text_encoder


@torch.no_grad()
def encode_batch(
    batch: dict[str, Any],
    labels: np.ndarray,
    models: Models,
    args: argparse.Namespace,
    device: torch.device,
    captions: CaptionBatch | None = None,
) -> dict[str, Any]:
    """One decoded batch -> the rows of every modality (NumPy, storage dtypes); `captions`
    holds the images' captions when the models include a text encoder."""
    vae, encoders, text_encoder = models
    x = batch["pixels"].to(device, non_blocking=True)  # (B, 3, R, R) uint8
    rows: dict[str, Any] = {
        "labels": labels[batch["index"]],
        "moments": vae.encode_moments(x).cpu().numpy().astype(args.moments_dtype),  # (B, 8, h, w)
    }
    for enc in encoders:
        rows[f"features-{enc.name}"] = enc(x).half().cpu().numpy()  # (B, T, D)
    if args.save_pixels:
        rows["pixels"] = batch["png"] if args.pixel_format == "png" else batch["pixels"].numpy()
    if text_encoder is not None and captions is not None:
        rows.update(caption_rows(captions, text_encoder, args))
    return rows


@dataclass(frozen=True)
class CaptionBatch:
    texts: list[list[str]]  # each image's captions
    slots: int  # caption rows per image in the shards (the source's most captions per image)


def caption_rows(
    captions: CaptionBatch, text_encoder: TextEncoder, args: argparse.Namespace
) -> dict[str, np.ndarray]:
    """Every caption of a batch's images through the text encoder at once, placed at
    (image, caption index); rows past an image's last caption stay zero."""
    per_image = [len(texts) for texts in captions.texts]
    width = text_encoder_dim(args.text_encoder)
    features = np.zeros((len(per_image), captions.slots, CONTEXT_LENGTH, width), np.float16)
    image = np.repeat(np.arange(len(per_image)), per_image)
    slot = np.concatenate([np.arange(n) for n in per_image])
    encoded = text_encoder([text for texts in captions.texts for text in texts])  # (n, 77, D)
    features[image, slot] = encoded.half().cpu().numpy()
    counts = np.asarray(per_image, dtype=np.int64)
    return {f"text-{text_name(args)}": features, "caption_counts": counts}


def encode_shards(
    args: argparse.Namespace,
    source: ImageSource,
    todo: list[int],
    modalities: list[shards.Modality],
    models: Models,
    device: torch.device,
    show_progress: bool,
) -> None:
    """Encode and publish the shards `todo`, one after another, through one DataLoader."""
    ranges = shard_ranges(len(source), args.shard_size)
    # batches never straddle shards, so each shard is a run of consecutive batches
    batches = [
        list(ranges[shard][start : start + args.batch_size])
        for shard in todo
        for start in range(0, len(ranges[shard]), args.batch_size)
    ]
    images = CroppedImages(
        source, args.resolution, png=args.save_pixels and args.pixel_format == "png"
    )
    loader = DataLoader(
        images,
        batch_sampler=batches,
        num_workers=args.num_workers,
        collate_fn=collate_cropped,
        worker_init_fn=exit_with_parent,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.num_workers else None,
    )
    total = sum(len(ranges[shard]) for shard in todo)
    bar = tqdm(total=total, unit="img", disable=not show_progress, dynamic_ncols=True)
    writer: shards.ShardWriter | None = None
    queue = iter(todo)
    try:
        for batch in loader:
            if writer is None:
                shard = next(queue)
                writer = shards.ShardWriter(args.dest, shard, modalities, len(ranges[shard]))
            for i, reason in batch["failed"]:
                logger.warning("excluded %s: %s", source.path(i), reason)
                writer.exclude(source.path(i), reason)
            if batch["index"]:
                captions = batch_captions(source, batch["index"])
                rows = encode_batch(batch, source.labels, models, args, device, captions)
                texts = captions.texts if captions else None
                writer.add(rows, [source.path(i) for i in batch["index"]], texts)
            bar.update(len(batch["index"]) + len(batch["failed"]))
            if writer.seen == writer.capacity:
                writer.publish()
                writer = None
    finally:
        if writer is not None:  # interrupted: leave no temporary files behind if we can
            writer.abort()
        bar.close()


def batch_captions(source: ImageSource, index: list[int]) -> CaptionBatch | None:
    """The captions of the images `index`, or None for a source without captions."""
    if not isinstance(source, CaptionSource):
        return None
    return CaptionBatch([source.captions[i] for i in index], source.max_captions)


#################################################################################
#                                      Main                                     #
#################################################################################


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build (or finish) the dataset; returns the manifest on rank 0, None elsewhere."""
    # Ranks only meet at two barriers, so gloo serves on GPUs and CPUs alike; each rank computes
    # on the GPU of its local rank when there is one.
    rank, world, device = init_distributed(backend="gloo", timeout=BARRIER_TIMEOUT)
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    source = open_source(args)  # a SourceError is reported in one line
    if source.empty_classes and rank == 0:
        logger.warning(empty_classes_note(source))
    settings = build_settings(args, source)
    modalities = build_modalities(args) + caption_modalities(args, source)
    ranges = shard_ranges(len(source), args.shard_size)
    resuming = check_destination(args.dest, settings, args.force)
    pending = [
        shard
        for shard in range(len(ranges))
        if not resuming or shards.completed_shard(args.dest, shard, modalities) is None
    ]
    if args.dry_run:
        if rank == 0:
            print_plan(args, source, modalities, ranges, pending, world)
        return None
    if resuming and not pending and os.path.exists(os.path.join(args.dest, shards.MANIFEST)):
        # Complete: nothing to encode, and nothing (settings, manifest) is written again.
        logger.info("%s is complete (%d images, %d shards): nothing to do", args.dest,
                    len(source), len(ranges))  # fmt: skip
        close_distributed()
        return shards.load_manifest(args.dest) if rank == 0 else None
    mine = pending[rank::world]
    # Load (and so check) the networks before anything is written into --dest: a run that fails
    # here (unknown --vae, weights not downloadable) must leave no settings.json behind that
    # would make the corrected command refuse as "built with other settings".
    models = load_models(args, device) if mine else None
    # every rank has checked --dest, listed `pending` and loaded its networks before anything is
    # written there
    barrier()
    if rank == 0:
        prepare_destination(args, settings, pending)
    logger.info(
        "%d images, %d shards, %d to do, %d on this rank (%s)",
        len(source),
        len(ranges),
        len(pending),
        len(mine),
        device,
    )
    if models is not None:
        encode_shards(args, source, mine, modalities, models, device, show_progress=rank == 0)
    barrier()  # every shard is published
    manifest = None
    if rank == 0:
        manifest = finished_manifest(args.dest, pending)
        if manifest is None:
            header = caption_header(args, source, models, device)
            manifest = finalize(args, source, settings, modalities, len(ranges), header)
    close_distributed()
    return manifest


def finished_manifest(dest: str, pending: list[int]) -> dict[str, Any] | None:
    """The manifest of a dataset that had nothing left to do, as it is: rewriting it would only
    change where it says it came from (the shards are what they were)."""
    path = os.path.join(dest, shards.MANIFEST)
    if pending or not os.path.exists(path):
        return None
    logger.info("%s is complete: nothing to do", dest)
    manifest: dict[str, Any] = shards.read_json(path)
    return manifest


def prepare_destination(
    args: argparse.Namespace, settings: dict[str, Any], pending: list[int]
) -> None:
    """Rank 0, before any shard is written: (--force: delete the dataset there,) record the
    settings, drop what a killed run left."""
    if args.force:
        remove_dataset(args.dest)
    os.makedirs(args.dest, exist_ok=True)
    remove_temporaries(args.dest)  # a killed JSON write
    record = {"settings": settings, "command": command_line(args)}
    write_json(os.path.join(args.dest, shards.SETTINGS), record)
    if pending and os.path.exists(os.path.join(args.dest, shards.MANIFEST)):
        os.remove(os.path.join(args.dest, shards.MANIFEST))  # stale until every shard is back


def remove_dataset(dest: str) -> None:
    """--force: delete what this script writes into `dest` (its shard folder, settings and
    manifest, their temporary files), nothing else."""
    shutil.rmtree(os.path.join(dest, shards.SHARD_DIR), ignore_errors=True)
    names = os.listdir(dest) if os.path.isdir(dest) else []
    empty_captions = [n for n in names if n.startswith(EMPTY_CAPTION)]
    for name in (shards.MANIFEST, shards.SETTINGS, *empty_captions):
        if os.path.exists(os.path.join(dest, name)):
            os.remove(os.path.join(dest, name))
    if os.path.isdir(dest):
        remove_temporaries(dest)


def finalize(
    args: argparse.Namespace,
    source: ImageSource,
    settings: dict[str, Any],
    modalities: list[shards.Modality],
    num_shards: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Gather the shard sidecars into the manifest (rank 0, after every rank has finished);
    `extra` adds dataset-level entries (a captioned dataset's)."""
    header = {
        **(extra or {}),
        "source": args.source,
        "command": command_line(args),
        "settings": settings,
        "resolution": args.resolution,
        "num_classes": source.num_classes,
        "classes": source.classes,
        "excluded": [{"path": p, "reason": "not in the --labels file"} for p in source.unlabelled],
    }
    manifest = shards.write_manifest(args.dest, modalities, num_shards, header)
    logger.info(
        "wrote %s: %d samples, %d excluded",
        os.path.join(args.dest, shards.MANIFEST),
        manifest["num_samples"],
        len(manifest["excluded"]),
    )
    return manifest


def caption_header(
    args: argparse.Namespace, source: ImageSource, models: Models | None, device: torch.device
) -> dict[str, Any]:
    """A captioned dataset's manifest entries, after writing the empty caption's features:
    the null condition of classifier-free guidance (U-ViT's `empty_context.npy`)."""
    if not isinstance(source, CaptionSource):
        return {}
    text_encoder = models[2] if models is not None else None
    if text_encoder is None:  # this rank had no shard to encode
        text_encoder = load_text_encoder(args.text_encoder, device)
    empty = text_encoder([""])[0].half().cpu().numpy()  # (77, D)
    name = f"{EMPTY_CAPTION}-{text_name(args)}.npy"
    path = os.path.join(args.dest, name)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a path would gain ".npy"
            np.save(f, empty)

    atomic_write(path, write)
    return {
        "captions": {
            "text_encoder": args.text_encoder,
            "modality": f"text-{text_name(args)}",
            "max_per_image": source.max_captions,
            "total": sum(len(c) for c in source.captions),
            "empty_caption": {"file": name, "sha256": file_sha256(path)},
        }
    }


def empty_classes_note(source: ImageSource) -> str:
    return (
        f"{len(source.empty_classes)} class folder(s) without images: "
        f"{', '.join(source.empty_classes)}; they keep their label (labels follow the sorted "
        "folder names) and the manifest lists them under empty_classes"
    )


def print_plan(
    args: argparse.Namespace,
    source: ImageSource,
    modalities: list[shards.Modality],
    ranges: list[range],
    pending: list[int],
    world: int,
) -> None:
    """--dry-run: what would be done, and the disk it needs."""
    print(
        f"source: {args.source}: {len(source)} images, {source.num_classes} classes"
        + (f", {len(source.unlabelled)} not in --labels" if source.unlabelled else "")
    )
    if source.empty_classes:
        print(f"        {empty_classes_note(source)}")
    print(
        f"dest:   {args.dest}: {len(ranges)} shards of {args.shard_size}, "
        f"{len(pending)} to encode over {world} process(es)"
    )
    for modality in modalities:
        per_sample = modality.sample_bytes()
        note = " (raw size; PNG is smaller)" if modality.encoding == "png" else ""
        print(
            f"  {modality.name:<28} {modality.dtype:<8} {modality.shape!s:<18} "
            f"{per_sample * len(source) / 2**30:9.2f} GiB{note}"
        )


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

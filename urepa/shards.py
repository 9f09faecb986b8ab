"""The on-disk dataset format, defined once: `preprocessing/prepare.py` writes it, `dataset.py`
reads it.

A dataset directory holds a few large, memory-mappable files per modality (never one file per
image):

    settings.json                     the settings the directory is built with (checked on re-runs)
    shards/labels-00000.npy           int64 (n,)
    shards/moments-00000.npy          float32 (n, 8, h, w): SD-VAE posterior [mean, std]
    shards/features-<enc>-00000.npy   float16 (n, T, D): final-norm patch tokens of one encoder
    shards/pixels-00000.npy           uint8 (n, 3, H, W)                       (pixels, "npy")
    shards/pixels-00000.png.bin       concatenated PNG files                   (pixels, "png")
    shards/pixels-00000.offsets.npy   int64 (n + 1,): byte offsets into the .bin
    shards/text-<enc>-00000.npy       float16 (n, K, 77, D): K captions' text features (--captions)
    shards/caption_counts-00000.npy   int64 (n,): how many of the K caption rows are real
    shards/shard-00000.json           sidecar: written last, so its presence means "shard complete"
                                      (with --captions it also holds each sample's caption texts)
    empty-caption-<enc>.npy           float16 (77, D): the empty caption's features (--captions)
    manifest.json                     written after every shard is complete: what train.py reads
                                      (classes, class_counts, empty_classes, excluded files, ...)

`.npy` files are plain NumPy arrays (`np.load(path, mmap_mode="r")` opens them). A shard is written
to `<name>.tmp` files and published with `os.replace` only when complete; the sidecar records each
file's size and SHA-256, and the manifest gathers the sidecars.

A shard is started only if the disk has room for all of it (an upper bound from the shapes), and
its memory-mapped files have their disk blocks reserved when created: a disk that fills up anyway
is a DatasetError that keeps the completed shards, never a SIGBUS in the middle of a write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from urepa.utils import ReportedError, atomic_write, file_sha256, readable_size, write_json

FORMAT_NAME = "u-repa-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARD_DIR = "shards"
PREPARE = "python preprocessing/prepare.py"
NPY_HEADER_BYTES = 4096  # an upper bound; NumPy writes 128 or 192


class DatasetError(ReportedError, RuntimeError):
    """A dataset directory is missing, incomplete, corrupt, or not what was asked for."""


@dataclass(frozen=True)
class Modality:
    """One per-sample quantity stored in every shard.

    `encoding` "npy": one array (n, *shape) per shard. "png": each sample a PNG of an (H, W, 3)
    uint8 image (stored shape (3, H, W)), concatenated into a `.png.bin` with an offsets array.
    `info` is free-form description for the manifest (model ids, scale factors, ...).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str = "npy"
    info: tuple[tuple[str, Any], ...] = ()

    def files(self, shard: int) -> list[str]:
        """Paths of this modality's files for one shard, relative to the dataset directory."""
        stem = os.path.join(SHARD_DIR, f"{self.name}-{shard:05d}")
        if self.encoding == "png":
            return [stem + ".png.bin", stem + ".offsets.npy"]
        return [stem + ".npy"]

    def sample_bytes(self) -> int:
        """One sample as an array (for PNG, before compression)."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def shard_bytes(self, samples: int) -> int:
        """At most what this modality's files of a shard of `samples` take on disk. A PNG takes at
        most its raw size + 1% + 1 KiB (row filter bytes, deflate's stored blocks, chunks)."""
        raw = self.sample_bytes()
        if self.encoding == "png":
            offsets = 8 * (samples + 1)
            return samples * (raw + raw // 100 + 1024) + offsets + NPY_HEADER_BYTES
        return samples * raw + NPY_HEADER_BYTES

    def describe(self) -> dict[str, Any]:
        entry = {"dtype": self.dtype, "shape": list(self.shape), "encoding": self.encoding}
        return {**entry, **dict(self.info)}


def modality_from_manifest(name: str, entry: dict[str, Any]) -> Modality:
    info = tuple((k, v) for k, v in entry.items() if k not in ("dtype", "shape", "encoding"))
    return Modality(name, entry["dtype"], tuple(entry["shape"]), entry["encoding"], info)


def sidecar_path(root: str, shard: int) -> str:
    return os.path.join(root, SHARD_DIR, f"shard-{shard:05d}.json")


#################################################################################
#                               Small file helpers                              #
#################################################################################


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_npy(path: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy of `shape`, memory-mapped for writing, with its disk blocks reserved now.

    Writing through a map into a file the disk cannot hold kills the process with SIGBUS and no
    message; reserving the blocks turns a full disk into an OSError (ENOSPC) here instead."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):  # not on macOS: there, only the free-space check guards
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.path.getsize(path))
        except OSError as err:  # file systems that cannot reserve: write unreserved, as before
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        finally:
            os.close(fd)
    return array


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (3, H, W) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")).transpose(2, 0, 1))


#################################################################################
#                                    Writing                                    #
#################################################################################


class ShardWriter:
    """Writes one shard to `.tmp` files; `publish()` makes it visible atomically.

    Rows are appended in order; `capacity` is the number of source files assigned to the shard.
    Files that fail to decode are `exclude`d, so the published shard may hold fewer rows.
    """

    def __init__(self, root: str, shard: int, modalities: list[Modality], capacity: int):
        self.root, self.shard, self.modalities, self.capacity = root, shard, modalities, capacity
        os.makedirs(os.path.join(root, SHARD_DIR), exist_ok=True)
        remove_stale_temporaries(root, shard)  # from an interrupted run
        if os.path.exists(sidecar_path(root, shard)):  # rewriting a damaged shard: not done yet
            os.remove(sidecar_path(root, shard))
        self.count = 0
        self.sources: list[str] = []
        self.captions: list[list[str]] = []
        self.excluded: list[dict[str, str]] = []
        self._arrays: dict[str, np.memmap] = {}
        self._blobs: dict[str, Any] = {}
        self._offsets: dict[str, list[int]] = {}
        self.needed = sum(modality.shard_bytes(capacity) for modality in modalities)
        with self._disk_full_is_an_error():
            self._require_space(self.needed)
            for modality in modalities:
                self._open(modality)

    def _open(self, modality: Modality) -> None:
        tmp = self._tmp(modality.files(self.shard)[0])
        if modality.encoding == "png":
            self._blobs[modality.name] = open(tmp, "wb")  # noqa: SIM115 (closed in publish)
            self._offsets[modality.name] = [0]
        else:
            shape = (self.capacity, *modality.shape)
            self._arrays[modality.name] = open_npy(tmp, np.dtype(modality.dtype), shape)

    def _require_space(self, num_bytes: int) -> None:
        """Refuse to start writing `num_bytes` that the disk does not have."""
        if shutil.disk_usage(self.root).free < num_bytes:
            raise self._no_space(num_bytes)

    @contextlib.contextmanager
    def _disk_full_is_an_error(self) -> Iterator[None]:
        """The disk filling up while the shard is written (ENOSPC) -> the same DatasetError."""
        try:
            yield
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise self._no_space(self.needed) from err

    def _no_space(self, needed: int) -> DatasetError:
        """Remove this shard's temporary files (freeing their space), then say what to do."""
        self.abort()
        free = shutil.disk_usage(self.root).free
        return DatasetError(
            f"not enough disk space in {self.root} for shard {self.shard}: it needs "
            f"{readable_size(needed)}, {readable_size(free)} is free; completed shards are "
            "kept: free some space and re-run the same command to resume"
        )

    def _tmp(self, relpath: str) -> str:
        return os.path.join(self.root, relpath + ".tmp")

    @property
    def seen(self) -> int:
        """Source files handled so far (stored or excluded)."""
        return self.count + len(self.excluded)

    def add(
        self, rows: dict[str, Any], sources: list[str], captions: list[list[str]] | None = None
    ) -> None:
        """Append len(sources) samples: `rows[name]` is an array (k, *shape), or for PNG
        modalities a list of k PNG byte strings; `captions`, each sample's caption texts, go
        to the sidecar (a captioned dataset)."""
        added = len(sources)
        if self.seen + added > self.capacity:
            raise ValueError(f"shard {self.shard}: more than {self.capacity} samples")
        with self._disk_full_is_an_error():  # PNG writes; arrays have their blocks reserved
            for modality in self.modalities:
                if modality.encoding == "png":
                    for data in rows[modality.name]:
                        self._blobs[modality.name].write(data)
                        self._offsets[modality.name].append(
                            self._offsets[modality.name][-1] + len(data)
                        )
                else:
                    rows_now = slice(self.count, self.count + added)
                    self._arrays[modality.name][rows_now] = rows[modality.name]
        self.count += added
        self.sources.extend(sources)
        self.captions.extend(captions or [])

    def exclude(self, source: str, reason: str) -> None:
        self.excluded.append({"path": source, "reason": reason})

    def _finish_tmp_files(self) -> list[str]:
        """Flush every temporary file, trimmed to `count` rows; return their final relpaths."""
        relpaths = []
        for modality in self.modalities:
            files = modality.files(self.shard)
            if modality.encoding == "png":
                self._blobs.pop(modality.name).close()
                with open(self._tmp(files[1]), "wb") as f:  # a path would gain ".npy"
                    np.save(f, np.asarray(self._offsets[modality.name], dtype=np.int64))
            else:
                array = self._arrays.pop(modality.name)
                array.flush()
                if self.count < self.capacity:  # some files were excluded: copy the prefix
                    self._require_space(self.count * array[0].nbytes + NPY_HEADER_BYTES)
                    _write_prefix(array, self.count, self._tmp(files[0]))
                del array
            relpaths.extend(files)
        return relpaths

    def publish(self) -> dict[str, Any]:
        """Make the shard visible: data files first, then the sidecar that marks it complete."""
        if self.seen != self.capacity:
            raise ValueError(f"shard {self.shard}: {self.seen} of {self.capacity} files handled")
        with self._disk_full_is_an_error():
            files = {}
            for rel in self._finish_tmp_files():
                tmp = self._tmp(rel)
                _fsync(tmp)  # where a full disk shows up if writing did not see it
                files[rel] = {"bytes": os.path.getsize(tmp), "sha256": file_sha256(tmp)}
                os.replace(tmp, os.path.join(self.root, rel))
            sidecar = {
                "format_version": FORMAT_VERSION,
                "shard": self.shard,
                "num_samples": self.count,
                "num_files": self.capacity,
                "files": files,
                "excluded": self.excluded,
                "sources": self.sources,
                **({"captions": self.captions} if self.captions else {}),
            }
            write_json(sidecar_path(self.root, self.shard), sidecar)
        return sidecar

    def abort(self) -> None:
        for f in self._blobs.values():
            with contextlib.suppress(OSError):  # a full disk fails the flush of its buffer
                f.close()
        self._blobs.clear()
        self._arrays.clear()
        remove_stale_temporaries(self.root, self.shard)


def _write_prefix(array: np.memmap, count: int, path: str) -> None:
    """Replace `path` by an .npy holding the first `count` rows of `array`, in bounded memory.
    Not flushed to disk here: `publish` flushes every file it publishes."""
    chunk = max(1, (64 << 20) // max(1, array[0].nbytes))  # rows per 64 MiB copy
    shape = (count, *array.shape[1:])

    def write(tmp: str) -> None:
        if count == 0:  # a zero-length memmap cannot be created
            with open(tmp, "wb") as f:  # a path would gain ".npy"
                np.save(f, np.empty(shape, dtype=array.dtype))
            return
        out = open_npy(tmp, array.dtype, shape)
        for start in range(0, count, chunk):
            out[start : start + chunk] = array[start : min(start + chunk, count)]
        out.flush()
        del out

    atomic_write(path, write, durable=False)


def remove_stale_temporaries(root: str, shard: int) -> None:
    """Delete what an interrupted write of `shard` left: its `.tmp` data files, and temporary
    files of `utils.atomic_write` (a trimmed array, the sidecar)."""
    folder = os.path.join(root, SHARD_DIR)
    for name in os.listdir(folder):
        if f"-{shard:05d}." in name and ".tmp" in name:
            os.remove(os.path.join(folder, name))


def completed_shard(root: str, shard: int, modalities: list[Modality]) -> dict[str, Any] | None:
    """The sidecar of a published shard, or None if the shard must be (re)written: no sidecar, or
    one of its files missing or of the wrong size (a cheap check; checksums are in `verify`)."""
    path = sidecar_path(root, shard)
    if not os.path.exists(path):
        return None
    sidecar = read_json(path)
    expected = [rel for modality in modalities for rel in modality.files(shard)]
    for rel in expected:
        entry = sidecar["files"].get(rel)
        full = os.path.join(root, rel)
        if entry is None or not os.path.exists(full) or os.path.getsize(full) != entry["bytes"]:
            return None
    return sidecar


def write_manifest(
    root: str, modalities: list[Modality], num_shards: int, header: dict[str, Any]
) -> dict[str, Any]:
    """Gather the shard sidecars into `manifest.json` (written last). `header` holds the
    dataset-level entries (settings, classes, resolution, ...)."""
    entries, excluded, class_counts = [], [], np.zeros(0, dtype=np.int64)
    for shard in range(num_shards):
        sidecar = completed_shard(root, shard, modalities)
        if sidecar is None:
            raise DatasetError(f"shard {shard} of {root} is not complete; re-run the same command")
        labels = np.load(os.path.join(root, SHARD_DIR, f"labels-{shard:05d}.npy"))
        counts = np.bincount(labels, minlength=len(class_counts))
        class_counts = np.pad(class_counts, (0, len(counts) - len(class_counts))) + counts
        entries.append({"num_samples": sidecar["num_samples"], "files": sidecar["files"]})
        excluded.extend(sidecar["excluded"])
    num_classes = header.get("num_classes", len(class_counts))
    class_counts = np.pad(class_counts, (0, num_classes - len(class_counts)))
    names = header.get("classes") or list(range(num_classes))  # folder names, or the labels
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **header,
        "num_samples": sum(e["num_samples"] for e in entries),
        "class_counts": class_counts.tolist(),
        # classes without a sample keep their label; listed so that nobody has to look for zeros
        "empty_classes": [names[k] for k in np.flatnonzero(class_counts == 0)],
        "modalities": {modality.name: modality.describe() for modality in modalities},
        "shards": entries,
        "excluded": sorted(header.get("excluded", []) + excluded, key=lambda e: e["path"]),
    }
    write_json(os.path.join(root, MANIFEST), manifest)
    return manifest


#################################################################################
#                                    Reading                                    #
#################################################################################


def load_manifest(root: str) -> dict[str, Any]:
    """Read `manifest.json`, with errors that say which command builds or finishes the dataset."""
    path = os.path.join(root, MANIFEST)
    if os.path.exists(path):
        manifest = read_json(path)
        if (
            manifest.get("format") != FORMAT_NAME
            or manifest.get("format_version") != FORMAT_VERSION
        ):
            raise DatasetError(
                f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} manifest; rebuild the dataset "
                f"with {PREPARE} into a new --dest"
            )
        return manifest
    settings_path = os.path.join(root, SETTINGS)
    if os.path.exists(settings_path):
        command = read_json(settings_path).get("command", f"{PREPARE} ... --dest {root}")
        raise DatasetError(
            f"the dataset in {root} is incomplete (no {MANIFEST}; preprocessing was interrupted or "
            f"is still running). Finish it by re-running the same command: {command}"
        )
    raise DatasetError(
        f"no dataset in {root!r} (no {MANIFEST}). Build one with: {PREPARE} "
        f"--source imagenet/train --dest {root} (see README, 'Preparing ImageNet')"
    )


# The manifest entries that describe the data itself, not where it came from or was written
# (`source`, `command` and `excluded` hold paths): a dataset moved or copied keeps its identity.
DATASET_CONTENT = (
    "format", "format_version", "resolution", "num_samples", "num_classes", "classes",
    "modalities", "shards",
)  # fmt: skip


def dataset_identity(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's content entries: the size and SHA-256 of every shard file, what
    each modality stores, the classes. Recorded in checkpoints, compared on resume."""
    content = {key: manifest.get(key) for key in DATASET_CONTENT}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class ShardReader:
    """Random access to a subset of modalities through memory maps.

    Maps are opened lazily, on first access in each process, so that the reader pickles cheaply
    into DataLoader workers (which then share the OS page cache, not Python objects).
    """

    def __init__(self, root: str, manifest: dict[str, Any], names: list[str]):
        self.root = root
        self.manifest = manifest
        self.modalities = [
            modality_from_manifest(name, manifest["modalities"][name]) for name in names
        ]
        self._by_name = {modality.name: modality for modality in self.modalities}
        counts = np.asarray([entry["num_samples"] for entry in manifest["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (num_shards + 1,)
        self._maps: dict[tuple[str, int], Any] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def modality(self, name: str) -> Modality:
        return self._by_name[name]

    def _rebuild_hint(self, shard: int) -> str:
        command = self.manifest.get("command", f"{PREPARE} ... --dest {self.root}")
        return (
            f"delete {os.path.join(self.root, SHARD_DIR, f'*-{shard:05d}.*')}, "
            f"{sidecar_path(self.root, shard)} and {os.path.join(self.root, MANIFEST)}, then "
            f"re-run the command that built it (only the missing shard is rebuilt): {command}"
        )

    def _expected(self) -> list[tuple[int, str, dict[str, Any]]]:
        out = []
        for shard, entry in enumerate(self.manifest["shards"]):
            for modality in self.modalities:
                for rel in modality.files(shard):
                    out.append((shard, rel, entry["files"][rel]))
        return out

    def check(self) -> None:
        """Cheap consistency checks: every file present, of the recorded size, with the recorded
        array header. Truncated or missing shards fail here; bit flips need `verify()`."""
        for shard, rel, entry in self._expected():
            path = os.path.join(self.root, rel)
            if not os.path.exists(path):
                raise DatasetError(f"missing shard file {path}; {self._rebuild_hint(shard)}")
            size = os.path.getsize(path)
            if size != entry["bytes"]:
                raise DatasetError(
                    f"shard file {path} has {size} bytes, the manifest says {entry['bytes']} "
                    f"(truncated or rewritten); {self._rebuild_hint(shard)}"
                )
        for shard, entry in enumerate(self.manifest["shards"]):
            for modality in self.modalities:
                self._check_header(shard, modality, entry["num_samples"])

    def _check_header(self, shard: int, modality: Modality, num_samples: int) -> None:
        files = modality.files(shard)
        shape: tuple[int, ...]
        if modality.encoding == "png":
            path, dtype, shape = files[1], np.dtype(np.int64), (num_samples + 1,)
        else:
            path, dtype, shape = files[0], np.dtype(modality.dtype), (num_samples, *modality.shape)
        with open(os.path.join(self.root, path), "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                    version, np.lib.format.read_array_header_2_0
                )
                got_shape, _, got_dtype = read_header(f)
            except ValueError as err:
                raise DatasetError(
                    f"{path} is not a valid .npy file; {self._rebuild_hint(shard)}"
                ) from err
        if tuple(got_shape) != shape or got_dtype != dtype:
            raise DatasetError(
                f"{path} holds {got_dtype} {tuple(got_shape)}, the manifest says {dtype} {shape}; "
                f"{self._rebuild_hint(shard)}"
            )

    def check_labels(self, num_classes: int) -> None:
        """Every stored label lies in [0, num_classes): a bad one would otherwise fail deep inside
        the model's label embedding, far from its cause (reads only the small label shards)."""
        modality = self._by_name["labels"]
        for shard in range(len(self.manifest["shards"])):
            labels = np.asarray(self._map(modality, shard))  # (n,) int64
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if bad.size:
                path = os.path.join(self.root, modality.files(shard)[0])
                raise DatasetError(
                    f"{path} holds label {labels[bad[0]]} (row {bad[0]}), outside [0, "
                    f"{num_classes}) for the {num_classes} classes of {MANIFEST}: the shard or the "
                    f"manifest is damaged; {self._rebuild_hint(shard)}"
                )

    def verify(self) -> None:
        """Full check: recompute every file's SHA-256 (reads the whole dataset)."""
        self.check()
        for shard, rel, entry in self._expected():
            if file_sha256(os.path.join(self.root, rel)) != entry["sha256"]:
                raise DatasetError(f"checksum mismatch in {rel}; {self._rebuild_hint(shard)}")

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample index -> (shard, row in shard)."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return shard, i - int(self.starts[shard])

    def _map(self, modality: Modality, shard: int) -> Any:
        key = (modality.name, shard)
        if key not in self._maps:
            files = [os.path.join(self.root, rel) for rel in modality.files(shard)]
            if modality.encoding == "png":
                blob = np.memmap(files[0], dtype=np.uint8, mode="r")
                self._maps[key] = (blob, np.load(files[1], mmap_mode="r"))
            else:
                self._maps[key] = np.load(files[0], mmap_mode="r")
        return self._maps[key]

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample i of every opened modality, as fresh (writable) arrays."""
        shard, row = self.locate(i)
        out = {}
        for modality in self.modalities:
            if modality.encoding == "png":
                blob, offsets = self._map(modality, shard)
                out[modality.name] = decode_png(blob[offsets[row] : offsets[row + 1]].tobytes())
            else:
                out[modality.name] = np.array(self._map(modality, shard)[row])
        return out

    def read_rows(self, name: str, indices: np.ndarray, out: np.ndarray) -> None:
        """Samples `indices` (global, in any order) of modality `name` into `out`, (len(indices),
        *shape): one fancy index per shard, straight into `out` where the shard's samples sit
        side by side in it (always, when a batch draws at most one sample per shard); PNG pixels
        are decoded one by one."""
        modality = self._by_name[name]
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        order = np.argsort(shard_of, kind="stable")  # positions grouped by shard, in order
        for group in np.split(order, np.flatnonzero(np.diff(shard_of[order])) + 1):
            shard = int(shard_of[group[0]])
            rows = indices[group] - self.starts[shard]
            if modality.encoding == "png":
                blob, offsets = self._map(modality, shard)
                for position, row in zip(group, rows, strict=True):
                    out[position] = decode_png(blob[offsets[row] : offsets[row + 1]].tobytes())
            elif group[-1] - group[0] == len(group) - 1:  # consecutive positions: no copy between
                first = int(group[0])
                target = out[first : first + len(group)]
                np.take(self._map(modality, shard), rows, axis=0, out=target, mode="clip")
            else:
                out[group] = self._map(modality, shard)[rows]

    def read_items(self, name: str, indices: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Item `items[k]` of sample `indices[k]` of modality `name`, (len(indices), *shape[1:]):
        one entry of a per-sample list (a caption's features) without reading the others."""
        modality = self._by_name[name]
        out = np.empty((len(indices), *modality.shape[1:]), dtype=modality.dtype)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            group = np.flatnonzero(shard_of == shard)
            rows = indices[group] - self.starts[shard]
            out[group] = self._map(modality, int(shard))[rows, items[group]]
        return out

    def read_all(self, name: str) -> np.ndarray:
        """A whole modality, concatenated over shards (for small ones such as labels)."""
        modality = self._by_name[name]
        num_shards = len(self.manifest["shards"])
        parts = [np.asarray(self._map(modality, shard)) for shard in range(num_shards)]
        return (
            np.concatenate(parts) if parts else np.empty((0, *modality.shape), dtype=modality.dtype)
        )

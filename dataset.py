"""The training set written by `preprocessing/prepare.py`: VAE moments, encoder features, labels
and (optionally) pixels, read from memory-mapped shards (format: `urepa/shards.py`); a captioned
set (`--captions`, MS-COCO) also gives each image's caption features and the empty caption's."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from urepa.encoders import encoder_dim
from urepa.shards import PREPARE, DatasetError, ShardReader, load_manifest, read_json, sidecar_path
from urepa.utils import file_sha256


def stored_encoders(manifest: dict[str, Any]) -> list[str]:
    """The encoders whose features a prepared dataset stores, in its order."""
    prefix = "features-"
    return [m[len(prefix) :] for m in manifest["modalities"] if m.startswith(prefix)]


class LatentDataset(Dataset):
    """Sample i -> {"moments": float32 (8, h, w) [mean, std], "label": int64 0-d,
    "features": [(T, D) float16 per requested encoder], "pixels": uint8 (3, H, W) if asked}.

    `encoders=None` returns every stored encoder (in the order they were stored), `[]` none (the
    online-encoder mode, with `pixels=True`). `resolution`, if given, must match the stored
    crop size. Opening checks the manifest against the request, every shard file's size and
    header, and every label against `num_classes` (cheap); `verify()` also checks every checksum
    (reads everything).
    """

    def __init__(
        self,
        data_dir: str,
        encoders: list[str] | None = None,
        pixels: bool = False,
        resolution: int | None = None,
    ):
        self.data_dir = data_dir
        self.manifest: dict[str, Any] = load_manifest(data_dir)
        stored = stored_encoders(self.manifest)
        self.encoders: list[str] = list(stored if encoders is None else encoders)
        self.pixels = pixels
        self.resolution: int = self.manifest["resolution"]
        self.num_classes: int = self.manifest["num_classes"]
        self._check_request(stored, resolution)
        names = ["labels", "moments", *(f"features-{e}" for e in self.encoders)]
        captions = self.manifest.get("captions")
        self.captioned = captions is not None
        if captions is not None:
            names += ["caption_counts", captions["modality"]]
            self.empty_context = self._empty_context(captions["empty_caption"])  # (L, D) fp16
        self._reader = ShardReader(data_dir, self.manifest, names + (["pixels"] if pixels else []))
        self._reader.check()
        self._reader.check_labels(self.num_classes)

    def _check_request(self, stored: list[str], resolution: int | None) -> None:
        built_with = f"(it was built with: {self.manifest.get('command', PREPARE)})"
        if resolution is not None and resolution != self.resolution:
            raise DatasetError(
                f"{self.data_dir} holds {self.resolution}-px data, {resolution} px was asked for; "
                f"prepare a dataset with {PREPARE} --resolution {resolution} {built_with}"
            )
        for name in self.encoders:
            if name not in stored:
                raise DatasetError(
                    f"{self.data_dir} has no features of encoder {name!r} (it stores: "
                    f"{', '.join(stored) or 'none'}); prepare a dataset that has them, into a new "
                    f"--dest, with {PREPARE} --enc-type {','.join(self.encoders)} {built_with}"
                )
            dim = self.manifest["modalities"][f"features-{name}"]["shape"][-1]
            if dim != encoder_dim(name):
                raise DatasetError(
                    f"features-{name} in {self.data_dir} are {dim}-d, but {name} "
                    f"has {encoder_dim(name)}-d features"
                )
        if self.pixels and "pixels" not in self.manifest["modalities"]:
            raise DatasetError(
                f"{self.data_dir} stores no pixels (needed by the online-encoder mode); prepare a "
                f"dataset with {PREPARE} --save-pixels {built_with}"
            )

    def _empty_context(self, entry: dict[str, str]) -> Tensor:
        """The empty caption's features, checked against the manifest's checksum."""
        path = os.path.join(self.data_dir, entry["file"])
        if not os.path.exists(path) or file_sha256(path) != entry["sha256"]:
            raise DatasetError(
                f"{path} is missing or differs from the checksum in the manifest; prepare the "
                f"dataset again into a new --dest ({self.manifest.get('command', PREPARE)})"
            )
        return torch.from_numpy(np.load(path))

    @property
    def context_dim(self) -> int:
        """Width of the caption features (a captioned dataset)."""
        return int(self.empty_context.shape[-1])

    def caption_counts(self, indices: Tensor) -> Tensor:
        """(b,) int64: how many captions each of samples `indices` has (>= 1)."""
        counts = np.empty(len(indices), dtype=np.int64)
        self._reader.read_rows("caption_counts", indices.numpy().astype(np.int64), counts)
        return torch.from_numpy(counts)

    def read_contexts(self, indices: Tensor, choice: Tensor) -> Tensor:
        """(b, L, D) float16: caption `choice[k]` of sample `indices[k]` (only that one is read)."""
        name = self.manifest["captions"]["modality"]
        rows = indices.numpy().astype(np.int64)
        return torch.from_numpy(self._reader.read_items(name, rows, choice.numpy()))

    def caption_texts(self) -> list[list[str]]:
        """Every sample's caption texts, from the shards' sidecars (a captioned dataset)."""
        shards = range(len(self.manifest["shards"]))
        return [c for s in shards for c in read_json(sidecar_path(self.data_dir, s))["captions"]]

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        arrays = self._reader.sample(i)
        sample = {
            "moments": torch.from_numpy(arrays["moments"].astype(np.float32, copy=False)),
            "label": torch.tensor(int(arrays["labels"]), dtype=torch.int64),
            "features": [torch.from_numpy(arrays[f"features-{e}"]) for e in self.encoders],
        }  # moments (8, h, w); features (T, D) each
        if self.pixels:
            sample["pixels"] = torch.from_numpy(arrays["pixels"])  # (3, H, W) uint8
        return sample

    def read_batch(self, indices: Tensor, pin_memory: bool = False) -> dict[str, Any]:
        """Samples `indices` (b,) stacked, as `torch.stack` of `self[i]` would give them: moments
        (b, 8, h, w) float32, label (b,), features [(b, T, D)], pixels (b, 3, H, W). Each
        modality is read with one fancy index per shard into one buffer: `batch_buffer`'s for
        what is handed to the training process, plain memory for the moments, which
        `TrainingBatches` turns into latents in the worker (fresh shared or pinned memory costs
        more than the read)."""
        rows = indices.numpy().astype(np.int64)  # a copy, never a view of the caller's tensor
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)}) in a batch of {rows.size}")

        def read(name: str, handed_over: bool = True) -> Tensor:
            modality = self._reader.modality(name)
            dtype = torch.from_numpy(np.empty(0, dtype=modality.dtype)).dtype
            shape = (len(rows), *modality.shape)
            out = (
                batch_buffer(shape, dtype, pin_memory)
                if handed_over
                else torch.empty(shape, dtype=dtype)
            )
            self._reader.read_rows(name, rows, out.numpy())
            return out

        batch = {
            "moments": read("moments", handed_over=False).float(),  # float16-stored: a copy
            "label": read("labels"),
            "features": [read(f"features-{e}") for e in self.encoders],
        }
        if self.pixels:
            batch["pixels"] = read("pixels")
        return batch

    def labels(self) -> np.ndarray:
        """Every sample's label, (N,) int64 (reads only the small label shards)."""
        return self._reader.read_all("labels")

    def verify(self) -> None:
        """Recompute every shard file's SHA-256 against the manifest; raises DatasetError."""
        self._reader.verify()


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool) -> Tensor:
    """An uninitialised tensor to read a batch into. In a DataLoader worker it lives in shared
    memory, so handing the batch to the training process copies nothing (DataLoader's own
    collate does the same); otherwise it is pinned if `pin_memory` (for asynchronous copies to
    the GPU)."""
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)

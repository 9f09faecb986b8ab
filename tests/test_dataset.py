"""dataset.py and the reading side of urepa/shards.py: exact round trips and clear errors.

Datasets are written here through `shards.ShardWriter` with known random values (no networks),
including an excluded file, so that reads can be compared with what was written.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset import LatentDataset, batch_buffer
from urepa import shards
from urepa.data_plan import BatchPlan, StepDraws, TrainingBatches
from urepa.encoders import ENCODER_STANDIN
from urepa.utils import write_json

RES = 32
COUNTS = [5, 3, 4]  # files per shard; one file of shard 1 is excluded -> 11 samples
ENCODERS = {ENCODER_STANDIN: 32, "dinov2-vit-s": 384}


def modalities(pixels: str | None, moments: str = "float16") -> list[shards.Modality]:
    out = [
        shards.Modality("labels", "int64", ()),
        shards.Modality("moments", moments, (8, RES // 8, RES // 8)),
    ]
    out += [shards.Modality(f"features-{e}", "float16", (4, d)) for e, d in ENCODERS.items()]
    if pixels:
        out.append(shards.Modality("pixels", "uint8", (3, RES, RES), pixels))
    return out


def write_dataset(
    root: str, pixels: str | None = "png", seed: int = 0, moments: str = "float16"
) -> list[dict]:
    """Write COUNTS shards of random samples; return the stored samples, in order."""
    rng = np.random.default_rng(seed)
    mods = modalities(pixels, moments)
    samples = []
    for s, n in enumerate(COUNTS):
        writer = shards.ShardWriter(root, s, mods, capacity=n)
        for k in range(n):
            if (s, k) == (1, 1):
                writer.exclude(f"c/{s}-{k}.jpg", "OSError: broken")
                continue
            rows: dict[str, Any] = {
                m.name: rng.normal(size=(1, *m.shape)).astype(m.dtype)
                for m in mods
                if m.name not in ("labels", "pixels")
            }
            rows["labels"] = rng.integers(0, 10, (1,))
            sample = {name: rows[name][0] for name in rows}
            if pixels:
                image = rng.integers(0, 256, (3, RES, RES), dtype=np.uint8)
                png = [shards.encode_png(image.transpose(1, 2, 0))]
                rows["pixels"] = png if pixels == "png" else image[None]
                sample["pixels"] = image  # PNG is lossless: reads must give these bytes back
            writer.add(rows, [f"c/{s}-{k}.jpg"])
            samples.append(sample)
        writer.publish()
    header = {
        "resolution": RES,
        "num_classes": 10,
        "settings": {"resolution": RES},
        "command": "python preprocessing/prepare.py --dest X",
    }
    shards.write_manifest(root, mods, len(COUNTS), header)
    return samples


@pytest.fixture(params=["png", "npy"])
def data(request, tmp_path):
    root = str(tmp_path / "data")
    return root, write_dataset(root, pixels=request.param)


def test_reads_back_exactly_what_was_written(data):
    root, samples = data
    ds = LatentDataset(root, pixels=True, resolution=RES)
    assert len(ds) == len(samples) == sum(COUNTS) - 1 and ds.num_classes == 10
    assert ds.manifest["excluded"] == [{"path": "c/1-1.jpg", "reason": "OSError: broken"}]
    assert ds.encoders == list(ENCODERS)  # None: every stored encoder, in stored order
    for i, want in enumerate(samples):  # crosses both shard boundaries and the excluded row
        got = ds[i]
        assert got["moments"].dtype == torch.float32 and got["moments"].shape == (8, 4, 4)
        np.testing.assert_array_equal(got["moments"].numpy(), want["moments"].astype(np.float32))
        assert got["label"].dtype == torch.int64 and got["label"].ndim == 0
        assert got["label"].item() == want["labels"]
        for feats, name in zip(got["features"], ENCODERS, strict=True):
            assert feats.dtype == torch.float16
            np.testing.assert_array_equal(feats.numpy(), want[f"features-{name}"])
        np.testing.assert_array_equal(got["pixels"].numpy(), want["pixels"])
    np.testing.assert_array_equal(ds.labels(), [s["labels"] for s in samples])
    torch.testing.assert_close(ds[-1]["moments"], ds[len(ds) - 1]["moments"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds.verify()


def test_modality_selection(data):
    root, samples = data
    only_s = LatentDataset(root, encoders=["dinov2-vit-s"])
    item = only_s[6]
    assert set(item) == {"moments", "label", "features"} and len(item["features"]) == 1
    np.testing.assert_array_equal(item["features"][0].numpy(), samples[6]["features-dinov2-vit-s"])
    reordered = LatentDataset(root, encoders=["dinov2-vit-s", ENCODER_STANDIN])
    assert [f.shape[-1] for f in reordered[0]["features"]] == [384, 32]
    assert LatentDataset(root, encoders=[], pixels=True)[0]["features"] == []


def test_dataloader_workers_see_the_same_samples(data):
    root, _ = data
    ds = LatentDataset(root, pixels=True)
    ds[0]  # opens maps in this process; workers must get none of them
    assert ds._reader._maps and pickle.loads(pickle.dumps(ds))._reader._maps == {}
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    moments = torch.cat([b["moments"] for b in batches])  # (N, 8, 4, 4)
    torch.testing.assert_close(moments, torch.stack([ds[i]["moments"] for i in range(len(ds))]))
    assert torch.cat([b["features"][1] for b in batches]).shape == (len(ds), 4, 384)


def test_a_batch_read_is_the_stack_of_its_samples(data):
    """One fancy index per shard (straight into the batch where the shard's samples sit side by
    side in it, through a gather otherwise) gives what reading sample by sample gives."""
    root, _ = data
    ds = LatentDataset(root, pixels=True)  # shards hold samples 0-4, 5-6, 7-10
    for order in [
        [3, 9, 0, 4, 7],  # shard 0 at positions 0, 2, 3: not side by side
        [5, 6, 0, 1, 2, 10, 8],  # each shard's samples side by side
        [8],
        list(range(len(ds)))[::-1],
    ]:
        batch = ds.read_batch(torch.tensor(order))
        samples = [ds[i] for i in order]
        for key in ("moments", "label", "pixels"):
            assert torch.equal(batch[key], torch.stack([s[key] for s in samples])), (order, key)
        for k in range(len(ENCODERS)):
            want = torch.stack([s["features"][k] for s in samples])
            assert torch.equal(batch["features"][k], want), (order, k)
    assert set(LatentDataset(root, encoders=[]).read_batch(torch.tensor([1]))) == {
        "moments",
        "label",
        "features",
    }
    for bad in ([0, len(ds)], [-1]):
        with pytest.raises(IndexError):
            ds.read_batch(torch.tensor(bad))


def test_training_batches_read_in_workers_are_those_read_in_process(data):
    """A worker hands a batch over (pickling moves its tensors' memory into shared memory, in a
    background thread) while it reads the next one: so no tensor of a batch may share memory
    with what the worker keeps, such as the epoch's order (here crossing epochs every 2 steps)."""
    root, _ = data
    ds = LatentDataset(root, pixels=True)
    plan = BatchPlan(len(ds), 4, accumulation=2, num_processes=1, seed=5)
    item = TrainingBatches(ds, plan, StepDraws())[3]
    assert item["indices"].untyped_storage().nbytes() == 2 * 8  # its own 2 indices, no more

    def read(workers: int) -> list[dict]:
        items = TrainingBatches(ds, plan, StepDraws(cfg_prob=0.5))
        return list(DataLoader(items, batch_size=None, sampler=range(40), num_workers=workers))

    for got, want in zip(read(2), read(0), strict=True):
        for key in ("x", "y", "t", "noise", "drop", "indices", "pixels"):
            assert torch.equal(got[key], want[key]), key
        assert all(
            torch.equal(a, b) for a, b in zip(got["features"], want["features"], strict=True)
        )


class BufferKinds(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:
        buffer = batch_buffer((2, 3), torch.float16, pin_memory=False)
        return torch.tensor([buffer.is_shared(), buffer.shape == (2, 3)])


def test_batches_are_read_into_shared_memory_in_workers_only():
    """In a worker, the buffer is shared memory already, so handing it over copies nothing."""
    in_worker = next(iter(DataLoader(BufferKinds(), batch_size=None, num_workers=1)))
    in_process = next(iter(DataLoader(BufferKinds(), batch_size=None, num_workers=0)))
    assert in_worker.tolist() == [True, True] and in_process.tolist() == [False, True]


class BatchMemory(torch.utils.data.Dataset):
    def __init__(self, dataset: LatentDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, bool]:
        batch = self.dataset.read_batch(torch.tensor([0, 7, 3]))
        features = batch["features"]
        return {"moments": batch["moments"].is_shared(), "features": features[0].is_shared()}


def test_only_what_is_handed_over_is_read_into_shared_memory(tmp_path):
    """The moments become latents inside the worker: fresh shared memory for them is wasted
    (float32 moments, as prepare.py stores them by default, are read without a copy)."""
    root = str(tmp_path / "data")
    write_dataset(root, pixels=None, moments="float32")
    in_worker = next(iter(DataLoader(BatchMemory(LatentDataset(root)), batch_size=None,
                                      num_workers=1)))  # fmt: skip
    assert in_worker == {"moments": False, "features": True}


def test_request_mismatch_is_a_clear_error(tmp_path):
    root = str(tmp_path / "d")
    write_dataset(root, pixels=None)
    with pytest.raises(shards.DatasetError, match="no features of encoder 'dinov2-vit-b'.*prepare"):
        LatentDataset(root, encoders=["dinov2-vit-b"])
    with pytest.raises(shards.DatasetError, match="32-px.*256 px.*--resolution 256"):
        LatentDataset(root, resolution=256)
    with pytest.raises(shards.DatasetError, match="stores no pixels.*--save-pixels"):
        LatentDataset(root, pixels=True)


def test_wrong_feature_dim_is_a_clear_error(tmp_path):
    root = str(tmp_path / "d")
    write_dataset(root, pixels=None)
    manifest = shards.read_json(os.path.join(root, shards.MANIFEST))
    manifest["modalities"]["features-dinov2-vit-s"]["shape"] = [4, 768]
    write_json(os.path.join(root, shards.MANIFEST), manifest)
    with pytest.raises(shards.DatasetError, match="768-d, but dinov2-vit-s has 384-d"):
        LatentDataset(root)


def test_missing_or_incomplete_dataset_says_what_to_run(tmp_path):
    with pytest.raises(shards.DatasetError, match="no dataset.*Build one with: python prepro"):
        LatentDataset(str(tmp_path / "nothing"))
    root = str(tmp_path / "d")
    write_dataset(root, pixels=None)
    write_json(os.path.join(root, shards.SETTINGS), {"command": "python p.py --x"})
    os.remove(os.path.join(root, shards.MANIFEST))
    with pytest.raises(shards.DatasetError, match="incomplete.*python p.py --x"):
        LatentDataset(root)


def test_truncated_missing_or_corrupted_shard(tmp_path):
    root = str(tmp_path / "d")
    write_dataset(root, pixels="png")
    path = os.path.join(root, "shards", "features-dinov2-vit-s-00002.npy")
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))  # a bit flip: same size, so only verify() sees it
    ds = LatentDataset(root)
    with pytest.raises(shards.DatasetError, match="checksum mismatch.*00002.*re-run"):
        ds.verify()
    LatentDataset(root, encoders=[ENCODER_STANDIN]).verify()  # only requested modalities count
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(shards.DatasetError, match=r"1000 bytes.*truncated.*shard-00002\.json"):
        LatentDataset(root)
    os.remove(os.path.join(root, "shards", "pixels-00001.png.bin"))
    with pytest.raises(shards.DatasetError, match="missing shard file.*pixels-00001"):
        LatentDataset(root, encoders=[], pixels=True)


def test_header_mismatch_is_caught_at_open(tmp_path):
    root = str(tmp_path / "d")
    write_dataset(root, pixels=None)
    path = os.path.join(root, "shards", "moments-00000.npy")
    np.save(path, np.zeros((5, 8, 4, 4), np.float32))  # float32 where float16 was written
    manifest = shards.read_json(os.path.join(root, shards.MANIFEST))
    manifest["shards"][0]["files"]["shards/moments-00000.npy"]["bytes"] = os.path.getsize(path)
    write_json(os.path.join(root, shards.MANIFEST), manifest)
    with pytest.raises(
        shards.DatasetError, match=r"holds float32 \(5, 8, 4, 4\), the manifest says float16"
    ):
        LatentDataset(root)


def test_every_dataset_file_gets_the_mode_of_open(tmp_path):
    previous = os.umask(0o022)
    try:
        root = str(tmp_path / "d")
        write_dataset(root, pixels="png")
    finally:
        os.umask(previous)
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


@pytest.mark.parametrize("bad", [10, -1])
def test_label_outside_num_classes_is_caught_at_open(tmp_path, bad):
    root = str(tmp_path / "d")
    write_dataset(root, pixels=None)  # labels 0..9, num_classes 10
    labels = np.load(os.path.join(root, "shards", "labels-00002.npy"), mmap_mode="r+")
    labels[1] = bad  # same size: only the values say something is wrong
    labels.flush()
    del labels
    with pytest.raises(
        shards.DatasetError,
        match=rf"labels-00002\.npy holds label {bad} \(row 1\), outside \[0, 10\).*re-run",
    ):
        LatentDataset(root)


def test_too_little_space_for_the_trimmed_copy(tmp_path, monkeypatch):
    """A shard with excluded files is published as a copy of its first rows: that copy needs
    space too, and is checked before it is written."""
    root = str(tmp_path / "d")
    mods = modalities(pixels=None)
    writer = shards.ShardWriter(root, 0, mods, capacity=3)
    rows = {m.name: np.zeros((2, *m.shape), m.dtype) for m in mods}
    writer.add(rows, ["a.jpg", "b.jpg"])
    writer.exclude("c.jpg", "OSError: broken")
    disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=100))
    with pytest.raises(shards.DatasetError, match=r"for shard 0: it needs .*, 100 B is free;"):
        writer.publish()
    assert not [p for p in os.listdir(os.path.join(root, "shards")) if ".tmp" in p]

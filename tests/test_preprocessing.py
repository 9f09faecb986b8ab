"""preprocessing/: ADM centre crop, sources, and the whole pipeline with the tiny stand-ins.

The generated ImageFolder mixes sizes, aspect ratios, formats and modes, and holds corrupt files;
every stored value is compared with the stand-in networks applied to an independent crop.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import preprocessing.prepare as prepare_module
from dataset import LatentDataset
from preprocessing.prepare import main, parse_args
from preprocessing.sources import ImageSource, SourceError, center_crop_arr, load_image
from urepa import shards
from urepa.encoders import ENCODER_STANDIN, load_encoder
from urepa.utils import ReportedError
from urepa.vae import load_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32
CLASSES = ["zebra", "ant", "moose"]  # created unsorted: labels must follow the sorted order
BAD = {"ant/broken.jpg", "moose/truncated.jpg", "zebra/empty.png"}
# (width, height, mode, format): odd sizes, portrait and landscape, smaller than the crop,
# large enough for two box halvings, and every mode ImageNet-like data throws at us
SPECS = [
    (40, 33, "RGB", "PNG"),
    (33, 51, "RGB", "JPEG"),
    (150, 131, "RGB", "PNG"),
    (20, 27, "L", "PNG"),
    (64, 97, "CMYK", "JPEG"),
    (45, 45, "RGBA", "PNG"),
    (71, 38, "P", "PNG"),
    (36, 80, "LA", "PNG"),
]


def make_image(w: int, h: int, mode: str, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth content so that JPEG and the resamplers see image-like data
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + c) + yy / (5 + c) + seed) for c in range(4)], -1)
    pixels = ((base * 0.4 + 0.5) * 255 + rng.normal(0, 8, base.shape)).clip(0, 255)
    image = Image.fromarray(pixels.astype(np.uint8)[..., :3]).convert(mode)
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.fromarray(pixels[..., 3].astype(np.uint8)))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_image_folder(root: str) -> dict[str, bytes]:
    """A small ImageFolder; returns {relative path: bytes} of the images that should be read."""
    files = {}
    for c, name in enumerate(CLASSES):
        for k, (w, h, mode, fmt) in enumerate(SPECS):
            ext = "jpg" if fmt == "JPEG" else "png"
            files[f"{name}/img{k}.{ext}"] = make_image(w + c, h, mode, fmt, seed=10 * c + k)
    good = dict(files)
    files["ant/broken.jpg"] = b"this is not an image"
    files["moose/truncated.jpg"] = files["moose/img1.jpg"][:300]
    files["zebra/empty.png"] = b""
    files["zebra/notes.txt"] = b"not an image extension: ignored"
    files["zebra/.hidden.png"] = files["zebra/img0.png"]  # hidden: ignored
    files["top-level.png"] = files["zebra/img0.png"]  # outside a class folder: ignored
    for rel, data in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return good


def reference_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop written independently: PIL crop box instead of array slicing."""
    image = image.convert("RGB")
    if min(image.size) >= 2 * size:
        half = image.resize((image.size[0] // 2, image.size[1] // 2), Image.Resampling.BOX)
        return reference_crop(half, size)
    w, h = image.size
    scale = size / min(w, h)
    w, h = round(w * scale), round(h * scale)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))


def prepare_argv(source: str, dest: str, *extra: str) -> list[str]:
    """The test settings: tiny stand-ins, 32 px, shards of 5 files, batches of 3; `extra` wins."""
    flags = f"--vae tiny-random --enc-type {ENCODER_STANDIN} --resolution {RES} --shard-size 5"
    flags += " --batch-size 3 --num-workers 0"
    return ["--source", source, "--dest", dest, *flags.split(), *extra]


def prepare(source: str, dest: str, *extra: str) -> dict:
    argv = prepare_argv(source, dest, *extra)
    manifest = main(parse_args(argv))
    assert manifest is not None
    return manifest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagefolder"))
    return root, make_image_folder(root)


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    """The reference build: one process, two decoding workers, PNG pixels stored."""
    dest = str(tmp_path_factory.mktemp("built") / "data")
    manifest = prepare(folder[0], dest, "--num-workers", "2", "--save-pixels")
    return dest, manifest


def shard_files(manifest: dict) -> list:
    return [s["files"] for s in manifest["shards"]]


#################################################################################
#                                   Centre crop                                 #
#################################################################################


@pytest.mark.parametrize("size", [32, 256, 512])
@pytest.mark.parametrize("wh", [(300, 200), (201, 599), (1023, 1025), (257, 256), (97, 31)])
def test_center_crop_matches_independent_version(size, wh):
    rng = np.random.default_rng(sum(wh) + size)
    image = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    out = center_crop_arr(image, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_crop(image, size))


def test_center_crop_known_steps():
    # 600×401 to 100: 401 ≥ 200 → box 300×200; 200 ≥ 200 → box 150×100; bicubic to 150×100 is the
    # identity; centre columns 25..124
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (401, 600, 3), np.uint8))
    halves = image.resize((300, 200), Image.Resampling.BOX).resize((150, 100), Image.Resampling.BOX)
    np.testing.assert_array_equal(center_crop_arr(image, 100), np.asarray(halves)[:, 25:125])


@pytest.mark.parametrize("spec", SPECS + [(30, 50, "1", "PNG")])
def test_every_mode_becomes_rgb(spec):
    w, h, mode, fmt = spec
    data = make_image(w, h, mode, fmt, seed=1)
    out = load_image(data, RES)
    assert out.shape == (RES, RES, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_crop(Image.open(io.BytesIO(data)), RES))


def png_16_bit(values: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): (H, W) grey or (H, W, 3)."""
    h, w = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, dtype, fmt",
    [
        ("I;16", "<u2", "PNG"),
        ("I;16", "<u2", "TIFF"),
        ("I;16B", ">u2", "TIFF"),
        ("I", "<i4", "TIFF"),
    ],
)
def test_16_bit_grey_keeps_the_high_byte(mode, dtype, fmt):
    values = np.random.default_rng(0).integers(0, 65536, (RES, RES))
    values[0, :5] = [0, 255, 256, 40000, 65535]
    data = encode(Image.frombytes(mode, (RES, RES), values.astype(dtype).tobytes()), fmt)
    out = load_image(data, RES)  # RES × RES: the crop is the identity
    high = (values >> 8).astype(np.uint8)  # 0, 0, 1, 156, 255: not clipped to white
    np.testing.assert_array_equal(out, np.repeat(high[..., None], 3, axis=-1))
    constant = np.full((2 * RES + 7, 3 * RES), 40000)  # box halving and bicubic keep a constant
    data = encode(
        Image.frombytes(mode, constant.shape[::-1], constant.astype(dtype).tobytes()), fmt
    )
    np.testing.assert_array_equal(load_image(data, RES), np.full((RES, RES, 3), 40000 >> 8))


def test_16_bit_colour_keeps_the_high_byte():
    values = np.random.default_rng(1).integers(0, 65536, (RES, RES, 3))
    np.testing.assert_array_equal(load_image(png_16_bit(values), RES), values >> 8)
    grey = np.random.default_rng(2).integers(0, 65536, (RES, RES))
    np.testing.assert_array_equal(load_image(png_16_bit(grey), RES)[..., 1], grey >> 8)


def test_images_of_unknown_range_are_refused():
    wide = np.array([[0, 70000]], dtype="<i4").repeat(RES, 0).repeat(RES // 2, 1)
    with pytest.raises(ValueError, match=r"values outside 0\.\.65535.*8 or 16 bits"):
        load_image(encode(Image.frombytes("I", (RES, RES), wide.tobytes()), "TIFF"), RES)
    floats = np.full((RES, RES), 0.5, dtype="<f4")
    with pytest.raises(ValueError, match=r"floating-point.*8 or 16 bits"):
        load_image(encode(Image.frombytes("F", (RES, RES), floats.tobytes()), "TIFF"), RES)


#################################################################################
#                                     Sources                                   #
#################################################################################


def test_folder_source_lists_sorted_classes(folder):
    root, good = folder
    source = ImageSource(root)
    assert source.classes == sorted(CLASSES) and source.num_classes == 3
    paths = [source.path(i) for i in range(len(source))]
    assert paths == sorted(set(good) | BAD)  # hidden, non-image and top-level files ignored
    assert source.labels.tolist() == [sorted(CLASSES).index(p.split("/")[0]) for p in paths]


def test_source_errors(tmp_path):
    with pytest.raises(ReportedError, match="does not exist"):
        prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportedError, match="contains no images"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "out"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(make_image(8, 8, "RGB", "PNG", 0))
    with pytest.raises(ReportedError, match="no class sub-folders.*--labels"):
        prepare(str(tmp_path / "flat"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def write_images(root, *paths: str) -> None:
    for k, rel in enumerate(paths):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(make_image(20, 20, "RGB", "PNG", seed=k))


def test_links_are_followed_but_no_folder_twice(tmp_path, caplog):
    root, outside = tmp_path / "src", tmp_path / "outside"
    write_images(root, "a/0.png", "a/sub/1.png", "b/0.png")
    write_images(outside, "x.png", "deep/y.png")
    (root / "a" / "loop").symlink_to(".")  # a loop: a/loop/loop/... would never end
    (root / "a" / "sub" / "back").symlink_to("..")  # a loop through a parent
    (root / "a" / "up").symlink_to("..")  # the source itself
    (root / "a" / "again").symlink_to("sub")  # a second way into a folder already listed
    (root / "b" / "more").symlink_to(outside)  # a folder elsewhere: followed
    (root / "b" / "file.png").symlink_to(outside / "x.png")  # a file elsewhere: followed
    (root / "c").symlink_to(outside)  # a class folder that is a link: followed
    with caplog.at_level("WARNING"):
        source = ImageSource(str(root))
    paths = [source.path(i) for i in range(len(source))]
    assert paths == [
        "a/0.png",
        "a/sub/1.png",
        "b/0.png",
        "b/file.png",
        "b/more/deep/y.png",
        "b/more/x.png",
        "c/deep/y.png",
        "c/x.png",  # the same file as b/more/x.png and b/file.png: ImageFolder counts each path
    ]
    assert source.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    skipped = sorted(r.getMessage().split()[2] for r in caplog.records)
    assert skipped == ["a/again:", "a/loop:", "a/sub/back:", "a/up:"]


def test_the_source_identity_follows_sizes_and_times_and_survives_a_broken_link(tmp_path):
    root = tmp_path / "src"
    write_images(root, "a/0.png", "b/0.png")
    (root / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # excluded when decoded
    before = ImageSource(str(root)).identity()
    assert ImageSource(str(root)).identity() == before  # listing it again changes nothing
    os.utime(root / "a" / "0.png", ns=(1, 1))  # touched: the same bytes, another time
    assert ImageSource(str(root)).identity() != before


def test_unreadable_folder_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "src"
    write_images(root, "a/0.png", "b/sub/1.png")
    scandir = os.scandir

    def refuse(path="."):
        if os.path.basename(path) == "sub":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(SourceError, match=r"cannot list .*b/sub: Permission denied.*readable"):
        ImageSource(str(root))


def test_empty_class_folder_keeps_its_label(tmp_path, caplog, capsys):
    root = tmp_path / "src"
    write_images(root, "ant/0.png", "ant/1.png", "cat/0.png", "cat/1.png")
    (root / "bee").mkdir()
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images here")
    source = ImageSource(str(root))
    assert source.classes == ["ant", "bee", "cat", "dog"] and source.num_classes == 4
    assert source.labels.tolist() == [0, 0, 2, 2]  # cat stays 2, as its sorted position says
    assert source.empty_classes == ["bee", "dog"]
    main(parse_args(prepare_argv(str(root), str(tmp_path / "dry"), "--dry-run")))
    plan = capsys.readouterr().out
    assert "4 images, 4 classes" in plan and "without images: bee, dog" in plan
    with caplog.at_level("WARNING"):
        manifest = prepare(str(root), str(tmp_path / "out"), "--enc-type", "none")
    assert "bee, dog" in caplog.text and "keep their label" in caplog.text
    assert manifest["num_classes"] == 4 and manifest["class_counts"] == [2, 0, 2, 0]
    assert manifest["empty_classes"] == ["bee", "dog"]
    assert LatentDataset(str(tmp_path / "out")).labels().tolist() == [0, 0, 2, 2]
    archive = str(tmp_path / "src.zip")
    with zipfile.ZipFile(archive, "w") as z:  # `zip -r` stores folders as entries too
        for name in ["ant", "ant/0.png", "bee", "cat", "cat/0.png", "dog", "dog/notes.txt"]:
            z.write(root / name, name)
    zipped = ImageSource(archive)
    assert zipped.classes == source.classes and zipped.labels.tolist() == [0, 2]


@pytest.mark.parametrize(
    "lines, line_number",
    [
        (["zebra/img0.png 1", "zebra/img1.jpg"], 2),  # no label
        (["zebra/img0.png seven"], 1),
        (["zebra/img0.png 1", "", "zebra/img1.jpg -1"], 3),  # blank lines count
        (["zebra/img0.png 2.0"], 1),
    ],
)
def test_bad_line_in_labels_file_names_file_and_line(folder, tmp_path, lines, line_number):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(lines) + "\n")
    bad = lines[line_number - 1]
    with pytest.raises(
        SourceError,
        match=rf"labels.txt' line {line_number}: '{bad}' is not 'relative/path label'.*integer",
    ):
        ImageSource(folder[0], str(labels_file))


def test_conflicting_labels_file_lines(folder, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("zebra/img0.png 1\nant/img0.png 2\nzebra/img0.png 4\n")
    with pytest.raises(SourceError, match=r"line 3: 'zebra/img0.png' has label 4, line 1 gave 1"):
        ImageSource(folder[0], str(labels_file))


def test_labels_file_entries_without_an_image_are_reported(folder, tmp_path, caplog):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("zebra/img0.png 1\nzebra/gone.png 2\ntrain/ant/img0.png 0\n")
    with caplog.at_level("WARNING"):
        source = ImageSource(folder[0], str(labels_file))
    assert len(source) == 1
    assert "2 entries of --labels" in caplog.text and "'zebra/gone.png'" in caplog.text


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"zebra/img0.png": 1,\n "ant/img0.png" 2}', r"not valid JSON \(line 2, column"),
        ('["zebra/img0.png", 1]', r"not a JSON object"),
        ('{"zebra/img0.png": 3.7}', r"label of 'zebra/img0.png' is 3.7"),
        ('{"zebra/img0.png": true}', r"label of 'zebra/img0.png' is True"),
        ('{"zebra/img0.png": "3"}', r"label of 'zebra/img0.png' is '3'"),
        ('{"zebra/img0.png": -2}', r"label of 'zebra/img0.png' is -2"),
        (
            '{"zebra/img0.png": 1, "zebra/img0.png": 2}',
            r"'zebra/img0.png' is listed twice, with labels 1 and 2",
        ),
    ],
)
def test_bad_json_labels_file(folder, tmp_path, text, match):
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(text)
    with pytest.raises(SourceError, match=r"labels.json'.*" + match):
        ImageSource(folder[0], str(labels_file))


#################################################################################
#                                 Whole pipeline                                #
#################################################################################


def test_pipeline_stores_what_the_standins_compute(folder, built):
    root, good = folder
    dest, manifest = built
    order = sorted(good)  # corrupt files excluded, everything else in sorted path order
    assert manifest["num_samples"] == len(order) == 24
    assert {e["path"] for e in manifest["excluded"]} == BAD
    assert all(e["reason"] and "0x" not in e["reason"] for e in manifest["excluded"])
    assert manifest["classes"] == sorted(CLASSES) and manifest["class_counts"] == [8, 8, 8]
    sources = [
        p for s in range(6) for p in shards.read_json(shards.sidecar_path(dest, s))["sources"]
    ]
    assert sources == order

    crops = np.stack([reference_crop(Image.open(io.BytesIO(good[p])), RES) for p in order])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()  # (N, 3, R, R) uint8
    moments = load_vae("tiny-random").encode_moments(x)  # (N, 8, R/8, R/8)
    features = load_encoder(ENCODER_STANDIN, resolution=RES)(x).half()  # (N, 4, 32)
    ds = LatentDataset(dest, pixels=True, resolution=RES)
    assert len(ds) == len(order) and ds.num_classes == 3
    for i, path in enumerate(order):
        item = ds[i]
        assert item["label"].item() == sorted(CLASSES).index(path.split("/")[0])
        torch.testing.assert_close(item["moments"], moments[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(item["features"][0], features[i], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(item["pixels"], x[i], rtol=0, atol=0)  # PNG is lossless
    ds.verify()


def test_zip_source_and_raw_pixels_give_the_same_dataset(folder, built, tmp_path):
    root, good = folder
    archive = str(tmp_path / "train.zip")
    with zipfile.ZipFile(archive, "w") as z:  # zipped with its top folder, as `zip -r` does
        for folder_name, _, files in os.walk(root):
            for f in files:
                full = os.path.join(folder_name, f)
                z.write(full, "train/" + os.path.relpath(full, root))
    manifest = prepare(archive, str(tmp_path / "z"), "--save-pixels", "--pixel-format", "npy")
    reference = built[1]
    assert manifest["settings"]["files_sha256"] == reference["settings"]["files_sha256"]
    for ours, theirs in zip(shard_files(manifest), shard_files(reference), strict=True):
        same = [k for k in ours if "pixels" not in k]
        assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    a, b = LatentDataset(str(tmp_path / "z"), pixels=True), LatentDataset(built[0], pixels=True)
    assert all(torch.equal(a[i]["pixels"], b[i]["pixels"]) for i in range(len(a)))


def test_labels_file_and_no_features(folder, tmp_path):
    root, good = folder
    chosen = sorted(good)[::3]
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(json.dumps({p: 7 - k % 3 for k, p in enumerate(chosen)}))
    manifest = prepare(
        root, str(tmp_path / "l"), "--labels", str(labels_file), "--enc-type", "none"
    )
    assert manifest["num_classes"] == 8 and manifest["num_samples"] == len(chosen)
    unlisted = {e["path"] for e in manifest["excluded"] if "--labels" in e["reason"]}
    # with a labels file, images outside class folders count too (flat folders are allowed)
    assert unlisted == (set(good) | BAD | {"top-level.png"}) - set(chosen)
    ds = LatentDataset(str(tmp_path / "l"))
    assert ds.labels().tolist() == [7 - k % 3 for k in range(len(chosen))]
    assert ds[0]["features"] == [] and not any(
        m.startswith("features") for m in ds.manifest["modalities"]
    )


def test_two_processes_write_the_same_dataset(folder, built, tmp_path):
    dest = str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv = prepare_argv(folder[0], dest, "--num-workers", "1", "--save-pixels")
    cmd = [*torchrun, "preprocessing/prepare.py", *argv]
    # torchrun would set 1 thread per process; CPU kernels round differently with other thread
    # counts, so keep the reference's count to compare bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[:3000] + "\n...\n" + result.stderr[-3000:]
    assert "[rank 1]" in result.stderr  # both ranks worked
    manifest = shards.read_json(os.path.join(dest, shards.MANIFEST))
    reference = built[1]
    assert shard_files(manifest) == shard_files(reference)
    assert manifest["excluded"] == reference["excluded"]


#################################################################################
#                          Resume, interruption, bad --dest                     #
#################################################################################


def mtimes(dest: str, shard: int) -> dict[str, int]:
    paths = [p for p in os.listdir(os.path.join(dest, shards.SHARD_DIR)) if f"-{shard:05d}." in p]
    return {p: os.stat(os.path.join(dest, shards.SHARD_DIR, p)).st_mtime_ns for p in paths}


def test_interrupted_run_resumes_to_the_same_dataset(folder, built, tmp_path, monkeypatch):
    dest = str(tmp_path / "r")
    published: list[int] = []
    original = shards.ShardWriter.publish

    def crash_after_first_shard(self):
        if published:
            raise KeyboardInterrupt("simulated crash")
        published.append(self.shard)
        return original(self)

    monkeypatch.setattr(shards.ShardWriter, "publish", crash_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(folder[0], dest, "--save-pixels")
    monkeypatch.setattr(shards.ShardWriter, "publish", original)
    assert not os.path.exists(os.path.join(dest, shards.MANIFEST))
    with pytest.raises(shards.DatasetError, match="incomplete.*re-running the same command"):
        LatentDataset(dest)
    # what a SIGKILL leaves: a half-written temporary file of the next shard
    for leftover in ["shards/moments-00001.npy.tmp", ".manifest.json.x1y2z3.tmp"]:
        with open(os.path.join(dest, leftover), "wb") as f:
            f.write(b"half a file")
    first = mtimes(dest, 0)

    manifest = prepare(folder[0], dest, "--save-pixels")
    assert mtimes(dest, 0) == first  # the completed shard was not rewritten
    assert shard_files(manifest) == shard_files(built[1])
    leftovers = os.listdir(dest) + os.listdir(os.path.join(dest, shards.SHARD_DIR))
    assert not [p for p in leftovers if ".tmp" in p]


def test_killed_run_resumes_to_the_same_dataset(tmp_path):
    """A real SIGKILL (no cleanup runs) right after the first shard is published."""
    root = str(tmp_path / "src")
    for k in range(120):  # enough images that the run is still busy when it is killed
        os.makedirs(os.path.join(root, f"c{k % 4}"), exist_ok=True)
        with open(os.path.join(root, f"c{k % 4}", f"{k}.png"), "wb") as f:
            f.write(make_image(30 + k % 7, 36, "RGB", "PNG", seed=k))
    argv = prepare_argv(root, str(tmp_path / "killed"), "--save-pixels")
    cmd = [sys.executable, "preprocessing/prepare.py", *argv]
    first = shards.sidecar_path(str(tmp_path / "killed"), 0)
    run = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(first) and run.poll() is None:
        time.sleep(0.005)
    run.kill()
    run.wait()
    assert os.path.exists(first), "the run failed before its first shard"
    assert not os.path.exists(str(tmp_path / "killed" / shards.MANIFEST)), "killed too late"
    published = mtimes(str(tmp_path / "killed"), 0)

    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = shards.read_json(str(tmp_path / "killed" / shards.MANIFEST))
    reference = prepare(root, str(tmp_path / "reference"), "--save-pixels")
    assert resumed["num_samples"] == 120
    assert mtimes(str(tmp_path / "killed"), 0) == published  # not rewritten
    assert shard_files(resumed) == shard_files(reference)


NO_SPACE = r"not enough disk space in .* for shard {}: it needs .*, .* is free; completed shards "
NO_SPACE += r"are kept: free some space and re-run the same command to resume$"


def fill_disk_then_resume(folder, built, dest: str, target, name: str, fake, shard: int) -> None:
    """Build with `target.name` replaced by `fake` (a full disk): the run stops at `shard` with
    NO_SPACE, keeps the shards before it and no temporary file; the same command, once the disk
    has room, finishes the dataset."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(target, name, fake)
        with pytest.raises(shards.DatasetError, match=NO_SPACE.format(shard)):
            prepare(folder[0], dest, "--save-pixels")
    done = [s for s in range(6) if os.path.exists(shards.sidecar_path(dest, s))]
    assert done == list(range(shard))
    leftovers = os.listdir(dest) + os.listdir(os.path.join(dest, shards.SHARD_DIR))
    assert not [p for p in leftovers if ".tmp" in p] and shards.MANIFEST not in leftovers
    assert shard_files(prepare(folder[0], dest, "--save-pixels")) == shard_files(built[1])


def test_too_little_free_space_stops_before_the_shard(folder, built, tmp_path):
    dest = str(tmp_path / "full")
    disk_usage = shutil.disk_usage

    def full_after_first_shard(path):
        usage = disk_usage(path)
        return usage._replace(free=1000) if os.path.exists(shards.sidecar_path(dest, 0)) else usage

    fill_disk_then_resume(folder, built, dest, shutil, "disk_usage", full_after_first_shard, 1)


def test_disk_full_when_reserving_a_shard(folder, built, tmp_path):
    """Memory-mapped files get their disk blocks at creation: a full disk fails there, with the
    same message, instead of killing the process with SIGBUS at the first write to a hole."""

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    fill_disk_then_resume(folder, built, str(tmp_path / "full"), os, "posix_fallocate", no_space, 0)


def test_disk_full_when_flushing_a_shard(folder, built, tmp_path):
    fsync = shards._fsync

    def no_space_in_shard_1(path: str) -> None:
        if "-00001." in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(path)

    dest = str(tmp_path / "full")
    fill_disk_then_resume(folder, built, dest, shards, "_fsync", no_space_in_shard_1, 1)


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC (buffered above it, the bytes in
    the buffer fail again when the file is closed)."""

    def __init__(self, f) -> None:
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.f.close()
        super().close()


def test_disk_full_while_writing_pngs_says_what_is_needed_and_free(folder, built, tmp_path):
    real_open = builtins.open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if mode == "wb" and str(path).endswith("-00001.png.bin.tmp"):
            return io.BufferedWriter(FullDisk(real_open(path, "wb", buffering=0)))
        return real_open(path, mode, *args, **kwargs)

    dest = str(tmp_path / "full")
    fill_disk_then_resume(folder, built, dest, builtins, "open", open_on_a_full_disk, 1)


def test_rerun_rebuilds_only_missing_or_damaged_shards(folder, built, tmp_path):
    dest = str(tmp_path / "d")
    prepare(folder[0], dest, "--save-pixels")
    before = {s: mtimes(dest, s) for s in range(6)}
    os.remove(shards.sidecar_path(dest, 2))  # an unpublished shard
    with open(os.path.join(dest, shards.SHARD_DIR, "moments-00004.npy"), "r+b") as f:
        f.truncate(100)  # a damaged one
    manifest = prepare(folder[0], dest, "--save-pixels")
    after = {s: mtimes(dest, s) for s in range(6)}
    assert [s for s in range(6) if after[s] != before[s]] == [2, 4]
    assert shard_files(manifest) == shard_files(built[1])


def test_rerun_of_a_complete_dataset_writes_nothing(folder, built, tmp_path):
    dest = str(tmp_path / "d")
    prepare(folder[0], dest)
    names = sorted(os.listdir(dest))
    before = {name: os.stat(os.path.join(dest, name)).st_mtime_ns for name in names}
    manifest = prepare(folder[0], dest)
    assert sorted(os.listdir(dest)) == names
    assert {name: os.stat(os.path.join(dest, name)).st_mtime_ns for name in names} == before
    assert manifest == shards.load_manifest(dest)


def test_destination_with_other_settings_is_a_clear_error(folder, built, tmp_path):
    with pytest.raises(
        ReportedError, match=r"(?s)other settings:\n  encoders.*\n  pixels.*new --dest"
    ):
        prepare(folder[0], built[0], "--enc-type", "none")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"")
    with pytest.raises(ReportedError, match="not empty.*new or empty directory"):
        prepare(folder[0], str(tmp_path / "other"))


def test_failed_model_load_leaves_nothing_that_blocks_the_corrected_command(folder, tmp_path):
    """An unavailable --vae fails before --dest is written, so the corrected command runs."""
    dest = str(tmp_path / "first")

    def offline(spec: str, **kwargs):
        raise RuntimeError(f"could not load the SD-VAE from {spec!r} (no internet access)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_module, "load_vae", offline)
        with pytest.raises(RuntimeError, match="could not load the SD-VAE"):
            prepare(folder[0], dest, "--vae", "ema")
    assert not os.path.exists(dest) or not os.listdir(dest)
    with pytest.raises(ValueError, match="--vae must be one of"):
        prepare(folder[0], dest, "--vae", "emma")  # a typo: the real loader refuses it
    assert not os.path.exists(dest) or not os.listdir(dest)
    assert prepare(folder[0], dest)["num_samples"] == 24  # the corrected command


def test_dry_run_and_help_need_no_weights(folder, tmp_path, capsys):
    dest = str(tmp_path / "dry")
    main(parse_args(["--source", folder[0], "--dest", dest, "--dry-run"]))  # real ids, no loading
    out = capsys.readouterr().out
    assert "27 images, 3 classes" in out and "6 shards" not in out and "1 shards of 10000" in out
    assert "features-dinov2-vit-b" in out and not os.path.exists(dest)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit):
        parse_args(["--source", "s", "--dest", "d", "--resolution", "100"])

"""Reading the source images: an ImageFolder tree or a zip of one, labels, and ADM's centre crop."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import signal
import sys
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from urepa.shards import encode_png
from urepa.utils import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
}


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion `image_datasets.py`): (size, size, C) uint8.

    Halve with a box filter while the short side is at least 2·size (anti-aliasing for large
    images), bicubic-resize so the short side is `size`, then take the centre square.
    """
    while min(image.size) >= 2 * size:
        w, h = image.size
        image = image.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)  # (H, W, C)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def load_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> centre-cropped RGB (size, size, 3) uint8.

    8-bit modes go through PIL's `convert("RGB")` as in ADM: greyscale is replicated, CMYK and
    palette images are converted, and an alpha channel is dropped. 16-bit greyscale keeps its
    high byte (see `to_8_bit`); PIL already reduces 16-bit colour to its high byte when reading.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode now, so that truncated files fail here
        rgb = to_8_bit(image).convert("RGB")
    return np.ascontiguousarray(center_crop_arr(rgb, size))


def to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16*", and "I", which older PIL gives 16-bit PNGs) -> "L" by its high
    byte (value >> 8, as PIL and libpng reduce 16-bit colour). PIL's own conversion would clip
    every value above 255 to white. Other modes are returned as they are; integer images beyond
    16 bits and floating-point ones have no known range, so they are refused (excluded)."""
    if image.mode == "F":
        raise ValueError("floating-point image (mode F): its range is unknown; store 8 or 16 bits")
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image)  # (H, W) uint16 or int32
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"integer image (mode {image.mode}) with values outside 0..65535 "
            f"({values.min()}..{values.max()}): its range is unknown; store 8 or 16 bits"
        )
    return Image.fromarray((values >> 8).astype(np.uint8))


#################################################################################
#                                  Image sources                                #
#################################################################################


class SourceError(InputError):
    """The --source (or --labels) cannot be used; the message says what to do."""


class ImageSource:
    """The sorted list of images of an ImageFolder tree or a zip of one, with their labels.

    Labels are the index of the class folder (the first path component) among the sorted class
    folders, as torchvision's ImageFolder, unless a labels file maps relative path -> label.
    Paths are kept in NumPy arrays so that forked DataLoader workers share them (no per-object
    reference counts to copy).
    """

    def __init__(self, source: str, labels_file: str | None = None):
        self._open(source, "an ImageFolder directory (one sub-folder per class) or a .zip of one")
        names, folders = self._list_images()
        if labels_file is None:
            files, labels, self.classes = _folder_labels(names, folders, source)
            self.unlabelled: list[str] = []
        else:
            files, labels, self.unlabelled = _file_labels(names, labels_file)
            self.classes = []
        # class folders without images keep their index (see _folder_labels); say which they are
        self.empty_classes = sorted(set(self.classes) - {f.split("/", 1)[0] for f in files})
        if not files:
            raise SourceError(f"no labelled images found in --source {source!r}")
        self.files = np.asarray([f.encode() for f in files])  # (N,) bytes, sorted
        self.labels = np.asarray(labels, dtype=np.int64)  # (N,)
        self.num_classes = len(self.classes) or int(self.labels.max()) + 1

    def _open(self, source: str, expected: str) -> None:
        """Check that --source exists (`expected` says what it should be) and note its kind."""
        if not os.path.exists(source):
            raise SourceError(f"--source {source!r} does not exist; pass {expected}")
        self.source = source
        self.is_zip = os.path.isfile(source)
        if self.is_zip and not zipfile.is_zipfile(source):
            raise SourceError(f"--source {source!r} is a file but not a zip archive")
        self._zip: tuple[int, zipfile.ZipFile] | None = None
        self.prefix = ""  # zips made of a top folder (`zip -r train.zip train/`) keep it in names

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> str:
        return self.files[i].decode()

    def _list_images(self) -> tuple[list[str], set[str]]:
        """The sorted image paths and the names of the class folders (with images or not)."""
        names, folders = self._list_zip() if self.is_zip else _list_folder(self.source)
        if not names:
            raise SourceError(
                f"--source {self.source!r} contains no images "
                f"(extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return sorted(names), folders

    def _list_zip(self) -> tuple[list[str], set[str]]:
        with zipfile.ZipFile(self.source) as z:
            entries = z.namelist()
        names = [n for n in entries if _is_image(n)]
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) == 1 and any(n.count("/") >= 2 for n in names):
            # one top folder above the class folders (`zip -r train.zip train/`): drop it
            self.prefix = tops.pop() + "/"
            entries = [n[len(self.prefix) :] for n in entries if n.startswith(self.prefix)]
            names = [n[len(self.prefix) :] for n in names]
        # a folder is any entry's first component: `zip -r` also stores empty folders ("bee/")
        tops = {n.split("/", 1)[0] for n in entries if "/" in n}
        return names, {top for top in tops if not _is_hidden(top)}

    def read(self, i: int) -> bytes:
        """The encoded bytes of image i (opens the zip once per process: handles do not fork)."""
        name = self.path(i)
        if not self.is_zip:
            with open(os.path.join(self.source, name), "rb") as f:
                return f.read()
        if self._zip is None or self._zip[0] != os.getpid():
            self._zip = (os.getpid(), zipfile.ZipFile(self.source))
        return self._zip[1].read(self.prefix + name)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}

    def identity(self) -> str:
        """SHA-256 of what the listed files are: each one's path, size and modification time
        (in a zip: its entry's size and CRC-32). One `stat` per file and no read (seconds for
        ImageNet's 1.28M files); a file replaced, edited or touched changes it, and so does
        another source that holds the same names."""
        digest = hashlib.sha256()
        for path, size, stamp in self._file_stamps():
            digest.update(f"{path}\t{size}\t{stamp}\n".encode())
        return digest.hexdigest()

    def _file_stamps(self) -> Iterator[tuple[str, int, int]]:
        """(path, size, mtime in ns, or a zip entry's CRC-32) of every listed file."""
        if self.is_zip:
            with zipfile.ZipFile(self.source) as z:
                entries = {info.filename: info for info in z.infolist()}
            for name in map(bytes.decode, self.files):
                info = entries[self.prefix + name]
                yield name, info.file_size, info.CRC
            return
        for name in map(bytes.decode, self.files):
            try:
                stat = os.stat(os.path.join(self.source, name))
            except OSError:  # a broken link: excluded when it fails to decode, with the reason
                yield name, -1, -1
                continue
            yield name, stat.st_size, stat.st_mtime_ns

    def fingerprint(self) -> str:
        """SHA-256 of the (path, label) list: what decides the content of every shard."""
        digest = hashlib.sha256()
        for path, label in zip(self.files, self.labels, strict=True):
            digest.update(path + b"\t" + str(int(label)).encode() + b"\n")
        return digest.hexdigest()


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image(path: str) -> bool:
    hidden = any(_is_hidden(part) for part in path.split("/"))
    return not hidden and os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _list_folder(root: str) -> tuple[list[str], set[str]]:
    """The image paths under `root` (relative, "/"-separated) and its class folders."""
    names, folders = [], set()
    with os.scandir(root) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():  # follows links, as ImageFolder does
            folders.add(entry.name)
            names += _walk_class_folder(root, entry.name)
        elif _is_image(entry.name):  # outside a class folder: used only with --labels
            names.append(entry.name)
    return names, folders


def _walk_class_folder(root: str, folder: str) -> list[str]:
    """The image paths under `root/folder`, following links to files and folders as
    torchvision's ImageFolder does, but entering each folder once.

    Following links blindly never ends on a loop (`loop -> .`) and multiplies the images; so a
    link to a folder already entered here (a loop, a link up to `root`, a second link to one
    folder) is skipped with a warning naming it. A file reached by two paths (two file links, or
    one folder linked into two classes) stays two samples, as in ImageFolder.
    """
    top = os.path.join(root, folder)
    entered = {_identity(root)}
    if not _first_entry(top, entered, root):
        return []

    def unreadable(err: OSError) -> None:  # os.walk would skip the folder without a word
        raise SourceError(
            f"cannot list {err.filename}: {err.strerror}; make it readable or move it out "
            "of --source"
        )

    names = []
    for current, dirs, files in os.walk(top, onerror=unreadable, followlinks=True):
        # real folders before links, so that a folder keeps its own path and the link is skipped
        dirs.sort(key=lambda d: (os.path.islink(os.path.join(current, d)), d))
        dirs[:] = [
            d
            for d in dirs
            if not _is_hidden(d) and _first_entry(os.path.join(current, d), entered, root)
        ]
        rel = os.path.relpath(current, root).replace(os.sep, "/")
        names += [f"{rel}/{f}" for f in files if _is_image(f"{rel}/{f}")]
    return names


def _identity(path: str) -> tuple[int, int]:
    """What makes a folder the same folder whatever the path (links followed)."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _first_entry(path: str, entered: set[tuple[int, int]], root: str) -> bool:
    """Whether the folder at `path` is entered for the first time (and record it)."""
    identity = _identity(path)
    if identity in entered:
        logger.warning(
            "not following %s: it leads to %s, a folder already listed (a link loop, or a "
            "second link to one folder); its images are listed once",
            os.path.relpath(path, root).replace(os.sep, "/"),
            os.path.realpath(path),
        )
        return False
    entered.add(identity)
    return True


def _folder_labels(
    names: list[str], folders: set[str], source: str
) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder labels: the index among the sorted class folders, including folders without
    images, so that a label always means the same folder (ImageNet's synset order) and an empty
    folder does not shift every later class by one. Images outside a class folder are ignored."""
    names = [n for n in names if "/" in n]
    classes = sorted(folders)
    if not names:
        raise SourceError(
            f"--source {source!r} has images but no class sub-folders with images; arrange it "
            "as <class>/<image> or pass --labels FILE"
        )
    index = {c: k for k, c in enumerate(classes)}
    return names, [index[n.split("/", 1)[0]] for n in names], classes


def _file_labels(names: list[str], labels_file: str) -> tuple[list[str], list[int], list[str]]:
    """Labels from a JSON object {relative path: label} or text lines `relative/path label`."""
    if not os.path.isfile(labels_file):
        raise SourceError(f"--labels {labels_file!r} does not exist")
    read = _json_labels if labels_file.endswith(".json") else _text_labels
    mapping = read(labels_file)
    files = [n for n in names if n in mapping]
    unlabelled = [n for n in names if n not in mapping]
    listed = set(names)
    missing = [path for path in mapping if path not in listed]  # in the order of the file
    if missing:  # a typo or a path prefix that differs: those labels would vanish unseen
        logger.warning(
            "%d entries of --labels %s name no image in --source (first: %r); they are ignored",
            len(missing),
            labels_file,
            missing[0],
        )
    return files, [mapping[n] for n in files], unlabelled


def _text_labels(labels_file: str) -> dict[str, int]:
    """Lines `relative/path label` (the path may hold spaces; the label is the last word)."""
    mapping: dict[str, tuple[int, int]] = {}  # path -> (label, line number)
    with open(labels_file) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"[0-9]+", parts[1]):
                raise SourceError(
                    f"--labels {labels_file!r} line {number}: {line.strip()!r} is not "
                    "'relative/path label' (a path under --source, a space, a non-negative integer)"
                )
            path, label = parts[0], int(parts[1])
            if path in mapping and mapping[path][0] != label:
                raise SourceError(
                    f"--labels {labels_file!r} line {number}: {path!r} has label {label}, "
                    f"line {mapping[path][1]} gave {mapping[path][0]}; keep one line per image"
                )
            mapping[path] = (label, number)
    return {path: label for path, (label, _) in mapping.items()}


def _json_labels(labels_file: str) -> dict[str, int]:
    """A JSON object {relative path: non-negative integer label}."""

    def no_conflicts(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        for key, value in pairs:  # json.load would silently keep the last of repeated keys
            if key in mapping and mapping[key] != value:
                raise SourceError(
                    f"--labels {labels_file!r}: {key!r} is listed twice, with labels "
                    f"{mapping[key]!r} and {value!r}; keep one entry per image"
                )
            mapping[key] = value
        return mapping

    with open(labels_file) as f:
        try:
            mapping = json.load(f, object_pairs_hook=no_conflicts)
        except json.JSONDecodeError as err:
            raise SourceError(
                f"--labels {labels_file!r} is not valid JSON (line {err.lineno}, column "
                f'{err.colno}: {err.msg}); write an object {{"relative/path": label, ...}}'
            ) from None
    if not isinstance(mapping, dict):
        raise SourceError(
            f'--labels {labels_file!r} is not a JSON object; write {{"relative/path": label, ...}}'
        )
    for path, label in mapping.items():
        # bool is an int in Python, and int(3.7) would silently give 3: only true integers pass
        if type(label) is not int or label < 0:
            raise SourceError(
                f"--labels {labels_file!r}: the label of {path!r} is {label!r}; labels are "
                "non-negative integers"
            )
    return mapping


#################################################################################
#                          Decoding in DataLoader workers                       #
#################################################################################


class CroppedImages(Dataset):
    """Item i -> (i, (3, R, R) uint8 or None, PNG bytes or None, failure reason or None).

    A file that cannot be read or decoded is reported, never raised: it is excluded, not fatal.
    """

    def __init__(self, source: ImageSource, resolution: int, png: bool = False):
        self.source, self.resolution, self.png = source, resolution, png

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, bytes | None, str | None]:
        try:
            image = load_image(self.source.read(i), self.resolution)  # (R, R, 3)
        except Exception as err:  # PIL raises many types for corrupt data; all mean "excluded"
            return i, None, None, failure_reason(err)
        png = encode_png(image) if self.png else None
        return i, image.transpose(2, 0, 1), png, None


def exit_with_parent(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: die with the main process. A SIGKILLed run would otherwise
    leave its workers blocked on a queue nobody reads (Linux only; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def failure_reason(err: Exception) -> str:
    """The exception as a reason for the manifest, without object addresses (which would make
    runs differ): PIL names the in-memory file `<_io.BytesIO object at 0x...>`."""
    return re.sub(
        r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "image data", f"{type(err).__name__}: {err}"
    )


def collate_cropped(items: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A batch of CroppedImages items -> the decoded images and the failures, separately."""
    ok = [item for item in items if item[3] is None]
    pixels = np.stack([item[1] for item in ok]) if ok else np.zeros((0, 3, 1, 1), np.uint8)
    return {
        "index": [item[0] for item in ok],
        "pixels": torch.from_numpy(pixels),  # (n_ok, 3, R, R) uint8
        "png": [item[2] for item in ok],
        "failed": [(item[0], item[3]) for item in items if item[3] is not None],
    }


#################################################################################
#                        Captioned images (MS-COCO)                             #
#################################################################################


class CaptionSource(ImageSource):
    """The images of a COCO split (`train2014/`, `val2014/`, or a zip of one) that its captions
    file (`annotations/captions_train2014.json`) describes, sorted by path, with their captions.

    An image is matched to the captions file by its file name (`file_name`), wherever it sits
    under --source; images without a caption are left out and listed as such. Each image keeps
    every caption, in the order of the annotation ids (COCO has 5 to 7 per image). Labels are
    all 0: the captions condition these images, not a class.
    """

    def __init__(self, source: str, captions_file: str):
        self._open(source, "COCO's image folder (train2014/ or val2014/) or a .zip of it")
        names = self._list_zip()[0] if self.is_zip else _list_folder(source)[0]
        by_name = read_coco_captions(captions_file)
        files = sorted(n for n in names if n.rsplit("/", 1)[-1] in by_name)
        if not files:
            raise SourceError(
                f"no image of --source {source!r} is named in --captions {captions_file!r}; "
                "pass the images of the split the captions file describes"
            )
        self.unlabelled = sorted(set(names) - set(files))
        self.classes, self.empty_classes = [], []
        self.files = np.asarray([f.encode() for f in files])  # (N,) bytes, sorted
        self.labels = np.zeros(len(files), dtype=np.int64)
        self.num_classes = 1
        self.captions = [by_name[f.rsplit("/", 1)[-1]] for f in files]
        self.max_captions = max(len(c) for c in self.captions)

    def fingerprint(self) -> str:
        """SHA-256 of the (path, captions) list: what decides the content of every shard."""
        digest = hashlib.sha256()
        for path, captions in zip(self.files, self.captions, strict=True):
            digest.update(path + b"\t" + json.dumps(captions).encode() + b"\n")
        return digest.hexdigest()


def read_coco_captions(captions_file: str) -> dict[str, list[str]]:
    """COCO's captions JSON -> {image file name: [captions in annotation-id order]}."""
    try:
        with open(captions_file) as f:
            coco = json.load(f)
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        annotations = sorted(coco["annotations"], key=lambda a: a["id"])
        by_name: dict[str, list[str]] = {}
        for annotation in annotations:
            by_name.setdefault(names[annotation["image_id"]], []).append(annotation["caption"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SourceError(
            f"--captions {captions_file!r} is not a COCO captions file ({type(err).__name__}: "
            f"{err}); pass annotations/captions_train2014.json or captions_val2014.json"
        ) from None
    return by_name

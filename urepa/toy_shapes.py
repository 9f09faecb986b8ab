"""The quickstart's dataset: ten classes of coloured shapes, and a way to check an image's class
by looking at it (no learned network).

Class k is a (shape, colour) pair. Every shape and every colour occurs in two classes, so a
generator has to get both right to draw its class: neither alone tells the classes apart.

    0 red circle    1 green square   2 blue triangle    3 yellow cross   4 purple ring
    5 blue circle   6 yellow square  7 purple triangle  8 red cross      9 green ring

An image is a shape of random size and position, in its colour (each channel jittered by up to
±20 levels), on a plain grey background of random brightness, drawn at 4× and box-filtered down
(anti-aliased edges). Image i of class k depends only on (seed, k, i).

`measure` reads the shape and colour back: the largest blob that differs from the background
(estimated from the border), its median colour matched to the nearest palette entry, and its mask,
scaled to its bounding box, matched to the nearest shape template (soft IoU). An image that is not
recognisably a shape (no plain background, a blob that fills the image or is cut by its edge, is
not one palette colour or matches no template well) reads as no shape: noise and constant images
score 0, below chance. On freshly drawn images it reads every class right
(`tests/test_end_to_end.py` checks both), so the agreement of generated images with their labels
measures the generator, not the measurement.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from urepa.utils import atomic_write

SHAPES = ("circle", "square", "triangle", "cross", "ring")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 50, 45),
    "green": (45, 185, 75),
    "blue": (55, 95, 235),
    "yellow": (235, 205, 45),
    "purple": (170, 70, 215),
}
COLOURS = tuple(PALETTE)
# Class k < 5: shape k in colour k; class 5 + k: shape k in colour k + 2 (mod 5).
CLASSES: tuple[tuple[str, str], ...] = tuple(
    (SHAPES[k % 5], COLOURS[(k % 5 + 2 * (k // 5)) % 5]) for k in range(10)
)
NUM_CLASSES = len(CLASSES)

SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges
COLOUR_JITTER = 20  # per channel, levels
FOREGROUND_LEVELS = 48  # a pixel this far (max over channels) from the background is the shape's
# What an image must show to be read as a shape. Calibrated on drawn images (worst case first),
# the quickstart's samples after 1,200 steps (worst case second, ODE and SDE, 200 images) and
# noise (uniform and Gaussian), which must fail (`reading`).
BACKGROUND_LEVELS = 24  # a border pixel this close to the border's median is background...
PLAIN_BORDER = 0.2  # ...and at least this fraction of the border is (1.0, 0.25; noise <= 0.17)
# The shape lies inside the image (drawn ones keep 2 px from its edges)...
MIN_AREA = 0.025  # ...covers at least this fraction of it (0.069, 0.037; noise specks less)
MAX_AREA = 0.5  # ...and at most this (0.37, 0.45; no shape fills the image, uniform noise's 0.94)
COLOUR_LEVELS = 110  # its median colour is this close to a palette colour (20, 108)
SOLID_LEVELS = 40  # a shape pixel this close to the median colour is of that colour...
SOLID = 0.15  # ...and at least this fraction of them are (0.82, 0.17; noise <= 0.08)
MIN_IOU = 0.35  # its mask overlaps its shape's template this much (0.89, 0.39)
TEMPLATE_SIZE = 24


def class_name(label: int) -> str:
    shape, colour = CLASSES[label]
    return f"{colour} {shape}"


def folder_name(label: int) -> str:
    """`3_yellow_cross`: sorted folder names give the labels 0..9 (one digit each)."""
    shape, colour = CLASSES[label]
    return f"{label}_{colour}_{shape}"


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def draw_shape(
    canvas: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, ...],
    background: tuple[int, ...],
) -> None:
    """`shape` of half-extent `r` centred at (cx, cy)."""
    if shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        canvas.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        canvas.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        canvas.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        canvas.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        h = 0.55 * r
        canvas.ellipse([cx - h, cy - h, cx + h, cy + h], fill=background)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def draw(label: int, index: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Image `index` of class `label`: (size, size, 3) uint8, a function of (seed, label, index)."""
    rng = np.random.default_rng([seed, label, index])
    shape, colour = CLASSES[label]
    grey = int(rng.integers(20, 80))
    background = (grey, grey, grey)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    fill = tuple(int(c) for c in np.clip(np.array(PALETTE[colour]) + jitter, 0, 255))
    radius = rng.uniform(0.19, 0.34) * size
    cx, cy = rng.uniform(radius + 2, size - radius - 2, 2)
    scale = SUPERSAMPLE
    image = Image.new("RGB", (size * scale, size * scale), background)
    draw_shape(
        ImageDraw.Draw(image), shape, cx * scale, cy * scale, radius * scale, fill, background
    )
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def write_dataset(root: str, per_class: int, size: int = 64, seed: int = 0) -> int:
    """An ImageFolder tree `root/{label}_{colour}_{shape}/{index:05d}.png`; returns the count.

    Existing files are kept (they hold the same bytes), so a re-run only adds what is missing."""
    for label in range(NUM_CLASSES):
        folder = os.path.join(root, folder_name(label))
        os.makedirs(folder, exist_ok=True)
        for index in range(per_class):
            path = os.path.join(folder, f"{index:05d}.png")
            if not os.path.exists(path):
                image = Image.fromarray(draw(label, index, size, seed))
                atomic_write(path, functools.partial(image.save, format="PNG"), durable=False)
    return NUM_CLASSES * per_class


def toy_captions(label: int, index: int) -> list[str]:
    """Captions of image `index` of class `label`: one to three phrasings of its colour and
    shape, as COCO gives several per image (their number varies)."""
    shape, colour = CLASSES[label]
    phrasings = [f"a {colour} {shape}", f"A {shape} that is {colour}.", f"{colour} {shape} on grey"]
    return phrasings[: 1 + (label + index) % 3]


def write_caption_dataset(
    root: str, per_class: int, size: int = 64, seed: int = 0
) -> tuple[str, str]:
    """The toy shapes in MS-COCO's layout, for the text-to-image path: `root/images/` holding
    `{label}_{index:05d}.png` and `root/captions.json` (COCO's captions format, `toy_captions`).
    Returns (image folder, captions file), the `--source` and `--captions` of prepare.py."""
    images_dir = os.path.join(root, "images")
    entries: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    os.makedirs(images_dir, exist_ok=True)
    for label in range(NUM_CLASSES):
        for index in range(per_class):
            name, image_id = f"{label}_{index:05d}.png", len(entries)
            path = os.path.join(images_dir, name)
            if not os.path.exists(path):
                image = Image.fromarray(draw(label, index, size, seed))
                atomic_write(path, functools.partial(image.save, format="PNG"), durable=False)
            entries.append({"id": image_id, "file_name": name})
            for caption in toy_captions(label, index):
                annotations.append(
                    {"id": len(annotations), "image_id": image_id, "caption": caption}
                )
    captions_file = os.path.join(root, "captions.json")
    coco = json.dumps({"images": entries, "annotations": annotations})

    def write(tmp: str) -> None:
        Path(tmp).write_text(coco)

    atomic_write(captions_file, write, durable=False)
    return images_dir, captions_file


# --------------------------------------------------------------------------------------------
# Reading an image's class back
# --------------------------------------------------------------------------------------------


def _box_resize(mask: np.ndarray) -> np.ndarray:
    """A (h, w) bool mask cropped to its bounding box and resized to (T, T) floats in [0, 1]."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255)
    resized = image.resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255


@functools.cache
def _templates() -> np.ndarray:
    """(5, T, T): each shape's mask, drawn large and scaled to its bounding box."""
    size, out = 256, []
    for shape in SHAPES:
        image = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(image), shape, size / 2, size / 2, size / 3, (255,), (0,))
        out.append(_box_resize(np.asarray(image) > 127))
    return np.stack(out)


def measure(image: np.ndarray) -> tuple[str | None, str | None]:
    """(shape, colour) that a (H, W, 3) uint8 image shows; (None, None) if it shows no shape:
    no plain background, no blob, or a blob that is not one solid palette colour in one of
    the five shapes (see `reading`)."""
    read = reading(image)
    return (read["shape"], read["colour"]) if read["recognised"] else (None, None)


def reading(image: np.ndarray) -> dict[str, Any]:
    """What `measure` looks at, and whether the image passes each test: its nearest shape and
    colour, and `recognised`. The tests are calibrated so that freshly drawn images pass all
    of them (`tests/test_end_to_end.py`) and that uniform or Gaussian noise, constant images
    and images without a plain background fail, so that noise scores 0, below chance."""
    pixels = image.astype(np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    plain = float((np.abs(border - background).max(-1) <= BACKGROUND_LEVELS).mean())
    blobs, count = ndimage.label(np.abs(pixels - background).max(axis=-1) > FOREGROUND_LEVELS)
    read: dict[str, Any] = {"shape": None, "colour": None, "recognised": False, "plain": plain}
    if count == 0:
        return read
    mask = blobs == 1 + int(np.bincount(blobs.ravel())[1:].argmax())  # the largest blob
    rgb = np.median(pixels[mask], axis=0)
    off = {c: float(np.abs(rgb - np.array(PALETTE[c])).max()) for c in PALETTE}  # worst channel
    colour = min(off, key=off.__getitem__)
    box_mask = _box_resize(mask)
    templates = _templates()
    iou = np.minimum(templates, box_mask).sum((1, 2)) / np.maximum(templates, box_mask).sum((1, 2))
    read.update(
        shape=SHAPES[int(iou.argmax())],
        colour=colour,
        area=float(mask.mean()),
        inside=not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()),
        colour_off=off[colour],
        solid=float((np.abs(pixels[mask] - rgb).max(-1) <= SOLID_LEVELS).mean()),
        iou=float(iou.max()),
    )
    read["recognised"] = (
        plain >= PLAIN_BORDER
        and read["inside"]
        and MIN_AREA <= read["area"] <= MAX_AREA
        and read["colour_off"] <= COLOUR_LEVELS
        and read["solid"] >= SOLID
        and read["iou"] >= MIN_IOU
    )
    return read


def agreement(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How often (N, H, W, 3) uint8 images show their labels' shape, colour and both (= class),
    overall and per class (keyed by the class's folder name); chance is 0.2, 0.2 and 0.1. An
    image that shows no shape counts as wrong on all three; `no_shape` is how many do, and
    `recognised` says which."""
    seen = [measure(image) for image in images]
    recognised = [shape is not None for shape, _ in seen]
    shape_ok = np.array([s == CLASSES[y][0] for (s, _), y in zip(seen, labels, strict=True)])
    colour_ok = np.array([c == CLASSES[y][1] for (_, c), y in zip(seen, labels, strict=True)])
    class_ok = shape_ok & colour_ok
    per_class = {folder_name(k): float(class_ok[labels == k].mean()) if (labels == k).any()
                 else None for k in range(NUM_CLASSES)}  # fmt: skip
    return {
        "class": float(class_ok.mean()),
        "shape": float(shape_ok.mean()),
        "colour": float(colour_ok.mean()),
        "no_shape": 1 - float(np.mean(recognised)),
        "per_class": per_class,
        "correct": class_ok.tolist(),
        "recognised": recognised,
    }

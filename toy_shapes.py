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
scaled to its bounding box, matched to the nearest shape template (soft IoU). On freshly drawn
images it reads every class right (`tests/test_end_to_end.py` checks this), so the agreement of
generated images with their labels measures the generator, not the measurement.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from utils import atomic_write

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
MIN_AREA = 0.005  # blobs smaller than this fraction of the image are no shape
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
    """(shape, colour) that a (H, W, 3) uint8 image shows; (None, None) if it shows no blob."""
    pixels = image.astype(np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(pixels - np.median(border, axis=0)).max(axis=-1)  # (H, W)
    blobs, count = ndimage.label(distance > FOREGROUND_LEVELS)
    if count == 0:
        return None, None
    areas = np.bincount(blobs.ravel())[1:]
    mask = blobs == 1 + int(areas.argmax())
    if mask.sum() < MIN_AREA * mask.size:
        return None, None
    rgb = np.median(pixels[mask], axis=0)
    colour = min(PALETTE, key=lambda c: float(np.sum((rgb - np.array(PALETTE[c])) ** 2)))
    box_mask = _box_resize(mask)
    templates = _templates()
    iou = np.minimum(templates, box_mask).sum((1, 2)) / np.maximum(templates, box_mask).sum((1, 2))
    return SHAPES[int(iou.argmax())], colour


def agreement(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How often (N, H, W, 3) uint8 images show their labels' shape, colour and both (= class),
    overall and per class (keyed by the class's folder name); chance is 0.2, 0.2 and 0.1."""
    seen = [measure(image) for image in images]
    shape_ok = np.array([s == CLASSES[y][0] for (s, _), y in zip(seen, labels, strict=True)])
    colour_ok = np.array([c == CLASSES[y][1] for (_, c), y in zip(seen, labels, strict=True)])
    class_ok = shape_ok & colour_ok
    per_class = {folder_name(k): float(class_ok[labels == k].mean()) if (labels == k).any()
                 else None for k in range(NUM_CLASSES)}  # fmt: skip
    return {
        "class": float(class_ok.mean()),
        "shape": float(shape_ok.mean()),
        "colour": float(colour_ok.mean()),
        "per_class": per_class,
        "correct": class_ok.tolist(),
    }

"""Read uint8 image arrays from `.npz` / `.npy` files in batches, without loading them whole.

A 50K × 256² × 3 sample file is 9.8 GB. `np.savez` stores its members uncompressed, so such a member
is memory-mapped where it lies inside the zip; members of `np.savez_compressed` files cannot be
mapped and are decompressed as a stream instead. Either way the images come out in file order.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from evaluations.commands import InputError

# What numpy and zipfile raise on a truncated or corrupt file.
CORRUPT_FILE_ERRORS = (ValueError, EOFError, struct.error, zipfile.BadZipFile, zlib.error)

# A zip local file header is 30 bytes; the member's data follows its name and extra field, whose
# lengths are the last two fields. (The central directory's extra field may differ, so read these.)
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"

_FIX_FLOAT = "np.clip(np.rint(127.5 * x + 128), 0, 255).astype(np.uint8) for x in [-1, 1]"


@dataclass
class ImageArray:
    """A uint8 (N, H, W, 3) image array read front to back in batches, once."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    memory_mapped: bool  # False: the member is compressed and decompressed as a stream
    _read_next: Callable[[int], np.ndarray]  # the next `count` images, in file order

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield writable (B, H, W, 3) uint8 copies; the first is checked for a sane pixel range."""
        if batch_size < 1:
            raise InputError(f"batch size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            batch = self._read_next(min(batch_size, len(self) - start))
            if start == 0:
                _check_pixel_range(batch, self.path)
            yield batch


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Report what numpy or zipfile raise on a truncated or corrupt `path` as one InputError."""
    try:
        yield
    except InputError:
        raise
    except CORRUPT_FILE_ERRORS as err:
        raise InputError(
            f"{path} is not a readable .npz or .npy file ({err}); it is truncated, corrupt or "
            "of another format: write it again"
        ) from err


@contextmanager
def open_image_array(path: str | Path, key: str = "arr_0") -> Iterator[ImageArray]:
    """Open `key` of an `.npz` (or a plain `.npy` file), checked to hold uint8 N×H×W×3 pixels."""
    path = str(path)
    with ExitStack() as stack:
        npy = path.endswith(".npy")
        with reading(path):
            array = _open_npy(path) if npy else _open_npz_member(path, key, stack)
        _check_layout(array)
        yield array


def _open_npy(path: str) -> ImageArray:
    mapped = np.load(path, mmap_mode="r")
    return _mapped_image_array(path, mapped)


def _mapped_image_array(path: str, mapped: np.ndarray) -> ImageArray:
    position = 0

    def read_next(count: int) -> np.ndarray:
        nonlocal position
        batch = np.array(mapped[position : position + count])  # copy out of the map: writable
        position += count
        return batch

    return ImageArray(path, tuple(mapped.shape), mapped.dtype, True, read_next)


def _open_npz_member(path: str, key: str, stack: ExitStack) -> ImageArray:
    archive = stack.enter_context(zipfile.ZipFile(path))
    name = f"{key}.npy"
    if name not in archive.namelist():
        keys = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise InputError(
            f"{path} has no array {key!r} (it holds {keys}); write images with "
            f"np.savez(path, {key}=images)"
        )
    info = archive.getinfo(name)
    if info.compress_type == zipfile.ZIP_STORED:
        return _map_stored_member(path, info)
    return _stream_member(path, stack.enter_context(archive.open(info)))


def _map_stored_member(path: str, info: zipfile.ZipInfo) -> ImageArray:
    """Memory-map an uncompressed member in place: its bytes are a plain `.npy` file."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        magic, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
        if magic != _ZIP_LOCAL_MAGIC:
            raise InputError(f"{path}: corrupt zip (no local header for {info.filename})")
        f.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len)
        shape, fortran_order, dtype = _read_npy_header(f, path)
        offset = f.tell()
    order: Literal["C", "F"] = "F" if fortran_order else "C"
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    return _mapped_image_array(path, mapped)


def _stream_member(path: str, stream: IO[bytes]) -> ImageArray:
    """Decompress a compressed member front to back, `count` images at a time."""
    shape, fortran_order, dtype = _read_npy_header(stream, path)
    if fortran_order:
        raise InputError(
            f"{path}: a compressed Fortran-ordered array cannot be read in batches; "
            "save it with np.savez(path, arr_0=np.ascontiguousarray(images))"
        )
    image_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def read_next(count: int) -> np.ndarray:
        with reading(path):  # a bad CRC or a broken deflate stream shows only now
            data = _read_exactly(stream, count * image_bytes, path)
        return np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:]).copy()

    return ImageArray(path, tuple(shape), dtype, False, read_next)


def _read_npy_header(f: IO[bytes], path: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise InputError(f"{path}: unsupported .npy format version {version}; re-save with np.savez")


def _read_exactly(stream: IO[bytes], size: int, path: str) -> bytes:
    # A zip stream may return fewer bytes than asked for; keep reading until done or at the end.
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            raise InputError(f"{path}: file ends early (truncated or still being written?)")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _check_layout(array: ImageArray) -> None:
    """Shape and dtype, from the header alone (plus a peek at the values to explain a bad dtype)."""
    shape, path = array.shape, array.path
    if len(shape) == 4 and shape[1] == 3 and shape[-1] != 3:
        raise InputError(
            f"{path}: images are N×3×H×W {shape}, but the evaluator needs N×H×W×3 "
            "(NHWC); convert with images.transpose(0, 2, 3, 1)"
        )
    if len(shape) != 4 or shape[-1] != 3:
        raise InputError(
            f"{path}: expected RGB images of shape N×H×W×3, got {shape} "
            "(grayscale images must be repeated to three channels)"
        )
    if shape[0] == 0:
        raise InputError(f"{path}: the array holds no images")
    if array.dtype != np.uint8:
        peek = array._read_next(min(len(array), 16))
        raise InputError(
            f"{path}: images have dtype {array.dtype} with values in "
            f"[{peek.min():.3g}, {peek.max():.3g}], but the evaluator needs uint8 "
            f"pixels in [0, 255] as ADM's does; convert with e.g. {_FIX_FLOAT}"
        )


def _check_pixel_range(batch: np.ndarray, path: str) -> None:
    # uint8 cannot leave [0, 255], but images in [0, 1] cast to uint8 pass every other check.
    if batch.max() <= 1:
        raise InputError(
            f"{path}: the first {len(batch)} images hold only the values 0 and 1; "
            "were images in [0, 1] cast to uint8? Scale them to [0, 255] first"
        )

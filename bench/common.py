"""What the benchmarks share: the machine's description, timing, host-sync counting, peak
memory, MFU, and random-weight stand-ins of the frozen encoders.

Timing follows the usual rules for asynchronous devices: warm up first, synchronise before each
reading of the host clock, repeat, report the median and the spread. Host synchronisations are
counted with `torch.cuda.set_sync_debug_mode("warn")`, which makes every operation that waits
for the GPU (`.item()`, `float(t)`, a copy to pageable memory, `nonzero`, ...) issue a warning;
the warnings are caught and counted. On a CPU there is no such thing to count.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from urepa.encoders import STANDINS, RepresentationEncoder, build_vit, load_encoder

CUDA_ONLY = "n/a (CUDA only)"
SYNC_WARNING = "synchronizing CUDA operation"  # the text of set_sync_debug_mode's warning


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device) -> dict[str, Any]:
    """Software and hardware of this run, printed with every benchmark."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_count"] = torch.cuda.device_count()
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of one call of `fn` (after one warm-up call), each call timed alone."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class SyncCount:
    """The number of host synchronisations seen inside `count_syncs` (None on a CPU)."""

    value: int | None = None


@contextmanager
def count_syncs(device: torch.device) -> Iterator[SyncCount]:
    """Count the operations that make the host wait for the GPU inside the block.

    Do not synchronise inside the block yourself: `torch.cuda.synchronize()` counts too."""
    count = SyncCount()
    if device.type != "cuda":
        yield count
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode("default")
    count.value = sum(SYNC_WARNING in str(w.message) for w in caught)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset, GiB (None on a CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def mfu(flops_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, or None when the peak is unknown."""
    return None if peak is None else flops_per_second / peak


def fmt(value: Any, digits: int = 4) -> str:
    """A figure for the report: numbers to `digits` significant digits, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def report(title: str, rows: dict[str, Any]) -> None:
    """Print a block of `name  value` lines under a title."""
    print(f"\n== {title} ==")
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value if isinstance(value, str) else fmt(value)}")


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nwrote {path}")


def random_encoder(name: str, resolution: int, device: torch.device) -> RepresentationEncoder:
    """A frozen encoder of `name`'s architecture with random weights: its speed is the real one's,
    and nothing is downloaded. The test stand-ins come from `encoders.load_encoder` itself."""
    if name in STANDINS:
        return load_encoder(name, resolution, device=device)
    return RepresentationEncoder(build_vit(name, resolution), name, resolution).to(device)


def pinned(tree: Any, device: torch.device) -> Any:
    """Tensors of a batch (dict / list) in page-locked memory when the device is a GPU."""
    if device.type != "cuda":
        return tree
    if isinstance(tree, Tensor):
        return tree.pin_memory()
    if isinstance(tree, dict):
        return {k: pinned(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [pinned(v, device) for v in tree]
    return tree

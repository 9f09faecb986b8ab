"""What a training run reports: the text log (stdout and log.txt on the main process), one JSON
line of metrics per log interval (metrics.jsonl), interval means gathered without host syncs,
the model FLOP utilisation (MFU), and preview grids for the trackers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor

from urepa.utils import atomic_write

LOGGER_NAME = "u-repa.train"


def create_logger(is_main: bool) -> logging.Logger:
    """Main process: INFO to stdout (and a file, `add_log_file`). Others: warnings to stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    close_logger(logger)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    add_handler(logger, logging.StreamHandler(sys.stdout if is_main else sys.stderr))
    return logger


def add_log_file(logger: logging.Logger, path: str) -> None:
    add_handler(logger, logging.FileHandler(path))


def add_handler(logger: logging.Logger, handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Add one row to a JSON-lines log (metrics.jsonl, eval.jsonl) in a single write. A row cut
    short by a kill stays one damaged line, which readers skip and a resume repairs: the next
    row starts a line of its own instead of continuing it."""
    line = json.dumps(record) + "\n"
    with open(path, "a+b") as f:  # (appends always go to the end, whatever the read position)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())


def keep_metrics_until(path: str, step: int) -> int:
    """Drop the rows of steps after `step` from a metrics.jsonl, and damaged lines (a row cut
    short by a kill, garbage): a run resumed from the checkpoint of `step` logs those steps
    again, so that every step keeps one row. Rewritten atomically, and only if a line goes;
    returns how many went."""
    return rewrite_jsonl(path, lambda row: row is not None and row["step"] <= step)


def repair_jsonl(path: str) -> list[int]:
    """Rewrite a JSON-lines log (eval.jsonl, metrics.jsonl) without its damaged lines,
    atomically, if it has any; returns their numbers (from 1)."""
    damaged = read_jsonl(path)[1]
    rewrite_jsonl(path, lambda row: row is not None)
    return damaged


def rewrite_jsonl(path: str, keep: Callable[[dict[str, Any] | None], bool]) -> int:
    """Keep the lines of a JSON-lines log whose row (None: damaged) `keep` accepts, rewriting
    the file atomically if a line goes; returns how many went."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if keep(log_row(line))]
    if len(kept) < len(lines):

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(kept)

        atomic_write(path, write)
    return len(lines) - len(kept)


def read_jsonl(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a JSON-lines log and the numbers (from 1) of its damaged lines, which are
    skipped. A missing file has no rows."""
    if not os.path.exists(path):
        return [], []
    rows, damaged = [], []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            row = log_row(line)
            if row is not None:
                rows.append(row)
            elif line.strip():  # a blank line is no row, and no damage either
                damaged.append(number)
    return rows, damaged


def log_row(line: str) -> dict[str, Any] | None:
    """A line of metrics.jsonl or eval.jsonl as its row; None if it is damaged: cut short (no
    newline: a kill, a full disk), not JSON, or not an object with an integer step."""
    try:
        row = json.loads(line) if line.endswith("\n") else None
    except json.JSONDecodeError:
        return None
    valid = isinstance(row, dict) and type(row.get("step")) is int
    return row if valid else None


def damaged_lines_note(path: str, damaged: list[int]) -> str:
    """The report of a log's damaged lines: "PATH: skipped 2 damaged lines (3, 9) ..."."""
    shown = ", ".join(map(str, damaged[:10])) + (", ..." if len(damaged) > 10 else "")
    return f"{path}: skipped {len(damaged)} damaged line(s) ({shown}): not a complete JSON row"


def format_metrics(step: int, metrics: dict[str, float]) -> str:
    """One log line: `step 1000 | total 0.5123 | velocity 0.4012 | ...`."""
    parts = [f"step {step}"]
    for name, value in metrics.items():
        if isinstance(value, float) and not value.is_integer():
            parts.append(f"{name} {value:.4g}")
        else:
            parts.append(f"{name} {value}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 125 -> "2m05s", 42.4 -> "42s"."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def time_remaining(step: int, sec_per_step: float, max_steps: int, checkpoint_every: int) -> str:
    """The time left at `sec_per_step`: "eta 1h02m to step 400000, 5m10s to the next
    checkpoint"."""
    next_checkpoint = min((step // checkpoint_every + 1) * checkpoint_every, max_steps)
    to_end = format_duration((max_steps - step) * sec_per_step)
    to_checkpoint = format_duration((next_checkpoint - step) * sec_per_step)
    return f"eta {to_end} to step {max_steps}, {to_checkpoint} to the next checkpoint"


class StepRate:
    """Seconds per step over the last `window` seconds of training, for the time left: one log
    interval's rate swings with the load of a shared machine (a 2-core CPU shared with other
    jobs gave 0.5 to 15 s per step within minutes), the mean over a window does not.

    `add(seconds, step)` records that training reached `step` after `seconds` of training
    time; the rate is taken from the oldest point that keeps the window full to the newest."""

    def __init__(self, window: float = 600.0) -> None:
        self.window = window
        self.points: deque[tuple[float, int]] = deque()

    def add(self, seconds: float, step: int) -> None:
        self.points.append((seconds, step))
        while len(self.points) > 2 and seconds - self.points[1][0] >= self.window:
            self.points.popleft()

    @property
    def span(self) -> float:
        """Seconds the rate is measured over."""
        return self.points[-1][0] - self.points[0][0]

    @property
    def sec_per_step(self) -> float:
        (_, first), (_, last) = self.points[0], self.points[-1]
        return self.span / max(1, last - first)

    def describe(self) -> str:
        """ "at 0.52 s/step (mean of the last 10m00s)": the rate the time left assumes."""
        return f"at {self.sec_per_step:.3g} s/step (mean of the last {format_duration(self.span)})"


class MetricMeans:
    """Sums 0-dim device tensors step by step without reading them (no host sync); `pop`
    averages them over the interval and over processes with one collective and one read."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def pop(self, mean_over_processes: Callable[[Tensor], Tensor]) -> dict[str, float]:
        if not self.count:
            return {}
        names = list(self.sums)  # the same order on every process
        totals = mean_over_processes(torch.stack([self.sums[n] for n in names])).tolist()
        means = {n: total / self.count for n, total in zip(names, totals, strict=True)}
        self.sums, self.count = {}, 0
        return means


# Dense bf16/fp16 tensor-core peak per GPU (TFLOP/s), for the MFU estimate; --peak-tflops
# overrides. TF32 runs at half of it; plain fp32 is not estimated.
# Dense bf16/fp16 tensor-core peaks of NVIDIA's data sheets, matched in this order against the
# device name: the PCIe and NVL H100s are clocked lower than the SXM one.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # fmt: skip


def gpu_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name, or None when unknown."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def peak_flops(
    device: torch.device, mixed_precision: str, allow_tf32: bool, override_tflops: float | None
) -> float | None:
    """Peak FLOP/s of one device for the MFU estimate, or None when unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = gpu_peak_tflops(torch.cuda.get_device_name(device))
    if tflops is None or (mixed_precision == "no" and not allow_tf32):
        return None
    return tflops * 1e12 / (2 if mixed_precision == "no" else 1)


def grid_image(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> one (rows·H, cols·W, 3) uint8 grid, near-square."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    grid[:n] = pixels
    grid = grid.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return grid.numpy()


def track_image(acc: Accelerator, grid: Any, step: int) -> None:
    """Send a preview grid (H, W, 3) uint8 to the tracker, if any."""
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            tracker.log_images({"preview": [grid]}, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({"preview": grid[None]}, step=step, dataformats="NHWC")

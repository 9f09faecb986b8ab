"""The analysis's figures, drawn from its flat records (matplotlib, no display needed).

* per_layer.png: probe top-1 and CKNNA per block at each t, for the last checkpoint (REPA Fig.
  2a-b, 3b); an encoder's own probe accuracy is a dashed line.
* per_timestep.png: the best block's probe top-1 and CKNNA per t (REPA Fig. 7), one line per
  checkpoint; drawn when there are several times.
* across_checkpoints.png: the best block's probe top-1 and CKNNA, the token cosine similarity
  and the manifold distance per training step (REPA Fig. 2c; U-REPA Fig. 3); drawn when there
  are several checkpoints.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

Record = dict[str, Any]
TITLES = {
    "probe_top1": "linear probing top-1",
    "cknna": "CKNNA (unbiased: may exceed 1 at small N)",
    "token_cos_sim": "token cosine similarity",
    "manifold_distance": "manifold distance",
}


def _label(record: Record, by: tuple[str, ...]) -> str:
    parts = []
    for key in by:
        value = record[key]
        if value is not None:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def series(
    records: list[Record], metric: str, x: str, by: tuple[str, ...]
) -> dict[str, tuple[list[float], list[float]]]:
    """{label: (xs, ys)} of `metric` against record key `x`, one line per value of the keys
    `by`; several records at one point (different blocks) give their maximum, as REPA plots the
    best block's value."""
    points: dict[str, dict[float, float]] = defaultdict(dict)
    for r in records:
        if r["metric"] != metric or r[x] is None:
            continue
        line = points[_label(r, by)]
        line[r[x]] = max(line.get(r[x], float("-inf")), r["value"])
    return {label: (sorted(p), [p[k] for k in sorted(p)]) for label, p in points.items()}


def _figure(
    panels: list[tuple[str, dict]], xlabel: str, path: str, refs: dict | None = None
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in sorted(lines.items()):
            ax.plot(xs, ys, marker="o", markersize=3, label=label or None)
        for label, value in (refs or {}).get(metric, {}).items():
            ax.axhline(value, linestyle="--", color="gray", linewidth=1)
            ax.annotate(label, (0.02, value), xycoords=("axes fraction", "data"), fontsize=7)
        ax.set_title(TITLES[metric], fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if any(lines):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _panels(
    records: list[Record], metrics: Iterable[str], x: str, by: tuple[str, ...]
) -> list[tuple[str, dict]]:
    """(metric, its lines against `x`) for each of `metrics` that the records hold."""
    panels = [(m, series(records, m, x, by)) for m in metrics]
    return [(m, lines) for m, lines in panels if lines]


def write_plots(records: list[Record], out_dir: str) -> list[str]:
    """Draw the figures that the records support into out_dir; returns their paths."""
    written = []
    steps = sorted({r["step"] for r in records})
    times = sorted({r["t"] for r in records if r["t"] is not None})
    last = [r for r in records if r["step"] == steps[-1]] if steps else []
    refs = {"probe_top1": {f"{r['encoder']}": r["value"] for r in records
                           if r["metric"] == "probe_top1" and r["encoder"]}}  # fmt: skip
    probe_and_cknna = ("probe_top1", "cknna")
    panels = _panels(last, probe_and_cknna, "layer", ("t", "encoder"))
    if panels:
        path = os.path.join(out_dir, "per_layer.png")
        written.append(_figure(panels, f"block (step {steps[-1]})", path, refs))
    panels = _panels(records, probe_and_cknna, "t", ("step", "encoder"))
    if len(times) > 1 and panels:
        path = os.path.join(out_dir, "per_timestep.png")
        written.append(_figure(panels, "t (1 = noise)", path))
    if len(steps) > 1:
        panels = _panels(records, TITLES, "step", ("t", "encoder"))
        path = os.path.join(out_dir, "across_checkpoints.png")
        written.append(_figure(panels, "training step", path))
    return written

"""Convergence curves and paper tables from evaluation results.

    python curves.py exps/sitdown-xl2-urepa exps/sit-xl2-repa --out fid.png
    python curves.py exps/sitdown-xl2-urepa --metric fd_dinov2 --out fd-dinov2.png
    python curves.py --table 8 --out table8.md

Curves (U-REPA Fig. 1's form): a metric of `train.py --eval-every`'s `eval.jsonl` (fid, sfid,
inception_score, precision, recall, fd_dinov2) against training steps, images seen and GPU-hours,
one line per run, on one figure. These are FID-10K (or whatever --eval-samples was) curves: their
values are not comparable with papers' FID-50K.

Tables: the rows of a U-REPA table with the paper's FID beside ours. Ours is the evaluator's
50K-sample result that the table scripts write (RESULTS/EXP-STEP-SAMPLER.json), else the online
evaluation of that run at that step with the same sampler (marked FID-10K, not comparable), else
blank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NamedTuple

from urepa.cli import DefaultsHelpFormatter, run_main
from urepa.run_log import damaged_lines_note, read_jsonl
from urepa.settings import EVAL_FILE, EVAL_PRESETS, SAMPLING_DEFAULTS
from urepa.utils import InputError


class PaperRow(NamedTuple):
    setting: str
    exp: str  # the run directory name the table script uses
    step: int
    sampler: str  # nocfg (SDE 250, cfg 1), paper-main or ablation
    fid: float  # the paper's FID-50K


def _ablations(rows: list[tuple[str, str, float]]) -> list[PaperRow]:
    """100K-step SiT↓-XL/2 ablations, sampled with the ablation preset."""
    return [PaperRow(setting, exp, 100_000, "ablation", fid) for setting, exp, fid in rows]


DEFAULT = "sitdown-xl2-urepa"  # every ablation table's default row is this run at 100K
# U-REPA's tables (the numbers of SPEC.md §8 and of the table scripts' headers).
PAPER_TABLES: dict[str, list[PaperRow]] = {
    "3": [
        PaperRow("SiT↓-B/2 + U-REPA, 400K", "sitdown-b2-urepa", 400_000, "nocfg", 15.3),
        PaperRow("SiT↓-L/2 + U-REPA, 400K", "sitdown-l2-urepa", 400_000, "nocfg", 5.8),
        PaperRow("SiT↓-XL/2 + U-REPA, 400K", DEFAULT, 400_000, "nocfg", 5.4),
        PaperRow("SiT-B/2 + REPA, 400K", "sit-b2-repa", 400_000, "nocfg", 24.4),
        PaperRow("SiT-L/2 + REPA, 700K", "sit-l2-repa", 700_000, "nocfg", 8.4),
        PaperRow("SiT-XL/2 + REPA, 4M", "sit-xl2-repa", 4_000_000, "nocfg", 5.9),
    ],
    "4": [
        PaperRow("SiT↓-XL/2 + U-REPA, 200 epochs", DEFAULT, 1_000_800, "paper-main", 1.48),
        PaperRow("SiT↓-XL/2 + U-REPA, 400 epochs", DEFAULT, 2_001_600, "paper-main", 1.41),
    ],
    "5": _ablations(
        [
            (f"tap after block {block}", f"ablation-w0-layer{block}", fid)
            for block, fid in [
                (4, 9.42),
                (8, 9.35),
                (12, 6.73),
                (16, 6.43),
                (18, 6.25),
                (20, 6.36),
                (24, 6.77),
                (28, 8.40),
                (32, 13.10),
            ]
        ]
    ),  # fmt: skip
    "6": _ablations(
        [("upsample (default)", DEFAULT, 5.72), ("pool", "ablation-align-pool", 5.99)]
    ),  # fmt: skip
    "7": _ablations(
        [
            ("after the MLP (default)", DEFAULT, 5.72),
            ("before", "ablation-upsample-before", 5.84),
            ("within (pixel shuffle)", "ablation-upsample-within", 6.36),
        ]
    ),  # fmt: skip
    "8": _ablations(
        [
            ("w = 0", "ablation-w0-layer18", 6.25),
            ("w = 2", "ablation-w2", 5.81),
            ("w = 3 (default)", DEFAULT, 5.72),
            ("w = 4", "ablation-w4", 5.79),
        ]
    ),  # fmt: skip
    "9": _ablations(
        [("ordinary MLP (default)", DEFAULT, 5.72), ("time-aware", "ablation-time-aware", 5.63)]
    ),  # fmt: skip
    "10": _ablations(
        [
            ("constant (default)", DEFAULT, 5.72),
            ("rise", "ablation-lambda-rise", 5.85),
            ("fall", "ablation-lambda-fall", 5.72),
            ("dip", "ablation-lambda-dip", 5.58),
        ]
    ),  # fmt: skip
}
# The x axes of the curves: eval.jsonl field -> axis label.
AXES = {"step": "training steps", "images_seen": "images seen", "gpu_hours": "GPU-hours"}
SETTINGS = ("preset", "sampler_steps", "num_samples")  # what a row's numbers depend on


def read_eval_rows(run: str) -> list[dict[str, Any]]:
    """The rows of a run directory's eval.jsonl (or of that file named directly)."""
    path = os.path.join(run, EVAL_FILE) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise InputError(
            f"{run}: no {EVAL_FILE} there; give a run directory of train.py --eval-every N "
            f"(or its {EVAL_FILE})"
        )
    rows, damaged = read_jsonl(path)
    if damaged and path not in REPORTED:  # each file's damage is told once
        REPORTED.add(path)
        print(f"curves.py: warning: {damaged_lines_note(path, damaged)}", file=sys.stderr)
    if not rows:
        raise InputError(f"{path} holds no readable evaluation")
    return sorted(rows, key=lambda row: row["step"])


REPORTED: set[str] = set()  # the eval.jsonl files whose damaged lines were reported


def run_label(run: str) -> str:
    return os.path.basename(os.path.normpath(run if os.path.isdir(run) else os.path.dirname(run)))


def load_runs(runs: list[str], metric: str) -> dict[str, list[dict[str, Any]]]:
    """Each run's evaluations that hold `metric` (FD-DINOv2 may have been turned on at a
    resume: the rows before have none); a run with no such row is an error."""
    data = {}
    for run in runs:
        rows = read_eval_rows(run)
        data[run] = [row for row in rows if metric in row]
        if not data[run]:
            keys = sorted(k for k, v in rows[-1].items() if isinstance(v, float))
            raise InputError(f"{run}: no {metric!r} in its evaluations; it has {keys}")
    return data


def by_settings(run: str, rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """A run's rows split by evaluation settings (one line each), named by the run, and by the
    settings too when it has several (--eval-preset or --eval-samples changed on a resume)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in SETTINGS), []).append(row)
    if len(groups) == 1:
        return [(run_label(run), rows)]
    return [
        (f"{run_label(run)} ({', '.join(map(str, key))})", part) for key, part in groups.items()
    ]


def curve_figure(data: dict[str, list[dict[str, Any]]], metric: str) -> Any:
    """One matplotlib figure: `metric` against each of AXES, a line per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    counts = sorted({row["num_samples"] for rows in data.values() for row in rows})
    series = [line for run, rows in data.items() for line in by_settings(run, rows)]
    fig, axes = plt.subplots(1, len(AXES), figsize=(5 * len(AXES), 4), sharey=True)
    for ax, (key, label) in zip(axes, AXES.items(), strict=True):
        for name, rows in series:
            ax.plot([r[key] for r in rows], [r[metric] for r in rows], "o-", label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    samples = ", ".join(f"{n // 1000}K" if n % 1000 == 0 else str(n) for n in counts)
    axes[0].set_ylabel(f"{metric} ({samples} samples)")
    axes[0].legend()
    fig.suptitle(f"{metric} over training ({samples} samples per evaluation: not comparable "
                 "with 50K-sample numbers)")  # fmt: skip
    fig.tight_layout()
    return fig


def our_fid(row: PaperRow, results: str, exps: str) -> tuple[float | None, str]:
    """(FID, where it came from) for a paper row: the 50K result file, else the run's online
    evaluation at that step with that sampler, else (None, '')."""
    path = os.path.join(results, f"{row.exp}-{row.step:07d}-{row.sampler}.json")
    if os.path.isfile(path):
        result = read_result(path)
        return result["fid"], f"FID-{result['num_samples'] // 1000}K, {path}"
    online = os.path.join(exps, row.exp, EVAL_FILE)
    preset = "no-guidance" if row.sampler == "nocfg" else row.sampler
    steps = {**SAMPLING_DEFAULTS, **EVAL_PRESETS[preset]}["num_steps"]
    if os.path.isfile(online):
        for ev in read_eval_rows(online):
            same_sampler = ev["preset"] == preset and ev["sampler_steps"] == steps
            if ev["step"] == row.step and same_sampler:
                return ev["fid"], f"FID-{ev['num_samples']} online, not comparable: {online}"
    return None, ""


def read_result(path: str) -> dict[str, Any]:
    """An evaluator result file (JSON with `fid` and `num_samples`), or a one-line error."""
    try:
        with open(path) as f:
            result = json.load(f)
        fid, count = result["fid"], result["num_samples"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(
            f"{path} is not an evaluator result (JSON with fid and num_samples: "
            f"{type(err).__name__}); evaluate the samples again or remove it"
        ) from None
    if not isinstance(fid, int | float) or not isinstance(count, int):
        raise InputError(f"{path}: fid {fid!r} and num_samples {count!r} are not numbers")
    return result


def check_table_sources(results: str, exps: str) -> None:
    """--results and --exps must be folders (a missing one holds nothing yet; not both): a
    table read from a file or from nothing would say "not run" on every row without a word."""
    for flag, folder in (("--results", results), ("--exps", exps)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError(
                f"{flag} {folder} is not a folder: give the folder of the "
                f"{'evaluator results' if flag == '--results' else 'run directories'}"
            )
    if not os.path.isdir(results) and not os.path.isdir(exps):
        raise InputError(
            f"neither --results {results} nor --exps {exps} is a folder: there is "
            "nothing to read the table from"
        )


def check_figure_format(out: str) -> None:
    """--out's extension must be a format matplotlib writes (png, pdf, svg, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(out)[1].lstrip(".").lower()
    if extension not in formats:
        raise InputError(
            f"--out {out}: a figure is written as {', '.join(sorted(formats))} "
            "(the file name's extension says which)"
        )


def paper_table(table: str, results: str, exps: str) -> str:
    """Markdown: the table's rows, the paper's FID and ours."""
    lines = [
        f"U-REPA Table {table}: paper FID-50K beside ours",
        "",
        "| setting | step | sampler | paper FID | our FID | ours from |",
        "|---|---|---|---|---|---|",
    ]
    for row in PAPER_TABLES[table]:
        fid, source = our_fid(row, results, exps)
        ours = f"{fid:.2f}" if fid is not None else "not run"
        lines.append(f"| {row.setting} | {row.step:,} | {row.sampler} | {row.fid:.2f} | {ours} | "
                     f"{source} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# fmt: off
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convergence curves and paper tables.", formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("runs", nargs="*",
                        help="run directories (or their eval.jsonl) to plot, one line each")
    parser.add_argument("--metric", default="fid",
                        help="eval.jsonl field: fid, sfid, inception_score, precision, recall, "
                             "fd_dinov2")
    parser.add_argument("--table", choices=sorted(PAPER_TABLES, key=int), default=None,
                        help="write this U-REPA table (markdown) instead of plotting")
    parser.add_argument("--results", default="results",
                        help="the evaluator's JSON files, as the table scripts name them")
    parser.add_argument("--exps", default="exps", help="run directories (online evaluations)")
    parser.add_argument("--out", required=True, help="figure (.png, .pdf) or table (.md)")
    args = parser.parse_args(argv)
    if (args.table is None) == (not args.runs):
        parser.error("give run directories to plot, or --table N (not both)")
    return args
# fmt: on


def main(args: argparse.Namespace) -> None:
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise InputError(f"--out {args.out}: the folder {folder} does not exist; create it first")
    if args.table is not None:
        check_table_sources(args.results, args.exps)
        with open(args.out, "w") as f:
            f.write(paper_table(args.table, args.results, args.exps))
    else:
        check_figure_format(args.out)
        fig = curve_figure(load_runs(args.runs, args.metric), args.metric)
        fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))

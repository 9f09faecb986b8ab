"""The headline figures of `bash bench/run_gpu.sh OUT quick` as one markdown table.

python -m bench.summary OUT        # reads OUT/quick-train.json, OUT/quick-train-sit.json and
                                   # OUT/quick-sample.json (a part that did not finish is
                                   # reported so), prints the table and writes
                                   # OUT/quick-summary.md
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench.common import fmt
from urepa.cli import run_main

NOT_RUN = "not run (no --repa-src / REPA_SRC)"


PARTS = ("quick-train", "quick-train-sit", "quick-sample")


def load(out: str, name: str) -> dict[str, Any] | None:
    """OUT/NAME.json, or None if the part did not finish (stopped at its time limit, failed)."""
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def training_rows(train: dict[str, Any], what: str) -> list[tuple[str, str]]:
    """The rows of one training part; `what` names it in each row (e.g. "SiT↓-XL/2")."""
    ours = train["configs"]["ours"]
    if "error" in ours:
        return [(f"{what}: training (ours)", f"failed: {ours['error']}")]
    rows = [
        ("training: model, batch, precision, compile",
         f"{ours['model']}, {ours['batch_per_device']} per GPU, {ours['precision']}, "
         f"compile {ours['compile']}"),
        ("training images/s (ours)", f"{fmt(ours['images_per_sec'])} (min "
         f"{fmt(ours['images_per_sec_min'])}, max {fmt(ours['images_per_sec_max'])})"),
        ("training MFU (ours)", percent(ours["mfu"])),
        ("peak memory", "n/a (CUDA only)" if ours["peak_mem_gib"] is None
         else f"{ours['peak_mem_gib']:.1f} GiB"),
        ("host syncs per step / per log", f"{fmt(ours['syncs_per_step'])} / "
         f"{fmt(ours['syncs_per_log'])}"),
        ("update share (AdamW step + EMA, alone)", f"{percent(ours['ema_opt_share'])} "
         f"({fmt(ours['adamw_step_ms'])} + {fmt(ours['ema_update_ms'])} ms of "
         f"{fmt(ours['step_ms'])} ms)"),
        ("compile check (compiled vs eager gradients)", ours.get("compile_check", "n/a")),
    ]  # fmt: skip
    repa = train["configs"].get("repa-actual")
    if repa is None:
        rows.append(("REPA's own step: images/s, ratio ours / REPA", NOT_RUN))
    elif "error" in repa:
        rows.append(("REPA's own step", f"failed: {repa['error']}"))
    else:
        ratio = train["ratios"]["ours/repa-actual"]
        rows.append((f"REPA's own step ({repa['model']}, {repa['precision']}, features "
                     "precomputed): images/s, MFU, ratio ours / REPA",
                     f"{fmt(repa['images_per_sec'])}, {percent(repa['mfu'])}, "
                     f"{ratio:.2f}x"))  # fmt: skip
    return [(f"{what}: {name}", value) for name, value in rows]


def sampling_rows(sample: dict[str, Any]) -> list[tuple[str, str]]:
    s = sample["sampling"]
    rows = [
        ("sampling: model, sampler, batch, precision, compile",
         f"{s['model']}, {s['mode']} {s['num_steps']} steps cfg {s['cfg_scale']} on "
         f"{s['guidance_interval']}, {s['batch_per_device']} per GPU, {s['precision']}, "
         f"compile {s['compile']}"),
        ("sampling samples/s (ours)", f"{fmt(s['samples_per_sec'])} "
         f"({fmt(s['minutes_for_50k_on_8'])} min for 50K on 8 GPUs, no decoding)"),
        ("sampling MFU (forward images actually run)", percent(s["mfu"])),
    ]  # fmt: skip
    repa = s.get("repa")
    if repa is None:
        rows.append(("REPA's own sampler: samples/s, ratio ours / REPA", NOT_RUN))
    else:
        rows.append((f"REPA's own sampler ({repa['precision']}, fused_attn "
                     f"{repa['fused_attn']}): samples/s, MFU, ratio ours / REPA",
                     f"{fmt(repa['samples_per_sec'])}, {percent(repa['mfu'])}, "
                     f"{s['ratio_to_repa']:.2f}x"))  # fmt: skip
    return rows


def summary_table(out: str) -> str:
    train, sit, sample = (load(out, name) for name in PARTS)
    first = next((part for part in (train, sit, sample) if part is not None), None)
    env = first["environment"] if first is not None else None
    rows = [("device", "n/a (no part finished)" if env is None else
             f"{env['device_name']} (torch {env['torch']}, CUDA {env['cuda']}; MFU against "
             "this GPU's own dense bf16 peak)")]  # fmt: skip
    parts = ((train, "quick-train", lambda r: training_rows(r, "SiT↓-XL/2 + U-REPA")),
             (sit, "quick-train-sit", lambda r: training_rows(r, "SiT-XL/2 + REPA recipe")),
             (sample, "quick-sample", sampling_rows))  # fmt: skip
    for result, name, rows_of in parts:
        if result is None:
            rows.append((name, f"not finished (stopped at its time limit or failed): see "
                               f"{os.path.join(out, name + '.txt')}"))  # fmt: skip
        else:
            rows += rows_of(result)
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the OUT folder of bench/run_gpu.sh")
    out = p.parse_args(argv).out
    table = summary_table(out)
    path = os.path.join(out, "quick-summary.md")
    with open(path, "w") as f:
        f.write(table + "\n")
    print(f"\n== quick summary ({path}) ==\n{table}")
    return table


if __name__ == "__main__":
    run_main(main)

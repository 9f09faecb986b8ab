"""The headline figures of `bash bench/run_gpu.sh OUT quick` as one markdown table.

python -m bench.summary OUT        # reads OUT/quick-train.json and OUT/quick-sample.json,
                                   # prints the table and writes OUT/quick-summary.md
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench.common import fmt
from cli import run_main
from utils import InputError

NOT_RUN = "not run (no --repa-src / REPA_SRC)"


def load(out: str, name: str) -> dict[str, Any]:
    path = os.path.join(out, f"{name}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: {err}; run `bash bench/run_gpu.sh {out} quick` first") from None


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def training_rows(train: dict[str, Any]) -> list[tuple[str, str]]:
    ours = train["configs"]["ours"]
    if "error" in ours:
        return [("training (ours)", f"failed: {ours['error']}")]
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
    return rows


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
    train, sample = load(out, "quick-train"), load(out, "quick-sample")
    env = train["environment"]
    rows = [("device", f"{env['device_name']} (torch {env['torch']}, CUDA {env['cuda']})")]
    rows += training_rows(train) + sampling_rows(sample)
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

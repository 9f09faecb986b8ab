"""bench/ on a CPU: each script runs on a tiny model in seconds and prints its figures.

Nothing here times anything or checks a speed: only that the figures and the configuration are
printed, that the forward passes are counted as the sampler runs them, and that the CPU-only
figures say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from accelerate.state import AcceleratorState

from bench import data_speed, sample_speed, train_speed
from frozen import ENCODER_STANDIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = '{"hidden_size": 32, "depths": [1, 2, 1], "num_heads": 2, "projector_dim": 32}'


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def fields(text: str, block: str) -> dict[str, str]:
    """`name  value` lines of one `== block ==` of the report."""
    lines = text.split(f"== {block} ==\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {line.split()[0]: line.split(None, 1)[1] for line in lines if line.strip()}


def test_train_speed_prints_ours_repa_protocol_and_their_ratio(capsys, tmp_path):
    out_json = tmp_path / "train.json"
    results = train_speed.main([
        "--model", "SiTDown", "--model-config", TINY, "--resolution", "64", "--batch-size", "4",
        "--enc-type", ENCODER_STANDIN, "--steps", "2", "--rounds", "2", "--warmup", "1",
        "--sync-steps", "1", "--update-repeats", "1", "--json", str(out_json),
    ])  # fmt: skip
    text = capsys.readouterr().out
    env = fields(text, "environment")
    assert env["device"] == "cpu" and "torch" in env and "device_name" in env
    ours, repa = fields(text, "training: ours"), fields(text, "training: repa-protocol")
    for block in (ours, repa):
        for key in ("model", "batch", "precision", "compile", "fused_adamw", "sdpa_backend",
                    "encoder", "forward_gmacs", "images_per_sec", "step_ms", "mfu",
                    "peak_mem_gib", "syncs_per_step", "syncs_per_log", "adamw_step_ms",
                    "ema_update_ms", "ema_opt_share"):  # fmt: skip
            assert key in block, key
        assert block["syncs_per_step"] == block["peak_mem_gib"] == "n/a (CUDA only)"
        assert block["mfu"].startswith("n/a")  # no known peak for a CPU
    assert ours["precision"] == "bf16" and ours["fused_adamw"] == "True"
    assert ours["encoder"] == f"{ENCODER_STANDIN} (precomputed)"
    assert "adamw_foreach_step_ms" in ours and "ema_per_tensor_loop_ms" in ours
    assert repa["precision"] == "fp16" and repa["fused_adamw"] == "False"
    assert repa["encoder"] == f"{ENCODER_STANDIN} (online)"
    assert repa["metrics_read"] == "every step"
    assert "ours/repa-protocol" in fields(text, "ratios of images/s")
    saved = json.loads(out_json.read_text())
    assert saved["ratios"]["ours/repa-protocol"] == pytest.approx(
        results["ratios"]["ours/repa-protocol"]
    )


def test_train_speed_with_a_peak_prints_mfu_and_reports_a_failing_config(capsys):
    results = train_speed.main([
        "--model", "SiTDown", "--model-config", TINY, "--resolution", "64", "--batch-size", "4",
        "--enc-type", ENCODER_STANDIN, "--steps", "1", "--rounds", "1", "--warmup", "1",
        "--sync-steps", "1", "--update-repeats", "1", "--peak-tflops", "1",
        "--mixed-precision", "no", "--configs", "ours,sdpa-efficient",
    ])  # fmt: skip
    text = capsys.readouterr().out
    ours = results["configs"]["ours"]
    assert ours["mfu"] == pytest.approx(
        ours["images_per_sec"] * 6 * ours["forward_gmacs"] * 1e9 / 1e12
    )
    assert "of 1 TFLOP/s" in fields(text, "training: ours")["mfu"]
    # The memory-efficient attention kernel does not run on a CPU: reported, not fatal.
    assert "error" in results["configs"]["sdpa-efficient"]
    assert "failed:" in text.split("== training: sdpa-efficient ==", 1)[1]


def test_train_speed_refuses_unknown_configs():
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--configs", "ours,warp-drive"])


def test_sample_speed_counts_the_forward_passes_run_and_compares_precisions(capsys):
    result = sample_speed.main([
        "--model", "SiTDown", "--model-config", TINY, "--resolution", "64",
        "--per-proc-batch-size", "3", "--num-steps", "5", "--batches", "1",
        "--compare-samples", "2",
    ])  # fmt: skip
    text = capsys.readouterr().out
    rows = fields(text, "sampling")
    expected = ["model", "sampler", "batch", "precision", "compile", "predraw_noise",
                "forward_gmacs", "batch_seconds", "samples_per_sec", "forward_images",
                "forward_images_per_sec", "mfu", "minutes_for_50k_on_8", "peak_mem_gib",
                "syncs_per_step", "other_noise_batch_seconds", "tf32_vs_fp32",
                "bf16_vs_fp32"]  # fmt: skip
    assert [key for key in expected if key not in rows] == []
    assert rows["sampler"] == "sde 5 steps, cfg 1.65 on t in [0.0, 0.7]"  # the paper-main preset
    assert rows["precision"] == "bf16" and rows["syncs_per_step"] == "n/a (CUDA only)"
    # SDE times 1, 0.76, 0.52, 0.28 (stochastic) and 0.04 (last): guided when t <= 0.7, so the
    # model runs 2 × 3 + 3 × 6 = 24 images in 5 forward calls per batch of 3.
    assert result["forward_images_per_batch"] == 24 and result["forward_calls_per_batch"] == 5
    assert result["tf32_max_abs_diff"] == 0  # no TF32 on a CPU
    assert 0 < result["bf16_max_abs_diff"] < 0.5


def test_data_speed_reads_both_ways_and_prints_the_ratio(capsys):
    result = data_speed.main([
        "--synthetic", "48", "--global-batch", "8", "--processes", "2", "--num-workers", "0",
        "--batches", "2", "--train-images-per-sec", "10",
    ])  # fmt: skip
    rows = fields(capsys.readouterr().out, "data loading")
    for key in ("latent_dataset_samples_per_sec", "training_batches_samples_per_sec",
                "latent_dataset_ratio", "training_batches_ratio"):  # fmt: skip
        assert key in rows, key
    assert result["micro_batch"] == 4
    ratio = result["training_batches_samples_per_sec"] / 10
    assert result["training_batches_ratio"] == pytest.approx(ratio)


def test_the_quick_gpu_part_runs_both_benchmarks_with_valid_flags(tmp_path):
    """`bash bench/run_gpu.sh OUT quick` on a stand-in interpreter that only parses each
    benchmark's flags: the part exists, calls both benchmarks, and every flag is accepted."""
    stub = tmp_path / "parse-only"
    stub.write_text(
        "#!/bin/sh\n"
        "shift  # -m\n"
        f'exec {sys.executable} -c "import importlib, sys; '
        "importlib.import_module(sys.argv[1]).parse_args(sys.argv[2:]); "
        'print(\\"parsed\\", sys.argv[1])" "$@"\n'
    )
    stub.chmod(0o755)
    result = subprocess.run(["bash", "bench/run_gpu.sh", str(tmp_path / "out"), "quick"],
                            cwd=REPO, env={**os.environ, "PYTHON": str(stub)},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parsed bench.train_speed" in result.stdout
    assert "parsed bench.sample_speed" in result.stdout

"""bench/ on a CPU: each script runs on a tiny model in seconds and prints its figures.

Nothing here times anything or checks a speed: only that the figures and the configuration are
printed, that the forward passes are counted as the sampler runs them, and that the CPU-only
figures say so.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

from bench import data_speed, op_count, repa, sample_speed, time_model, train_speed
from urepa.encoders import ENCODER_STANDIN
from urepa.run_log import gpu_peak_tflops
from urepa.utils import InputError

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
    assert "adamw_default_step_ms" in ours and "ema_per_tensor_loop_ms" in ours
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


# --------------------------------------------------------------------------------------------
# --repa-src: a stand-in checkout with REPA's layout and signatures (tiny, written here)
# --------------------------------------------------------------------------------------------

REPA_STUB = {
    # No models/__init__.py, as in REPA; models/layers.py shares its name with ours.
    "models/layers.py": """
import torch.nn as nn
class Mixer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
    def forward(self, x):
        return x + self.fc(x).tanh()
""",
    "models/sit.py": """
import torch.nn as nn
from models.layers import Mixer
class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)
class SiT(nn.Module):
    def __init__(self, path_type="edm", input_size=32, patch_size=2, in_channels=4,
                 hidden_size=32, decoder_hidden_size=32, encoder_depth=8, depth=2,
                 num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 use_cfg=False, z_dims=[768], projector_dim=32, **block_kwargs):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.y_embedder = nn.Embedding(num_classes + int(use_cfg), hidden_size)
        self.blocks = nn.ModuleList([Mixer(hidden_size) for _ in range(depth)])
        self.projectors = nn.ModuleList([nn.Linear(hidden_size, z) for z in z_dims])
        self.final_layer = nn.Linear(hidden_size, patch_size ** 2 * in_channels)
    def forward(self, x, t, y):
        n, c, h, w = x.shape
        p = self.patch_size
        x = self.x_embedder(x) + t[:, None, None] + self.y_embedder(y)[:, None]
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 1 == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]
        x = self.final_layer(x).view(n, h // p, w // p, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w), zs
def SiT_T_2(**kwargs):
    return SiT(depth=2, hidden_size=32, decoder_hidden_size=32, patch_size=2, **kwargs)
SiT_models = {"SiT-T/2": SiT_T_2}
""",
    "loss.py": """
import torch
import torch.nn.functional as F
class SILoss:
    def __init__(self, prediction="v", path_type="linear", weighting="uniform", encoders=[],
                 accelerator=None, latents_scale=None, latents_bias=None):
        self.latents_scale, self.latents_bias = latents_scale, latents_bias
    def __call__(self, model, images, model_kwargs=None, zs=None):
        t = torch.rand((images.shape[0], 1, 1, 1)).to(images)
        noises = torch.randn_like(images)
        out, zs_tilde = model((1 - t) * images + t * noises, t.flatten(), **model_kwargs)
        denoising = ((out - (noises - images)) ** 2).mean(dim=(1, 2, 3))
        proj = sum(-(F.normalize(z, dim=-1) * F.normalize(zt, dim=-1)).sum(-1).mean(-1)
                   for z, zt in zip(zs, zs_tilde)) / len(zs)
        return denoising, proj
""",
    "samplers.py": """
import torch
def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0,
                  guidance_low=0.0, guidance_high=1.0, path_type="linear"):
    x = latents.double()
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    for t_cur, t_next in zip(t[:-1], t[1:]):
        guided = cfg_scale > 1 and guidance_low <= t_cur <= guidance_high
        x_in = torch.cat([x, x]) if guided else x
        y_in = torch.cat([y, torch.full_like(y, 1000)]) if guided else y
        v = model(x_in.float(), torch.full((x_in.shape[0],), float(t_cur)), y=y_in)[0]
        if guided:
            cond, uncond = v.double().chunk(2)
            v = uncond + cfg_scale * (cond - uncond)
        x = x + (t_next - t_cur) * v.double()
    return x
def euler_maruyama_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0,
                           guidance_low=0.0, guidance_high=1.0, path_type="linear"):
    return euler_sampler(model, latents, y, num_steps, False, cfg_scale, guidance_low,
                         guidance_high, path_type)
""",
    "train.py": """
import wandb  # REPA's train.py imports trackers and diffusers: its module code must not run
from collections import OrderedDict
import torch
@torch.no_grad()
def sample_posterior(moments, latents_scale=1., latents_bias=0.):
    mean, std = torch.chunk(moments, 2, dim=1)
    return (mean + std * torch.randn_like(mean)) * latents_scale + latents_bias
@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name.replace("module.", "")].mul_(decay).add_(param.data, alpha=1 - decay)
""",
}
REPA_TINY = '{"hidden_size": 32, "decoder_hidden_size": 32, "depth": 2, "encoder_depth": 1}'


def write_repa_stub(root) -> str:
    for name, text in REPA_STUB.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_repa_code_is_imported_from_its_checkout_without_disturbing_ours(tmp_path):
    import models.layers as our_layers

    path_before = list(sys.path)
    code = repa.load_repa(write_repa_stub(tmp_path / "REPA"))
    assert code.sit.Mixer.__module__ == "models.layers"  # the checkout's, not ours
    assert not hasattr(our_layers, "Mixer")
    assert sys.modules["models.layers"] is our_layers and sys.path == path_before
    model = code.sit.SiT_models["SiT-T/2"](input_size=8, z_dims=[16], encoder_depth=1)
    ema = copy.deepcopy(model)
    for p in model.parameters():
        p.data.add_(1.0)
    code.update_ema(ema, model, decay=0.75)  # taken from train.py without importing wandb
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        assert torch.allclose(e, 0.75 * (p - 1.0) + 0.25 * p, atol=1e-6)
    (tmp_path / "REPA" / "loss.py").unlink()
    with pytest.raises(InputError, match="loss.py"):
        repa.load_repa(str(tmp_path / "REPA"))


def test_train_speed_times_repas_own_step_beside_ours(capsys, tmp_path, monkeypatch):
    """The REPA step runs REPA's update_ema once per step; its images/s give the ratio."""
    calls = []

    def counting_load(path: str) -> repa.RepaCode:
        code = repa.load_repa(path)
        ema = code.update_ema
        code.update_ema = lambda *a, **k: (calls.append(1), ema(*a, **k))[1]
        return code

    monkeypatch.setattr(train_speed, "load_repa", counting_load)
    results = train_speed.main([
        "--model", "SiTDown", "--model-config", TINY, "--resolution", "64", "--batch-size", "4",
        "--enc-type", ENCODER_STANDIN, "--steps", "2", "--rounds", "2", "--warmup", "1",
        "--sync-steps", "1", "--update-repeats", "1", "--configs", "ours",
        "--repa-src", write_repa_stub(tmp_path / "REPA"), "--repa-model-config", REPA_TINY,
    ])  # fmt: skip
    text = capsys.readouterr().out
    block = fields(text, "training: repa-actual")
    assert "precomputed random features" in block["config"]
    assert block["precision"] == "fp16" and block["metrics_read"] == "every step"
    # init (decay 0) + warm-up 1 + 2 rounds × 2 + 1 sync step + (1 warm-up + 1) timed alone
    assert len(calls) == 1 + 1 + 4 + 1 + 2
    ours, theirs = results["configs"]["ours"], results["configs"]["repa-actual"]
    assert results["ratios"]["ours/repa-actual"] == pytest.approx(
        ours["images_per_sec"] / theirs["images_per_sec"]
    )
    # the stand-in's forward MACs per image: 16 tokens × (patch conv 16·32 + 2 mixers 32·32
    # + output 32·16), projector excluded
    assert theirs["forward_gmacs"] * 1e9 == pytest.approx(16 * (16 * 32 + 2 * 32 * 32 + 32 * 16))


# --------------------------------------------------------------------------------------------
# bench.op_count against closed forms
# --------------------------------------------------------------------------------------------


def counted(make, fn) -> list[op_count.Op]:
    """The operations of fn(*make()), make's tensors fake."""
    with op_count.fake_mode():
        tensors = make()
    return op_count.count(lambda: fn(*tensors))


def test_op_count_flops_bytes_and_kernels_match_closed_forms():
    m, k, n = 8, 16, 4

    op, _ = counted(lambda: (torch.randn(m, k), torch.randn(n, k), torch.randn(n)), F.linear)
    assert op.category == "matmul" and op.flops == 2 * m * n * k and op.kernels == 1

    def elementwise(a, b):
        c = a + b  # reads 2, writes 1
        a.mul_(2.0)  # in place: reads and writes a
        return c.view(-1).to(torch.bfloat16)  # the view is free; the cast reads fp32, writes bf16

    add, mul, cast, _ = counted(lambda: (torch.randn(m, k), torch.randn(m, k)), elementwise)
    size = m * k
    assert (add.bytes, mul.bytes, cast.bytes) == (3 * 4 * size, 2 * 4 * size, 6 * size)
    assert (add.flops, mul.flops, cast.flops) == (size, size, size)


def test_op_count_kernels_and_fusion_model_of_a_tiny_graph():
    size = 1000

    def graph(x, w):
        y = x * 2
        z = (y + 1).relu()
        out = z[:, None] * w  # (size, 4); the indexing is a view
        return y, out.sum()

    ops = counted(lambda: (torch.randn(size), torch.randn(size, 4)), graph)
    assert [o.name.split(".")[0] for o in ops] == ["mul", "add", "relu", "mul", "sum", "return"]
    eager = op_count.eager_totals(ops)
    assert eager.kernels == 5
    assert eager.bytes == 4 * (2 * size + 2 * size + 2 * size + (size + 4 * size + 4 * size)
                               + (4 * size + 1))  # fmt: skip
    compiled = op_count.compiled_totals(ops)
    # one region: reads x and w, writes y and the sum (both returned); nothing else
    assert compiled.kernels == 1
    assert compiled.bytes == 4 * (size + 4 * size + size + 1)
    # multi_tensor_apply: 300 small tensors in one list: ceil(300 / 110) launches; one tensor
    # of 2 × 320 chunks + 1 element: 3 launches
    assert op_count.multi_tensor_launches(([torch.empty(3)] * 300,)) == 3
    assert op_count.multi_tensor_launches(([torch.empty(2 * 320 * 65536 + 1)],)) == 3


def table_rows(table: list[str]) -> dict[str, list[str]]:
    """Row label -> cells of a markdown table printed by bench.op_count."""
    return {r.strip("| ").split(" | ")[0]: r.strip("| ").split(" | ")[1:] for r in table[2:]}


def test_op_count_prints_bound_and_estimate_for_both_gpus(capsys):
    tables = op_count.main([
        "--models", "SiTDown", "--model-config", TINY, "--resolution", "64",
        "--enc-type", ENCODER_STANDIN, "--batch-size", "2", "--no-sampling",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "| SiTDown: eager |" in out
    time_header = tables["training time"][0]
    for gpu in ("H100 SXM", "H200"):
        assert f"{gpu}: bound" in time_header and f"{gpu}: estimate" in time_header
    labels = [f"SiTDown: {c}" for c in op_count.CONFIGS]
    time_rows = table_rows(tables["training time"])
    assert list(time_rows) == labels
    for cells in time_rows.values():  # per GPU: bound, estimate as "ms, images/s, MFU%"
        for bound, estimate in (cells[0:2], cells[2:4]):
            (b_ms, b_rate, b_mfu), (e_ms, e_rate, e_mfu) = (
                [float(x.strip(" ms%").replace(",", "")) for x in c.split(", ")]
                for c in (bound, estimate))  # fmt: skip
            assert e_ms >= b_ms and e_rate <= b_rate and e_mfu <= b_mfu

    counts = table_rows(tables["training counts"])
    (eager_gb, _), (bound_gb, compiled_gb), (_, update_gb), (_, sharded_gb) = (
        (float(x) for x in counts[label][1].split(" / ")) for label in labels)  # fmt: skip
    # fused within each block only moves more than fused across the whole step, less than eager
    assert bound_gb < compiled_gb < eager_gb
    eager_update, compiled_update, fused_update, sharded_update = (
        float(counts[label][2]) for label in labels)  # fmt: skip
    assert eager_update == compiled_update > fused_update > 0
    assert update_gb == pytest.approx(compiled_gb - compiled_update + fused_update, rel=0.01)
    assert sharded_update == pytest.approx(fused_update / 8, rel=0.01)
    # sharded: 1/8 of the update, plus FSDP2's copies around its collectives (16 B/parameter)
    assert sharded_gb > update_gb - fused_update * 7 / 8
    # the all-gathers and reduce-scatters: only the sharded row sends over NVLink
    sent = [float(counts[label][3]) for label in labels]
    assert sent[:3] == [0, 0, 0] and sent[3] > 0
    collectives = [float(cells[0].split(" / ")[-1]) for cells in
                   table_rows(tables["training parts"]).values()]  # fmt: skip
    assert collectives[:3] == [0, 0, 0] and collectives[3] > 0
    # bytes per parameter: norm 4, clipping's scale 8, AdamW 28, EMA 12; compiled: 4 + 20 + 16
    update = {k: v[0] for k, v in table_rows(tables["update"]).items()}
    assert update["today's path, in all"] == "52.0"
    assert update["compiled update (--compile-update), in all"] == "40.0"


@pytest.mark.parametrize(("model", "gflop"), [("SiTDown-XL/2", 678.28), ("SiT-XL/2", 728.80)])
def test_op_count_flops_per_image_of_the_xl_models(model, gflop):
    """A training step's matmul + attention + convolution FLOPs per image at full size (fake
    tensors), as docs/benchmarks.md reports them: the time model must not change them."""
    ops = op_count.training_ops(model, 2, [], update=False).ops
    flops = sum(op.flops for op in ops if op.category in ("matmul", "attention", "conv"))
    assert flops / 2 / 1e9 == pytest.approx(gflop, abs=0.005)


def test_time_model_prices_adaln_matmuls_by_their_bytes():
    """An AdaLN matmul has one row per image (32): it reads a 1152 x 6912 bf16 weight for
    little arithmetic, so the estimate prices its bytes; with a token per row (32 x 256 rows)
    the same weight is priced by its FLOPs. The bound prices FLOPs at peak either way."""
    weight = (6 * 1152, 1152)

    def make(rows: int):
        return lambda: (torch.randn(rows, 1152, dtype=torch.bfloat16),
                        torch.randn(weight, dtype=torch.bfloat16))  # fmt: skip

    for rows, part in ((32, "memory-bound matmuls"), (32 * 256, "matmuls")):
        op, _ = counted(make(rows), F.linear)
        kernel = op_count.op_kernel(op)
        assert kernel.bytes == 2 * (rows * 1152 + 6 * 1152 * 1152 + rows * 6 * 1152)
        for gpu in time_model.GPUS:
            name, seconds = time_model.kernel_seconds(kernel, gpu, time_model.ESTIMATE)
            assert name == part
            memory = kernel.bytes / (gpu.hbm_bytes_per_s * 0.85)
            compute = 2 * rows * 1152 * 6 * 1152 / (gpu.peak_flops * 0.70)
            assert seconds == pytest.approx(max(memory, compute))
            assert (memory > compute) == (rows == 32)
            assert time_model.kernel_seconds(kernel, gpu, time_model.BOUND) == (
                "matmuls",
                pytest.approx(compute * 0.70),
            )


def test_time_model_attention_runs_the_padded_flash_kernel():
    est = time_model.ESTIMATE
    assert est.attention(72, False) == pytest.approx(0.30 * 72 / 96)  # the head-96 kernel
    assert est.attention(72, True) == pytest.approx(0.21 * 72 / 96)
    assert est.attention(64, False) == est.attention(128, False) == pytest.approx(0.30)
    assert time_model.BOUND.attention(72, True) == 1.0


def test_time_model_counts_fsdp_collectives_only_when_sharded():
    gpu = time_model.GPUS[0]
    ks = [time_model.Kernel("matmul", int(1e12), 0)]  # ~1.4 ms of compute on an H100
    sharding = time_model.Sharding(8, 10**9, 10**8)
    # fp32 all-gather + reduce-scatter: each GPU sends 7/8 of the weights, twice
    assert sharding.wire_bytes() == pytest.approx(2 * 7 / 8 * 4e9)
    wire = sharding.wire_bytes() / (450e9 * 0.80)  # ~19 ms: longer than the compute
    root = wire / 10  # the unit outside the blocks overlaps with nothing
    compute = 1e12 / (989e12 * 0.70)
    parts = time_model.step_seconds(ks, gpu, time_model.ESTIMATE, sharding)
    assert parts["collectives"] == pytest.approx(root + (wire - root - compute))
    assert time_model.step_seconds(ks, gpu, time_model.ESTIMATE)["collectives"] == 0
    assert time_model.step_seconds(ks, gpu, time_model.BOUND, sharding)["collectives"] == 0


def test_op_count_fuses_only_inside_each_compiled_graph_backward_included():
    """Two blocks with an element-wise operation between them: fused across everything (the
    bound) one kernel per direction; as compiled, each block's forward and backward are
    kernels of their own, and what runs outside the blocks runs eagerly."""

    class Block(torch.nn.Module):
        def forward(self, x):
            return (x * 2).relu()

    blocks = [Block(), Block()]
    graphs = op_count.CompiledGraphs()
    graphs.track_modules("blocks", blocks)

    def step(x):
        y = blocks[1](blocks[0](x) + 1)
        y.sum().backward()
        return x.grad

    with op_count.fake_mode():
        x = torch.randn(100, requires_grad=True)
    ops = op_count.count(lambda: step(x), graphs)
    forward = [(op.name.split(".")[0], op.graphs.get("blocks")) for op in ops[:6]]
    assert forward == [("mul", "blocks #1"), ("relu", "blocks #1"), ("add", None),
                       ("mul", "blocks #2"), ("relu", "blocks #2"), ("sum", None)]  # fmt: skip
    # the backward of each block's operations (threshold_backward, mul) runs in its graph
    backward = {op.graphs.get("blocks") for op in ops[6:-1] if op.name.startswith("threshold")}
    assert backward == {"blocks #1", "blocks #2"}
    tagged = [op for op in ops[6:-1] if op.graphs]
    assert {op.name.split(".")[0] for op in tagged} == {"threshold_backward", "mul"}
    ideal, compiled = op_count.kernels(ops, "ideal"), op_count.kernels(ops, "blocks")
    eager = op_count.kernels(ops, "eager")
    assert len(ideal) < len(compiled) < len(eager)
    by_graph = [op.graphs.get("blocks") for op in ops[:-1]]
    runs = sum(1 for i, g in enumerate(by_graph) if g is None or i == 0 or g != by_graph[i - 1])
    assert len(compiled) == runs


def test_op_count_counts_the_unfused_adamw_as_foreach_updates():
    """--no-fused-optimizer is PyTorch's default AdamW: foreach kernels on a GPU (counted as
    multi-tensor updates), never its per-tensor loop (lerp_, addcdiv_, ... one per tensor)."""
    count = op_count.training_ops("SiTDown", 2, [
        "--model-config", TINY, "--resolution", "64", "--enc-type", ENCODER_STANDIN,
        "--no-fused-optimizer"])  # fmt: skip
    other = {op.name.split(".")[0] for op in count.ops if op.category == "other"}
    assert not other & {"lerp_", "addcdiv_", "addcmul_", "sqrt"}
    update = [op.name.split(".")[0] for op in count.ops if op.category == "update"]
    assert "_foreach_addcdiv_" in update and "_fused_adamw_" not in update


# --------------------------------------------------------------------------------------------
# bench/run_gpu.sh
# --------------------------------------------------------------------------------------------


def run_quick(tmp_path, limits: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    env = {**os.environ, "BENCH_SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "REPA_SRC": write_repa_stub(tmp_path / "REPA"), "QUICK_LIMITS": limits}  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run(["bash", "bench/run_gpu.sh", str(out), "quick"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "quick-summary.md").read_text()
    assert summary.strip() in result.stdout
    return result, dict(line.strip("| ").split(" | ", 1) for line in summary.splitlines()[2:])


def test_quick_gpu_part_runs_on_tiny_models_and_ends_with_one_summary_table(tmp_path):
    """`BENCH_SMOKE=1 bash bench/run_gpu.sh OUT quick` with REPA_SRC: our SiT↓ step and our SiT
    step (REPA's recipe), each beside REPA's own step, and the sampler; one summary table with
    both ratios. A part stopped by its time limit is reported and leaves the others' figures."""
    _, rows = run_quick(tmp_path, "200 200 200")
    out = tmp_path / "out"
    for part, what in (("quick-train", "SiT↓-XL/2 + U-REPA"),
                       ("quick-train-sit", "SiT-XL/2 + REPA recipe")):  # fmt: skip
        train = json.loads((out / f"{part}.json").read_text())
        ours = train["configs"]["ours"]
        assert rows[f"{what}: training images/s (ours)"].startswith(
            f"{ours['images_per_sec']:.4g} "
        )
        ratio = train["ratios"]["ours/repa-actual"]
        assert any(k.startswith(f"{what}: REPA's own step") and v.endswith(f"{ratio:.2f}x")
                   for k, v in rows.items())  # fmt: skip
        # the smoke runs eagerly: no compile check to run
        assert rows[f"{what}: compile check (compiled vs eager gradients)"] == "not compiled"
    assert (
        json.loads((out / "quick-train-sit.json").read_text())["configs"]["ours"]["model"] == "SiT"
    )
    sample = json.loads((out / "quick-sample.json").read_text())["sampling"]
    assert rows["sampling samples/s (ours)"].startswith(f"{sample['samples_per_sec']:.4g} ")
    # both training parts stopped at a limit of 1 s: reported, the sampler's figures kept
    result, rows = run_quick(tmp_path, "1 1 200")
    assert "quick-train: stopped" in result.stdout and "quick-train-sit: stopped" in result.stdout
    assert rows["quick-train"].startswith("not finished")
    assert rows["quick-train-sit"].startswith("not finished")
    assert "sampling samples/s (ours)" in rows


def test_every_gpu_part_passes_valid_flags_to_its_benchmark(tmp_path):
    """Every part but quick (run above), full size and with BENCH_SMOKE=1, on a stand-in
    interpreter that logs its arguments; each benchmark's parser then parses them here."""
    log = tmp_path / "argv.jsonl"
    stub = tmp_path / "log-argv"
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys\nwith open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    stub.chmod(0o755)
    parts = ["train", "train-each", "train-sit", "sample", "sample-compile", "data", "ops"]
    for smoke in ("0", "1"):
        env = {**os.environ, "PYTHON": str(stub), "BENCH_SMOKE": smoke}
        result = subprocess.run(
            ["bash", "bench/run_gpu.sh", str(tmp_path / smoke), "--repa-src", "/nowhere", *parts],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    modules = {"bench.train_speed": train_speed, "bench.sample_speed": sample_speed,
               "bench.data_speed": data_speed, "bench.op_count": op_count}  # fmt: skip
    assert [c[1] for c in calls[:7]] == ["bench.train_speed"] * 3 + ["bench.sample_speed"] * 2 + [
        "bench.data_speed", "bench.op_count"]  # fmt: skip
    assert len(calls) == 14
    for dash_m, module, *argv in calls:
        assert dash_m == "-m"
        modules[module].parse_args(argv)  # exits on a flag it does not know


def test_gpu_peaks_tell_h100_pcie_and_nvl_from_sxm():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert gpu_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_peak_tflops("NVIDIA GeForce RTX 3090") is None

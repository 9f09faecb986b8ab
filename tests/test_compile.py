"""torch.compile without graph breaks or recompilations, bf16 weights cast once for sampling, and
the --compile default (speed.py). Compiled with the "eager" / "aot_eager" backends: what dynamo
traces and guards is the same as with inductor, without inductor's code generation."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import generate
import train
from loss import SILoss
from models import build_model
from samplers import VelocityOnly, euler_sampler
from speed import compile_model, prepare_model_for_sampling, report_compile_times, resolve_compile


def tiny(name, **kwargs):
    sizes = {"SiT": {"depth": 4, "encoder_depth": 2}, "SiTDown": {"depths": (2, 3, 2)}}[name]
    model = build_model(name, input_size=8, hidden_size=32, num_heads=2, num_classes=10,
                        z_dims=[16], projector_dim=24, **sizes, **kwargs)  # fmt: skip
    with torch.no_grad():  # AdaLN-Zero starts every block at the identity and v at 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def inputs(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return x, torch.rand(n, generator=g), torch.randint(0, 11, (n,), generator=g)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize(
    ("name", "loss_fn"),
    [("SiT", SILoss()), ("SiTDown", SILoss(manifold_mode="batch", chunk_size=16))],  # 3 blocks
)
def test_model_and_loss_trace_without_graph_breaks(name, loss_fn):
    """Training (the loss around the model) and sampling (the model alone) are one graph each."""
    model = tiny(name)
    x, t, y = inputs()
    zs, drop = [torch.randn(3, 16, 16)], {"force_drop_ids": torch.tensor([True, False, False])}
    explained = dynamo.explain(loss_fn)(model, x, y, zs, t=t, noise=x.flip(0), model_kwargs=drop)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    explained = dynamo.explain(model.eval())(x, t, y, return_zs=False)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize(("name", "graphs"), [("SiT", 1), ("SiTDown", 3)])
def test_blocks_share_one_graph_per_stage_and_repeated_shapes_never_recompile(name, graphs):
    """Regional compilation: all blocks of a stage run one graph (SiT: one stage; SiT↓: three,
    the 2×2 grid, and the 4×4 grid in two memory layouts: stage 1 reads the patch embedding's
    transposed tokens, stage 3 the skip projections' contiguous ones); later calls with the same
    shapes, in training and sampling, compile nothing."""
    model = tiny(name)
    counter = CompileCounter()
    assert compile_model(model, "blocks", backend=counter) is model
    x, t, y = inputs()
    v, zs = model(x, t, y)
    (v.square().mean() + zs[0].mean()).backward()
    assert counter.frame_count == graphs
    with dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            v, zs = model(*inputs(seed))
            (v.square().mean() + zs[0].mean()).backward()
    assert counter.frame_count == graphs
    model.eval()  # sampling: other graphs, once each
    with torch.no_grad():
        model(*inputs(1), return_zs=False)
        compiled_for_sampling = counter.frame_count
        with dynamo.config.patch(error_on_recompile=True):
            model(*inputs(2), return_zs=False)
    assert counter.frame_count == compiled_for_sampling
    assert "_orig_mod" not in "".join(model.state_dict())  # checkpoints keep their keys


def test_a_copy_of_a_compiled_model_runs_eagerly():
    """Why copies (the EMA, the bf16 sampling model) are made before compiling, never after."""
    model, counter = tiny("SiT").eval(), CompileCounter()
    compile_model(model, "blocks", backend=counter)
    with torch.no_grad():
        copy.deepcopy(model)(*inputs(), return_zs=False)
        assert counter.frame_count == 0
        model(*inputs(), return_zs=False)
        assert counter.frame_count == 1


def test_whole_model_compilation_is_one_graph_without_recompiles():
    model = tiny("SiTDown")
    counter = CompileCounter()
    compiled = compile_model(model, "model", backend=counter)
    compiled(*inputs())
    with dynamo.config.patch(error_on_recompile=True):
        compiled(*inputs(1))
    assert counter.frame_count == 1


def test_compiled_loss_matches_the_eager_loss_and_its_gradients(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = tiny("SiTDown")
    x, t, y = inputs()
    zs, noise = [torch.randn(3, 16, 16)], torch.randn_like(x)
    results = []
    for compiled in (False, True):
        model.zero_grad()
        losses = SILoss(manifold_mode="batch", chunk_size=16, compile=compiled)(
            model, x, y, zs, t=t, noise=noise, model_kwargs={"force_drop_ids": y == 0}
        )
        losses["total"].backward()
        results.append((losses, [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled_losses, compiled_grads) = results
    for name, value in eager.items():
        torch.testing.assert_close(compiled_losses[name], value)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


def sample(model):
    """Euler ODE, guided on t <= 0.5: the first 3 steps unguided (N), the last 3 guided (2N)."""
    x, _, y = inputs(5, n=4)
    return euler_sampler(VelocityOnly(model), x, y % 10, num_steps=6, cfg_scale=2.0,
                         guidance_low=0.0, guidance_high=0.5)  # fmt: skip


def test_bf16_weights_cast_once_give_autocast_samples():
    """The guided (2N) and unguided (N) phases both run; the cast-once copy does the same
    arithmetic as autocast, which casts the same fp32 weights at every call."""
    model = tiny("SiTDown").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sample(model)
        cast_once = prepare_model_for_sampling(model, "bf16", compile=False)
        once = sample(cast_once)
        compiled = prepare_model_for_sampling(model, "bf16", compile=True, backend="eager")
        once_compiled = sample(compiled)
    assert cast_once.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert cast_once.y_embedder.embedding_table.weight.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32  # the original is untouched
    torch.testing.assert_close(once, autocast, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(once_compiled, once, rtol=1e-3, atol=1e-3)
    fp32 = sample(model)
    assert 1e-5 < (autocast - fp32).abs().max() < 0.1  # bf16 really ran, and stayed close
    for precision in ("fp32", "tf32"):  # nothing to cast: the model itself
        assert prepare_model_for_sampling(model, precision, compile=False) is model
    # CUDA graphs: the whole (cast) model in one compiled function (not called: CUDA only)
    graphed = prepare_model_for_sampling(model, "bf16", compile=True, cuda_graphs=True)
    assert isinstance(graphed, dynamo.eval_frame.OptimizedModule)
    assert graphed._orig_mod.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_compile_is_on_by_default_where_cuda_is_available(monkeypatch, tmp_path):
    ckpt = ["--ckpt", "x.pt", "--sample-dir", str(tmp_path)]
    train_args = ["--data-dir", str(tmp_path), "--exp-name", "run"]
    for available in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert resolve_compile(None) is available
        assert generate.parse_args(ckpt).compile is available
        assert train.parse_args([*train_args, "--mixed-precision", "no"]).compile is available
        assert generate.parse_args([*ckpt, "--no-compile"]).compile is False
        assert train.parse_args([*train_args, "--mixed-precision", "no", "--compile"]).compile


def test_each_compilation_is_reported_with_its_time():
    lines: list[str] = []
    report_compile_times(lines.append)
    report_compile_times(lines.append)  # replaces the first timer: still one line per compile

    @torch.compile(backend="eager")
    def double(x):
        return 2 * x

    double(torch.ones(2))
    double(torch.ones(2))
    assert len(lines) == 1 and "compiled in" in lines[0] and "1 so far" in lines[0]

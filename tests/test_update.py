"""The compiled update path (urepa/fused_update.py) against today's: clipping, AdamW, EMA.

`fused_update` must leave the weights, the EMA and AdamW's state where clip_grads_with_norm_,
torch.optim.AdamW and trainer.update_ema leave them, within fp32 rounding, over several steps
with the clipping active; compiled by inductor as by eager PyTorch; in train.py's own step; and
its optimiser state must continue on the eager path (a run may resume with either).
"""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState
from test_train import argv

import train
from urepa import trainer
from urepa.fused_update import adamw_state, compile_update, fused_update, hyperparameters
from urepa.run_log import create_logger
from urepa.trainer import create_accelerator, update_ema

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, max_norm=0.5,
             ema_decay=0.8)  # fmt: skip
STEPS = 5
# fp32 rounding over a few steps: the two paths order the same operations differently
CLOSE = dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def weights(shapes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def gradients(shapes, step: int) -> list[torch.Tensor]:
    """Large at even steps (global norm ≫ max_norm: clipped), small at odd ones (not)."""
    scale = 3.0 if step % 2 == 0 else 1e-3
    return [scale * g for g in weights(shapes, 100 + step)]


def todays_path(shapes, fused_adamw: bool, ema_every: int = 1):
    """clip_grads_with_norm_, torch.optim.AdamW, update_ema, STEPS times."""
    params = [torch.nn.Parameter(w) for w in weights(shapes, 0)]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"],
                            fused=fused_adamw or None)  # fmt: skip
    norms = []
    for step in range(STEPS):
        for p, g in zip(params, gradients(shapes, step), strict=True):
            p.grad = g
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, HYPER["max_norm"], norm)
        opt.step()
        if (step + 1) % ema_every == 0:
            update_ema(ema, [p.detach() for p in params], HYPER["ema_decay"])
        norms.append(float(norm))
    return [p.detach() for p in params], ema, opt, norms


def fused_path(shapes, update, ema_every: int = 1):
    params = weights(shapes, 0)
    ema = [p.clone() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    for step in range(STEPS):
        grads = gradients(shapes, step)
        norm = torch.nn.utils.get_total_norm(grads)
        with_ema = (step + 1) % ema_every == 0
        update(params, grads, m, v, steps, ema if with_ema else [], norm, HYPER)
    return params, ema, m, v, steps


def assert_same_state(fused, today) -> None:
    params, ema, m, v, steps = fused
    want_params, want_ema, opt, norms = today
    assert min(norms[0::2]) > 10 * HYPER["max_norm"] > 100 * max(norms[1::2])  # clipped or not
    torch.testing.assert_close(params, want_params, **CLOSE)
    torch.testing.assert_close(ema, want_ema, **CLOSE)
    state = [opt.state[p] for p in opt.param_groups[0]["params"]]
    torch.testing.assert_close(m, [s["exp_avg"] for s in state], **CLOSE)
    torch.testing.assert_close(v, [s["exp_avg_sq"] for s in state], **CLOSE)
    assert [float(s) for s in steps] == [float(s["step"]) for s in state] == [STEPS] * len(steps)


SHAPES = [(6, 5), (7,), (3, 2, 2)]


@pytest.mark.parametrize("fused_adamw", [True, False])
@pytest.mark.parametrize("ema_every", [1, 2])
def test_fused_update_equals_clipping_adamw_and_ema(fused_adamw, ema_every):
    fused = fused_path(SHAPES, fused_update, ema_every)
    assert_same_state(fused, todays_path(SHAPES, fused_adamw, ema_every))
    # and the update moved the weights by far more than the tolerance
    moved = max((a - b).abs().max() for a, b in zip(fused[0], weights(SHAPES, 0), strict=True))
    assert moved > 1e-2


def test_fused_update_compiled_by_inductor_equals_todays_path():
    """What a CUDA run compiles, on the CPU's code generator: the same numbers."""
    shapes = SHAPES[:2]  # inductor's compilation time grows with the number of tensors
    assert_same_state(fused_path(shapes, compile_update()), todays_path(shapes, True))


def test_train_step_with_the_fused_update_equals_todays_step_and_resumes_on_it(data_dir, tmp_path):
    """train.py's step, clipping active (--max-grad-norm 0.01), EMA every 2 steps, weight decay:
    the fused update (eager: the arithmetic; its compilation is the test above) against today's
    path; then today's path continues from the fused path's optimiser state."""
    extra = ["--max-grad-norm", "0.01", "--ema-every", "2", "--adam-weight-decay", "0.1",
             "--learning-rate", "1e-3", "--ema-decay", "0.5"]  # fmt: skip
    runs = {}
    for name in ("today", "fused"):
        AcceleratorState._reset_state(reset_partial_state=True)
        args = train.parse_args(argv(data_dir, tmp_path, name, *extra))
        accelerator = create_accelerator(
            args.mixed_precision, args.report_to, args.allow_tf32, str(tmp_path / name)
        )
        tr, dataset = train.setup(args, accelerator, None, create_logger(True))
        tr.update_fn = fused_update if name == "fused" else None
        batches = trainer.TrainingBatches(dataset, tr.plan, trainer.StepDraws(
            args.weighting, args.path_type, args.cfg_prob))  # fmt: skip
        tr.model.train()
        norms = []
        for step in range(3):
            norms.append(float(trainer.train_step(tr, [batches[step]])["grad_norm"]))
            tr.step += 1
        assert min(norms) > 10 * args.max_grad_norm  # every step clipped
        runs[name] = (tr, batches)
    (today, batches), (fused, _) = runs["today"], runs["fused"]
    torch.testing.assert_close(fused.raw.state_dict(), today.raw.state_dict(), **CLOSE)
    torch.testing.assert_close(fused.ema.state_dict(), today.ema.state_dict(), **CLOSE)
    opt_f, opt_t = fused.optimizer.state_dict(), today.optimizer.state_dict()
    torch.testing.assert_close(opt_f["state"], opt_t["state"], **CLOSE)
    # today's path continues from the fused path's state as from its own
    fused.optimizer.load_state_dict(opt_t)
    today.optimizer.load_state_dict(opt_f)
    fused.update_fn = None
    for tr in (today, fused):
        trainer.train_step(tr, [batches[3]])
    torch.testing.assert_close(fused.raw.state_dict(), today.raw.state_dict(), **CLOSE)


def test_adamw_state_is_created_as_adamw_creates_it():
    params = [torch.nn.Parameter(w) for w in weights(SHAPES, 0)]
    opt = torch.optim.AdamW(params)
    state = adamw_state(opt, [True] * len(params))
    assert all(float(s) == 0 and s.dtype == torch.float32 for s in state["step"])
    moments = zip(state["exp_avg"], params, strict=True)
    assert all(not m.any() and m.shape == p.shape for m, p in moments)
    assert opt.state[params[0]]["exp_avg"] is state["exp_avg"][0]  # the optimiser's own
    with pytest.raises(ValueError, match="amsgrad"):
        hyperparameters(torch.optim.AdamW(params, amsgrad=True), 1.0, 0.9)


def test_compile_update_is_opt_in_and_refused_with_fp16(data_dir, tmp_path, capsys):
    def parsed(*extra):
        return train.parse_args(argv(data_dir, tmp_path, "flags", *extra))

    assert not parsed("--compile").compile_update and parsed("--compile-update").compile_update
    assert not parsed("--compile", "--mixed-precision", "fp16").compile_update
    with pytest.raises(SystemExit):
        parsed("--compile-update", "--mixed-precision", "fp16")
    assert "--compile-update does not work with --mixed-precision fp16" in capsys.readouterr().err

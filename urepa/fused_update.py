"""The update after the backward pass as one compiled pass over the fp32 state: the clipped
gradient, AdamW and the EMA in one kernel per group of tensors, not three passes.

Today's path (`trainer.clip_gradients`, the fused AdamW kernel, `trainer.update_ema`) reads
and writes every parameter's fp32 state three times: the clipping scales the gradients in place
(8 bytes per parameter, after the 4 of the norm), AdamW reads parameter, gradient and both
moments and writes parameter and moments (28), the EMA reads itself and the parameter and
writes itself (12): 52 bytes per parameter and step. `fused_update` computes the same
arithmetic from one read of each tensor: the gradient is scaled in registers, never written,
and the parameter AdamW writes is the one the EMA averages, so 20 bytes are read and 16 written
(36; 28 in the steps without an EMA update under --ema-every), after the 4 of the norm.
torch.compile fuses its multi-tensor operations into that one pass (`compile_update`);
`bench.op_count` counts both paths.

The optimiser stays `torch.optim.AdamW`: its hyperparameters, its state (`exp_avg`,
`exp_avg_sq`, `step`, on the parameter's device) and so its checkpoints are those of the eager
path, and a run may resume with either path. The arithmetic is PyTorch's AdamW (decoupled
weight decay) and `clip_grads_with_norm_`'s coefficient; `tests/test_update.py` compares both
paths over several clipped steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from urepa.utils import local_shard

CLIP_EPS = 1e-6  # clip_grads_with_norm_'s: coefficient max_norm / (norm + 1e-6), at most 1


@torch.no_grad()
def fused_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    ema_params: list[Tensor],
    grad_norm: Tensor,
    hyper: dict[str, float],
) -> None:
    """Clip (the gradients scaled by min(1, max_norm / (grad_norm + 1e-6)), not written back),
    one AdamW step, then ema ← lerp(ema, θ, 1 − ema_decay) if `ema_params` (else no EMA).
    `hyper`: lr, beta1, beta2, eps, weight_decay, max_norm, ema_decay. `steps`: AdamW's step
    counters (0-dim float tensors on the parameters' device), incremented here."""
    lr, beta1, beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
    coef = (hyper["max_norm"] / (grad_norm + CLIP_EPS)).clamp(max=1.0)
    g = torch._foreach_mul(grads, coef)
    torch._foreach_add_(steps, 1.0)
    if hyper["weight_decay"]:  # decoupled weight decay
        torch._foreach_mul_(params, 1.0 - lr * hyper["weight_decay"])
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)  # m ← β1 m + (1 − β1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1.0 - beta2)  # v ← β2 v + (1 − β2) g²
    # θ ← θ − lr / (1 − β1^t) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
    correction1 = torch._foreach_sub(torch._foreach_pow(beta1, steps), 1.0)  # β1^t − 1
    correction2 = torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(beta2, steps), 1.0))
    step_sizes = torch._foreach_div(correction1, lr)  # −(1 − β1^t) / lr
    denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), torch._foreach_sqrt(correction2))
    torch._foreach_add_(denom, hyper["eps"])
    torch._foreach_mul_(denom, step_sizes)
    torch._foreach_addcdiv_(params, exp_avgs, denom)
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - hyper["ema_decay"])


UpdateFn = Callable[..., None]


def compile_update(backend: str = "inductor") -> UpdateFn:
    """`fused_update`, compiled: one pass over each group of tensors. Static shapes; the graph
    with the EMA and the one without (--ema-every > 1) are compiled once each."""
    return torch.compile(fused_update, dynamic=False, backend=backend)


def adamw_state(optimizer: torch.optim.Optimizer, selected: list[bool]) -> dict[str, list[Tensor]]:
    """AdamW's state of the `selected` parameters, as lists in the order of its parameters
    (this process's shards when sharded), created as AdamW creates it on its first step:
    moments zero, step counter 0 on the parameter's device (as AdamW keeps it when capturable
    or fused; a step counter on the CPU is moved there)."""
    out: dict[str, list[Tensor]] = {"exp_avg": [], "exp_avg_sq": [], "step": []}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p, chosen in zip(params, selected, strict=True):
        if not chosen:
            continue
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device != p.device:  # PyTorch's foreach AdamW keeps it on the CPU
            state["step"] = state["step"].to(p.device)
        for key in out:
            out[key].append(local_shard(state[key]))
    return out


def hyperparameters(
    optimizer: torch.optim.Optimizer, max_norm: float, ema_decay: float
) -> dict[str, float]:
    """The scalars of `fused_update` from AdamW's (single) parameter group."""
    (group,) = optimizer.param_groups
    if group["amsgrad"] or group["maximize"]:
        raise ValueError("fused_update implements AdamW without amsgrad and maximize")
    beta1, beta2 = group["betas"]
    return dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], max_norm=max_norm,
                ema_decay=ema_decay)  # fmt: skip

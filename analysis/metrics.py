"""Representation metrics of REPA (§3, appendix C.1) and U-REPA (Fig. 3).

* `cknna`: mutual k-nearest-neighbour kernel alignment (Huh et al. 2024), computed as the
  authors' released code computes it (`platonic-rep`, `metrics.AlignmentMetrics.cknna`).
* `linear_probe`: REPA's protocol (after DAE): a parameter-free batch norm and a linear layer,
  trained with Adam and a cosine-decayed learning rate for 90 epochs at batch 16,384.
* `token_similarity` and `manifold_distance`: the two alignment terms of `loss.py` on (N, T, D)
  features, as positive numbers to plot (U-REPA Fig. 3 tracks the first).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from loss import manifold_loss_per_sample, repa_loss_per_sample

#################################################################################
#                                     CKNNA                                     #
#################################################################################


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC estimator of Song et al. (2012), Eq. 5, for (m, m) kernels: a 0-dim tensor.

        HSIC = [tr(K~ L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1] / (m (m-3))

    with K~, L~ the kernels with a zeroed diagonal. As in the reference code, tr(K~ L~) is
    sum(K~ * L~^T), which matters for the masked (non-symmetric) kernels of CKNNA.
    1'K~L~1 is computed as (1'K~)(L~1): O(m^2) instead of the matrix product's O(m^3).
    """
    m = K.shape[0]
    K_tilde = K.clone().fill_diagonal_(0)
    L_tilde = L.clone().fill_diagonal_(0)
    value = (
        torch.sum(K_tilde * L_tilde.T)
        + torch.sum(K_tilde) * torch.sum(L_tilde) / ((m - 1) * (m - 2))
        - 2 * (K_tilde.sum(dim=0) @ L_tilde.sum(dim=1)) / (m - 2)
    )
    return value / (m * (m - 3))


def knn_mask(K: Tensor, topk: int) -> Tensor:
    """(m, m) 0/1 mask of each row's `topk` largest entries of the kernel K, diagonal excluded."""
    scores = K.clone().fill_diagonal_(float("-inf"))
    indices = torch.topk(scores, topk, dim=1).indices  # (m, topk)
    return torch.zeros_like(K).scatter_(1, indices, 1.0)


def cknna(feats_a: Tensor, feats_b: Tensor, topk: int = 10, eps: float = 1e-6) -> float:
    """CKNNA between two representations of the same N samples, (N, D_a) and (N, D_b).

    K = A A^T and L = B B^T (inner-product kernels on the features as given: no centring or
    normalisation here; the analysis L2-normalises first, see `prepare_features`). Each row of
    K and of L keeps its `topk` nearest neighbours (largest inner products, the sample itself
    excluded); alpha(i, j) = 1 where j is among i's neighbours in both. Then

        CKNNA = HSIC(aK, aL) / (sqrt(HSIC(a_K K, a_K K) HSIC(a_L L, a_L L)) + eps)

    with the unbiased HSIC of `hsic_unbiased`, as in Huh et al.'s code (`eps` = 1e-6 there;
    eps = 0 gives the plain ratio of REPA's Eq. 21). Computed in the features' dtype, at least
    fp32, on feats_a's device; memory: a few (N, N) matrices (N = 10,000: 0.4 GB each in fp32).
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(
            f"cknna needs (N, D) features of the same N samples, got {tuple(feats_a.shape)} and "
            f"{tuple(feats_b.shape)}"
        )
    n = feats_a.shape[0]
    if not 2 <= topk <= n - 1 or n < 4:
        raise ValueError(f"cknna needs 2 <= topk <= N - 1 and N >= 4, got topk={topk}, N={n}")
    dtype = torch.promote_types(torch.promote_types(feats_a.dtype, feats_b.dtype), torch.float32)
    a = feats_a.to(dtype)
    b = feats_b.to(device=a.device, dtype=dtype)
    with torch.autocast(device_type=a.device.type, enabled=False):
        K, L = a @ a.T, b @ b.T
        mask_k, mask_l = knn_mask(K, topk), knn_mask(L, topk)
        mutual = mask_k * mask_l
        kl = hsic_unbiased(mutual * K, mutual * L)
        kk = hsic_unbiased(mask_k * K, mask_k * K)
        ll = hsic_unbiased(mask_l * L, mask_l * L)
        return kl.item() / (torch.sqrt(kk * ll) + eps).item()


def prepare_features(feats: Tensor, outlier_quantile: float = 0.95) -> Tensor:
    """(N, D) features as Huh et al.'s pipeline hands them to `cknna`: float32, values clipped to
    +-q (q: the mean over samples of each sample's `outlier_quantile` quantile of |x|; 1 keeps
    them all), then each row L2-normalised."""
    feats = feats.float()
    if outlier_quantile < 1:
        q = torch.quantile(feats.abs().flatten(start_dim=1), outlier_quantile, dim=1).mean()
        feats = feats.clamp(-q, q)
    return nn.functional.normalize(feats, p=2, dim=-1)


#################################################################################
#                                 Linear probing                                #
#################################################################################


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """Parameter-free batch norm, then a linear layer (MAE's linear-probe initialisation:
    weights N(0, 0.01) truncated at 2 std, zero bias)."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01, a=-0.02, b=0.02)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 16_384,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """Top-1 accuracy in [0, 1] on (val_x, val_y) of a linear probe trained on (train_x, train_y).

    REPA appendix C.1: batch norm without affine parameters, a linear layer, 90 epochs, batch
    16,384, Adam, learning rate 1e-3 with cosine decay (per step, to 0, no warm-up, no weight
    decay). Each epoch visits the training set in a fresh order (seeded), the last batch
    possibly short (a batch of one joins the one before); the batch norm's running statistics
    serve at evaluation. Runs on train_x's device; features (N, D) of any float dtype, labels
    (N,) int.
    """
    device = train_x.device
    train_x, val_x = train_x.float(), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = probe_head(train_x.shape[1], num_classes).to(device)
    steps_per_epoch = len(epoch_batches(torch.arange(len(train_x)), batch_size))
    total = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    model.train()
    with torch.autocast(device_type=device.type, enabled=False):
        for _ in range(epochs):
            order = torch.randperm(len(train_x), generator=generator).to(device)
            for batch in epoch_batches(order, batch_size):
                loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return probe_accuracy(model, val_x, val_y, batch_size)


def epoch_batches(order: Tensor, batch_size: int) -> list[Tensor]:
    """One epoch's batches of `order`; a last batch of one sample joins the one before, as a
    batch norm in training mode needs two samples."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@torch.no_grad()
def probe_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Top-1 accuracy of `model` in eval mode on (x, y), in batches."""
    model.eval()
    correct = sum(
        (model(xb).argmax(dim=1) == yb).sum()
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    return float(correct) / max(len(y), 1)


#################################################################################
#                     Projector output vs encoder features                       #
#################################################################################


def token_similarity(target: Tensor, projected: Tensor) -> Tensor:
    """Mean token cosine similarity of each image, (N, T, D) x 2 -> (N,): minus L_REPA (Eq. 1)."""
    return -repa_loss_per_sample(target, projected)


def manifold_distance(target: Tensor, projected: Tensor, mode: str = "token") -> Tensor:
    """L_ML (U-REPA Eqs. 3-4) of each image, (N, T, D) x 2 -> (N,): the mean squared difference
    of the cosine-similarity matrices of encoder and projected features."""
    return manifold_loss_per_sample(target, projected, mode)

"""Building blocks shared by SiT and SiT↓: embedders, attention (with optional 2-D RoPE),
feed-forward layers, AdaLN-Zero transformer block and final layer.

Module and parameter names follow REPA's `models/sit.py` (which uses timm's `PatchEmbed`,
`Attention` and `Mlp`), so that SiT checkpoints released by REPA load with `strict=True`.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation. x: (N, T, C); shift, scale: (N, C)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                         Position embeddings                                   #
#################################################################################


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """MAE-style fixed 2-D sin-cos table, (grid_size², embed_dim), rows in raster order.

    Bit-for-bit the layout of REPA/MAE: the first half of the channels encodes the column
    (their meshgrid puts w first), the second half the row; each half is [sin, cos] over
    frequencies 1 / 10000^(i / (embed_dim / 4)). Computed in float64, returned as float32.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each

    def embed_1d(pos: Tensor) -> Tensor:
        omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0)
        omega = 1.0 / 10000**omega  # (D/4,)
        out = pos.reshape(-1, 1) * omega[None]  # (g², D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (g², D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (g², D)


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding (RoPE) on a square grid of `grid_size`² tokens.

    Channel pairs (i, i + d/2) of each head are rotated by angle_i: for the first d/4 pairs the
    angle is row·f, for the last d/4 it is column·f, f = theta^(-j / (d/4)). Attention scores then
    depend on positions only through their 2-D offset. Positions are the integer coordinates of
    the grid the block runs on (each U-Net stage has its own grid, hence its own tables).

    The cos/sin tables are fp32 buffers built here, once: they move with the model (`.to`), are
    not part of the state dict (non-persistent), and are plain tensors for torch.compile (no
    cache to look up, so no recompilation when the first call fills it).
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim % 4 == 0, got {head_dim}")
        self.head_dim = head_dim
        self.grid_size = grid_size
        self.theta = theta
        ang = self.angles(grid_size)
        ang = torch.cat([ang, ang], dim=1)  # (T, d): pair (i, i + d/2) shares angle_i
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def angles(self, grid_size: int) -> Tensor:
        """Rotation angles, (grid_size², head_dim / 2), rows in raster order."""
        quarter = self.head_dim // 4
        freqs = self.theta ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
        coords = torch.arange(grid_size, dtype=torch.float32)
        rows, cols = torch.meshgrid(coords, coords, indexing="ij")
        row_angles = rows.reshape(-1, 1) * freqs  # (T, d/4)
        col_angles = cols.reshape(-1, 1) * freqs  # (T, d/4)
        return torch.cat([row_angles, col_angles], dim=1)  # (T, d/2)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate queries or keys. x: (N, heads, T, head_dim) with T = grid_size²; the rotation
        runs in x's dtype (bf16 under autocast, as the attention that follows)."""
        if x.shape[-2] != self.cos.shape[0]:
            raise ValueError(
                f"RoPE built for a {self.grid_size}×{self.grid_size} grid got {x.shape[-2]} tokens"
            )
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated_half = torch.cat([-x2, x1], dim=-1)
        return x * cos + rotated_half * sin


#################################################################################
#                 Embedding layers for patches, timesteps and labels            #
#################################################################################


class PatchEmbed(nn.Module):
    """(N, C_in, H, W) latents -> (N, T, D) tokens with a stride-p convolution (timm's layout)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return grid_to_tokens(self.proj(x))  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds t ∈ [0, 1] (used as is, no ×1000) with a 256-d sinusoid and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """(N,) -> (N, dim): [cos, sin] over geometric frequencies (GLIDE/DiT convention)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.sinusoid(t, self.frequency_embedding_size).to(t.dtype)
        return self.mlp(t_freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class-label table with a null class at index `num_classes` for classifier-free guidance.

    Label dropout happens here and only here (in training mode, with `dropout_prob`); the loss
    and the training loop pass labels through untouched.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.bool()
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """labels (N,) -> (N, D). In training, each label is replaced by the null class with
        probability `dropout_prob`, unless `force_drop_ids` (N,) gives the decisions (the
        training loop draws them from its own per-step generator, for exact reproducibility)."""
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                        Attention, feed-forward, blocks                        #
#################################################################################


SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
_SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_backend(name: str) -> AbstractContextManager[None]:
    """Within the context, `F.scaled_dot_product_attention` uses only the kernel `name`, one of
    SDPA_BACKENDS; "auto" leaves the choice to PyTorch. A kernel that cannot run the inputs
    (e.g. flash in fp32, or efficient on a CPU) makes attention raise, naming the reason."""
    if name == "auto":
        return nullcontext()
    if name not in _SDPA_KERNELS:
        raise ValueError(f"SDPA backend must be one of {SDPA_BACKENDS}, got {name!r}")
    return sdpa_kernel(_SDPA_KERNELS[name])


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias (timm's parameter layout), optional 2-D RoPE on a
    `rope_grid`² token grid (None: no RoPE).

    Runs through `F.scaled_dot_product_attention`, so PyTorch picks the flash / memory-efficient
    kernel when one applies; the scale is head_dim^-0.5.
    """

    def __init__(self, dim: int, num_heads: int, rope_grid: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rope = RotaryEmbedding2D(self.head_dim, rope_grid) if rope_grid else None

    def forward(self, x: Tensor) -> Tensor:
        N, T, C = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (N, heads, T, head_dim) each
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, C))


class Mlp(nn.Module):
    """ViT feed-forward: fc1 -> tanh-approximated GELU -> fc2 (SiT/REPA)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward w3(SiLU(x W1) ⊙ x W2); W1 and W2 fused into one matmul (`w12`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_dim(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU width with the MACs of a GELU MLP of ratio `mlp_ratio`: 2/3 of its hidden size."""
    return int(2 * mlp_ratio * hidden_size / 3)


class TransformerBlock(nn.Module):
    """AdaLN-Zero transformer block (SiT). `ffn='gelu'` is REPA's block, `ffn='swiglu'` with
    RoPE on its `rope_grid`² tokens is the SiT↓ block.

    The residual stream keeps the dtype of `x`: under autocast, the matmuls and attention run
    in the autocast dtype and their (gated) outputs are added to an fp32 stream (REPA's SiT)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "gelu",
        rope_grid: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, rope_grid)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if ffn == "gelu":
            self.mlp: nn.Module = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        elif ffn == "swiglu":
            self.mlp = SwiGLU(hidden_size, swiglu_hidden_dim(hidden_size, mlp_ratio))
        else:
            raise ValueError(f"ffn must be 'gelu' or 'swiglu', got {ffn!r}")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (N, T, C) tokens, c: (N, C) conditioning."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then a linear map to p²·C_out values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p²·C_out)


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """(N, T, p²·c) tokens -> (N, c, h·p, w·p) via (N, h, w, p, p, c), as SiT/REPA."""
    h = w = math.isqrt(x.shape[1])
    if h * w != x.shape[1]:
        raise ValueError(f"token count {x.shape[1]} is not a square grid")
    x = x.reshape(x.shape[0], h, w, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * patch_size, w * patch_size)


def tokens_to_grid(x: Tensor, grid_size: int) -> Tensor:
    """(N, g², C) raster-order tokens -> (N, C, g, g) feature map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid_size, grid_size)


def grid_to_tokens(x: Tensor) -> Tensor:
    """(N, C, g, g) feature map -> (N, g², C) raster-order tokens, contiguous.

    Contiguous rather than a transposed view of the map: every block then sees one memory
    layout (one compiled graph per token grid), and torch 2.13's inductor computed wrong
    gradients for AdaLN blocks fed the transposed layout (docs/benchmarks.md, "Compiled =
    eager")."""
    return x.flatten(2).transpose(1, 2).contiguous()

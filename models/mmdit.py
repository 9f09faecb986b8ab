"""MMDiT: SD3's joint-attention transformer, REPA's text-to-image model (appendix K, Table 12).

State-dict compatible with REPA's `models/mmdit.py` (`sihyun-yu/REPA`): same parameter names and
shapes, same outputs. Two streams of tokens, the caption's (context) and the image's, each with
its own weights (a `context_block` and an `x_block` per layer); they meet in one attention over
the concatenated sequence:

    context (N, L, 768) -> context_embedder -> (N, L, C) ─┐
    latents (N, 4, H, W) -> patches + position  -> (N, T, C) ─┤ joint block × depth
    t -> timestep embedding c (N, C), the AdaLN input of every block ──────────────┘
    image tokens after block `encoder_depth` -> projector heads (REPA)
    image tokens after the last block -> final layer -> velocity (N, 4, H, W)

As in REPA: hidden size 32·depth and one head per block (head dim 32), qkv bias, tanh-GELU MLP,
fixed sin-cos position table cropped at its centre to the input's token grid, conditioning on t
only (no pooled text vector), the context stream of the last block only feeds keys and values,
and PyTorch's default initialisation (REPA's MMDiT has no AdaLN-Zero).

Differences from REPA's file: the position table has the side of the model's token grid (or
`pos_embed_max_size`) where REPA hard-codes 16, which crashes at any other input size (ImageNet
512, patch 4); the projector heads are ours (`ProjectorConfig`), REPA's by default; unused SD3
options are not carried: `qk_norm` (REPA's training script never passes it, its generation script
builds `fused_attn`/`qk_norm` and drops them, so Table 12 ran without), registers, the pooled
`y_embedder`, `learn_sigma`, `scale_mod_only`, `swiglu`, `rmsnorm`. Attention always runs
through `F.scaled_dot_product_attention` (the fused kernels where they apply), so there is no
`fused_attn` switch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.base import AlignedDiffusionTransformer, zero_
from models.layers import Mlp, modulate, sincos_pos_embed_2d
from models.projector import Projector, ProjectorConfig

CLIP_TEXT_DIM = 768  # CLIP ViT-L/14's text width, U-ViT's context features (77 × 768)


def joint_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Self-attention over a whole sequence: (N, L, 3C) packed q, k, v -> (N, L, C)."""
    N, L, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(N, L, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, head_dim)
    return out.transpose(1, 2).reshape(N, L, C3 // 3)


class StreamAttention(nn.Module):
    """One stream's projections into and out of the joint attention (`qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, pre_only: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = None if pre_only else nn.Linear(dim, dim)


class StreamBlock(nn.Module):
    """One stream's half of a joint block: AdaLN, qkv, and after the attention the gated
    residuals of attention and MLP. `pre_only`: only qkv (the last block's context stream,
    whose output nothing reads)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, pre_only: bool):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(hidden_size, num_heads, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        modulations = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, modulations * hidden_size)
        )

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x (N, L, C), c (N, C) -> packed qkv (N, L, 3C) and the modulations still to apply."""
        shift_msa, scale_msa, *rest = self.adaLN_modulation(c).chunk(
            2 if self.pre_only else 6, dim=-1
        )
        return self.attn.qkv(modulate(self.norm1(x), shift_msa, scale_msa)), rest

    def post_attention(self, x: Tensor, attended: Tensor, modulations: list[Tensor]) -> Tensor:
        """The residual updates from the attention output `attended` (N, L, C)."""
        assert self.attn.proj is not None, "a pre-only stream has no output"
        gate_msa, shift_mlp, scale_mlp, gate_mlp = modulations
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attended)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class JointBlock(nn.Module):
    """SD3's block: both streams attend over context ++ image tokens, then update separately."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, last: bool):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, pre_only=last)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, pre_only=False)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """context (N, L, C), x (N, T, C), c (N, C) -> both updated (context None if last)."""
        context_qkv, context_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_mods = self.x_block.pre_attention(x, c)
        attended = joint_attention(
            torch.cat([context_qkv, x_qkv], dim=1), self.x_block.attn.num_heads
        )
        context_attended, x_attended = attended.split([context.shape[1], x.shape[1]], dim=1)
        x = self.x_block.post_attention(x, x_attended, x_mods)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, context_attended, context_mods), x


class MMDiT(AlignedDiffusionTransformer):
    """Joint-attention transformer conditioned on context tokens. Forward:
    `model(x, t, context) -> (v, zs)`, context (N, L, context_dim) (CLIP text features, 77 × 768
    in U-ViT's protocol; the empty caption's features are the null condition for guidance)."""

    pos_embed: Tensor

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        depth: int = 24,
        mlp_ratio: float = 4.0,
        context_dim: int = CLIP_TEXT_DIM,
        pos_embed_max_size: int | None = None,
        z_dims: list[int] | tuple[int, ...] = (768,),
        encoder_depth: int = 8,
        projector: ProjectorConfig | None = None,
        encoder_grid: int | None = None,
    ):
        super().__init__()
        hidden_size, self.num_heads = 32 * depth, depth  # REPA: head dim 32
        self.mlp_ratio = mlp_ratio
        self.depth = depth
        self.build_stem(input_size, patch_size, in_channels, hidden_size, num_classes=None)
        self.context_dim = context_dim
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        grid = self.x_embedder.grid_size
        self.pos_embed_max_size = pos_embed_max_size or grid
        if self.pos_embed_max_size < grid:
            raise ValueError(
                f"pos_embed_max_size {pos_embed_max_size} is smaller than the {grid}×{grid} "
                "token grid of the input size; leave it unset or raise it"
            )
        # A buffer, as REPA's (so in the state dict), never trained.
        self.register_buffer("pos_embed", torch.zeros(1, self.pos_embed_max_size**2, hidden_size))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, depth, mlp_ratio, last=i == depth - 1) for i in range(depth)
        )
        self.build_heads(z_dims, encoder_depth, projector, encoder_grid)

    def initialize_weights(self) -> None:
        """REPA's MMDiT keeps PyTorch's default initialisation (Table 12 was trained from it);
        only the fixed position table and our zero-initialised projector options are set."""
        table = sincos_pos_embed_2d(self.hidden_size, self.pos_embed_max_size)
        self.pos_embed.data.copy_(table.unsqueeze(0))
        for projector in self.projectors:
            assert isinstance(projector, Projector)
            if projector.time_modulation is not None:  # identity at initialisation
                zero_(projector.time_modulation[-1])

    def tap_grid(self, block_index: int) -> int:
        return self.x_embedder.grid_size

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre h×w window of the position table, (1, h·w, C) in raster order."""
        side = self.pos_embed_max_size
        if h > side or w > side:
            raise ValueError(f"a {h}×{w} token grid exceeds the {side}×{side} position table")
        top, left = (side - h) // 2, (side - w) // 2
        table = self.pos_embed.reshape(1, side, side, -1)[:, top : top + h, left : left + w]
        return table.reshape(1, h * w, -1)

    def embed_tokens(self, x: Tensor) -> Tensor:
        h, w = (size // self.patch_size for size in x.shape[-2:])
        return self.x_embedder(x) + self.cropped_pos_embed(h, w)  # (N, T, C)

    def forward(  # type: ignore[override]
        self, x: Tensor, t: Tensor, context: Tensor, return_zs: bool = True
    ) -> tuple[Tensor, list[Tensor]]:
        """x: (N, C, H, W) latents, t: (N,) times in [0, 1], context: (N, L, context_dim).
        Returns (v, zs) as the other models; `return_zs=False` skips the projector heads."""
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must be (N, L, {self.context_dim}) text features, got "
                f"{tuple(context.shape)}"
            )
        tokens = self.embed_tokens(x).to(x.dtype)  # (N, T, C)
        c = self.t_embedder(t)  # (N, C): the only AdaLN input
        context_tokens: Tensor | None = self.context_embedder(context)  # (N, L, C)
        tapped = tokens
        for i, block in enumerate(self.joint_blocks, start=1):
            assert context_tokens is not None  # only the last block returns None
            context_tokens, tokens = block(context_tokens, tokens, c)
            if i == self.encoder_depth:
                tapped = tokens
        return self.forward_heads(tokens, tapped, c, c, return_zs)

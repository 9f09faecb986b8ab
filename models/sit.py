"""SiT: REPA's isotropic diffusion transformer, the baseline.

State-dict compatible with REPA's released checkpoints (`sihyun-yu/REPA`, `models/sit.py`): same
parameter names and shapes, fixed sin-cos `pos_embed`, tanh-GELU MLP, AdaLN-Zero blocks, velocity
output with as many channels as the input. Differences from REPA's file are fixes: the final layer
always has the model's width (REPA's SiT-S factories crash because `decoder_hidden_size` defaults
to 768), and no unused constructor arguments (`path_type`, `use_cfg`, `qk_norm`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from models.base import AlignedDiffusionTransformer
from models.layers import TransformerBlock, sincos_pos_embed_2d
from models.projector import ProjectorConfig


class SiT(AlignedDiffusionTransformer):
    """Isotropic transformer: `depth` blocks at the patch grid; the tap is block `encoder_depth`."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: list[int] | tuple[int, ...] = (768,),
        encoder_depth: int = 8,
        projector: ProjectorConfig | None = None,
        encoder_grid: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.depth = depth
        self.build_stem(
            input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob
        )
        # Fixed sin-cos table, a frozen parameter (REPA's layout, so it is in checkpoints).
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, mlp_ratio, ffn="gelu") for _ in range(depth)
        )
        self.build_heads(z_dims, encoder_depth, projector, encoder_grid)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        table = sincos_pos_embed_2d(self.hidden_size, self.x_embedder.grid_size)
        self.pos_embed.data.copy_(table.unsqueeze(0))

    def tap_grid(self, block_index: int) -> int:
        return self.x_embedder.grid_size

    def embed_tokens(self, x: Tensor) -> Tensor:
        return self.x_embedder(x) + self.pos_embed  # (N, T, C)

    def forward_trunk(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        tapped = x
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)  # (N, T, C)
            if i == self.encoder_depth:
                tapped = x
        return x, tapped

"""SiT↓ ("SiTDown"): the U-Net-shaped SiT of U-REPA (paper §3.2, Table 2).

Three stages of AdaLN-Zero transformer blocks at constant width C:

    stage 1: n1 blocks on the patch grid (16×16 tokens for a 32×32 latent, patch 2)
    2× down: 3×3 stride-2 convolution, C -> C            (16×16 -> 8×8)
    stage 2: n2 blocks on the 8×8 grid
    2× up:   3×3 convolution C -> 4C, pixel shuffle      (8×8 -> 16×16, width C)
    stage 3: n3 blocks on the patch grid; before its j-th block, the output of stage-1 block
             n1 + 1 - j is concatenated and projected back to C (U-ViT long skips, LIFO order)

Blocks use 2-D RoPE in full self-attention (each stage on its own grid) and a SwiGLU feed-forward
whose hidden width, 2/3·4C, gives it the MACs of the GELU MLP it replaces (paper: "tricks of
RoPE and SwiGLU"); there is no absolute position embedding.

The paper does not publish the skip pattern, resampling kernels, SwiGLU width or position
embedding. These choices put parameters and forward MACs within 3 % of Table 2 for B, L and XL
(`python -m models.summary` prints the comparison):

* skips: one per stage-3 block (U-ViT style, as the paper's Table 1 "+ skip connections" row's
  FLOPs imply for DiT-XL: depth 25 with 12 concat-and-project skips gives its 114.1 G);
* down: a strided 3×3 convolution (ADM's U-Net downsampler) with U-DiT's principle of trading
  resolution for channels replaced by constant width, as the author describes; `downsample=
  "unshuffle"` selects U-DiT's literal operator instead (3×3 conv C -> C/4, pixel-unshuffle),
  which has the same MACs but 4× fewer parameters and lands SiT↓-B 4.5 % under Table 2;
* up: U-DiT's operator at constant width (3×3 conv C -> 4C, pixel shuffle).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from models.base import AlignedDiffusionTransformer
from models.layers import TransformerBlock, grid_to_tokens, tokens_to_grid
from models.projector import ProjectorConfig

DOWNSAMPLE_MODES = ("stride", "unshuffle")


class Downsample(nn.Module):
    """(N, g², C) -> (N, (g/2)², C)."""

    def __init__(self, hidden_size: int, mode: str = "stride"):
        super().__init__()
        if mode == "stride":
            self.conv = nn.Conv2d(hidden_size, hidden_size, 3, stride=2, padding=1)
        elif mode == "unshuffle":
            self.conv = nn.Conv2d(hidden_size, hidden_size // 4, 3, padding=1)
        else:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor, grid_size: int) -> Tensor:
        fmap = self.conv(tokens_to_grid(x, grid_size))
        if self.mode == "unshuffle":
            fmap = nn.functional.pixel_unshuffle(fmap, 2)
        return grid_to_tokens(fmap)


class Upsample(nn.Module):
    """(N, g², C) -> (N, (2g)², C): 3×3 conv to 4C channels, then pixel shuffle."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.conv = nn.Conv2d(hidden_size, 4 * hidden_size, 3, padding=1)

    def forward(self, x: Tensor, grid_size: int) -> Tensor:
        return grid_to_tokens(
            nn.functional.pixel_shuffle(self.conv(tokens_to_grid(x, grid_size)), 2)
        )


class SiTDown(AlignedDiffusionTransformer):
    """U-shaped SiT with stages `depths` = (n1, n2, n3), n1 == n3; blocks numbered 1..sum(depths)
    through all stages, so `encoder_depth=k` taps the k-th block wherever it is."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depths: tuple[int, int, int] | list[int] = (10, 16, 10),
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: list[int] | tuple[int, ...] = (768,),
        encoder_depth: int | None = None,
        projector: ProjectorConfig | None = None,
        encoder_grid: int | None = None,
        downsample: str = "stride",
    ):
        if len(depths) != 3 or depths[0] != depths[2] or min(depths) < 1:
            raise ValueError(f"depths must be (n1, n2, n1) with positive counts, got {depths}")
        if (input_size // patch_size) % 2:
            raise ValueError("SiT↓ halves the token grid, so input_size / patch_size must be even")
        super().__init__()
        self.depths: tuple[int, int, int] = (depths[0], depths[1], depths[2])
        self.depth = sum(self.depths)
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.build_stem(
            input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob
        )
        C = hidden_size
        self.blocks = nn.ModuleList(
            TransformerBlock(C, num_heads, mlp_ratio, ffn="swiglu", rope_grid=self.tap_grid(i))
            for i in range(1, self.depth + 1)
        )
        self.downsample = Downsample(C, downsample)
        self.upsample = Upsample(C)
        self.skip_linears = nn.ModuleList(nn.Linear(2 * C, C) for _ in range(self.depths[2]))
        if encoder_depth is None:  # Table 5's tap: the centre block, in the middle stage
            encoder_depth = (self.depth + 1) // 2
        self.build_heads(z_dims, encoder_depth, projector, encoder_grid)

    def stage_of(self, block_index: int) -> int:
        """0, 1 or 2: the stage holding block `block_index` (1-indexed)."""
        n1, n2, _ = self.depths
        return 0 if block_index <= n1 else 1 if block_index <= n1 + n2 else 2

    def tap_grid(self, block_index: int) -> int:
        full = self.x_embedder.grid_size
        return full // 2 if self.stage_of(block_index) == 1 else full

    def forward_trunk(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        n1, n2, _ = self.depths
        high, low = self.x_embedder.grid_size, self.x_embedder.grid_size // 2
        stream = x.dtype  # the convolutions and skip projections return to it (fp32 under autocast)
        skips: list[Tensor] = []
        tapped = x
        for i, block in enumerate(self.blocks, start=1):
            if i == n1 + 1:
                x = self.downsample(x, high).to(stream)  # (N, T/4, C)
            elif i == n1 + n2 + 1:
                x = self.upsample(x, low).to(stream)  # (N, T, C)
            if i > n1 + n2:  # stage 3: fuse the mirrored stage-1 output
                skip_linear = self.skip_linears[i - n1 - n2 - 1]
                x = skip_linear(torch.cat([x, skips.pop()], dim=-1)).to(stream)
            x = block(x, c)
            if i <= n1:
                skips.append(x)
            if i == self.encoder_depth:
                tapped = x
        return x, tapped

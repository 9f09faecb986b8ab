"""What SiT and SiT↓ share: conditioning, alignment tap + projector heads, and the output head.

A subclass's constructor calls `build_stem` (patch, timestep and label embedding), builds its
trunk, and calls `build_heads` (projector heads, final layer, initialisation); it implements
`forward_trunk(x, c) -> (tokens, tapped)` and `tap_grid(k)`. Everything around the trunk lives
here, so the two models differ only in their trunk.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
import torch.nn as nn
from torch import Tensor

from models.layers import FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
from models.projector import Projector, ProjectorConfig, pool_tokens, resample_scale

# The encoders' tokens are 16 image pixels apart (encoders.TOKEN_STRIDE) and an SD-VAE latent
# pixel covers 8 (vae.SD_VAE_FACTOR): the encoder grid is half the latent side. Stated here, not
# imported, so that the models stand alone; tests/test_frozen_networks.py checks that the two agree.
LATENT_SIDES_PER_ENCODER_TOKEN = 2


def default_encoder_grid(latent_side: int) -> int:
    """Side of the encoder's token grid on the image that SD-VAE latents of this side decode to."""
    return latent_side // LATENT_SIDES_PER_ENCODER_TOKEN


class _WeightAndBias(Protocol):
    weight: Tensor
    bias: Tensor


def as_linear(module: nn.Module) -> _WeightAndBias:
    """A linear or convolution layer with a bias, typed as such (nn.Module's attributes are not)."""
    assert isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None
    return cast(_WeightAndBias, module)


def zero_(module: nn.Module) -> None:
    layer = as_linear(module)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class AlignedDiffusionTransformer(nn.Module):
    """Base class. Forward: `model(x, t, y) -> (v, zs)`.

    x: (N, C, H, W) latents, t: (N,) times in [0, 1] (t = 1 is noise), y: (N,) labels in
    [0, num_classes] (num_classes is the null class). v has the shape of x; zs holds one
    (N, T_enc, D_enc) projected feature tensor per entry of `z_dims`, on the encoder's token grid
    (or, with `align_resolution="pool"`, on the tap's grid: see `align_targets`).
    """

    # Set by `models.build_model`: the registry name and the arguments the model was built with.
    model_name: str
    model_kwargs: dict[str, Any]
    # Set by `checkpoints.load_model_for_sampling`: the training arguments stored with the weights.
    checkpoint_args: dict[str, Any]
    # Set by the subclass before `build_heads`: the number of blocks of its trunk.
    depth: int

    # -- construction: a subclass calls build_stem, builds its trunk, then calls build_heads ------

    def build_stem(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        num_classes: int | None,
        class_dropout_prob: float = 0.0,
    ) -> None:
        """The embedders before the trunk: patches, timestep, and the label unless `num_classes`
        is None (a text-to-image model is conditioned by its context tokens instead)."""
        self.in_channels = in_channels
        self.out_channels = in_channels  # velocity only, no learned sigma
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes is not None:
            self.num_classes = num_classes
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)

    def build_heads(
        self,
        z_dims: list[int] | tuple[int, ...],
        encoder_depth: int,
        projector: ProjectorConfig | None,
        encoder_grid: int | None,
    ) -> None:
        """After the trunk: one projector head per encoder at block `encoder_depth` (REPA's
        head unless `projector` says otherwise), the output layer, then the initialisation."""
        projector = projector or ProjectorConfig()
        if not 1 <= encoder_depth <= self.depth:
            raise ValueError(
                f"encoder_depth={encoder_depth} is out of range: this model has {self.depth} "
                f"blocks, so the alignment tap must be a block index in 1..{self.depth}"
            )
        self.z_dims = list(z_dims)
        self.encoder_depth = encoder_depth
        self.align_resolution = projector.align_resolution
        # By default the grid of DINOv2 on the image that SD-VAE latents of this size decode to
        # (16×16 at 256 px). Patch-4/8 models therefore project their coarser grid up to it
        # (REPA's keep their own grid: encoder_grid=input_size // patch_size does that).
        latent_side = self.x_embedder.grid_size * self.patch_size
        self.encoder_grid = encoder_grid or default_encoder_grid(latent_side)
        self.tap_grid_size = self.tap_grid(encoder_depth)
        scale = resample_scale(self.tap_grid_size, self.encoder_grid)
        head_scale = 1 if projector.align_resolution == "pool" else scale
        self.projectors = nn.ModuleList(
            Projector(self.hidden_size, z_dim, head_scale, projector) for z_dim in self.z_dims
        )
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels)
        self.initialize_weights()

    # -- subclass interface ---------------------------------------------------------------------

    def tap_grid(self, block_index: int) -> int:
        """Side of the token grid that block `block_index` (1-indexed) runs on."""
        raise NotImplementedError

    def forward_trunk(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, C) embedded tokens -> (final tokens, tokens after block `encoder_depth`)."""
        raise NotImplementedError

    def embed_tokens(self, x: Tensor) -> Tensor:
        return self.x_embedder(x)

    # -- shared ---------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """DiT/REPA initialisation: xavier linears, zeroed AdaLN and output layers (AdaLN-Zero)."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        # Patch embedding initialised like a linear layer, not a convolution.
        patch = self.x_embedder.proj
        nn.init.xavier_uniform_(patch.weight.data.view([patch.weight.shape[0], -1]))
        nn.init.zeros_(as_linear(patch).bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(as_linear(self.t_embedder.mlp[0]).weight, std=0.02)
        nn.init.normal_(as_linear(self.t_embedder.mlp[2]).weight, std=0.02)
        # AdaLN-Zero: every modulation starts at zero, so each block starts as the identity.
        for module in self.modules():
            modulation = getattr(module, "adaLN_modulation", None)
            if isinstance(modulation, nn.Sequential):
                zero_(modulation[-1])
        zero_(self.final_layer.linear)
        for projector in self.projectors:
            assert isinstance(projector, Projector)
            if projector.time_modulation is not None:  # identity at initialisation
                zero_(projector.time_modulation[-1])

    def align_targets(self, zs: list[Tensor]) -> list[Tensor]:
        """Encoder features (N, T_enc, D) -> the grid this model's `zs` predictions live on.

        Identity unless `align_resolution="pool"` (Table 6), where the encoder's grid is
        average-pooled down to the tap's grid instead of upsampling the model's features.
        """
        if self.align_resolution != "pool":
            return list(zs)
        return [pool_tokens(z, self.tap_grid_size) for z in zs]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        force_drop_ids: Tensor | None = None,
        return_zs: bool = True,
    ) -> tuple[Tensor, list[Tensor]]:
        """`force_drop_ids` (N,) bool: which labels to replace by the null class (training only;
        by default the label embedder draws them with probability `class_dropout_prob`).
        `return_zs=False` skips the projector heads and returns `zs = []`: sampling needs v only
        (v does not depend on the heads, so it is the same either way)."""
        # The residual stream keeps x's dtype: fp32 under autocast, where only the matmuls and
        # attention run in bf16/fp16 (REPA's SiT, whose fp32 position table promotes it).
        tokens = self.embed_tokens(x).to(x.dtype)  # (N, T, C)
        t_emb = self.t_embedder(t)  # (N, C)
        c = t_emb + self.y_embedder(y, self.training, force_drop_ids)  # (N, C)
        tokens, tapped = self.forward_trunk(tokens, c)
        return self.forward_heads(tokens, tapped, c, t_emb, return_zs)

    def forward_heads(
        self, tokens: Tensor, tapped: Tensor, c: Tensor, t_emb: Tensor, return_zs: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """After the trunk: the projections of the tapped tokens (unless `return_zs` is False)
        and the velocity from the final tokens, conditioned on c (N, C)."""
        zs = (
            [projector(tapped, self.tap_grid_size, t_emb) for projector in self.projectors]
            if return_zs
            else []
        )
        out = self.final_layer(tokens, c)  # (N, T, p²·C_out)
        return unpatchify(out, self.patch_size, self.out_channels), zs

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents the model takes."""
        size = self.x_embedder.grid_size * self.patch_size
        return (self.in_channels, size, size)

    def num_parameters(self, include_projectors: bool = True) -> int:
        skip = set() if include_projectors else {id(p) for p in self.projectors.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def null_labels(self, n: int, device: torch.device | None = None) -> Tensor:
        """Labels of the unconditional (null) class, for classifier-free guidance."""
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

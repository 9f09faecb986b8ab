"""Model family: registry, SiT (REPA layout), SiT↓ (Table 2), alignment tap, RoPE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import MODEL_NAMES, MODELS, build_model, canonical_name
from models.layers import RotaryEmbedding2D, sincos_pos_embed_2d
from models.summary import PAPER_TABLE, count_macs


def tiny_sit(**kwargs):
    defaults = dict(
        input_size=8,
        hidden_size=32,
        depth=4,
        num_heads=2,
        num_classes=10,
        z_dims=[16],
        encoder_depth=2,
        projector_dim=24,
    )
    return build_model("SiT", **{**defaults, **kwargs})


def tiny_sit_down(**kwargs):
    defaults = dict(
        input_size=8,
        hidden_size=32,
        depths=(2, 3, 2),
        num_heads=2,
        num_classes=10,
        z_dims=[16],
        projector_dim=24,
    )
    return build_model("SiTDown", **{**defaults, **kwargs})


def batch(n=3, size=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, num_classes + 1, (n,), generator=g)  # includes the null class
    return x, t, y


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registry_entry_builds_with_right_shapes(name):
    with torch.device("meta"):
        model = MODELS[name](z_dims=[768, 1024])
        x = torch.zeros(2, 4, 32, 32)
        v, zs = model(x, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert v.shape == x.shape
    # one projection per encoder, on DINOv2's 16×16 grid for a 256×256 image
    assert [tuple(z.shape) for z in zs] == [(2, 256, 768), (2, 256, 1024)]
    assert model.y_embedder.embedding_table.num_embeddings == 1001  # null class at index 1000


def test_registry_names_and_aliases():
    expected = {f"SiT-{s}/{p}" for s in ["S", "B", "L", "XL"] for p in (2, 4, 8)}
    expected |= {f"SiTDown-{s}/2" for s in ["B", "L", "XL"]}
    assert set(MODEL_NAMES) == expected
    assert MODELS["SiT↓-XL/2"] is MODELS["SiTDown-XL/2"]
    assert canonical_name("SiT↓-B/2") == "SiTDown-B/2"
    with pytest.raises(KeyError, match="choose one of"):
        canonical_name("SiT-XXL/2")


def test_build_model_records_how_to_rebuild():
    with torch.device("meta"):
        model = build_model("SiT↓-B/2", input_size=8, num_classes=10, z_dims=[16])
    assert model.model_name == "SiTDown-B/2"
    assert model.model_kwargs == dict(input_size=8, num_classes=10, z_dims=[16])
    with torch.device("meta"):
        rebuilt = build_model(model.model_name, **model.model_kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_sit_s_factory_builds_and_runs():
    # REPA's SiT-S factories crash (final layer built with width 768); ours run.
    model = build_model("SiT-S/8", input_size=16, num_classes=10, z_dims=[8])
    v, _ = model(*batch(size=16))
    assert v.shape == (3, 4, 16, 16)


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("make", [tiny_sit, tiny_sit_down], ids=["SiT", "SiTDown"])
def test_velocity_is_zero_at_init_and_every_parameter_learns(make):
    torch.manual_seed(0)
    model = make(z_dims=[16, 12], time_aware_projector=True)
    x, t, y = batch()
    v, _ = model(x, t, y)
    assert torch.equal(v, torch.zeros_like(v))  # AdaLN-Zero + zero output layer

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == (["pos_embed"] if make is tiny_sit else [])

    def step():
        opt.zero_grad()
        v, zs = model(x, t, y)
        loss = (v - x).square().mean() + sum((z - 1).square().mean() for z in zs)
        loss.backward()
        opt.step()

    step()
    # Every parameter is in the graph from the first step (DDP needs no unused parameters) ...
    assert [n for n, p in trainable if p.grad is None] == []
    # ... and once the zero-initialised gates and output layer have moved (AdaLN-Zero needs a
    # step per stage of the chain: output layer, then gates, then the block weights), every one
    # of them receives a non-zero gradient.
    step()
    step()
    assert [n for n, p in trainable if not p.grad.abs().sum() > 0] == []


# --------------------------------------------------------------------------- SiT (REPA layout)


def repa_sit_layout(
    hidden, depth, patch, in_ch=4, num_classes=1000, z_dims=(768,), proj=2048, grid=16
):
    """REPA's SiT state-dict layout, written out from its module tree (timm PatchEmbed,
    Attention, Mlp; build_mlp projector; FinalLayer)."""
    C = hidden
    table = {
        "pos_embed": (1, grid * grid, C),
        "x_embedder.proj.weight": (C, in_ch, patch, patch),
        "x_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (C, 256),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "y_embedder.embedding_table.weight": (num_classes + 1, C),
        "final_layer.linear.weight": (patch * patch * in_ch, C),
        "final_layer.linear.bias": (patch * patch * in_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * C, C),
        "final_layer.adaLN_modulation.1.bias": (2 * C,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table |= {
            b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "mlp.fc1.weight": (4 * C, C), b + "mlp.fc1.bias": (4 * C,),
            b + "mlp.fc2.weight": (C, 4 * C), b + "mlp.fc2.bias": (C,),
            b + "adaLN_modulation.1.weight": (6 * C, C), b + "adaLN_modulation.1.bias": (6 * C,),
        }  # fmt: skip
    for k, z in enumerate(z_dims):
        p = f"projectors.{k}."
        table |= {
            p + "0.weight": (proj, C), p + "0.bias": (proj,),
            p + "2.weight": (proj, proj), p + "2.bias": (proj,),
            p + "4.weight": (z, proj), p + "4.bias": (z,),
        }  # fmt: skip
    return table


def test_sit_xl_state_dict_matches_repa_layout():
    with torch.device("meta"):
        model = build_model("SiT-XL/2")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == repa_sit_layout(hidden=1152, depth=28, patch=2)


def test_sit_pos_embed_is_mae_sincos():
    """Independent evaluation of MAE's formula: first half encodes the column, second the row."""
    D, g = 16, 4
    table = sincos_pos_embed_2d(D, g)
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    for index in range(g * g):
        row, col = divmod(index, g)
        expected = torch.cat(
            [
                torch.sin(col * omega),
                torch.cos(col * omega),
                torch.sin(row * omega),
                torch.cos(row * omega),
            ]
        ).float()
        torch.testing.assert_close(table[index], expected)
    model = tiny_sit(hidden_size=16)
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(16, 4))


def test_sit_forward_matches_a_plain_transcription_of_repa():
    """A second implementation of REPA's forward, written from its equations, with our weights."""
    torch.manual_seed(0)
    model = tiny_sit(depth=3, encoder_depth=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x, t, y = batch()
    C, H, p = 32, 2, 2
    sd = model.state_dict()

    def linear(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t[:, None] * freqs
    t_freq = torch.cat([args.cos(), args.sin()], dim=1)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    N, T, _ = h.shape
    for i in range(3):
        b = f"blocks.{i}."
        mod = linear(F.silu(c), b + "adaLN_modulation.1")[:, None]  # (N, 1, 6C)
        sh1, sc1, g1, sh2, sc2, g2 = mod.split(C, dim=-1)
        a = F.layer_norm(h, (C,), eps=1e-6) * (1 + sc1) + sh1
        q, k, v = linear(a, b + "attn.qkv").reshape(N, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), dim=-1) @ v
        h = h + g1 * linear(att.transpose(1, 2).reshape(N, T, C), b + "attn.proj")
        m = F.layer_norm(h, (C,), eps=1e-6) * (1 + sc2) + sh2
        m = linear(F.gelu(linear(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g2 * m
        if i == 1:
            z = linear(
                F.silu(linear(F.silu(linear(h, "projectors.0.0")), "projectors.0.2")),
                "projectors.0.4",
            )
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].split(C, dim=-1)
    out = linear(F.layer_norm(h, (C,), eps=1e-6) * (1 + scale) + shift, "final_layer.linear")
    g = 4
    out = out.reshape(N, g, g, p, p, 4).permute(0, 5, 1, 3, 2, 4).reshape(N, 4, g * p, g * p)

    v_ours, zs_ours = model(x, t, y)
    torch.testing.assert_close(v_ours, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zs_ours[0], z, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SiT↓


@pytest.mark.parametrize("name", ["SiTDown-B/2", "SiTDown-L/2", "SiTDown-XL/2"])
def test_sit_down_matches_table_2(name):
    """Parameters (projector excluded) and forward MACs at 256×256 within 3 % of Table 2."""
    with torch.device("meta"):
        model = build_model(name)
    params_m = model.num_parameters(include_projectors=False) / 1e6
    gmacs = count_macs(model, input_size=32) / 1e9
    paper_params, paper_gmacs = PAPER_TABLE[name]
    assert abs(params_m / paper_params - 1) < 0.03, params_m
    assert abs(gmacs / paper_gmacs - 1) < 0.03, gmacs


def test_mac_count_reproduces_sit_flops_of_the_papers():
    """The counter gives SiT's published GFLOPs (Table 3), so Table 2 is compared like for like."""
    for name in ["SiT-B/2", "SiT-XL/2"]:
        with torch.device("meta"):
            model = build_model(name)
        assert abs(count_macs(model) / 1e9 / PAPER_TABLE[name][1] - 1) < 0.005


def test_mac_counter_counts_one_per_multiply_add():
    model = tiny_sit(depth=1, encoder_depth=1)
    linear_macs = 16 * (3 * 32 * 32 + 32 * 32 + 2 * 4 * 32 * 32)  # qkv, proj, fc1, fc2 per token
    attention_macs = 2 * 16 * 16 * 32  # QKᵀ and AV
    per_sample = 256 * 32 + 32 * 32 + 6 * 32 * 32 + 2 * 32 * 32  # t-MLP, block and final AdaLN
    patch_io = 16 * (4 * 2 * 2 * 32) + 16 * (32 * 2 * 2 * 4)
    assert count_macs(model, input_size=8) == linear_macs + attention_macs + per_sample + patch_io


@pytest.mark.parametrize(
    "name,tap", [("SiTDown-B/2", 8), ("SiTDown-L/2", 16), ("SiTDown-XL/2", 18)]
)
def test_sit_down_default_tap_is_the_middle_block(name, tap):
    with torch.device("meta"):
        model = build_model(name)
    assert model.encoder_depth == tap
    assert model.tap_grid_size == 8  # inside the 8×8 middle stage
    assert build_model("SiT-B/2", input_size=8, num_classes=10).encoder_depth == 8


@pytest.mark.parametrize("make,depth", [(tiny_sit, 4), (tiny_sit_down, 7)])
def test_out_of_range_encoder_depth_is_a_clear_error(make, depth):
    for bad in (0, depth + 1):
        with pytest.raises(ValueError, match=f"1..{depth}"):
            make(encoder_depth=bad)


def test_sit_down_forward_matches_a_second_implementation():
    """Re-run the U-Net with the model's own blocks but independent glue: stages, strided-conv
    down, conv + pixel-shuffle up, LIFO concat skips; tap and projector by hand."""
    torch.manual_seed(0)
    model = tiny_sit_down(encoder_depth=4, projector_upsample="after").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t, y = batch()
    N, C = 3, 32
    t_emb = model.t_embedder(t)
    c = t_emb + model.y_embedder(y, train=False)
    h = model.x_embedder(x)  # (N, 16, C), 4×4 grid
    blocks = list(model.blocks)
    stage1 = []
    for blk in blocks[:2]:
        h = blk(h, c)
        stage1.append(h)
    fmap = h.transpose(1, 2).reshape(N, C, 4, 4)
    conv = model.downsample.conv
    h = F.conv2d(fmap, conv.weight, conv.bias, stride=2, padding=1).flatten(2).transpose(1, 2)
    for i, blk in enumerate(blocks[2:5], start=3):
        h = blk(h, c)
        if i == 4:
            tapped = h  # (N, 4, C) on the 2×2 grid
    up = model.upsample.conv
    fmap = F.conv2d(h.transpose(1, 2).reshape(N, C, 2, 2), up.weight, up.bias, padding=1)
    # pixel shuffle by hand: channel c·4 + 2i + j -> position (2y + i, 2x + j)
    fmap = fmap.reshape(N, C, 2, 2, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(N, C, 4, 4)
    h = fmap.flatten(2).transpose(1, 2)
    for j, blk in enumerate(blocks[5:]):
        skip = stage1[1 - j]  # first stage-3 block meets the last stage-1 block
        lin = model.skip_linears[j]
        h = blk(torch.cat([h, skip], -1) @ lin.weight.T + lin.bias, c)
    v = model.final_layer(h, c)
    v = v.reshape(N, 4, 4, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(N, 4, 8, 8)
    proj = model.projectors[0]
    z = proj.mlp(tapped).transpose(1, 2).reshape(N, 16, 2, 2)
    z = F.interpolate(z, size=(4, 4), mode="bilinear", align_corners=False)
    z = z.flatten(2).transpose(1, 2)

    v_ours, zs_ours = model(x, t, y)
    torch.testing.assert_close(v_ours, v)
    torch.testing.assert_close(zs_ours[0], z)


@pytest.mark.parametrize("tap,tokens", [(1, 16), (3, 16), (4, 16), (6, 16)])
def test_tap_grid_follows_the_stage(tap, tokens):
    model = tiny_sit_down(encoder_depth=tap)
    assert model.tap_grid_size == (2 if tap in (3, 4, 5) else 4)
    _, zs = model(*batch())
    assert zs[0].shape == (3, tokens, 16)  # always on the encoder's 4×4 grid


def test_tap_is_the_output_of_block_k():
    model = tiny_sit_down(encoder_depth=6)  # first stage-3 block, full resolution
    captured = {}
    model.blocks[5].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    _, zs = model(*batch())
    torch.testing.assert_close(zs[0], model.projectors[0].mlp(captured["h"]))


# --------------------------------------------------------------------------- projector


def tapped_tokens(n=2, grid=2, dim=32, seed=1):
    return torch.randn(n, grid * grid, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", ["bilinear", "nearest"])
def test_upsample_after_equals_interpolating_mlp_output(kernel):
    model = tiny_sit_down(projector_kernel=kernel)
    proj, h = model.projectors[0], tapped_tokens()
    by_hand = proj.mlp(h).transpose(1, 2).reshape(2, 16, 2, 2)
    extra = {"align_corners": False} if kernel == "bilinear" else {}
    by_hand = F.interpolate(by_hand, scale_factor=2, mode=kernel, **extra)
    torch.testing.assert_close(proj(h, 2), by_hand.flatten(2).transpose(1, 2))


def test_upsample_before_runs_the_mlp_on_the_interpolated_map():
    proj, h = tiny_sit_down(projector_upsample="before").projectors[0], tapped_tokens()
    fine = F.interpolate(h.transpose(1, 2).reshape(2, 32, 2, 2), scale_factor=2, mode="bilinear")
    torch.testing.assert_close(proj(h, 2), proj.mlp(fine.flatten(2).transpose(1, 2)))


def test_upsample_within_emits_a_patch_per_token():
    proj, h = tiny_sit_down(projector_upsample="within").projectors[0], tapped_tokens()
    assert proj[4].out_features == 4 * 16
    out = proj(h, 2)  # (2, 16, 16)
    raw = proj.mlp(h)  # (2, 4, 64): token (y, x) holds channels d·4 + 2i + j
    for y_ in range(2):
        for x_ in range(2):
            for i in range(2):
                for j in range(2):
                    fine_index = (2 * y_ + i) * 4 + (2 * x_ + j)
                    expected = raw[:, y_ * 2 + x_, (2 * i + j) :: 4]
                    torch.testing.assert_close(out[:, fine_index], expected)


def test_full_resolution_tap_needs_no_resampling():
    model = tiny_sit_down(encoder_depth=1, projector_upsample="within")
    proj, h = model.projectors[0], tapped_tokens(grid=4)
    assert proj.scale == 1 and proj[4].out_features == 16
    torch.testing.assert_close(proj(h, 4), proj.mlp(h))


def test_time_aware_projector_is_identity_at_init_and_then_modulates():
    torch.manual_seed(0)
    plain = tiny_sit_down()
    torch.manual_seed(0)
    timed = tiny_sit_down(time_aware_projector=True)
    timed.load_state_dict(plain.state_dict(), strict=False)
    x, t, y = batch()
    torch.testing.assert_close(timed(x, t, y)[1][0], plain(x, t, y)[1][0])
    with torch.no_grad():
        timed.projectors[0].time_modulation[-1].bias.fill_(0.5)  # γ = β = 0.5
    torch.testing.assert_close(timed(x, t, y)[1][0], plain(x, t, y)[1][0] * 1.5 + 0.5)


def test_pool_alignment_keeps_the_coarse_grid_and_pools_targets():
    model = tiny_sit_down(align_resolution="pool")
    _, zs = model(*batch())
    assert zs[0].shape == (3, 4, 16)  # the tap's 2×2 grid
    target = torch.randn(3, 16, 16)
    pooled = model.align_targets([target])[0]
    grid = target.reshape(3, 4, 4, 16)
    by_hand = torch.stack(
        [
            grid[:, 2 * a : 2 * a + 2, 2 * b : 2 * b + 2].mean(dim=(1, 2))
            for a in range(2)
            for b in range(2)
        ],
        dim=1,
    )
    torch.testing.assert_close(pooled, by_hand)
    assert tiny_sit_down().align_targets([target])[0] is target


def test_tap_grid_must_divide_encoder_grid_by_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        tiny_sit_down(encoder_grid=6)
    model = tiny_sit_down(encoder_grid=8)  # 2×2 tap upsampled ×4
    assert model(*batch())[1][0].shape == (3, 64, 16)


def test_bad_projector_options_are_rejected():
    with pytest.raises(ValueError, match="upsample"):
        tiny_sit_down(projector_upsample="sideways")
    with pytest.raises(ValueError, match="kernel"):
        tiny_sit_down(projector_kernel="bicubic")
    with pytest.raises(ValueError, match="align_resolution"):
        tiny_sit_down(align_resolution="crop")
    with pytest.raises(ValueError, match="depths"):
        tiny_sit_down(depths=(2, 3, 1))


# --------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_position():
    g = 5
    rope = RotaryEmbedding2D(head_dim=16, grid_size=g)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=gen).expand(1, 1, g * g, 16)  # same query everywhere
    k = torch.randn(1, 1, 1, 16, generator=gen).expand(1, 1, g * g, 16)
    scores = (rope(q) @ rope(k).transpose(-1, -2))[0, 0]  # (T, T)
    by_offset: dict[tuple[int, int], float] = {}
    for i in range(g * g):
        for j in range(g * g):
            offset = (i // g - j // g, i % g - j % g)
            by_offset.setdefault(offset, scores[i, j].item())
            assert scores[i, j].item() == pytest.approx(by_offset[offset], abs=1e-4)
    # ... and it does depend on the offset, in both directions
    assert by_offset[(0, 1)] != pytest.approx(by_offset[(0, 0)], abs=1e-3)
    assert by_offset[(1, 0)] != pytest.approx(by_offset[(0, 1)], abs=1e-3)


def test_rope_preserves_norms_and_is_identity_at_the_origin():
    rope = RotaryEmbedding2D(head_dim=8, grid_size=3)
    x = torch.randn(2, 3, 9, 8)
    out = rope(x)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])


def test_rope_tables_are_buffers_on_each_stage_grid_outside_the_state_dict():
    model = tiny_sit_down()  # depths (2, 3, 2) on a 4×4 patch grid, 2×2 in the middle stage
    grids = [block.attn.rope.grid_size for block in model.blocks]
    assert grids == [4, 4, 2, 2, 2, 4, 4]
    rope = model.blocks[3].attn.rope
    assert dict(rope.named_buffers()).keys() == {"cos", "sin"}
    angles = rope.angles(2)  # (4, head_dim / 2): (row, col) · f for each token
    torch.testing.assert_close(rope.cos, torch.cat([angles, angles], dim=1).cos())
    assert "rope" not in "".join(model.state_dict())
    moved = model.to(torch.float64)  # buffers follow the model
    assert moved.blocks[0].attn.rope.cos.dtype == torch.float64
    with pytest.raises(ValueError, match="4×4 grid got 9 tokens"):
        model.blocks[0].attn.rope(torch.zeros(1, 1, 9, 16))


@pytest.mark.parametrize(
    "make", [tiny_sit, tiny_sit_down, lambda: tiny_sit_down(downsample="unshuffle")]
)
def test_residual_stream_stays_fp32_under_bf16_autocast(make):
    """The decision of docs/models.md: under autocast every block reads and writes an fp32
    residual stream, while its matmuls run in bf16."""
    model = make()
    seen: dict[str, list[torch.dtype]] = {"stream": [], "matmul": []}
    hooks = [model.final_layer.register_forward_pre_hook(
        lambda _m, args: seen["stream"].append(args[0].dtype))]  # fmt: skip
    for block in model.blocks:
        hooks.append(block.register_forward_pre_hook(
            lambda _m, args: seen["stream"].append(args[0].dtype)))  # fmt: skip
        hooks.append(block.register_forward_hook(
            lambda _m, _args, out: seen["stream"].append(out.dtype)))  # fmt: skip
        hooks.append(block.attn.qkv.register_forward_hook(
            lambda _m, _args, out: seen["matmul"].append(out.dtype)))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, zs = model(*batch())
    for hook in hooks:
        hook.remove()
    assert seen["stream"] == [torch.float32] * (2 * model.depth + 1)
    assert seen["matmul"] == [torch.bfloat16] * model.depth


def test_label_dropout_uses_the_null_class_only_in_training():
    model = tiny_sit(class_dropout_prob=1.0)
    labels = torch.tensor([0, 3, 9])
    emb = model.y_embedder
    torch.testing.assert_close(emb(labels, train=True), emb.embedding_table.weight[[10, 10, 10]])
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table.weight[labels])


def test_forced_label_drops_replace_exactly_those_labels():
    model = tiny_sit(class_dropout_prob=0.1)
    labels = torch.tensor([0, 3, 9])
    forced = torch.tensor([True, False, True])
    table = model.y_embedder.embedding_table.weight
    out = model.y_embedder(labels, train=True, force_drop_ids=forced)
    torch.testing.assert_close(out, table[[10, 3, 10]])


# --------------------------------------------------------------------------- speed switches


@pytest.mark.parametrize("make", [tiny_sit, tiny_sit_down])
def test_return_zs_false_skips_the_projectors_and_keeps_v(make):
    torch.manual_seed(0)
    model = make().eval()
    for p in model.parameters():  # random weights everywhere, so that v is not zero
        p.data.normal_(0, 0.1)
    calls = []
    for projector in model.projectors:
        projector.register_forward_hook(lambda *args: calls.append(1))
    x, t, y = batch()
    v, zs = model(x, t, y)
    assert len(zs) == 1 and calls == [1]
    v_only, none = model(x, t, y, return_zs=False)
    assert none == [] and calls == [1]  # the heads did not run
    assert torch.equal(v_only, v)


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backend_choice_keeps_attention(backend):
    from models.layers import sdpa_backend

    torch.manual_seed(0)
    model = tiny_sit_down().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = batch()
    with torch.no_grad():
        reference = model(x, t, y)[0]
        with sdpa_backend(backend):
            v = model(x, t, y)[0]
    torch.testing.assert_close(v, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="SDPA backend must be one of"):
        sdpa_backend("fast")

"""MMDiT (REPA appendix K): REPA's state-dict layout, its forward (a plain transcription, and
REPA's own class when a checkout is named by REPA_SRC), the registry, the alignment options."""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

from loss import SILoss
from models import build_model, canonical_name, model_config
from models.layers import sincos_pos_embed_2d
from urepa.cli import model_name

CONTEXT = 768


def tiny_mmdit(**kwargs):
    defaults = dict(input_size=8, depth=2, z_dims=[16], encoder_depth=1, projector_dim=24)
    return build_model("MMDiT", **{**defaults, **kwargs})


def inputs(n=2, size=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.rand(n, generator=g)
    context = torch.randn(n, tokens, CONTEXT, generator=g)
    return x, t, context


def repa_mmdit_layout(depth, patch=2, grid=16, in_ch=4, z_dims=(768,), proj=2048):
    """REPA's MMDiT state dict, written out from its module tree: PatchEmbed, TimestepEmbedder,
    a Linear(768, C) context embedder, the pos_embed buffer, per layer a JointBlock of two
    DismantledBlocks (the last context block pre-only: qkv and a 2C modulation), FinalLayer,
    build_mlp projectors."""
    C = 32 * depth

    def linear(name, n_out, n_in):
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    table = {
        "pos_embed": (1, grid * grid, C),
        "x_embedder.proj.weight": (C, in_ch, patch, patch),
        "x_embedder.proj.bias": (C,),
        **linear("t_embedder.mlp.0", C, 256),
        **linear("t_embedder.mlp.2", C, C),
        **linear("context_embedder", C, 768),
        **linear("final_layer.linear", patch * patch * in_ch, C),
        **linear("final_layer.adaLN_modulation.1", 2 * C, C),
    }
    for i in range(depth):
        for stream in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{stream}."
            pre_only = stream == "context_block" and i == depth - 1
            table |= linear(b + "attn.qkv", 3 * C, C)
            table |= linear(b + "adaLN_modulation.1", (2 if pre_only else 6) * C, C)
            if not pre_only:
                table |= linear(b + "attn.proj", C, C)
                table |= linear(b + "mlp.fc1", 4 * C, C) | linear(b + "mlp.fc2", C, 4 * C)
    for k, z in enumerate(z_dims):
        p = f"projectors.{k}."
        table |= linear(p + "0", proj, C) | linear(p + "2", proj, proj) | linear(p + "4", z, proj)
    return table


def test_table_12_model_has_repas_layout_hidden_32_depth_and_heads_depth():
    with torch.device("meta"):
        model = build_model("MMDiT-d24/2", input_size=32, z_dims=[768])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == repa_mmdit_layout(depth=24)
    assert model.hidden_size == 768 and model.num_heads == 24


def naive_joint_attention(q, k, v, heads):
    """Per sample and head, softmax(q kᵀ / √d) v over the whole sequence, with loops."""
    N, L, C = q.shape
    d = C // heads
    out = torch.empty_like(q)
    for n in range(N):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[n, :, cols] @ k[n, :, cols].T / math.sqrt(d)
            out[n, :, cols] = torch.softmax(scores, dim=-1) @ v[n, :, cols]
    return out


def transcribed_forward(sd, x, t, context, depth, encoder_depth, patch=2):
    """REPA's MMDiT forward written from its equations, reading the weights from `sd`."""
    C = 32 * depth

    def linear(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def adaln(h, shift, scale):
        return F.layer_norm(h, (C,), eps=1e-6) * (1 + scale) + shift

    half = 128
    args = t[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)
    c = linear(torch.cat([args.cos(), args.sin()], dim=1), "t_embedder.mlp.0")
    c = linear(F.silu(c), "t_embedder.mlp.2")
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    ctx = linear(context, "context_embedder")
    L = ctx.shape[1]
    for i in range(depth):
        streams, qkvs, mods = [ctx, h], [], []
        for name, s in zip(("context_block", "x_block"), streams, strict=True):
            b = f"joint_blocks.{i}.{name}."
            mod = linear(F.silu(c), b + "adaLN_modulation.1")[:, None].split(C, dim=-1)
            qkvs.append(linear(adaln(s, mod[0], mod[1]), b + "attn.qkv"))
            mods.append(mod)
        q, k, v = torch.cat(qkvs, dim=1).split(C, dim=-1)
        attended = naive_joint_attention(q, k, v, heads=depth)
        parts = (attended[:, :L], attended[:, L:])
        for j, name in enumerate(("context_block", "x_block")):
            b = f"joint_blocks.{i}.{name}."
            if len(mods[j]) == 2:  # the last context block: keys and values only
                continue
            _, _, g1, sh2, sc2, g2 = mods[j]
            s = streams[j] + g1 * linear(parts[j], b + "attn.proj")
            m = linear(
                F.gelu(linear(adaln(s, sh2, sc2), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2"
            )
            streams[j] = s + g2 * m
        ctx, h = streams
        if i + 1 == encoder_depth:
            z = linear(
                F.silu(linear(F.silu(linear(h, "projectors.0.0")), "projectors.0.2")),
                "projectors.0.4",
            )
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].split(C, dim=-1)
    out = linear(adaln(h, shift, scale), "final_layer.linear")
    N, g = x.shape[0], x.shape[-1] // patch
    out = out.reshape(N, g, g, patch, patch, 4).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(N, 4, g * patch, g * patch), z


def test_forward_matches_a_plain_transcription_of_repa():
    """Joint attention computed by loops over samples and heads, with our weights; the tap in
    the middle of three blocks, the last one's context stream pre-only."""
    torch.manual_seed(0)
    model = tiny_mmdit(depth=3, encoder_depth=2).eval()
    x, t, context = inputs()
    with torch.no_grad():
        v, zs = model(x, t, context)
        v_ref, z_ref = transcribed_forward(model.state_dict(), x, t, context, 3, 2)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zs[0], z_ref, rtol=1e-5, atol=1e-5)


def test_the_caption_conditions_v_as_a_set_of_tokens():
    """Another context changes v; a permutation of the context tokens does not (they carry no
    positions and meet the image only in attention, which is order-free over keys)."""
    torch.manual_seed(0)
    model = tiny_mmdit().eval()
    x, t, context = inputs()
    with torch.no_grad():
        v = model(x, t, context)[0]
        assert not torch.allclose(v, model(x, t, torch.randn_like(context))[0])
        torch.testing.assert_close(v, model(x, t, context.flip(1))[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- REPA's own class


def load_repas_mmdit():
    """REPA's `models/mmdit.py` from the checkout at $REPA_SRC (it imports einops and
    transformers at module level)."""
    pytest.importorskip("einops")
    pytest.importorskip("transformers")
    from bench.repa import import_file, isolated_imports

    path = os.path.abspath(os.environ["REPA_SRC"])
    with isolated_imports(path):
        return import_file("repa_src_mmdit", os.path.join(path, "models", "mmdit.py"))


@pytest.mark.skipif(not os.environ.get("REPA_SRC"), reason="REPA_SRC names no REPA checkout")
def test_repas_own_mmdit_loads_strictly_and_gives_the_same_outputs(capsys):
    repa = load_repas_mmdit()
    torch.manual_seed(0)
    theirs = repa.MMDiT(input_size=32, depth=2, z_dims=[16], encoder_depth=1, projector_dim=24)
    ours = tiny_mmdit(input_size=32)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, t, context = inputs(size=32, tokens=77)
    with torch.no_grad():
        v_theirs, zs_theirs = theirs.eval()(x, t, context=context)
        v_ours, zs_ours = ours.eval()(x, t, context)
    for a, b in ((v_ours, v_theirs), (zs_ours[0], zs_theirs[0])):
        assert (a - b).norm() <= 1e-5 * b.norm()


# --------------------------------------------------------------------------- position table


def test_position_table_is_cropped_at_its_centre():
    model = tiny_mmdit(input_size=8, pos_embed_max_size=8)  # table 8×8, grid 4×4
    table = sincos_pos_embed_2d(model.hidden_size, 8).reshape(8, 8, -1)
    torch.testing.assert_close(model.cropped_pos_embed(4, 4)[0], table[2:6, 2:6].reshape(16, -1))
    torch.testing.assert_close(model.cropped_pos_embed(8, 8)[0], table.reshape(64, -1))
    default = tiny_mmdit(input_size=8)  # the table has the grid's side: no crop
    assert default.pos_embed.shape == (1, 16, default.hidden_size)
    with pytest.raises(ValueError, match="smaller than the 4×4 token grid"):
        tiny_mmdit(input_size=8, pos_embed_max_size=2)


def test_a_smaller_input_reads_the_centre_of_the_table():
    torch.manual_seed(0)
    model = tiny_mmdit(input_size=8, pos_embed_max_size=8, projector_dim=8)
    x, t, context = inputs(size=8)
    tokens = model.embed_tokens(x)
    expected = model.x_embedder(x) + model.pos_embed.reshape(1, 8, 8, -1)[:, 2:6, 2:6].reshape(
        1, 16, -1
    )
    torch.testing.assert_close(tokens, expected)


# --------------------------------------------------------------------------- registry, options


def test_registry_builds_records_and_rebuilds():
    model = tiny_mmdit()
    name, kwargs = model_config(model)
    assert name == "MMDiT" and canonical_name("MMDiT-d24/2") == "MMDiT-d24/2"
    rebuilt = build_model(name, **kwargs)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_class_conditional_commands_refuse_a_text_to_image_model():
    with pytest.raises(argparse.ArgumentTypeError, match="text-to-image"):
        model_name("MMDiT-d24/2")


def test_context_of_the_wrong_width_is_a_clear_error():
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=r"context must be \(N, L, 768\)"):
        tiny_mmdit()(x, t, torch.randn(2, 5, 512))


@pytest.mark.parametrize(
    "options, grid",
    [
        ({}, 8),  # patch 2 on 16×16 latents: the encoder's grid (128 px), no resampling
        ({"patch_size": 4, "projector_upsample": "after"}, 8),
        ({"patch_size": 4, "projector_upsample": "within"}, 8),
        ({"patch_size": 4, "align_resolution": "pool"}, 4),
        ({"time_aware_projector": True}, 8),
    ],
)
def test_alignment_options_and_the_manifold_loss_train_the_projector(options, grid):
    """REPA and U-REPA's projector options on MMDiT; Eq. 5 with the manifold term through the
    loss, context in the label's place; every projector parameter gets a gradient."""
    torch.manual_seed(0)
    model = tiny_mmdit(input_size=16, **options)
    x, t, context = inputs(size=16)
    target = torch.randn(2, 64, 16)
    loss = SILoss(proj_coeff=0.5, manifold_coeff=1.0)
    terms = loss(model, x, context, zs=model.align_targets([target]), t=t)
    assert model(x, t, context)[1][0].shape == (2, grid * grid, 16)
    assert terms["manifold"] > 0 and terms["repa"] != 0
    terms["total"].backward()
    for name, p in model.projectors.named_parameters():
        if "time_modulation" not in name:  # zero at init: its input gradient flows
            assert p.grad is not None and p.grad.abs().sum() > 0, name

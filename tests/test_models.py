"""megamed.models: shapes, size checks, identity at init, exact unconditional path, gradients,
attention blocks against plain-softmax references, RoPE/positions, HF text encoder, save/load,
configs. Everything runs the `tiny` config at 32-64 px on CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megamed.models import (MegaMedModel, ModelConfig, config_from_dict, count_params,
                            from_pretrained, list_configs, load_model_config, make_model, save_pretrained)
from megamed.models.layers import (CrossAttentionBlock, SelfAttentionBlock, TransformerLayer, apply_rope,
                                   make_axial_pos, rope_freqs, rope_theta)
from megamed.utils.dataclass_json import ConfigError

torch.set_num_threads(1)


def tiny(**changes) -> ModelConfig:
    return load_model_config("tiny").replace(**changes)


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05, skip: str = "\0") -> torch.nn.Module:
    """Move every parameter off its init (zero-init layers included) so all paths carry signal;
    parameters whose name starts with `skip` are left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip):
                p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def make_tiny(seed: int = 0, perturbed: bool = True, **changes) -> MegaMedModel:
    torch.manual_seed(seed)
    model = make_model(tiny(**changes))
    return perturb_(model, seed) if perturbed else model


def text_batch(B: int, L: int = 12, vocab: int = 1024, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    return ids, mask


# ---------------------------------------------------------------------------------------------
# shapes and sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(32, 64), (48, 32), (40, 56)])
def test_shapes_non_square(height, width):
    model = make_tiny()
    x, t = torch.randn(2, 1, height, width), torch.randn(2)
    ids, mask = text_batch(2)
    out = model(x, t, text_ids=ids, text_mask=mask)
    assert out.shape == (2, 1, height, width)
    assert torch.isfinite(out).all() and out.abs().mean() > 0


@pytest.mark.parametrize("height,width,name", [(30, 32, "height"), (32, 36, "width"), (0, 32, "height"),
                                               (16, 64, "height"), (64, 8, "width")])
def test_invalid_sizes_name_the_dimension(height, width, name):
    model = make_tiny(perturbed=False)
    with pytest.raises(ValueError, match=name):
        model(torch.randn(1, 1, height, width), torch.zeros(1))


def test_bad_inputs():
    model = make_tiny(perturbed=False)
    x = torch.randn(2, 1, 32, 32)
    ids, mask = text_batch(2)
    with pytest.raises(ValueError, match="x: expected"):
        model(torch.randn(2, 3, 32, 32), torch.zeros(2))          # wrong channel count
    with pytest.raises(ValueError, match="c_noise"):
        model(x, torch.zeros(3))
    with pytest.raises(ValueError, match="text_mask"):
        model(x, torch.zeros(2), text_ids=ids, text_mask=mask.long())
    with pytest.raises(ValueError, match="text_ids"):
        model(x, torch.zeros(2), text_ids=torch.cat([ids, ids]), text_mask=torch.cat([mask, mask]))
    with pytest.raises(ValueError, match="text_ids"):
        model(x, torch.zeros(2), text_ids=torch.full((2, 4), 5000), text_mask=None)  # outside vocab 1024
    with pytest.raises(ValueError, match="text_ids"):
        model(x, torch.zeros(2), text_ids=torch.ones(2, 33, dtype=torch.long))      # > max_length 32
    with pytest.raises(ValueError, match="text_ids and text_context"):
        model(x, torch.zeros(2), text_ids=ids, text_mask=mask, text_context=model.encode_text(ids, mask))


# ---------------------------------------------------------------------------------------------
# identity at init
# ---------------------------------------------------------------------------------------------

def test_output_is_exactly_zero_at_init():
    model = make_tiny(perturbed=False)
    ids, mask = text_batch(2)
    out = model(torch.randn(2, 1, 32, 48), torch.randn(2), text_ids=ids, text_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kind,cross", [("neighborhood", False), ("global", True)])
def test_every_block_is_identity_at_init(kind, cross):
    torch.manual_seed(0)
    layer = TransformerLayer(32, 96, 16, 64, kind=kind, kernel_size=5, attn_kind="cosine",
                             context_features=64 if cross else None)
    x, cond = torch.randn(2, 6, 10, 32), torch.randn(2, 64)
    theta = rope_theta(make_axial_pos(6, 10), rope_freqs(8, 2))
    context, mask = torch.randn(2, 7, 64), torch.ones(2, 7, dtype=torch.bool)
    assert torch.equal(layer(x, theta, cond, context, mask), x)


def _reference_skip_path(model: MegaMedModel, x: torch.Tensor) -> torch.Tensor:
    """What the network computes when every transformer block is the identity, written with
    plain reshapes and matmuls (no megamed.ops): patch -> merges -> splits lerped into skips
    -> RMSNorm -> unpatch."""
    cfg = model.config

    def unshuffle(h, f):   # [B, H, W, C] -> [B, H/f, W/f, f*f*C], (row, col, channel) order
        B, H, W, C = h.shape
        return h.reshape(B, H // f, f, W // f, f, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H // f, W // f, f * f * C)

    def shuffle(h, f):     # inverse of unshuffle
        B, H, W, C = h.shape
        c = C // (f * f)
        return h.reshape(B, H, W, f, f, c).permute(0, 1, 3, 2, 4, 5).reshape(B, H * f, W * f, c)

    h = unshuffle(x.permute(0, 2, 3, 1), cfg.patch_size) @ model.patch_in.proj.weight.T
    skips = []
    for merge in model.merges:
        skips.append(h)
        h = unshuffle(h, 2) @ merge.proj.weight.T
    for i in reversed(range(cfg.levels - 1)):
        y = shuffle(h @ model.splits[i].proj.weight.T, 2)
        h = torch.lerp(skips[i], y, model.splits[i].fac)
    h = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * model.out_norm.scale
    return shuffle(h @ model.patch_out.weight.T, cfg.patch_size).permute(0, 3, 1, 2)


def test_network_is_its_skip_path_at_init():
    model = make_tiny(perturbed=False)
    with torch.no_grad():  # make the unpatch (and the lerp factors) non-trivial; blocks stay identity
        model.patch_out.weight.normal_(0, 0.1)
        for split in model.splits:
            split.fac.fill_(0.3)
    x = torch.randn(2, 1, 40, 24)
    ids, mask = text_batch(2)
    out = model(x, torch.randn(2), text_ids=ids, text_mask=mask)
    torch.testing.assert_close(out, _reference_skip_path(model, x), rtol=1e-5, atol=1e-5)
    assert out.abs().mean() > 1e-3


# ---------------------------------------------------------------------------------------------
# text conditioning
# ---------------------------------------------------------------------------------------------

def test_unconditional_equals_fully_masked_text_exactly():
    model = make_tiny()
    x, t = torch.randn(3, 1, 32, 32), torch.randn(3)
    ids, mask = text_batch(3)
    uncond = model(x, t)
    masked = model(x, t, text_ids=ids, text_mask=torch.zeros_like(mask))
    assert torch.equal(uncond, masked)
    # mixed batch (what classifier-free guidance and condition dropout produce)
    mixed_mask = mask.clone()
    mixed_mask[1] = False
    mixed = model(x, t, text_ids=ids, text_mask=mixed_mask)
    assert torch.equal(mixed[1], uncond[1])
    assert not torch.allclose(mixed[0], uncond[0], atol=1e-4)  # the text does matter
    ctx = model.encode_text(ids, torch.zeros_like(mask))
    assert torch.equal(ctx.pooled, torch.zeros_like(ctx.pooled))
    assert torch.equal(model(x, t, text_context=ctx.unconditional()), uncond)


def test_text_context_paths_agree():
    model = make_tiny()
    x, t = torch.randn(2, 1, 32, 40), torch.randn(2)
    ids, mask = text_batch(2)
    ref = model(x, t, text_ids=ids, text_mask=mask)
    ctx = model.encode_text(ids, mask)
    assert torch.equal(model(x, t, text_context=ctx), ref)
    # raw states + mask (what guidance.cat_cond concatenates); zero-padding extra positions is harmless
    padded_states = F.pad(ctx.states, (0, 0, 0, 3))
    padded_mask = F.pad(mask, (0, 3))
    torch.testing.assert_close(model(x, t, text_context=padded_states, text_mask=padded_mask), ref,
                               rtol=1e-5, atol=1e-6)
    # a batch-1 prompt broadcasts to every image
    torch.testing.assert_close(model(x, t, text_ids=ids[:1], text_mask=mask[:1])[1],
                               model(x[1:], t[1:], text_ids=ids[:1], text_mask=mask[:1])[0], rtol=1e-5, atol=1e-6)
    one = model.encode_text(ids[:1], mask[:1])
    torch.testing.assert_close(model(x, t, text_context=one)[1], model(x[1:], t[1:], text_ids=ids[:1],
                                                                      text_mask=mask[:1])[0], rtol=1e-5, atol=1e-6)


def test_padding_ids_do_not_matter():
    model = make_tiny()
    x, t = torch.randn(2, 1, 32, 32), torch.randn(2)
    ids, mask = text_batch(2)
    other = torch.where(mask, ids, torch.randint(3, 1024, ids.shape))
    torch.testing.assert_close(model(x, t, text_ids=other, text_mask=mask), model(x, t, text_ids=ids, text_mask=mask),
                               rtol=1e-5, atol=1e-6)


def test_model_without_text_rejects_text():
    cfg = tiny(text={"kind": "none"}, cross_attention=(False, False))
    model = make_model(cfg)
    assert model.text_encoder is None
    out = model(torch.randn(1, 1, 32, 32), torch.zeros(1))
    assert out.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="text_ids"):
        model(torch.randn(1, 1, 32, 32), torch.zeros(1), text_ids=torch.ones(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# attention blocks against plain-softmax references
# ---------------------------------------------------------------------------------------------

def _ref_cosine_attention(q, k, v, scale, mask=None):
    """q [B, Nq, h, D], k/v [B, Nk, h, D]; q.k = scale_h * cos(q, k); softmax over (masked) keys."""
    qn, kn = F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12)
    logits = torch.einsum("bqhd,bkhd->bhqk", qn, kn) * scale[None, :, None, None]
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = logits.softmax(-1)
    if mask is not None:
        p = torch.nan_to_num(p)  # all-masked rows -> 0
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _ref_rope(x, theta):
    """Rotate pairs (i, i+d) of x [..., D] by theta [..., d] via complex multiplication."""
    d = theta.shape[-1]
    z = torch.complex(x[..., :d], x[..., d:2 * d]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag, x[..., 2 * d:]], dim=-1)


@pytest.mark.parametrize("attn_kind", ["cosine", "dot"])
def test_global_self_attention_block_matches_reference(attn_kind):
    torch.manual_seed(0)
    block = perturb_(SelfAttentionBlock(32, 8, 16, kind="global", attn_kind=attn_kind))
    B, H, W, C, heads = 2, 3, 5, 32, 4
    x, cond = torch.randn(B, H, W, C), torch.randn(B, 16)
    theta = rope_theta(make_axial_pos(H, W), rope_freqs(4, heads))            # [H, W, heads, 2]
    # reference: norm, qkv, RoPE, cosine attention, out projection, residual
    scale = 1 + cond @ block.norm.linear.weight.T
    xn = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * scale[:, None, None]
    q, k, v = (xn @ block.qkv_proj.weight.T).view(B, H * W, 3, heads, 8).unbind(2)
    th = theta.reshape(H * W, heads, 2)
    if attn_kind == "cosine":   # q.k = scale_h * cos(q, k)
        q, k = _ref_rope(F.normalize(q, dim=-1), th), _ref_rope(F.normalize(k, dim=-1), th)
        y = _ref_cosine_attention(q, k, v, block.scale)
    else:                       # plain q.k / sqrt(D)
        q, k = _ref_rope(q, th), _ref_rope(k, th)
        p = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", p, v)
    ref = x + y.reshape(B, H, W, C) @ block.out_proj.weight.T
    torch.testing.assert_close(block(x, theta, cond), ref, rtol=1e-4, atol=1e-5)


def test_neighborhood_block_with_full_window_equals_global():
    torch.manual_seed(0)
    nb = perturb_(SelfAttentionBlock(32, 16, 16, kind="neighborhood", kernel_size=5))
    gl = SelfAttentionBlock(32, 16, 16, kind="global")
    gl.load_state_dict(nb.state_dict())
    x, cond = torch.randn(2, 5, 5, 32), torch.randn(2, 16)
    theta = rope_theta(make_axial_pos(5, 5), rope_freqs(8, 2))
    torch.testing.assert_close(nb(x, theta, cond), gl(x, theta, cond), rtol=1e-4, atol=1e-5)


def test_cross_attention_block_matches_reference():
    torch.manual_seed(0)
    block = perturb_(CrossAttentionBlock(32, 16, 16, 24))
    B, H, W, L = 3, 2, 3, 5
    x, cond, ctx = torch.randn(B, H, W, 32), torch.randn(B, 16), torch.randn(B, L, 24)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    scale = 1 + cond @ block.norm.linear.weight.T
    xn = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * scale[:, None, None]
    q = (xn @ block.q_proj.weight.T).view(B, H * W, 2, 16)
    k, v = (ctx @ block.kv_proj.weight.T).view(B, L, 2, 2, 16).unbind(2)
    y = _ref_cosine_attention(q, k, v, block.scale, mask)
    ref = x + y.reshape(B, H, W, 32) @ block.out_proj.weight.T
    out = block(x, cond, ctx, mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[2], x[2])  # no real token: exactly the input


# ---------------------------------------------------------------------------------------------
# positions and RoPE
# ---------------------------------------------------------------------------------------------

def test_axial_positions_convention():
    # square: HDiT's midpoints of linspace(-1, 1, n + 1)
    edges = torch.linspace(-1, 1, 9)
    torch.testing.assert_close(make_axial_pos(8, 8)[:, 0, 0], (edges[:-1] + edges[1:]) / 2)
    # non-square: the longer side spans [-1, 1], the shorter keeps the same unit
    pos = make_axial_pos(4, 8)
    assert pos.shape == (4, 8, 2)
    torch.testing.assert_close(pos[0, :, 1], (edges[:-1] + edges[1:]) / 2)
    torch.testing.assert_close(pos[:, 0, 0], torch.tensor([-0.375, -0.125, 0.125, 0.375]))
    # resolution independence: 2x2 means of a fine grid are the coarse grid (what lets a model
    # trained at 32^2 run at 64^2 with the same position range)
    for h, w in [(8, 8), (6, 10)]:
        fine = make_axial_pos(2 * h, 2 * w)
        pooled = fine.reshape(h, 2, w, 2, 2).mean(dim=(1, 3))
        torch.testing.assert_close(pooled, make_axial_pos(h, w))


def test_rope_is_relative():
    """After RoPE, q.k depends only on the position difference (per head)."""
    torch.manual_seed(0)
    freqs = rope_freqs(16, 3)                                       # [3 heads, 4]
    q, k = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    pa, pb = torch.tensor([0.3, -0.2]), torch.tensor([-0.5, 0.7])
    shift = torch.tensor([0.11, -0.37])

    def dot(p1, p2):
        t1, t2 = rope_theta(p1, freqs).double(), rope_theta(p2, freqs).double()
        return (apply_rope(q, t1) * apply_rope(k, t2)).sum(-1)

    torch.testing.assert_close(dot(pa, pb), dot(pa + shift, pb + shift))
    assert not torch.allclose(dot(pa, pb), dot(pa, pa))
    theta = rope_theta(pa, freqs).double()
    torch.testing.assert_close(apply_rope(q, theta), _ref_rope(q, theta))


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------

def test_gradient_reaches_every_parameter_and_checkpointing_matches():
    model = make_tiny()
    x, t = torch.randn(2, 1, 32, 40), torch.randn(2)
    ids, mask = text_batch(2)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, t, text_ids=ids, text_mask=mask).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    missing = [n for n, p in model.named_parameters() if n not in plain or not plain[n].abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    model.set_gradient_checkpointing(True)
    ckpt = grads()
    model.set_gradient_checkpointing(False)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-7)


def test_one_sgd_step_moves_zero_init_layers():
    model = make_tiny(perturbed=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask = text_batch(2)
    x, target = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x, torch.randn(2), text_ids=ids, text_mask=mask), target).backward()
        opt.step()
    # after two steps the zero-init output layers have moved and the blocks are no longer identity
    assert model.patch_out.weight.abs().sum() > 0
    assert model.mid_level[0].ff.down_proj.weight.abs().sum() > 0


def test_bf16_autocast_and_bf16_weights():
    model = make_tiny()
    x, t = torch.randn(2, 1, 32, 32), torch.randn(2)
    ids, mask = text_batch(2)
    ref = model(x, t, text_ids=ids, text_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text_ids=ids, text_mask=mask)
    # the residual stream stays float32 or goes bf16 depending on the patch-op backend's autocast support
    assert out.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05 * ref.abs().max().item())
    half = make_model(model.config, dtype=torch.bfloat16)
    half.load_state_dict(model.state_dict())
    out = half(x.bfloat16(), t, text_ids=ids, text_mask=mask)
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05 * ref.abs().max().item())


def test_param_groups_partition_trainable_parameters():
    model = make_tiny(perturbed=False)
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert all(p.dim() >= 2 for p in decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for p in (model.out_norm.scale, model.splits[0].fac, model.mid_level[0].self_attn.scale,
              model.text_encoder.token_emb.weight, model.text_encoder.pos_emb):
        assert id(p) in no_decay_ids


# ---------------------------------------------------------------------------------------------
# save / load, fine-tuning at a higher resolution
# ---------------------------------------------------------------------------------------------

def _tokenizer():
    from megamed.text.tokenizer import train_bpe

    return train_bpe(["no finding", "small left pleural effusion", "mild cardiomegaly"] * 4, 300)


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_tiny()
    tok = _tokenizer()
    save_pretrained(model, tmp_path / "m", tokenizer=tok, extra={"diffusion": {"sigma_data": 0.5}})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    loaded, tok2, data = from_pretrained(tmp_path / "m")
    assert data["diffusion"] == {"sigma_data": 0.5} and config_from_dict(data["model"]) == model.config
    assert loaded.config == model.config and not loaded.training
    ref_state, new_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], new_state[key]), key
    ids, mask = tok.encode(["mild cardiomegaly"], 16)
    assert torch.equal(tok2.encode(["mild cardiomegaly"], 16)[0], ids)
    x, t = torch.randn(1, 1, 32, 32), torch.randn(1)
    assert torch.equal(loaded(x, t, text_ids=ids, text_mask=mask), model.eval()(x, t, text_ids=ids, text_mask=mask))

    save_pretrained(model, tmp_path / "h", half=True)
    half, tok3, _ = from_pretrained(tmp_path / "h")
    assert tok3 is None
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("m", "h")}
    assert size["h"] < 0.6 * size["m"]
    for key, value in ref_state.items():
        assert torch.equal(half.state_dict()[key], value.half().float() if value.is_floating_point() else value), key
    with pytest.raises(ValueError, match="model"):
        save_pretrained(model, tmp_path / "bad", extra={"model": {}})

    # `megamed model convert SRC DST --half` keeps the config extras and the tokenizer
    from megamed.models.io import convert
    convert(tmp_path / "m", tmp_path / "c", half=True)
    conv, tok4, data4 = from_pretrained(tmp_path / "c")
    assert data4["diffusion"] == {"sigma_data": 0.5} and tok4 is not None
    assert torch.equal(conv.state_dict()["patch_out.weight"], half.state_dict()["patch_out.weight"])


def test_finetune_at_higher_resolution(tmp_path):
    """Weights saved from a model used at 32^2 load and train at 64^2: no resolution-shaped
    tensors in the checkpoint, and positions at 64^2 cover the same [-1, 1] frame."""
    model = make_tiny()
    ids, mask = text_batch(2)
    model(torch.randn(2, 1, 32, 32), torch.randn(2), text_ids=ids, text_mask=mask).mean().backward()
    save_pretrained(model, tmp_path / "m32")
    loaded, _, _ = from_pretrained(tmp_path / "m32")
    loaded.train()
    opt = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    x, target = torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(loaded(x, torch.zeros(2), text_ids=ids, text_mask=mask), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # 64^2 positions interpolate the 32^2 frame: denser, but never outside [-1, 1]
    assert make_axial_pos(8, 8).abs().max() < make_axial_pos(16, 16).abs().max() < 1


# ---------------------------------------------------------------------------------------------
# Hugging Face text encoder from a local directory (tiny random BERT, no download)
# ---------------------------------------------------------------------------------------------

def test_hf_text_encoder_from_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=40))
    bert.save_pretrained(tmp_path / "bert")
    cfg = tiny(text={"kind": "hf", "width": 64, "max_length": 32, "hf_path": str(tmp_path / "bert")})
    model = perturb_(make_model(cfg), seed=3, skip="text_encoder.hf.")  # keep the BERT as saved
    enc = model.text_encoder
    assert not any(p.requires_grad for p in enc.hf.parameters())       # frozen by default
    model.train()
    assert not enc.hf.training                                          # and kept in eval mode
    ids, mask = text_batch(2, vocab=99)
    ctx = model.encode_text(ids, mask)
    ref_bert = transformers.BertModel.from_pretrained(tmp_path / "bert", local_files_only=True).eval()
    hidden = ref_bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state @ enc.proj.weight.T
    ref = hidden / hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * enc.out_norm.scale
    torch.testing.assert_close(ctx.states, ref, rtol=1e-4, atol=1e-5)
    pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(ctx.pooled, pooled, rtol=1e-4, atol=1e-5)

    x, t = torch.randn(2, 1, 32, 32), torch.randn(2)
    out = model(x, t, text_context=ctx)
    assert torch.equal(model(x, t, text_ids=ids, text_mask=torch.zeros_like(mask)), model(x, t))
    out.mean().backward()
    assert enc.proj.weight.grad is not None and all(p.grad is None for p in enc.hf.parameters())

    # the checkpoint is self-contained: loading works after the original directory is gone
    save_pretrained(model, tmp_path / "saved")
    import shutil
    shutil.rmtree(tmp_path / "bert")
    loaded, _, _ = from_pretrained(tmp_path / "saved")
    model.eval()
    assert torch.equal(loaded(x, t, text_ids=ids, text_mask=mask), model(x, t, text_ids=ids, text_mask=mask))

    with pytest.raises(ValueError, match="text.hf_path"):
        make_model(tiny(text={"kind": "hf", "width": 64, "hf_path": str(tmp_path / "missing")}))
    trainable = make_model(tiny(text={"kind": "hf", "width": 64, "hf_path": str(tmp_path / "saved" / "none"),
                                      "hf_trainable": True}), hf_config_dir=tmp_path / "saved" / "text_encoder")
    assert all(p.requires_grad for p in trainable.text_encoder.hf.parameters())


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

def test_config_unknown_key_is_named(tmp_path):
    data = tiny().to_dict()
    with pytest.raises(ConfigError, match="widhts"):
        config_from_dict({**data, "widhts": [1]})
    with pytest.raises(ConfigError, match=r"text\.'vocab'"):
        config_from_dict({**data, "text": {**data["text"], "vocab": 5}})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**data, "kernal_size": 3}))
    with pytest.raises(ConfigError, match="kernal_size"):
        load_model_config(path)
    path.write_text(json.dumps({"model": data, "diffusion": {}}))  # a saved run's config.json
    assert load_model_config(path) == tiny()
    with pytest.raises(ValueError, match="name_or_path"):
        load_model_config("no-such-config")


@pytest.mark.parametrize("changes,name", [
    ({"kernel_size": 4}, "kernel_size"),
    ({"depths": (1,)}, "depths"),
    ({"widths": (30, 64)}, "widths"),
    ({"attention": ("neighborhood", "axial")}, "attention"),
    ({"text": {"kind": "none"}}, "cross_attention"),
    ({"text": {"kind": "bert"}}, "text.kind"),
    ({"attn_kind": "flash"}, "attn_kind"),
    ({"default_resolution": 36}, "default_resolution"),
])
def test_config_validation(changes, name):
    with pytest.raises(ConfigError, match=name):
        config_from_dict({**tiny().to_dict(), **changes})


@pytest.mark.parametrize("name,lo,hi", [("tiny", 1e4, 2e6), ("small", 1e6, 1e7), ("base", 150e6, 250e6),
                                        ("large-1024", 0.8e9, 1.2e9), ("hdit-ffhq-1024", 80e6, 90e6)])
def test_named_configs_build_on_meta(name, lo, hi):
    assert name in list_configs()
    cfg = load_model_config(name)
    model = make_model(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert lo <= n <= hi and n == count_params(cfg)
    assert cfg.default_resolution % cfg.size_multiple == 0
    model.check_size(cfg.default_resolution, cfg.default_resolution)  # the default size is runnable

"""Analytic parameter and compute counts for MegaMedModel, from the config alone.

count_flops(cfg, H, W) counts the multiply-adds (MACs) of ONE forward of ONE image: every
linear layer (per token), attention's two matmuls (q.k and p.v) and the patch ops. Norms,
softmax, GELU, RoPE and other elementwise work are not counted (that is the usual
convention, and what torch.utils.flop_counter counts too). FLOPs = 2 * MACs.

Attention per query and per layer, with C = width (= heads * d_head):
    neighborhood   2 * k^2 * C     (k^2 keys for EVERY query: NATTEN shifts the window
                                    inward at borders instead of shrinking it)
    global         2 * N * C       (N = tokens at that level)
    cross          2 * L * C       (L = text tokens; all L counted, padding included)

Importing this module also registers FLOP formulas with torch.utils.flop_counter for the ops
FlopCounterMode cannot see into: megamed's neighborhood-attention custom ops, the compiled
patch_merge/patch_split ops (when megamed._C is loaded), and torch's CPU flash-attention kernel
(torch counts only the CUDA SDPA kernels). Then FlopCounterMode measures the whole model.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch.utils import flop_counter

from megamed.models.config import ModelConfig, TextEncoderConfig

COMPONENTS = ("patch", "merge_split", "attn_proj", "attn_neighborhood", "attn_global", "cross_attn_proj",
              "cross_attn", "mlp", "conditioning", "text_encoder")


def _as_config(cfg_or_model) -> tuple[ModelConfig, "torch.nn.Module | None"]:
    if isinstance(cfg_or_model, ModelConfig):
        return cfg_or_model, None
    cfg = getattr(cfg_or_model, "config", None)
    if isinstance(cfg, ModelConfig):
        return cfg, cfg_or_model
    raise ValueError(f"cfg_or_model: expected a ModelConfig or a MegaMedModel, got {type(cfg_or_model).__name__}")


def count_params(cfg_or_model) -> int:
    """Number of parameters (a config is built on the meta device: no memory, no init cost)."""
    cfg, model = _as_config(cfg_or_model)
    if model is None:
        from megamed.models.hdit import make_model

        model = make_model(cfg, device="meta")
    return sum(p.numel() for p in model.parameters())


def _text_encoder_macs(text: TextEncoderConfig, L: int, model) -> int:
    if text.kind == "transformer":
        D, F = text.width, text.d_ff
        per_block = L * (3 * D * D + D * D + D * 2 * F + F * D) + 2 * L * L * D
        return text.depth * per_block
    # HF encoder: a BERT-like estimate from its config (needs the built model)
    hf_cfg = model.text_encoder.hf.config if model is not None else None
    if hf_cfg is None:
        return 0
    h = hf_cfg.hidden_size
    inter = getattr(hf_cfg, "intermediate_size", 4 * h)
    layers = getattr(hf_cfg, "num_hidden_layers", 0)
    return layers * (L * (4 * h * h + 2 * h * inter) + 2 * L * L * h) + L * h * text.width


def count_flops(cfg_or_model, height: int | None = None, width: int | None = None, *,
                text_length: int | None = None, with_params: bool = True) -> dict:
    """Analytic cost of one forward at height x width (default: the config's default_resolution).

    text_length: prompt tokens (default text.max_length; ignored when text is off; 0 = no text).
    Returns {"params", "macs", "flops" (= 2 macs), "by_component": {name: macs}}.
    """
    cfg, model = _as_config(cfg_or_model)
    height = cfg.default_resolution if height is None else height
    width = cfg.default_resolution if width is None else width
    m = cfg.size_multiple
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size <= 0 or size % m:
            raise ValueError(f"{name}={size} must be a positive multiple of patch_size * 2^(levels-1) = {m}")
    text_on = cfg.text.enabled
    L = (cfg.text.max_length if text_length is None else text_length) if text_on else 0
    if L < 0:
        raise ValueError(f"text_length must be >= 0, got {text_length}")
    p, mw, k = cfg.patch_size, cfg.mapping_width, cfg.kernel_size
    Dt = cfg.text.width if text_on else 0
    c = OrderedDict((name, 0) for name in COMPONENTS)

    # patch embedding and unpatch: one linear per level-0 token
    n0 = (height // p) * (width // p)
    c["patch"] += n0 * (p * p * cfg.in_channels) * cfg.widths[0] + n0 * cfg.widths[0] * (p * p * cfg.out_channels)

    # conditioning: Fourier features (1 -> mw/2), time projection, pooled-text projection, mapping MLP
    c["conditioning"] += mw // 2 + mw * mw + (Dt * mw if L else 0)
    c["conditioning"] += cfg.mapping_depth * (mw * 2 * cfg.mapping_d_ff + cfg.mapping_d_ff * mw)

    last = cfg.levels - 1
    for i, (w, d_ff, kind) in enumerate(zip(cfg.widths, cfg.d_ffs, cfg.attention)):
        h_l, w_l = height // p // 2 ** i, width // p // 2 ** i
        n = h_l * w_l
        layers = cfg.depths[i] * (1 if i == last else 2)  # down and up halves, one mid
        cross = cfg.cross_attention[i] and L > 0
        per_layer = OrderedDict((name, 0) for name in COMPONENTS)
        per_layer["attn_proj"] = n * (3 * w * w + w * w)               # packed qkv + out
        if kind == "neighborhood":
            per_layer["attn_neighborhood"] = 2 * n * k * k * w          # q.k and p.v over k^2 keys
        else:
            per_layer["attn_global"] = 2 * n * n * w
        if cross:
            per_layer["cross_attn_proj"] = n * (w * w + w * w) + L * Dt * 2 * w  # q, out; k/v from text
            per_layer["cross_attn"] = 2 * n * L * w
        per_layer["mlp"] = n * (w * 2 * d_ff + d_ff * w)                 # GEGLU up (2x) + down
        per_layer["conditioning"] = (3 if cross else 2) * mw * w         # AdaRMSNorm scales (per image)
        for name, macs in per_layer.items():
            c[name] += layers * macs
        if i < last:  # merge 2x2 -> next width, split next width -> 2x2, on the coarser grid
            n_next = (h_l // 2) * (w_l // 2)
            c["merge_split"] += 2 * n_next * (4 * w) * cfg.widths[i + 1]

    if L:
        c["text_encoder"] += _text_encoder_macs(cfg.text, L, model)
    macs = sum(c.values())
    out = {"macs": macs, "flops": 2 * macs, "by_component": dict(c), "height": height, "width": width,
           "text_length": L}
    if with_params:
        out["params"] = count_params(model if model is not None else cfg)
    return out


def human(n: float) -> str:
    """1.234e9 -> '1.23 G' (K, M, G, T)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}  "


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Rows of (name, count_flops result) -> a fixed-width text table (MACs, FLOPs per forward, batch 1)."""
    lines = [f"{'config':<16} {'resolution':>11} {'params':>10} {'MACs':>10} {'FLOPs':>10}"]
    for name, r in rows:
        res = f"{r['height']}x{r['width']}"
        lines.append(f"{name:<16} {res:>11} {human(r['params']):>10} {human(r['macs']):>10} {human(r['flops']):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# FlopCounterMode formulas for ops torch cannot see into
# ---------------------------------------------------------------------------------------------

def _na_fwd_flop(q_shape, k_shape, v_shape, kernel_size, dilation, scale, backend, *, out_shape=None, **kw) -> int:
    B, H, W, heads, D = q_shape
    return 2 * 2 * B * H * W * heads * kernel_size * kernel_size * D   # 2 matmuls, 2 FLOPs per MAC


def _na_bwd_flop(grad_shape, q_shape, *args, out_shape=None, **kw) -> int:
    # dP = dO V^T, dQ = dS K, dK = dS^T Q, dV = P^T dO: 4 matmuls, torch's convention for SDPA's
    # backward (the recomputation of S = Q K^T is not counted)
    kernel_size = args[4]
    B, H, W, heads, D = q_shape
    return 4 * 2 * B * H * W * heads * kernel_size * kernel_size * D


def _patch_merge_flop(x_shape, w_shape, *args, out_shape=None, **kw) -> int:
    # every output token is one [f*f*C] x [f*f*C, C_out] product
    B, h, w, c_out = out_shape
    return 2 * B * h * w * w_shape[0] * w_shape[1]


def _patch_split_flop(x_shape, w_shape, *args, out_shape=None, **kw) -> int:
    # every input token is one [C_in] x [C_in, f*f*C_out] product (the lerp is elementwise)
    B, h, w, _ = x_shape
    return 2 * B * h * w * w_shape[0] * w_shape[1]


def _sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kw) -> int:
    # torch counts SDPA's CUDA kernels but not the CPU flash kernel; same formula: q.k + p.v
    B, heads, Nq, D = q_shape
    Nk = k_shape[-2]
    return 2 * 2 * B * heads * Nq * Nk * D


def _register() -> None:
    targets = []
    try:
        import megamed.ops  # noqa: F401  (defines torch.ops.megamed.*)

        targets += [(torch.ops.megamed.na2d_fwd, _na_fwd_flop), (torch.ops.megamed.na2d_bwd, _na_bwd_flop)]
    except (ImportError, AttributeError):  # ops not built: nothing to register
        pass
    for name, formula in (("patch_merge", _patch_merge_flop), ("patch_split", _patch_split_flop)):
        try:  # defined by the compiled extension (megamed._C) when it is loaded
            targets.append((getattr(torch.ops.megamed, name), formula))
        except (AttributeError, RuntimeError):
            pass
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        targets.append((cpu_flash, _sdpa_cpu_flop))
    for target, formula in targets:
        if target not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(target)(formula)


_register()

"""Building blocks of the hourglass diffusion transformer (after HDiT / k-diffusion's
image_transformer_v2), channels-last throughout: image tokens are [B, H, W, C].

Every block is residual and its last projection is zero-initialised, so at init each block
is exactly the identity (x + 0 == x) and the network starts as its skip path. Attention,
token merge and token split go through `megamed.ops`, which picks a backend (reference
PyTorch on CPU, fused kernels where available).

Conventions
- RMSNorm / AdaRMSNorm compute in float32 whatever the input dtype, then cast back.
- Positions (for axial RoPE) live in a resolution-independent frame: see make_axial_pos.
- Cosine-similarity attention (HDiT): q and k are L2-normalised per head and multiplied by
  sqrt(scale) each, so q.k = scale * cos(angle), with `scale` a learned per-head parameter
  (init 10). The logits are then bounded, which keeps attention stable at any resolution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamed import ops


def zero_init(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., C] / rms(x) * scale, with scale broadcastable to x; computed in >= float32."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    mean_sq = x.to(dtype).pow(2).mean(dim=-1, keepdim=True)
    return (x.to(dtype) * (scale.to(dtype) * torch.rsqrt(mean_sq + eps))).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale is 1 + Linear(cond): the conditioning path of every block.

    The linear is zero-initialised, so at init this is a plain (unit-scale) RMSNorm.
    cond [B, cond_features]; x [B, ..., C] (any number of token dims).
    """

    def __init__(self, features: int, cond_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = zero_init(nn.Linear(cond_features, features, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale = self.linear(cond) + 1                                  # [B, C]
        scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
        return rms_norm(x, scale, self.eps)


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------

class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar: [B] -> [B, out_features] (cos | sin).

    The frequencies are a persistent buffer (random at init, saved with the weights).
    """

    def __init__(self, out_features: int, std: float = 1.0):
        super().__init__()
        if out_features % 2:
            raise ValueError(f"out_features must be even, got {out_features}")
        self.register_buffer("weight", torch.randn(out_features // 2, 1) * std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t[:, None].to(self.weight.dtype) @ self.weight.T  # [B, out/2]
        return torch.cat([f.cos(), f.sin()], dim=-1)


class LinearGEGLU(nn.Linear):
    """Linear to 2*out_features, then value * gelu(gate) (Shazeer 2020): [.., in] -> [.., out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features * 2, bias=bias)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = F.linear(x, self.weight, self.bias).chunk(2, dim=-1)
        return x * F.gelu(gate)


# ---------------------------------------------------------------------------------------------
# positions and axial RoPE
# ---------------------------------------------------------------------------------------------

def make_axial_pos(h: int, w: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h, w, 2] (y, x) positions of token centres in a resolution-independent frame.

    Convention: the image is centred on 0 and its LONGER side spans [-1, 1]; the shorter side
    spans [-s, s] with s = short/long, so both axes share one unit (no stretching on
    non-square images). A token's position says where it is in the field of view, not which
    pixel index it is, so:
    - a model trained at 256^2 and run at 1024^2 sees the same range of positions, just
      sampled 4x more densely (RoPE phases interpolate instead of extrapolating);
    - level l+1's positions are exactly the means of level l's 2x2 blocks (the same as
      HDiT's downscale_pos), so each level can compute its own grid directly.
    For square images this equals HDiT's make_axial_pos.
    """
    unit = 2.0 / max(h, w)  # length of one token in the shared frame
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5 - h / 2) * unit
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5 - w / 2) * unit
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).to(dtype)


def rope_freqs(rope_dims: int, n_heads: int, device=None) -> torch.Tensor:
    """[n_heads, rope_dims // 4] angular frequencies, log-spaced over [pi, 10 pi] (HDiT).

    Positions span ~[-1, 1], so the lowest frequency turns half a circle across the image and
    the highest ten; heads interleave the frequencies so every head sees the whole range.
    """
    n = rope_dims // 4
    freqs = torch.linspace(math.log(math.pi), math.log(10 * math.pi), n_heads * n + 1, device=device)[:-1].exp()
    return freqs.view(n, n_heads).T.contiguous()


def rope_theta(pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """pos [..., 2], freqs [heads, n] -> theta [..., heads, 2n] (y angles then x angles)."""
    theta_y = pos[..., None, 0:1] * freqs                               # [..., heads, n]
    theta_x = pos[..., None, 1:2] * freqs
    return torch.cat([theta_y, theta_x], dim=-1)


def apply_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate dims (i, i + d) of x [..., heads, D] by theta [..., heads, d] (broadcast); D >= 2d.

    Dims beyond 2d pass through unrotated (they carry content, not position).
    """
    d = theta.shape[-1]
    if d == 0:
        return x
    dtype = torch.promote_types(torch.promote_types(x.dtype, theta.dtype), torch.float32)
    x1, x2, rest = x[..., :d].to(dtype), x[..., d:2 * d].to(dtype), x[..., 2 * d:]
    cos, sin = theta.to(dtype).cos(), theta.to(dtype).sin()
    y1, y2 = (x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype)
    return torch.cat([y1, y2, rest], dim=-1)


def scale_for_cosine_sim(qk: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dim of qk [..., heads, D] and multiply by sqrt(scale [heads]).

    Applied to q and k alike, q.k becomes scale * cos(q, k). Computed in >= float32.
    """
    dtype = torch.promote_types(torch.promote_types(qk.dtype, scale.dtype), torch.float32)
    qk32 = qk.to(dtype)
    factor = scale.to(dtype)[:, None].sqrt() * torch.rsqrt(qk32.pow(2).sum(-1, keepdim=True) + eps)
    return (qk32 * factor).to(qk.dtype)


# ---------------------------------------------------------------------------------------------
# transformer blocks (all residual, all identity at init)
# ---------------------------------------------------------------------------------------------

class SelfAttentionBlock(nn.Module):
    """AdaRMSNorm -> packed qkv -> (cosine-sim) -> RoPE -> neighborhood or global attention -> out.

    x [B, H, W, C], theta [H, W, heads, rope_dims/2] (from the level's positions), cond [B, Cc].
    """

    def __init__(self, width: int, d_head: int, cond_features: int, *, kind: str, kernel_size: int = 7,
                 attn_kind: str = "cosine", dropout: float = 0.0):
        super().__init__()
        if kind not in ("neighborhood", "global"):
            raise ValueError(f"kind must be 'neighborhood' or 'global', got {kind!r}")
        self.kind, self.kernel_size, self.attn_kind = kind, kernel_size, attn_kind
        self.d_head, self.n_heads = d_head, width // d_head
        self.norm = AdaRMSNorm(width, cond_features)
        self.qkv_proj = nn.Linear(width, 3 * width, bias=False)
        self.scale = nn.Parameter(torch.full([self.n_heads], 10.0)) if attn_kind == "cosine" else None
        self.dropout = nn.Dropout(dropout)
        self.out_proj = zero_init(nn.Linear(width, width, bias=False))

    def forward(self, x: torch.Tensor, theta: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv_proj(self.norm(x, cond)).view(B, H, W, 3, self.n_heads, self.d_head)
        # q and k are normalised and rotated together as one [B, H, W, 2, heads, D] tensor;
        # q, k, v handed to the op are strided slices of packed tensors (no copies).
        qk = qkv[..., :2, :, :]
        if self.scale is not None:
            qk, attn_scale = scale_for_cosine_sim(qk, self.scale), 1.0
        else:
            attn_scale = None  # ops default: D ** -0.5
        qk = apply_rope(qk, theta[:, :, None])                          # theta broadcast over (B, q/k)
        q, k, v = qk[..., 0, :, :], qk[..., 1, :, :], qkv[..., 2, :, :]  # [B, H, W, heads, D]
        if self.kind == "neighborhood":
            y = ops.neighborhood_attention(q, k, v, self.kernel_size, scale=attn_scale)
        else:  # global: all H*W tokens attend to each other
            y = ops.attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), scale=attn_scale)
        y = self.dropout(y.reshape(B, H, W, C))
        return x + self.out_proj(y)


class CrossAttentionBlock(nn.Module):
    """Image tokens attend to text tokens: AdaRMSNorm -> q; text states -> k, v; masked attention.

    x [B, H, W, C], context [B, L, Ct], mask [B, L] (True = real token). A row whose mask is
    all False (unconditional) gets exactly zero from ops.attention, so out_proj(0) = 0 and the
    block returns x unchanged: dropping the text is exact, not approximate.
    """

    def __init__(self, width: int, d_head: int, cond_features: int, context_features: int, *,
                 attn_kind: str = "cosine", dropout: float = 0.0):
        super().__init__()
        self.d_head, self.n_heads = d_head, width // d_head
        self.norm = AdaRMSNorm(width, cond_features)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(context_features, 2 * width, bias=False)
        self.scale = nn.Parameter(torch.full([self.n_heads], 10.0)) if attn_kind == "cosine" else None
        self.dropout = nn.Dropout(dropout)
        self.out_proj = zero_init(nn.Linear(width, width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = self.q_proj(self.norm(x, cond)).view(B, H * W, self.n_heads, self.d_head)
        kv = self.kv_proj(context).view(B, context.shape[1], 2, self.n_heads, self.d_head)
        k, v = kv[:, :, 0], kv[:, :, 1]                                  # [B, L, heads, D] views
        attn_scale = None
        if self.scale is not None:
            q, k, attn_scale = scale_for_cosine_sim(q, self.scale), scale_for_cosine_sim(k, self.scale), 1.0
        y = ops.attention(q, k, v, key_padding_mask=mask, scale=attn_scale)  # [B, H*W, heads, D]
        y = self.dropout(y.reshape(B, H, W, C))
        return x + self.out_proj(y)


class FeedForwardBlock(nn.Module):
    """AdaRMSNorm -> GEGLU up -> down (zero init): x [B, ..., C] -> same."""

    def __init__(self, width: int, d_ff: int, cond_features: int, dropout: float = 0.0):
        super().__init__()
        self.norm = AdaRMSNorm(width, cond_features)
        self.up_proj = LinearGEGLU(width, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(nn.Linear(d_ff, width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(self.dropout(self.up_proj(self.norm(x, cond))))


class TransformerLayer(nn.Module):
    """Self-attention (neighborhood or global), optional text cross-attention, GEGLU MLP."""

    def __init__(self, width: int, d_ff: int, d_head: int, cond_features: int, *, kind: str, kernel_size: int,
                 attn_kind: str, context_features: int | None, dropout: float = 0.0):
        super().__init__()
        self.self_attn = SelfAttentionBlock(width, d_head, cond_features, kind=kind, kernel_size=kernel_size,
                                            attn_kind=attn_kind, dropout=dropout)
        self.cross_attn = (CrossAttentionBlock(width, d_head, cond_features, context_features, attn_kind=attn_kind,
                                               dropout=dropout) if context_features else None)
        self.ff = FeedForwardBlock(width, d_ff, cond_features, dropout=dropout)

    def forward(self, x: torch.Tensor, theta: torch.Tensor, cond: torch.Tensor,
                context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_attn(x, theta, cond)
        if self.cross_attn is not None and context is not None:
            x = self.cross_attn(x, cond, context, mask)
        return self.ff(x, cond)


class Level(nn.ModuleList):
    """The layers of one hourglass level (down half or up half), with optional checkpointing."""

    gradient_checkpointing = False

    def forward(self, x, theta, cond, context=None, mask=None):
        for layer in self:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # recompute the layer in backward instead of storing its activations
                x = checkpoint(layer, x, theta, cond, context, mask, use_reentrant=False)
            else:
                x = layer(x, theta, cond, context, mask)
        return x


# ---------------------------------------------------------------------------------------------
# token merge / split (between levels) and the mapping network
# ---------------------------------------------------------------------------------------------

class TokenMerge(nn.Module):
    """[B, H, W, C_in] -> [B, H/f, W/f, C_out]: each f x f block (row, col, channel) -> linear."""

    def __init__(self, in_features: int, out_features: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(in_features * factor * factor, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .to(x.dtype): under autocast x is already low precision and the op wants matching dtypes
        return ops.patch_merge(x, self.proj.weight.to(x.dtype), factor=self.factor)


class TokenSplit(nn.Module):
    """[B, H, W, C_in] -> [B, fH, fW, C_out], lerped into the skip: skip + fac * (y - skip).

    fac is learned, init 0.5 (HDiT): the up path starts as an even mix of the upsampled
    low-resolution features and the high-resolution skip.
    """

    def __init__(self, in_features: int, out_features: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(in_features, out_features * factor * factor, bias=False)
        self.fac = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return ops.patch_split(x, self.proj.weight.to(x.dtype), factor=self.factor, skip=skip.to(x.dtype),
                               lerp=self.fac.to(x.dtype))


class MappingFeedForwardBlock(nn.Module):
    def __init__(self, width: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(width)
        self.up_proj = LinearGEGLU(width, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(nn.Linear(d_ff, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(self.dropout(self.up_proj(self.norm(x))))


class MappingNetwork(nn.Module):
    """[B, width] conditioning embedding -> [B, width] vector read by every AdaRMSNorm."""

    def __init__(self, depth: int, width: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.in_norm = RMSNorm(width)
        self.blocks = nn.ModuleList([MappingFeedForwardBlock(width, d_ff, dropout) for _ in range(depth)])
        self.out_norm = RMSNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)

"""Plain-PyTorch reference implementations of the megamed ops (also the CPU path).

They take already-validated arguments (the public functions in natten.py, attention.py and
patch.py check shapes first) and accept strided views: nothing here calls .contiguous()
on an input. Low-precision inputs are computed in float32 and cast back at the end.

Neighborhood attention (NATTEN semantics), layout [B, H, W, heads, D]:
query (i, j) attends to exactly k*k keys, rows s_i .. s_i+k-1 with
s_i = clamp(i - k//2, 0, H - k) and columns likewise: the window shifts inward at the
borders instead of being padded. With dilation d the rows (columns) are split by residue
mod d and the rule applies inside each sub-grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on elements of one gathered key/value chunk [B, rows, W, k*k, heads, D]
# (16 MiB in fp32). The backward keeps up to ~8 tensors this size alive at once, so the
# reference stays near 128 MiB of scratch whatever the image size (unless one row alone
# is bigger: chunks never split a row).
_CHUNK_ELEMS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 -> fp32 (softmax and accumulation); fp32/fp64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# neighborhood attention
# ---------------------------------------------------------------------------------------------

def neighborhood_index(length: int, kernel_size: int, dilation: int = 1, device=None) -> torch.Tensor:
    """[length, kernel_size] int64: the key positions each query position attends to along one axis.

    Position i has residue r = i % d in a sub-grid of n_r = ceil((length - r) / d) positions;
    inside it, i sits at i // d and its window starts at clamp(i // d - k//2, 0, n_r - k).
    """
    i = torch.arange(length, device=device)
    r, t = i % dilation, i // dilation
    n_r = (length - r + dilation - 1) // dilation
    start = torch.minimum((t - kernel_size // 2).clamp(min=0), n_r - kernel_size)
    return r[:, None] + (start[:, None] + torch.arange(kernel_size, device=device)) * dilation


def _row_chunks(q: torch.Tensor, kernel_size: int):
    """Yield (i0, i1) row ranges so one gathered chunk stays under _CHUNK_ELEMS elements."""
    B, H, W, heads, D = q.shape
    per_row = max(1, B * W * kernel_size * kernel_size * heads * D)
    step = max(1, _CHUNK_ELEMS // per_row)
    for i0 in range(0, H, step):
        yield i0, min(H, i0 + step)


def _window_index(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [c, k], cols [W, k] -> (key row, key column) index tensors, each [c, W, k*k].

    Entry (i, j, a*k + b) is the key (rows[i, a], cols[j, b]): the window in row-major order.
    """
    c, k = rows.shape
    W = cols.shape[0]
    key_rows = rows[:, None, :, None].expand(c, W, k, k).reshape(c, W, k * k)
    key_cols = cols[None, :, None, :].expand(c, W, k, k).reshape(c, W, k * k)
    return key_rows, key_cols


def na2d_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int,
                 dilation: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, H, W, heads, D] in q.dtype, lse float32 [B, H, W, heads]).

    lse is the natural-log log-sum-exp of the SCALED logits over each query's k*k keys,
    what the backward needs to recompute the probabilities without storing them.
    """
    B, H, W, heads, D = q.shape
    ct = compute_dtype(q.dtype)
    rows_all = neighborhood_index(H, kernel_size, dilation, q.device)  # [H, k]
    cols = neighborhood_index(W, kernel_size, dilation, q.device)      # [W, k]
    outs, lses = [], []
    for i0, i1 in _row_chunks(q, kernel_size):
        kr, kc = _window_index(rows_all[i0:i1], cols)                  # [c, W, kk] each
        kg, vg = k[:, kr, kc].to(ct), v[:, kr, kc].to(ct)               # [B, c, W, kk, heads, D]
        qc = q[:, i0:i1, :, None].to(ct)                                # [B, c, W, 1, heads, D]
        logits = (qc * kg).sum(-1) * scale                              # [B, c, W, kk, heads]
        lse = torch.logsumexp(logits, dim=3, keepdim=True)              # [B, c, W, 1, heads]
        p = torch.exp(logits - lse)
        outs.append((p[..., None] * vg).sum(3).to(q.dtype))            # [B, c, W, heads, D]
        lses.append(lse.squeeze(3).float())
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def na2d_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, kernel_size: int, dilation: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-style backward: recompute P = exp(S - lse), then
    dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK += scale dS^T Q.
    Keys are shared by neighbouring queries, so dK/dV are scatter-added (index_add_).
    """
    B, H, W, heads, D = q.shape
    ct = compute_dtype(q.dtype)
    rows_all = neighborhood_index(H, kernel_size, dilation, q.device)
    cols = neighborhood_index(W, kernel_size, dilation, q.device)
    # rowsum(dO * O) = sum_n P_n dP_n: the softmax Jacobian's diagonal-correction term.
    delta = (grad_out.to(ct) * out.to(ct)).sum(-1)                      # [B, H, W, heads]
    dq = torch.empty(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros((B, H * W, heads, D), dtype=ct, device=q.device)
    dv = torch.zeros((B, H * W, heads, D), dtype=ct, device=q.device)
    for i0, i1 in _row_chunks(q, kernel_size):
        kr, kc = _window_index(rows_all[i0:i1], cols)                  # [c, W, kk] each
        kg, vg = k[:, kr, kc].to(ct), v[:, kr, kc].to(ct)               # [B, c, W, kk, heads, D]
        qc = q[:, i0:i1, :, None].to(ct)                                # [B, c, W, 1, heads, D]
        doc = grad_out[:, i0:i1, :, None].to(ct)
        p = torch.exp((qc * kg).sum(-1) * scale - lse[:, i0:i1, :, None].to(ct))  # [B, c, W, kk, heads]
        dp = (doc * vg).sum(-1)
        ds = p * (dp - delta[:, i0:i1, :, None])
        dq[:, i0:i1] = (ds[..., None] * kg).sum(3) * scale
        # every (query, key) pair adds to its key's gradient: flatten the pairs [c, W, kk]
        # and scatter into the flat key axis H*W (the gathered layout makes these views)
        idx = (kr * W + kc).reshape(-1)
        dk.index_add_(1, idx, (ds[..., None] * qc * scale).reshape(B, idx.numel(), heads, D))
        dv.index_add_(1, idx, (p[..., None] * doc).reshape(B, idx.numel(), heads, D))
    return dq.to(q.dtype), dk.view(q.shape).to(k.dtype), dv.view(q.shape).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# global attention
# ---------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None",
              scale: float) -> torch.Tensor:
    """q [B, Nq, heads, D], k/v [B, Nk, heads, D], mask [B, Nk] bool (True = real token) -> [B, Nq, heads, D].

    SDPA wants [B, heads, N, D]: transposes are views, SDPA handles the strides.
    A batch row with no real key at all would softmax over nothing (NaN); it returns zeros.
    """
    attn_mask, empty = None, None
    if key_padding_mask is not None:
        empty = ~key_padding_mask.any(dim=1)                            # [B]
        # let fully-masked rows attend to everything (finite), then zero them below
        attn_mask = (key_padding_mask | empty[:, None])[:, None, None, :]  # [B, 1, 1, Nk]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, scale=scale).transpose(1, 2)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# patch merge / split (pixel-unshuffle + linear, linear + pixel-shuffle), channels-last
# ---------------------------------------------------------------------------------------------

def patch_merge(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", factor: int) -> torch.Tensor:
    """x [B, H, W, C] -> [B, H/f, W/f, C_out]; each f x f block is flattened (row, col, channel)."""
    B, H, W, C = x.shape
    f = factor
    x = x.unflatten(2, (W // f, f)).unflatten(1, (H // f, f))          # [B, H/f, f, W/f, f, C] (a view)
    x = x.permute(0, 1, 3, 2, 4, 5).flatten(3)                          # [B, H/f, W/f, f*f*C]
    return F.linear(x, weight, bias)


def patch_split(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", factor: int,
                skip: "torch.Tensor | None" = None, lerp: "torch.Tensor | None" = None) -> torch.Tensor:
    """x [B, H, W, C_in] -> [B, H*f, W*f, C_out]; optional skip + lerp * (y - skip)."""
    B, H, W, _ = x.shape
    f = factor
    y = F.linear(x, weight, bias)                                       # [B, H, W, f*f*C_out]
    c_out = weight.shape[0] // (f * f)
    y = y.unflatten(3, (f, f, c_out)).permute(0, 1, 3, 2, 4, 5)         # [B, H, f, W, f, C_out]
    y = y.reshape(B, H * f, W * f, c_out)
    if skip is not None:
        y = skip + lerp * (y - skip)
    return y


def scale_or_default(scale: "float | None", head_dim: int) -> float:
    return float(head_dim ** -0.5) if scale is None else float(scale)


__all__ = ["neighborhood_index", "na2d_forward", "na2d_backward", "attention", "patch_merge",
           "patch_split", "compute_dtype", "scale_or_default"]

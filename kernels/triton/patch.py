"""Patch merge / patch split as Triton GEMMs whose loads and stores do the block regrouping.

    merge: x [B, H, W, C] -> out [B, H/f, W/f, Cout],  out[m] = blocks(x)[m] @ W^T + b
           blocks(x)[m, kk] = x[b, hi*f + fi, wi*f + fj, c] with kk = (fi*f + fj)*C + c
           -> the A-operand load gathers the f x f block straight from x's strides.
    split: x [B, h, w, Cin] -> out [B, h*f, w*f, Cout],  y[m, n] = x[m] @ W^T + b,
           out[b, hi*f + fi, wi*f + fj, co] = y[m, n] with n = (fi*f + fj)*Cout + co
           -> the epilogue's store scatters each row into its f x f block, and fuses the
              lerp into the skip path: out = skip + lerp * (y - skip).

No permute().contiguous() anywhere: x, weight, skip and lerp are read through their strides
(so weight.t() views serve the backward: merge's dx is split with W^T, split's dx is merge
with W^T, see megamed.ops._triton). Accumulation is fp32; the output has x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _patch_merge_kernel(
    X, Wt, Bias, Out,
    sxb, sxh, sxw, sxc,
    swn, swk,                      # weight [Cout, f*f*C]
    h, w, C, M, N, KK,             # M = B*h*w output tokens, N = Cout, KK = f*f*C
    F: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    # output token m -> (batch, block row, block col) -> address of its block's top-left element
    bi = (rm // (h * w)).to(tl.int64)
    hi = (rm % (h * w)) // w
    wi = rm % w
    a_base = bi * sxb + (hi * F) * sxh + (wi * F) * sxw  # [BM]
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, KK, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < KK
        fi = kk // (F * C)        # (row-in-block, col-in-block, channel) order of the features
        fj = (kk // C) % F
        c = kk % C
        a = tl.load(X + a_base[:, None] + (fi * sxh + fj * sxw + c * sxc)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)            # [BM, BK]
        wt = tl.load(Wt + rn[None, :] * swn + kk[:, None] * swk,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)           # [BK, BN]
        acc += tl.dot(a, wt, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # out is allocated contiguous [B, h, w, Cout] = [M, N]
    tl.store(Out + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _patch_split_kernel(
    X, Wt, Bias, Skip, Lerp, Out,
    sxb, sxh, sxw, sxc,
    swn, swk,                      # weight [f*f*Cout, Cin]
    ssb, ssh, ssw, ssc,            # skip [B, h*f, w*f, Cout]
    slc,                           # lerp stride over channels (0 for a 0-d lerp)
    sob, soh, sow, soc,            # out [B, h*f, w*f, Cout]
    h, w, Cout, M, N, K,           # M = B*h*w input tokens, N = f*f*Cout, K = Cin
    F: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    bi = (rm // (h * w)).to(tl.int64)
    hi = (rm % (h * w)) // w
    wi = rm % w
    a_base = bi * sxb + hi * sxh + wi * sxw
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < K
        a = tl.load(X + a_base[:, None] + kk[None, :] * sxc, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(Wt + rn[None, :] * swn + kk[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, wt, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # epilogue: feature n = (fi*F + fj)*Cout + co goes to pixel (hi*F + fi, wi*F + fj), channel co
    fi = rn // (F * Cout)
    fj = (rn // Cout) % F
    co = rn % Cout
    row = hi[:, None] * F + fi[None, :]     # [BM, BN]
    col = wi[:, None] * F + fj[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    y = acc.to(Out.dtype.element_ty)         # round like the unfused linear before blending
    if HAS_SKIP:
        s = tl.load(Skip + bi[:, None] * ssb + row * ssh + col * ssw + co[None, :] * ssc, mask=mask, other=0.0)
        lp = tl.load(Lerp + co * slc, mask=n_ok, other=0.0)
        sf = s.to(tl.float32)
        y = (sf + lp.to(tl.float32)[None, :] * (y.to(tl.float32) - sf)).to(Out.dtype.element_ty)
    tl.store(Out + bi[:, None] * sob + row * soh + col * sow + co[None, :] * soc, y, mask=mask)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (one place, so tests can poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(M: int, N: int, K: int) -> dict:
    """Fixed GEMM tiles (no autotune under the interpreter); small problems get small tiles."""
    bm = 64 if M >= 64 else 16
    bn = min(128, max(16, triton.next_power_of_2(N)))
    bk = min(64, max(16, triton.next_power_of_2(K)))
    return dict(BM=bm, BN=bn, BK=bk, num_warps=4 if bm * bn <= 64 * 64 else 8)


def patch_merge(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None, *,
                factor: int = 2) -> torch.Tensor:
    """x [B, H, W, C] -> [B, H/f, W/f, Cout]; weight [Cout, f*f*C] (any strides, e.g. a .t() view)."""
    B, H, W, C = x.shape
    f = factor
    if H % f or W % f:
        raise ValueError(f"x spatial size {H}x{W} is not divisible by factor = {f}")
    if weight.shape[1] != f * f * C:
        raise ValueError(f"weight shape {tuple(weight.shape)}: expected [Cout, {f * f * C}]")
    h, w, N = H // f, W // f, weight.shape[0]
    out = _empty((B, h, w, N), x.dtype, x.device)
    M, KK = B * h * w, f * f * C
    cfg = _blocks(M, N, KK)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _patch_merge_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        *x.stride(), *weight.stride(), h, w, C, M, N, KK,
        F=f, HAS_BIAS=bias is not None, DOT_PREC=_dot_precision(x.dtype), **cfg)
    return out


def patch_split(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None, *, factor: int = 2,
                skip: "torch.Tensor | None" = None, lerp: "torch.Tensor | None" = None) -> torch.Tensor:
    """x [B, h, w, Cin] -> [B, h*f, w*f, Cout]; weight [f*f*Cout, Cin]; optional skip + lerp * (y - skip)."""
    B, h, w, K = x.shape
    f = factor
    N = weight.shape[0]
    if N % (f * f) or weight.shape[1] != K:
        raise ValueError(f"weight shape {tuple(weight.shape)}: expected [f*f*Cout, {K}] with f = {f}")
    if (skip is None) != (lerp is None):
        raise ValueError("skip and lerp go together")
    cout = N // (f * f)
    out = _empty((B, h * f, w * f, cout), x.dtype, x.device)
    M = B * h * w
    cfg = _blocks(M, N, K)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    if skip is not None:
        lerp_c = lerp.reshape(1) if lerp.dim() == 0 else lerp
        skip_strides, lerp_stride = skip.stride(), (0 if lerp.dim() == 0 else lerp.stride(0))
    else:
        lerp_c, skip_strides, lerp_stride = weight, (0, 0, 0, 0), 0
    _patch_split_kernel[grid](
        x, weight, bias if bias is not None else weight, skip if skip is not None else weight, lerp_c, out,
        *x.stride(), *weight.stride(), *skip_strides, lerp_stride, *out.stride(),
        h, w, cout, M, N, K,
        F=f, HAS_BIAS=bias is not None, HAS_SKIP=skip is not None, DOT_PREC=_dot_precision(x.dtype), **cfg)
    return out


__all__ = ["patch_merge", "patch_split", "SUPPORTED_DTYPES"]

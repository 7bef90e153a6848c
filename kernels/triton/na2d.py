"""2-D neighborhood attention in Triton: forward and backward, no materialised attention matrix.

Semantics (NATTEN, see megamed.ops.natten): q, k, v [B, H, W, heads, D]; query (i, j) attends to
exactly KS*KS keys, rows s_i .. s_i+KS-1 with s_i = clamp(i - KS//2, 0, n - KS) (columns likewise).
With dilation d the rows and columns split by residue mod d into sub-grids of n = ceil((H - r) / d)
positions and the rule applies inside each sub-grid. So every kernel below works on sub-grid
coordinates t and maps them to image rows with r + t*d; a dilated problem is d*d dense problems.

Forward (`_na2d_fwd_kernel`), one program per (query tile, residue pair) x (batch, head):
    a TH x TW tile of queries ([M = TH*TW, D]) is multiplied with `tl.dot` against its K/V halo,
    the union of the tile's windows: rows s(first row) .. s(last row) + KS - 1 (at most TH + KS - 1,
    because s is monotone with slope <= 1), columns likewise. The halo is walked flattened, in
    chunks of BLOCK_N keys (no padding of its width to a power of two), with an online (flash)
    softmax; logits of halo keys outside a query's own window are masked to -inf. Each K/V
    element is read once per tile. lse = log-sum-exp of the SCALED logits.

Backward strategy (two passes, no atomics):
    1. `_na2d_bwd_dq_kernel`, query tiles exactly as the forward: Delta = rowsum(dO * O) is
       computed from the tile and stored (fp32 [B, H, W, heads]) for pass 2, P = exp(S - lse) is
       recomputed per halo chunk, dS = P * (dP - Delta) with dP = dO V^T, dQ = scale * dS K.
    2. `_na2d_bwd_dkdv_kernel`, KEY tiles over the inverse neighbourhood: because s_i is monotone
       in i, the queries whose clamped windows contain key row r form a contiguous range
           i_lo(r) = 0 if r <= KS-1 else r - KS//2
           i_hi(r) = n-1 if r >= n-KS else r + KS//2
       (asymmetric at borders: a key near an edge is seen by up to KS + KS//2 query rows). The
       program walks that query range (rows and columns) in chunks, recomputes P^T and dS^T with
       the exact window mask, and accumulates dV = P^T dO and dK = scale * dS^T Q in registers,
       each key tile owned by one program, so dK/dV are written once, in the input dtype.

All math accumulates in fp32; q, k, v may be fp32, fp16 or bf16 and any strides (strides are
kernel arguments; nothing is made contiguous). The head dim is padded to a power of two >= 16
with masks, so any D works; D <= 128 is what the tile sizes are chosen for.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------
# helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _window_start(t, n, KS: tl.constexpr):
    """First key (sub-grid coordinate) of query t's window: clamp(t - KS//2, 0, n - KS)."""
    return tl.minimum(tl.maximum(t - KS // 2, 0), n - KS)


@triton.jit
def _tile_coords(pid, H, W, DIL: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Program id -> (row residue ry, col residue rx, sub-grid rows nh, cols nw, tile origin t0, u0).

    Tiles are laid out for the largest sub-grid (residue 0, ceil(H / DIL) rows); tiles of the smaller
    sub-grids that fall outside are fully masked."""
    tiles_h = tl.cdiv(tl.cdiv(H, DIL), TH)
    tiles_w = tl.cdiv(tl.cdiv(W, DIL), TW)
    tile = pid % (tiles_h * tiles_w)
    res = pid // (tiles_h * tiles_w)
    ry = res // DIL
    rx = res % DIL
    nh = (H - ry + DIL - 1) // DIL
    nw = (W - rx + DIL - 1) // DIL
    return ry, rx, nh, nw, (tile // tiles_w) * TH, (tile % tiles_w) * TW


@triton.jit
def _query_tile(pid, H, W, KS: tl.constexpr, DIL: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """The program's query tile, flattened row-major ([M] = TH*TW): residues (ry, rx), sub-grid
    size (nh, nw), sub-grid coordinates (t, u), validity q_ok, and each query's first window
    key row/column (st, su), and the tile's halo = union of its windows (rows h0..h1, columns
    w0..w1, exclusive upper bounds). Shared by the forward and the dQ pass, which walk the same tiles."""
    ry, rx, nh, nw, t0, u0 = _tile_coords(pid, H, W, DIL, TH, TW)
    m = tl.arange(0, TH * TW)
    t = t0 + m // TW
    u = u0 + m % TW
    q_ok = (t < nh) & (u < nw)
    h0 = _window_start(t0, nh, KS)
    h1 = _window_start(tl.minimum(t0 + TH - 1, nh - 1), nh, KS) + KS
    w0 = _window_start(u0, nw, KS)
    w1 = _window_start(tl.minimum(u0 + TW - 1, nw - 1), nw, KS) + KS
    return ry, rx, nh, nw, t, u, q_ok, _window_start(t, nh, KS), _window_start(u, nw, KS), h0, h1, w0, w1


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _na2d_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod,
    slb, slh, slw, sln,
    H, W, HEADS, D, qk_scale,  # qk_scale = scale * log2(e): softmax in base 2
    KS: tl.constexpr, DIL: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HEADS).to(tl.int64)
    head = bh % HEADS
    # query tile, flattened row-major: [M] sub-grid coordinates (t, u), window starts (st, su),
    # halo rows h0..h1 / columns w0..w1 (the union of the tile's windows)
    ry, rx, nh, nw, t, u, q_ok, st, su, h0, h1, w0, w1 = _query_tile(pid, H, W, KS, DIL, TH, TW)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q_ptr = Q + b * sqb + head * sqn + (ry + t * DIL)[:, None] * sqh + (rx + u * DIL)[:, None] * sqw + d[None, :] * sqd
    q = tl.load(q_ptr, mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # [M, BLOCK_D]

    # finite "minus infinity" for the running max: a fully masked (out-of-image) query row
    # then gives exp2(-inf - (-1e30)) = 0 instead of NaN
    m_i = tl.full([TH * TW], -1.0e30, tl.float32)
    l_i = tl.zeros([TH * TW], tl.float32)
    acc = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    # walk the halo flattened row-major in chunks of BLOCK_N keys (no padding of its width to a
    # power of two: a 14-wide halo row costs 14 lanes, not 16)
    hw = w1 - w0
    n_halo = (h1 - h0) * hw
    nk = tl.arange(0, BLOCK_N)
    for c0 in range(0, n_halo, BLOCK_N):
        hk = c0 + nk
        kr = h0 + hk // hw  # [N] key sub-grid coordinates of this chunk
        kc = w0 + hk % hw
        k_ok = hk < n_halo
        kv_mask = k_ok[:, None] & d_ok[None, :]
        krow = (ry + kr * DIL)[:, None]  # image row / column of each key
        kcol = (rx + kc * DIL)[:, None]
        k_ptr = K + b * skb + head * skn + krow * skh + kcol * skw + d[None, :] * skd
        kt = tl.load(k_ptr, mask=kv_mask, other=0.0)  # [N, BLOCK_D]
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale  # [M, N]
        in_win = ((kr[None, :] >= st[:, None]) & (kr[None, :] < st[:, None] + KS)
                  & (kc[None, :] >= su[:, None]) & (kc[None, :] < su[:, None] + KS) & k_ok[None, :])
        s = tl.where(in_win, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = V + b * svb + head * svn + krow * svh + kcol * svw + d[None, :] * svd
        vt = tl.load(v_ptr, mask=kv_mask, other=0.0)  # [N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = O + b * sob + head * son + (ry + t * DIL)[:, None] * soh + (rx + u * DIL)[:, None] * sow + d[None, :] * sod
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # base-2 max + log2(sum) -> natural log
    tl.store(LSE + b * slb + head * sln + (ry + t * DIL) * slh + (rx + u * DIL) * slw, lse, mask=q_ok)


# ---------------------------------------------------------------------------------------------
# backward, pass 1: dQ (and Delta) over query tiles
# ---------------------------------------------------------------------------------------------

@triton.jit
def _na2d_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod,
    sgb, sgh, sgw, sgn, sgd,   # grad_out
    slb, slh, slw, sln,        # lse and delta (same layout)
    sdb, sdh, sdw, sdn, sdd,   # dq
    H, W, HEADS, D, qk_scale, scale,
    KS: tl.constexpr, DIL: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HEADS).to(tl.int64)
    head = bh % HEADS
    ry, rx, nh, nw, t, u, q_ok, st, su, h0, h1, w0, w1 = _query_tile(pid, H, W, KS, DIL, TH, TW)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    md = q_ok[:, None] & d_ok[None, :]
    row = (ry + t * DIL)[:, None]
    col = (rx + u * DIL)[:, None]

    q = tl.load(Q + b * sqb + head * sqn + row * sqh + col * sqw + d[None, :] * sqd, mask=md, other=0.0)
    do = tl.load(DO + b * sgb + head * sgn + row * sgh + col * sgw + d[None, :] * sgd, mask=md, other=0.0)
    o = tl.load(O + b * sob + head * son + row * soh + col * sow + d[None, :] * sod, mask=md, other=0.0)
    # Delta = rowsum(dO * O) = sum_n P_n dP_n, the softmax Jacobian's correction term; pass 2 reuses it
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # [M]
    l_off = b * slb + head * sln + (ry + t * DIL) * slh + (rx + u * DIL) * slw
    tl.store(DELTA + l_off, delta, mask=q_ok)
    lse2 = tl.load(LSE + l_off, mask=q_ok, other=0.0) * 1.4426950408889634  # natural -> base 2

    dq = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    # the forward's halo walk
    hw = w1 - w0
    n_halo = (h1 - h0) * hw
    nk = tl.arange(0, BLOCK_N)
    for c0 in range(0, n_halo, BLOCK_N):
        hk = c0 + nk
        kr = h0 + hk // hw  # [N] key sub-grid coordinates of this chunk
        kc = w0 + hk % hw
        k_ok = hk < n_halo
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kt = tl.load(K + b * skb + head * skn + (ry + kr * DIL)[:, None] * skh + (rx + kc * DIL)[:, None] * skw
                     + d[None, :] * skd, mask=kv_mask, other=0.0)  # [N, BLOCK_D]
        vt = tl.load(V + b * svb + head * svn + (ry + kr * DIL)[:, None] * svh + (rx + kc * DIL)[:, None] * svw
                     + d[None, :] * svd, mask=kv_mask, other=0.0)
        in_win = ((kr[None, :] >= st[:, None]) & (kr[None, :] < st[:, None] + KS)
                  & (kc[None, :] >= su[:, None]) & (kc[None, :] < su[:, None] + KS)
                  & k_ok[None, :] & q_ok[:, None])
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale       # [M, N]
        p = tl.where(in_win, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)                 # [M, N]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b * sdb + head * sdn + row * sdh + col * sdw + d[None, :] * sdd, dq.to(DQ.dtype.element_ty), mask=md)


# ---------------------------------------------------------------------------------------------
# backward, pass 2: dK, dV over key tiles (inverse neighbourhood)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _query_range(r_first, r_last, n, KS: tl.constexpr):
    """Inclusive range of queries (sub-grid coords) whose windows contain any key in [r_first, r_last]."""
    lo = tl.where(r_first <= KS - 1, 0, r_first - KS // 2)
    hi = tl.where(r_last >= n - KS, n - 1, r_last + KS // 2)
    return lo, hi


@triton.jit
def _na2d_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sgb, sgh, sgw, sgn, sgd,
    slb, slh, slw, sln,
    sdb, sdh, sdw, sdn, sdd,   # dk and dv (allocated alike)
    H, W, HEADS, D, qk_scale, scale,
    KS: tl.constexpr, DIL: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HEADS).to(tl.int64)
    head = bh % HEADS
    ry, rx, nh, nw, t0, u0 = _tile_coords(pid, H, W, DIL, TH, TW)

    # key tile [M] in sub-grid coordinates
    m = tl.arange(0, TH * TW)
    kr = t0 + m // TW
    kc = u0 + m % TW
    k_ok = (kr < nh) & (kc < nw)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    md = k_ok[:, None] & d_ok[None, :]
    row = (ry + kr * DIL)[:, None]
    col = (rx + kc * DIL)[:, None]
    kt = tl.load(K + b * skb + head * skn + row * skh + col * skw + d[None, :] * skd, mask=md, other=0.0)  # [M, BD]
    vt = tl.load(V + b * svb + head * svn + row * svh + col * svw + d[None, :] * svd, mask=md, other=0.0)

    # queries that see any key of this tile (a tile past the sub-grid edge clamps to its last row/col)
    i_lo, i_hi = _query_range(tl.minimum(t0, nh - 1), tl.minimum(t0 + TH - 1, nh - 1), nh, KS)
    j_lo, j_hi = _query_range(tl.minimum(u0, nw - 1), tl.minimum(u0 + TW - 1, nw - 1), nw, KS)

    dk = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    dv = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    # walk that query block flattened row-major in chunks of BLOCK_N queries
    qw = j_hi + 1 - j_lo
    n_q = (i_hi + 1 - i_lo) * qw
    nq = tl.arange(0, BLOCK_N)
    for c0 in range(0, n_q, BLOCK_N):
        hq = c0 + nq
        qt = i_lo + hq // qw  # [N] query sub-grid coordinates of this chunk
        qu = j_lo + hq % qw
        q_ok = hq < n_q
        qm = q_ok[:, None] & d_ok[None, :]
        qrow = (ry + qt * DIL)[:, None]
        qcol = (rx + qu * DIL)[:, None]
        q = tl.load(Q + b * sqb + head * sqn + qrow * sqh + qcol * sqw + d[None, :] * sqd, mask=qm, other=0.0)
        do = tl.load(DO + b * sgb + head * sgn + qrow * sgh + qcol * sgw + d[None, :] * sgd, mask=qm, other=0.0)
        l_off = b * slb + head * sln + (ry + qt * DIL) * slh + (rx + qu * DIL) * slw
        lse2 = tl.load(LSE + l_off, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_off, mask=q_ok, other=0.0)
        st = _window_start(qt, nh, KS)
        su = _window_start(qu, nw, KS)
        # [M keys, N queries]: key m lies in query n's window
        in_win = ((kr[:, None] >= st[None, :]) & (kr[:, None] < st[None, :] + KS)
                  & (kc[:, None] >= su[None, :]) & (kc[:, None] < su[None, :] + KS)
                  & q_ok[None, :] & k_ok[:, None])
        s_t = tl.dot(kt, tl.trans(q), input_precision=DOT_PREC) * qk_scale          # S^T [M, N]
        p_t = tl.where(in_win, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(vt, tl.trans(do), input_precision=DOT_PREC)                   # dP^T [M, N]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * scale
    off = b * sdb + head * sdn + row * sdh + col * sdw + d[None, :] * sdd
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=md)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=md)


# ---------------------------------------------------------------------------------------------
# launch wrappers (torch tensors in, torch tensors out)
# ---------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


def _config(kernel_size: int, head_dim: int, tile: "tuple[int, int] | None" = None,
            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Fixed tile sizes (no autotune: it cannot run under TRITON_INTERPRET=1).

    Query (and key) tiles default to 8 x 8 (M = 64), walked against chunks of BLOCK_N = 64 halo
    keys (or queries, in the dK/dV pass). `tile` overrides (TH, TW): powers of two with
    TH * TW >= 16 (tl.dot's minimum); tests use 4 x 4 so small images still have interior tiles.
    fp32 runs unpipelined (num_stages=1): pipelined fp32 tiles at D = 128 need ~214 KB of shared
    memory (checked by compiling for sm_90 offline), more than an A100 has."""
    th, tw = tile if tile is not None else (8, 8)
    if th * tw < 16 or th & (th - 1) or tw & (tw - 1):
        raise ValueError(f"tile must be two powers of two with a product >= 16, got {tile!r}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(TH=th, TW=tw, BLOCK_N=64, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8,
                num_stages=1 if dtype == torch.float32 else 2)


def _grid(q: torch.Tensor, dilation: int, th: int, tw: int) -> tuple[int, int]:
    B, H, W, heads, _ = q.shape
    sub_h, sub_w = -(-H // dilation), -(-W // dilation)
    return (dilation * dilation * -(-sub_h // th) * -(-sub_w // tw), B * heads)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (tf32 would lose ~3 digits); fp16/bf16 ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (one place, so tests can poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int) -> None:
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} shape/dtype/device {tuple(t.shape)}/{t.dtype}/{t.device} must match q "
                             f"{tuple(q.shape)}/{q.dtype}/{q.device}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.dim() != 5:
        raise ValueError(f"q must be [B, H, W, heads, D], got {tuple(q.shape)}")
    if kernel_size % 2 == 0 or kernel_size * dilation > min(q.shape[1], q.shape[2]):
        raise ValueError(f"kernel_size must be odd with kernel_size * dilation <= min(H, W); got "
                         f"kernel_size={kernel_size}, dilation={dilation}, q {tuple(q.shape)}")


def na2d_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, *,
                 dilation: int = 1, scale: "float | None" = None,
                 tile: "tuple[int, int] | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, H, W, heads, D] in q.dtype, lse float32 [B, H, W, heads], natural log, scaled logits)."""
    _check(q, k, v, kernel_size, dilation)
    B, H, W, heads, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty(q.shape[:4], torch.float32, q.device)
    cfg = _config(kernel_size, D, tile, q.dtype)
    _na2d_fwd_kernel[_grid(q, dilation, cfg["TH"], cfg["TW"])](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        H, W, heads, D, scale * LOG2E,
        KS=kernel_size, DIL=dilation, DOT_PREC=_dot_precision(q.dtype), **cfg)
    return out, lse


def na2d_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, kernel_size: int, *, dilation: int = 1,
                  scale: "float | None" = None,
                  tile: "tuple[int, int] | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each [B, H, W, heads, D] in the input dtype (fp32 accumulation inside)."""
    _check(q, k, v, kernel_size, dilation)
    if lse.dtype != torch.float32 or lse.shape != q.shape[:4]:
        raise ValueError(f"lse must be float32 {tuple(q.shape[:4])}, got {lse.dtype} {tuple(lse.shape)}")
    B, H, W, heads, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    cfg = _config(kernel_size, D, tile, q.dtype)
    grid = _grid(q, dilation, cfg["TH"], cfg["TW"])
    prec = _dot_precision(q.dtype)
    delta = _empty(q.shape[:4], torch.float32, q.device)
    # Delta must share lse's strides (one offset computation serves both)
    if delta.stride() != lse.stride():
        lse = lse.contiguous()
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    _na2d_bwd_dq_kernel[grid](
        q, k, v, out, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *lse.stride(), *dq.stride(),
        H, W, heads, D, scale * LOG2E, scale,
        KS=kernel_size, DIL=dilation, DOT_PREC=prec, **cfg)
    _na2d_bwd_dkdv_kernel[grid](
        q, k, v, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(), *dk.stride(),
        H, W, heads, D, scale * LOG2E, scale,
        KS=kernel_size, DIL=dilation, DOT_PREC=prec, **cfg)
    return dq, dk, dv


def flops(B: int, H: int, W: int, heads: int, D: int, kernel_size: int, backward: bool = False) -> float:
    """Useful FLOPs of neighborhood attention: 4 * N * k^2 * D * heads forward, 2.5x that backward."""
    fwd = 4.0 * B * H * W * kernel_size ** 2 * D * heads
    return fwd * 2.5 if backward else fwd


__all__ = ["na2d_forward", "na2d_backward", "flops", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]

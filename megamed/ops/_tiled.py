"""`tiled`: CPU neighborhood attention as halo-tiled batched matmuls, in plain PyTorch.

The `reference` backend gathers k*k keys per query and multiplies elementwise: 49 copies of
every key at k=7, and no matmul anywhere. Here the query grid is cut into th x tw tiles
instead. Every query of a tile attends inside one contiguous "halo" of at most
(th + k - 1) x (tw + k - 1) keys (the union of the tile's clamped windows), so a tile is
a small dense attention problem:

    S = scale * Q_tile @ K_halo^T + mask     [tiles, th*tw, Lh*Lw]   (mask: 0 in the query's
    P = softmax(S), lse = logsumexp(S)                                own window, -inf outside)
    O = P @ V_halo                           [tiles, th*tw, D]

The same algorithm the fused GPU kernels use, written with torch ops: one gather per operand
for a whole chunk of tiles, then all tiles at once as a batch of masked dense attentions,
so CPU time goes to BLAS instead of aten::mul/aten::index. The per-tile attention runs in
torch's fused CPU flash-attention op (forward and backward, ~2x faster than unfused) when
this torch has it, else as explicit bmm + softmax (_attend*). The price is the masked-out
logits: (Lh*Lw) / k^2 times the useful work (4x at th = tw = 8, k = 7), which matmuls pay
for easily.

Edge tiles: a grid that the tile size does not divide gets a last, partial tile whose
empty query slots are filled with clamped duplicates of real queries (their windows are
valid, so nothing is NaN). The forward keeps each query's result from the tile that owns it;
the backward zeroes the duplicates' incoming gradient so their keys are not counted twice.

Dilation d: rows/cols with the same residue mod d form a sub-grid that is an ordinary
dilation-1 problem (megamed.ops.reference), so each of the d*d sub-grids runs separately
on strided views q[:, ry::d, rx::d] and writes back to the same positions.

Memory: work is chunked over rows of tiles so one [B*heads, chunk, th*tw, Lh*Lw] logits
block stays under _CHUNK_ELEMS elements (16 MiB in fp32); the bmm backward keeps ~3 such
blocks alive (P, dS and a temporary; the fused kernels less, they work in blocks) plus the
gathered halos, ~3x the chunk's share of k and v, i.e. roughly 50-100 MiB of scratch
whatever the image size (unless one row of tiles alone is bigger: chunks never split it).
Outputs and dk/dv are full-size [B, H, W, heads, D] in the compute dtype.

Inputs may be strided views ([B, H, W, heads, D] slices of a packed qkv tensor): the
gathers (index_select) read them directly, nothing copies a whole input first. fp16/bf16 are upcast per chunk
(matmuls, softmax and gradient accumulation in fp32) and cast back at the end.
"""
from __future__ import annotations

import functools

import torch

from megamed.ops.backends import register_backend
from megamed.ops.reference import compute_dtype

PRIORITY_TILED = 5       # above reference (0), below compiled/GPU backends (cpp 10, triton 15)
DEFAULT_TILE = (8, 8)    # (th, tw); k = 7, D = 32: 8x8 and 8x16 fastest at 32^2 tokens, 16x16 only
                         # wins at 16^2; 4x4 is slowest (benchmarks/bench_na_cpu.py --tile)
_CHUNK_ELEMS = 1 << 22   # bound on one logits block, see the module docstring


# ---------------------------------------------------------------------------------------------
# index tables (depend only on the grid, tile and kernel sizes: cached)
# ---------------------------------------------------------------------------------------------

def _axis_tables(n: int, t: int, ks: int) -> tuple[torch.Tensor, ...]:
    """Tiling of one axis of length n into tiles of t query positions, kernel ks (dilation 1).

    Returns
      qpos    [nt, t]     query position of each slot (the last tile repeats n-1 in empty slots)
      valid   [nt, t]     bool, False on those duplicate slots
      hpos    [nt, L]     key positions of each tile's halo, L = min(t + ks - 1, n)
      allowed [nt, t, L]  bool, halo position u is inside slot s's window
    """
    nt = -(-n // t)
    L = min(t + ks - 1, n)
    slot = torch.arange(nt)[:, None] * t + torch.arange(t)               # [nt, t]
    valid = slot < n
    qpos = slot.clamp(max=n - 1)
    win = (qpos - ks // 2).clamp(0, n - ks)                              # window start of each query
    # the halo starts at the tile's first window (windows start in order), moved in so it
    # fits the grid; it ends >= the last window's end because L >= t + ks - 1 or L = n
    hstart = torch.minimum(win[:, 0], torch.tensor(n - L))               # [nt]
    hpos = hstart[:, None] + torch.arange(L)                             # [nt, L]
    rel = (win - hstart[:, None])[:, :, None]                            # [nt, t, 1] in [0, L - ks]
    u = torch.arange(L)
    allowed = (u >= rel) & (u < rel + ks)                                # [nt, t, L]
    return qpos, valid, hpos, allowed


@functools.lru_cache(maxsize=64)
def _tables(H: int, W: int, th: int, tw: int, ks: int, dtype: torch.dtype) -> dict:
    """2-D tables for an H x W grid in th x tw tiles; tiles are numbered row-major (a, b),
    the th*tw slots of a tile and the Lh*Lw keys of its halo row-major too.

    rows, cols     [nth, th], [ntw, tw]   query row of each tile row's slots, column likewise
    hrows, hcols   [nth, Lh], [ntw, Lw]   halo key rows / columns
    valid   [tiles, th*tw]          the slot is its query's owner (not an edge duplicate)
    mask    [tiles, th*tw, Lh*Lw]   additive: 0 inside the slot's window, -inf outside
    owner   [H*W]                   flat (tile, slot) index that owns each query, for the output
    halo_origin  [(r0, c0)] * tiles  top-left key of each halo (Python ints, for the backward's adds)
    """
    qpr, vr, hpr, ar = _axis_tables(H, th, ks)
    qpc, vc, hpc, ac = _axis_tables(W, tw, ks)
    nth, ntw, Lh, Lw = qpr.shape[0], qpc.shape[0], hpr.shape[1], hpc.shape[1]
    tiles = nth * ntw
    valid = vr[:, None, :, None] & vc[None, :, None, :]                     # [nth, ntw, th, tw]
    inside = ar[:, None, :, None, :, None] & ac[None, :, None, :, None, :]  # [nth, ntw, th, tw, Lh, Lw]
    mask = torch.zeros(inside.shape, dtype=dtype).masked_fill_(~inside, float("-inf"))
    # query (i, j) is owned by tile (i // th, j // tw), slot (i % th, j % tw)
    i, j = torch.arange(H)[:, None], torch.arange(W)[None, :]
    owner = (((i // th) * ntw + j // tw) * th + i % th) * tw + j % tw        # [H, W]
    origin = [(int(r), int(c)) for r in hpr[:, 0] for c in hpc[:, 0]]     # row-major like the tiles
    return dict(rows=qpr, cols=qpc, hrows=hpr, hcols=hpc, valid=valid.reshape(tiles, th * tw),
                mask=mask.reshape(tiles, th * tw, Lh * Lw), owner=owner.reshape(-1), halo_origin=origin)


def _tile_row_chunks(n_tile_rows: int, per_tile_row: int):
    """Yield (a0, a1) ranges of tile rows so one logits block stays under _CHUNK_ELEMS elements."""
    step = max(1, _CHUNK_ELEMS // max(1, per_tile_row))
    for a0 in range(0, n_tile_rows, step):
        yield a0, min(n_tile_rows, a0 + step)


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """x [B, H, W, heads, D] (any strides), rows [na, n], cols [nb, m] -> [B*heads, na*nb, n*m, D]
    in dtype ct, entry ((b, h), (a, a'), (i, j)) = x[b, rows[a, i], cols[a', j], h].

    Tiles are separable (a tile's rows x its columns), so this is two index_selects that copy
    whole rows / whole (heads, D) columns, then one permuting copy: ~1.5x faster than a 2-D
    advanced-index gather, which indexes element by element."""
    B, _, _, heads, D = x.shape
    (na, n), (nb, m) = rows.shape, cols.shape
    g = x.index_select(1, rows.reshape(-1)).index_select(2, cols.reshape(-1))  # [B, na*n, nb*m, heads, D]
    g = g.view(B, na, n, nb, m, heads, D).permute(0, 5, 1, 3, 2, 4, 6)
    return g.reshape(B * heads, na * nb, n * m, D).to(ct)


def _check_tile(tile) -> tuple[int, int]:
    if (not isinstance(tile, (tuple, list)) or len(tile) != 2
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile)):
        raise ValueError(f"tile must be a pair of positive ints (th, tw), got {tile!r}")
    return int(tile[0]), int(tile[1])


# ---------------------------------------------------------------------------------------------
# the per-tile attention: batches of small dense problems with an additive mask
#   qt [BH, c, Q, D], kt/vt [BH, c, L, D], mask [c, Q, L] (0 / -inf), all in the compute dtype
# Two interchangeable kernels: torch's fused CPU flash-attention op when this torch has it
# (one vectorised pass for scale + mask + online softmax, fused backward; ~2x faster than the
# unfused one), else the same maths as explicit bmm + softmax. _FUSED switches (tests run both).
# ---------------------------------------------------------------------------------------------

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FUSED = _FLASH is not None and _FLASH_BWD is not None


def _attend_bmm(qt, kt, vt, mask, scale):
    """-> (out [BH, c, Q, D], lse [BH, c, Q])."""
    BH, c, Q, D = qt.shape
    L = kt.shape[2]
    s = torch.bmm(qt.reshape(BH * c, Q, D), kt.reshape(BH * c, L, D).transpose(1, 2)).mul_(scale)
    s = s.view(BH, c, Q, L).add_(mask)                                   # mask broadcasts over B*heads
    # exp is the costliest pass here (it runs on all L logits, masked ones too), so take it
    # once, inside softmax, and read lse off P: softmax computes exp(s - max) / sum, so the row
    # max of P is exactly 1 / sum >= 1/k^2 (never underflows) and lse = max(s) - log(max(P)).
    p = torch.softmax(s, dim=-1)                                         # k*k finite logits per row
    lse = s.amax(dim=-1) - p.amax(dim=-1).log()
    out = torch.bmm(p.view(BH * c, Q, L), vt.reshape(BH * c, L, D))
    return out.view(BH, c, Q, D), lse


def _attend_bmm_backward(got, qt, kt, vt, ot, lt, mask, scale):
    """Flash-style backward: P = exp(S - lse) recomputed, then dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q. -> (dq, dk, dv)."""
    BH, c, Q, D = qt.shape
    L = kt.shape[2]
    qf, gf = qt.reshape(BH * c, Q, D), got.reshape(BH * c, Q, D)
    kf, vf = kt.reshape(BH * c, L, D), vt.reshape(BH * c, L, D)
    # rowsum(dO * O) = sum_n P_n dP_n: the softmax Jacobian's diagonal-correction term
    delta = (got * ot).sum(-1, keepdim=True).view(BH * c, Q, 1)
    s = torch.bmm(qf, kf.transpose(1, 2)).mul_(scale)                    # [BH*c, Q, L]
    s.view(BH, c, Q, L).add_(mask)
    p = s.sub_(lt.reshape(BH * c, Q, 1)).exp_()                         # P, exactly 0 outside windows
    ds = torch.bmm(gf, vf.transpose(1, 2)).sub_(delta).mul_(p)          # dS without the scale
    dq = torch.bmm(ds, kf).mul_(scale)
    dk = torch.bmm(ds.transpose(1, 2), qf).mul_(scale)
    dv = torch.bmm(p.transpose(1, 2), gf)
    return dq.view(BH, c, Q, D), dk.view(BH, c, L, D), dv.view(BH, c, L, D)


def _attend(qt, kt, vt, mask, scale):
    if _FUSED:  # tiles ride in the heads slot: the [1, c, Q, L] mask broadcasts over B*heads
        out, lse = _FLASH(qt, kt, vt, attn_mask=mask[None], scale=scale)
        return out, lse
    return _attend_bmm(qt, kt, vt, mask, scale)


def _attend_backward(got, qt, kt, vt, ot, lt, mask, scale):
    if _FUSED:
        return _FLASH_BWD(got, qt, kt, vt, ot, lt, 0.0, False, attn_mask=mask[None], scale=scale)
    return _attend_bmm_backward(got, qt, kt, vt, ot, lt, mask, scale)


# ---------------------------------------------------------------------------------------------
# dilation 1: gather tiles and halos, attend, put the results back
# ---------------------------------------------------------------------------------------------

def _forward_d1(q, k, v, ks: int, scale: float, tile: tuple[int, int]):
    """q, k, v [B, H, W, heads, D] (any strides) -> out [B, H, W, heads, D] in compute dtype,
    lse float32 [B, H, W, heads]."""
    B, H, W, heads, D = q.shape
    ct = compute_dtype(q.dtype)
    T = _tables(H, W, min(tile[0], H), min(tile[1], W), ks, ct)
    tiles, Q, L = T["mask"].shape
    ntw = T["cols"].shape[0]
    BH = B * heads
    outs, lses = [], []
    for a0, a1 in _tile_row_chunks(T["rows"].shape[0], BH * ntw * Q * L):
        t0, t1 = a0 * ntw, a1 * ntw                                     # the chunk's tiles
        rows, hrows = T["rows"][a0:a1], T["hrows"][a0:a1]
        qt = _gather(q, rows, T["cols"], ct)                            # [BH, c, Q, D]
        kt = _gather(k, hrows, T["hcols"], ct)                          # [BH, c, L, D]
        vt = _gather(v, hrows, T["hcols"], ct)
        o, lse = _attend(qt, kt, vt, T["mask"][t0:t1], scale)           # [BH, c, Q, D], [BH, c, Q]
        outs.append(o.reshape(BH, (t1 - t0) * Q, D))
        lses.append(lse.reshape(BH, (t1 - t0) * Q))
    # pick each query's result from the tile slot that owns it: [BH, tiles*Q, D] -> [BH, H*W, D]
    out = torch.cat(outs, dim=1).index_select(1, T["owner"])
    lse = torch.cat(lses, dim=1).index_select(1, T["owner"])
    out = out.view(B, heads, H, W, D).movedim(1, 3)                     # [B, H, W, heads, D] view
    lse = lse.view(B, heads, H, W).movedim(1, 3).float()                # [B, H, W, heads]
    return out, lse


def _backward_d1(grad_out, q, k, v, out, lse, ks: int, scale: float, tile: tuple[int, int]):
    """Per-tile backward (see _attend_bmm_backward), then the halo gradients are summed back
    into dk/dv: halos of neighbouring tiles overlap. Returns (dq, dk, dv) [B, H, W, heads, D]
    in compute dtype."""
    B, H, W, heads, D = q.shape
    ct = compute_dtype(q.dtype)
    T = _tables(H, W, min(tile[0], H), min(tile[1], W), ks, ct)
    tiles, Q, L = T["mask"].shape
    ntw = T["cols"].shape[0]
    Lh, Lw = T["hrows"].shape[1], T["hcols"].shape[1]
    BH = B * heads
    # a tile's halo is a rectangle of the key grid, so summing its gradient back is one strided
    # add_ of [B, heads, Lh, Lw, D] per tile (index_add_ over the flattened key index was ~10x
    # slower: on CPU it expands to an element-wise scatter_add_)
    dk = torch.zeros(B, heads, H, W, D, dtype=ct)
    dv = torch.zeros(B, heads, H, W, D, dtype=ct)
    dqs = []
    for a0, a1 in _tile_row_chunks(T["rows"].shape[0], BH * ntw * Q * L):
        t0, t1 = a0 * ntw, a1 * ntw
        rows, hrows = T["rows"][a0:a1], T["hrows"][a0:a1]
        # duplicate slots of edge tiles get no incoming gradient: their keys are not counted twice
        keep = T["valid"][t0:t1].to(ct)[:, :, None]                    # [c, Q, 1]
        got = _gather(grad_out, rows, T["cols"], ct).mul_(keep)         # [BH, c, Q, D], dO
        qt = _gather(q, rows, T["cols"], ct)
        ot = _gather(out, rows, T["cols"], ct)
        lt = _gather(lse[..., None], rows, T["cols"], ct).squeeze(-1)   # [BH, c, Q]
        kt = _gather(k, hrows, T["hcols"], ct)                          # [BH, c, L, D]
        vt = _gather(v, hrows, T["hcols"], ct)
        dqt, dkt, dvt = _attend_backward(got, qt, kt, vt, ot, lt, T["mask"][t0:t1], scale)
        dqs.append(dqt.reshape(BH, (t1 - t0) * Q, D))
        dkt = dkt.reshape(B, heads, t1 - t0, Lh, Lw, D)
        dvt = dvt.reshape(B, heads, t1 - t0, Lh, Lw, D)
        for t in range(t1 - t0):                                        # overlapping halos sum
            r0, c0 = T["halo_origin"][t0 + t]
            dk[:, :, r0:r0 + Lh, c0:c0 + Lw] += dkt[:, :, t]
            dv[:, :, r0:r0 + Lh, c0:c0 + Lw] += dvt[:, :, t]
    dq = torch.cat(dqs, dim=1).index_select(1, T["owner"])              # [BH, H*W, D]
    dq = dq.view(B, heads, H, W, D).movedim(1, 3)
    dk, dv = dk.movedim(1, 3), dv.movedim(1, 3)                         # [B, H, W, heads, D] views
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# public entry points (any dilation: one dilation-1 problem per residue sub-grid)
# ---------------------------------------------------------------------------------------------

def _subgrids(dilation: int):
    for ry in range(dilation):
        for rx in range(dilation):
            yield (slice(None), slice(ry, None, dilation), slice(rx, None, dilation))


def na2d_tiled_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, *,
                       dilation: int = 1, scale: float, tile: tuple[int, int] = DEFAULT_TILE
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, H, W, heads, D] in q.dtype, lse float32 [B, H, W, heads]); arguments as
    megamed.ops.natten.neighborhood_attention (already validated), tile = (th, tw) queries."""
    th, tw = _check_tile(tile)
    if dilation == 1:
        out, lse = _forward_d1(q, k, v, kernel_size, scale, (th, tw))
        return out.to(q.dtype), lse
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:4], dtype=torch.float32)
    for sl in _subgrids(dilation):
        out[sl], lse[sl] = _forward_d1(q[sl], k[sl], v[sl], kernel_size, scale, (th, tw))
    return out, lse


def na2d_tiled_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, kernel_size: int, *, dilation: int = 1,
                        scale: float, tile: tuple[int, int] = DEFAULT_TILE
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) [B, H, W, heads, D] in the inputs' dtypes; consumes any backend's (out, lse)."""
    th, tw = _check_tile(tile)
    if dilation == 1:
        dq, dk, dv = _backward_d1(grad_out, q, k, v, out, lse, kernel_size, scale, (th, tw))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    # a key's gradient comes only from queries of its own residue class: plain writes, no sums
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
    for sl in _subgrids(dilation):
        dq[sl], dk[sl], dv[sl] = _backward_d1(grad_out[sl], q[sl], k[sl], v[sl], out[sl], lse[sl],
                                              kernel_size, scale, (th, tw))
    return dq, dk, dv


def na_can_run(q, k, v, kernel_size, *, dilation, scale) -> "str | None":
    if q.device.type != "cpu":
        return f"tiled is the CPU backend; {q.device.type} tensors use a GPU backend (triton/cuda)"
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported (float32/float64/bfloat16/float16)"
    return None


# the registered entry points read DEFAULT_TILE when called (benchmarks/bench_na_cpu.py --tile sets it)
def _fn(q, k, v, kernel_size, *, dilation, scale):
    return na2d_tiled_forward(q, k, v, kernel_size, dilation=dilation, scale=scale, tile=DEFAULT_TILE)


def _bwd(grad_out, q, k, v, out, lse, kernel_size, *, dilation, scale):
    return na2d_tiled_backward(grad_out, q, k, v, out, lse, kernel_size, dilation=dilation, scale=scale,
                               tile=DEFAULT_TILE)


register_backend("neighborhood_attention", "tiled", can_run=na_can_run, fn=_fn, bwd=_bwd,
                 priority=PRIORITY_TILED)

__all__ = ["na2d_tiled_forward", "na2d_tiled_backward", "na_can_run", "DEFAULT_TILE", "PRIORITY_TILED"]

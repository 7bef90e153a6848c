"""2-D neighborhood attention: the public function, its custom ops and their autograd.

Layout: q, k, v [B, H, W, heads, D] (channels-last, so q/k/v can be strided slices of one
packed qkv projection [B, H, W, 3, heads, D] without copies).

Two torch.library custom ops carry the computation through autograd and torch.compile:

    megamed::na2d_fwd(q, k, v, kernel_size, dilation, scale, backend) -> (out, lse)
    megamed::na2d_bwd(grad_out, q, k, v, out, lse, kernel_size, dilation, scale, backend) -> (dq, dk, dv)

`backend` names a registered neighborhood_attention backend (megamed.ops.backends): the
ops call its `fn` (forward) and `bwd` (backward). Because the forward hands the backward
only (out, lse), any backend's backward can consume any backend's forward.

lse layout: float32 [B, H, W, heads], the natural-log log-sum-exp of the SCALED logits
(scale * q.k) over each query's kernel_size**2 keys. It is a saved activation, not a
differentiable output.
"""
from __future__ import annotations

import torch

from megamed.ops import reference
from megamed.ops.backends import choose_backend, get_backend, register_backend

OP = "neighborhood_attention"


def check_na_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int) -> None:
    """ValueError naming the offending argument; shared by the public function and backends."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 5:
        raise ValueError(f"q must be [B, H, W, heads, D], got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be floating point, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} != q device {q.device}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    H, W = q.shape[1], q.shape[2]
    if kernel_size * dilation > min(H, W):
        raise ValueError(f"kernel_size * dilation = {kernel_size}*{dilation} must be <= min(H, W) = {min(H, W)} "
                         f"(q is {tuple(q.shape)})")


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("megamed::na2d_fwd", mutates_args=())
def na2d_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int,
             scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = get_backend(OP, backend).fn(q, k, v, kernel_size, dilation=dilation, scale=scale)
    return out.contiguous(), lse.contiguous()  # the layout the fake kernel promises


@na2d_fwd.register_fake
def _(q, k, v, kernel_size, dilation, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=torch.float32)


@torch.library.custom_op("megamed::na2d_bwd", mutates_args=())
def na2d_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, kernel_size: int, dilation: int, scale: float,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = get_backend(OP, backend).extra["bwd"](grad_out, q, k, v, out, lse, kernel_size,
                                                      dilation=dilation, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # as the fake kernel promises


@na2d_bwd.register_fake
def _(grad_out, q, k, v, out, lse, kernel_size, dilation, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kernel_size, dilation, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (kernel_size, dilation, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    kernel_size, dilation, scale, backend = ctx.args
    if grad_out is None:  # only lse was used downstream; it is not differentiable
        grad_out = torch.zeros_like(out)
    dq, dk, dv = na2d_bwd(grad_out, q, k, v, out, lse, kernel_size, dilation, scale, backend)
    return dq, dk, dv, None, None, None, None


na2d_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# reference backend
# ---------------------------------------------------------------------------------------------

def _reference_can_run(q, k, v, kernel_size, *, dilation, scale) -> "str | None":
    return None


register_backend(OP, "reference", can_run=_reference_can_run, fn=reference.na2d_forward,
                 bwd=reference.na2d_backward, priority=0)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def neighborhood_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, *,
                                    dilation: int = 1, scale: "float | None" = None,
                                    backend: "str | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like neighborhood_attention, also returning lse (float32 [B, H, W, heads], not differentiable)."""
    check_na_args(q, k, v, kernel_size, dilation)
    scale = reference.scale_or_default(scale, q.shape[-1])
    name = choose_backend(OP, q, k, v, kernel_size, dilation=dilation, scale=scale, backend=backend)
    return na2d_fwd(q, k, v, kernel_size, dilation, scale, name)


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, *,
                           dilation: int = 1, scale: "float | None" = None,
                           backend: "str | None" = None) -> torch.Tensor:
    """2-D neighborhood attention with NATTEN semantics. q, k, v [B, H, W, heads, D] -> [B, H, W, heads, D].

    Query (i, j) attends to exactly kernel_size**2 keys: rows s_i .. s_i + kernel_size - 1 with
    s_i = clamp(i - kernel_size // 2, 0, H - kernel_size), columns likewise (the window shifts
    inward at the borders; nothing is padded). With dilation d, rows and columns are split by
    residue mod d and the rule applies inside each sub-grid.

    kernel_size: odd, and kernel_size * dilation <= min(H, W).
    scale: multiplies q.k; defaults to D ** -0.5.
    backend: force a backend by name (see megamed.ops.backends); default chooses automatically.
    Inputs may be strided views (e.g. slices of a packed qkv tensor); fp16/bf16 accumulate in fp32.
    """
    return neighborhood_attention_with_lse(q, k, v, kernel_size, dilation=dilation, scale=scale,
                                           backend=backend)[0]

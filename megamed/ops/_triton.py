"""Backend `triton` for neighborhood_attention, patch_merge and patch_split (kernels in megamed.kernels.triton).

Neighborhood attention needs no autograd here: megamed.ops.natten's custom ops call this backend's
forward (-> out, lse) and backward (-> dq, dk, dv) entry points. The patch ops are called directly
by the public functions, so they are wrapped in their own custom ops with autograd, whose backward
reuses the forward kernels with the weight transposed (a strided view, no copy), as _cpp.py does:

    merge:  out = blocks(x) @ W^T    d x = split(grad, W^T)     d W = grad^T @ blocks(x)
    split:  y   = unblocks(x @ W^T)  d x = merge(d y, W^T)      d W = blocks(d y)^T @ x

Where it runs:
  * CUDA tensors (fp32, fp16, bf16), priority 15: above cpp (10) and reference (0), below a
    hand-written CUDA kernel (20).
  * CPU tensors only under TRITON_INTERPRET=1, and only when forced (backend="triton" or
    MEGAMED_BACKEND): the interpreter is a testing tool, thousands of times slower than the
    reference, and CI sets TRITON_INTERPRET=1 for every test, so automatic choice never picks it
    (the registry's `auto_refuse` hook). (bf16 is refused on
    CPU: the interpreter's bf16 tl.dot returns garbage.)
The backends are registered even when triton is missing, so forcing `triton` says why it cannot run.
"""
from __future__ import annotations

from typing import Optional

import torch

from megamed import flags
from megamed.ops.backends import register_backend

PRIORITY_TRITON = 15
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)
MAX_HEAD_DIM = 128

try:  # the kernels import triton at module level
    from megamed.kernels.triton import na2d as _na2d
    from megamed.kernels.triton import patch as _patch
    _IMPORT_ERROR: "str | None" = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _na2d = _patch = None
    _IMPORT_ERROR = f"triton is not importable ({e}); install it with `pip install megamed[triton]`"


def _device_reason(op: str, t: torch.Tensor) -> "str | None":
    """Why the tensor's device/dtype rules out the triton backend for `op`, or None."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if t.device.type == "cuda":
        if t.dtype not in GPU_DTYPES:
            return f"dtype {t.dtype} is not supported (float32, float16, bfloat16)"
        return None
    if t.device.type != "cpu":
        return f"tensors on {t.device} are not supported (CUDA, or CPU under the Triton interpreter)"
    if not flags.triton_interpret():
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    if t.dtype not in INTERPRETER_DTYPES:
        return f"dtype {t.dtype} is not supported by the Triton interpreter (float32, float16)"
    return None


def _auto_refuse(*args, **kwargs) -> "str | None":
    """Automatic choice skips the interpreter: CPU tensors run triton only when forced."""
    t = args[0]
    return "the Triton interpreter on CPU is for tests only (force it)" if t.device.type == "cpu" else None


# ---------------------------------------------------------------------------------------------
# neighborhood attention
# ---------------------------------------------------------------------------------------------

def na_can_run(q, k, v, kernel_size, *, dilation, scale) -> "str | None":
    reason = _device_reason("neighborhood_attention", q)
    if reason is not None:
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported"
    return None


def na_forward(q, k, v, kernel_size, *, dilation, scale):
    return _na2d.na2d_forward(q, k, v, kernel_size, dilation=dilation, scale=scale)


def na_backward(grad_out, q, k, v, out, lse, kernel_size, *, dilation, scale):
    return _na2d.na2d_backward(grad_out, q, k, v, out, lse, kernel_size, dilation=dilation, scale=scale)


register_backend("neighborhood_attention", "triton", can_run=na_can_run, fn=na_forward, bwd=na_backward,
                 priority=PRIORITY_TRITON, auto_refuse=_auto_refuse)


# ---------------------------------------------------------------------------------------------
# patch merge / split: custom ops (so autograd and torch.compile see through them)
# ---------------------------------------------------------------------------------------------

def _blocks(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*(H/f)*(W/f), f*f*C], each f x f block flattened in (i, j, c) order."""
    B, H, W, C = x.shape
    f = factor
    return x.reshape(B, H // f, f, W // f, f, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, f * f * C)


@torch.library.custom_op("megamed::triton_patch_merge", mutates_args=())
def triton_patch_merge(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       factor: int) -> torch.Tensor:
    return _patch.patch_merge(x, weight, bias, factor=factor)


@triton_patch_merge.register_fake
def _(x, weight, bias, factor):
    B, H, W, _ = x.shape
    return x.new_empty((B, H // factor, W // factor, weight.shape[0]))


@torch.library.custom_op("megamed::triton_patch_split", mutates_args=())
def triton_patch_split(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], factor: int,
                       skip: Optional[torch.Tensor], lerp: Optional[torch.Tensor]) -> torch.Tensor:
    return _patch.patch_split(x, weight, bias, factor=factor, skip=skip, lerp=lerp)


@triton_patch_split.register_fake
def _(x, weight, bias, factor, skip, lerp):
    B, h, w, _ = x.shape
    return x.new_empty((B, h * factor, w * factor, weight.shape[0] // (factor * factor)))


def _merge_setup(ctx, inputs, output):
    x, weight, bias, factor = inputs
    ctx.factor = factor
    ctx.save_for_backward(x, weight)


def _merge_backward(ctx, grad):
    # grad [B, h, w, Cout]
    x, weight = ctx.saved_tensors
    f = ctx.factor
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:  # [B, H, W, C]: grad @ W scattered back into blocks = split with W^T [f*f*C, Cout]
        grad_x = triton_patch_split(grad, weight.t(), None, f, None, None)
    if need_w:  # [Cout, f*f*C]
        grad_w = grad.reshape(-1, weight.shape[0]).t() @ _blocks(x, f)
    if need_b:
        grad_b = grad.sum((0, 1, 2))
    return grad_x, grad_w, grad_b, None


def _split_setup(ctx, inputs, output):
    x, weight, bias, factor, skip, lerp = inputs
    ctx.factor = factor
    ctx.save_for_backward(x, weight, bias, skip, lerp)


def _split_backward(ctx, grad):
    # grad [B, h*f, w*f, Cout]
    x, weight, bias, skip, lerp = ctx.saved_tensors
    f = ctx.factor
    need_x, need_w, need_b, _, need_skip, need_lerp = ctx.needs_input_grad
    grad_skip = grad_lerp = None
    grad_y = grad
    if skip is not None:
        # out = skip + lerp * (y - skip):  d y = lerp * grad,  d skip = (1 - lerp) * grad
        grad_y = (grad * lerp).to(grad.dtype)
        if need_skip:
            grad_skip = grad - grad_y
        if need_lerp:  # recompute y rather than save a full-resolution activation
            y = triton_patch_split(x, weight, bias, f, None, None)
            d = grad * (y - skip)
            grad_lerp = (d.sum() if lerp.dim() == 0 else d.sum((0, 1, 2))).to(lerp.dtype)
    grad_x = grad_w = grad_b = None
    if need_x:  # [B, h, w, Cin]: blocks(d y) @ W = merge with W^T [Cin, f*f*Cout]
        grad_x = triton_patch_merge(grad_y, weight.t(), None, f)
    if need_w or need_b:
        gb = _blocks(grad_y, f)  # [M, f*f*Cout]
        if need_w:
            grad_w = gb.t() @ x.reshape(-1, x.shape[-1])
        if need_b:
            grad_b = gb.sum(0)
    return grad_x, grad_w, grad_b, None, grad_skip, grad_lerp


triton_patch_merge.register_autograd(_merge_backward, setup_context=_merge_setup)
triton_patch_split.register_autograd(_split_backward, setup_context=_split_setup)


def merge_can_run(x, weight, bias, *, factor) -> "str | None":
    return _device_reason("patch_merge", x)


def split_can_run(x, weight, bias, *, factor, skip=None, lerp=None) -> "str | None":
    return _device_reason("patch_split", x)


def patch_merge(x, weight, bias=None, *, factor=2):
    return triton_patch_merge(x, weight, bias, factor)


def patch_split(x, weight, bias=None, *, factor=2, skip=None, lerp=None):
    return triton_patch_split(x, weight, bias, factor, skip, lerp)


register_backend("patch_merge", "triton", can_run=merge_can_run, fn=patch_merge, priority=PRIORITY_TRITON,
                 auto_refuse=_auto_refuse)
register_backend("patch_split", "triton", can_run=split_can_run, fn=patch_split, priority=PRIORITY_TRITON,
                 auto_refuse=_auto_refuse)

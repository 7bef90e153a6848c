"""Backend `triton` for neighborhood_attention, patch_merge and patch_split (kernels in megamed.kernels.triton).

Neighborhood attention needs no autograd here: megamed.ops.natten's custom ops call this backend's
forward (-> out, lse) and backward (-> dq, dk, dv) entry points. The patch ops are called directly
by the public functions, so they are wrapped in their own custom ops with the fakes and autograd
of megamed.ops.patch_autograd (the backward reuses the forward kernels with the weight transposed).

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
from megamed.ops import patch_autograd

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

@torch.library.custom_op("megamed::triton_patch_merge", mutates_args=())
def triton_patch_merge(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       factor: int) -> torch.Tensor:
    return _patch.patch_merge(x, weight, bias, factor=factor)


@torch.library.custom_op("megamed::triton_patch_split", mutates_args=())
def triton_patch_split(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], factor: int,
                       skip: Optional[torch.Tensor], lerp: Optional[torch.Tensor]) -> torch.Tensor:
    return _patch.patch_split(x, weight, bias, factor=factor, skip=skip, lerp=lerp)


triton_patch_merge.register_fake(patch_autograd.merge_fake)
triton_patch_split.register_fake(patch_autograd.split_fake)
patch_autograd.register_patch_autograd("megamed::triton_patch_merge", "megamed::triton_patch_split",
                                       triton_patch_merge, triton_patch_split)


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

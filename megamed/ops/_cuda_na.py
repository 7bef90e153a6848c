"""Backend `cuda` for neighborhood_attention: the hand-written CUDA forward of megamed._C.

The kernel (kernels/cuda/na2d.cu, design notes in kernels/cuda/na2d_block.cuh) is exposed by the
CUDA glue (csrc/cuda/na2d_cuda.cpp) as

    megamed::na2d_cuda_fwd(Tensor q, Tensor k, Tensor v, int kernel_size, int dilation, float scale)
        -> (Tensor out, Tensor lse)

with lse in the layout megamed.ops.natten documents (float32 [B, H, W, heads], natural log of the
scaled logits). That op exists only in a CUDA build of the extension; this module registers its
fake kernel when it does (the glue's set_python_module names this module).

Backward: there is no CUDA backward kernel. `bwd` runs the Triton backward when the triton backend
can run these tensors (it consumes this forward's out and lse), else the reference backward
(plain PyTorch, chunked, slow but exact): the choice is per call, from the tensors.

The backend is registered even when the extension or its CUDA kernels are missing, so forcing
`cuda` says why it cannot run instead of "unknown backend". Priority 20: above triton (15).
"""
from __future__ import annotations

import torch

from megamed import _ext
from megamed.ops import reference
from megamed.ops.backends import get_backend, register_backend

OP = "neighborhood_attention"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 128)  # the kernel's instantiations
# Below triton (15) until a GPU run shows otherwise: this SIMT/WMMA forward has never been timed, and
# its author expects Triton's tl.dot tiles to be faster (kernels/cuda/na2d_block.cuh lists what to tune).
# backend="cuda" or MEGAMED_BACKEND=neighborhood_attention=cuda selects it explicitly.
PRIORITY_CUDA = 12


# Decided once: the op comes with megamed._C, which megamed._ext loads (or not) at import. A constant
# also keeps can_run free of try/except for torch.compile, which traces it.
HAS_OP = _ext.has_op("na2d_cuda_fwd")


def na_can_run(q, k, v, kernel_size, *, dilation, scale) -> "str | None":
    """None if the CUDA forward kernel can run these (already validated) arguments, else why not."""
    status = _ext.extension_status()
    if _ext.extension() is None:
        return f"megamed._C is not loaded ({status['reason']})"
    if not status.get("cuda", False):
        return f"megamed._C was built without CUDA (against torch {status.get('torch_version')})"
    if not HAS_OP:
        return "megamed._C has no na2d_cuda_fwd kernel (built before it existed: pip install --no-build-isolation -e .)"
    if q.device.type != "cuda":
        return f"q is on {q.device}; the cuda backend runs on CUDA tensors"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float32, float16, bfloat16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not supported (the kernel is built for {HEAD_DIMS})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return f"{name} must be contiguous along D (stride 1), got strides {t.stride()}"
    return None


def na_forward(q, k, v, kernel_size, *, dilation, scale):
    return torch.ops.megamed.na2d_cuda_fwd(q, k, v, kernel_size, dilation, float(scale))


def na_backward(grad_out, q, k, v, out, lse, kernel_size, *, dilation, scale):
    """The Triton backward where it can run these tensors, else the reference backward."""
    try:
        triton = get_backend(OP, "triton")
    except ValueError:  # megamed.ops._triton not imported / not registered
        triton = None
    if triton is not None and triton.can_run(q, k, v, kernel_size, dilation=dilation, scale=scale) is None:
        return triton.extra["bwd"](grad_out, q, k, v, out, lse, kernel_size, dilation=dilation, scale=scale)
    return reference.na2d_backward(grad_out, q, k, v, out, lse, kernel_size, dilation, scale)


def _na2d_cuda_fwd_fake(q, k, v, kernel_size, dilation, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=torch.float32)  # contiguous, like the kernel's


if HAS_OP:
    torch.library.register_fake("megamed::na2d_cuda_fwd", _na2d_cuda_fwd_fake)


register_backend(OP, "cuda", can_run=na_can_run, fn=na_forward, bwd=na_backward, priority=PRIORITY_CUDA)

"""Backends served by the compiled megamed._C: `cpp` and `cuda` for patch_merge / patch_split,
`cpp` for neighborhood_attention (CPU).

C++ (csrc/) defines the schemas

    megamed::patch_merge(Tensor x, Tensor weight, Tensor? bias, int factor) -> Tensor
    megamed::patch_split(Tensor x, Tensor weight, Tensor? bias, int factor, Tensor? skip, Tensor? lerp) -> Tensor
    megamed::na2d_cpp_fwd(Tensor q, Tensor k, Tensor v, int kernel_size, int dilation, float scale) -> (Tensor, Tensor)
    megamed::na2d_cpp_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                          int kernel_size, int dilation, float scale) -> (Tensor, Tensor, Tensor)

and their CPU (and, with CUDA torch, CUDA for the patch ops) kernels. This module adds what torch
wants from Python (fake kernels and autograd; the patch ones shared with the Triton ops:
megamed.ops.patch_autograd) and the backends.

The `cpp` neighborhood-attention backend (csrc/na2d_cpu.cpp) reads the strided inputs directly,
puts one query per SIMD lane and splits work with at::parallel_for. It ranks above `tiled` (the
halo-tiled matmuls in plain PyTorch): 2.2-3.5x faster forward and forward+backward at k=7 on the
`small` model's shapes (B=8, 16^2/32^2 tokens, D=32) and at B=2, 32^2/64^2 tokens, D=32/64
(benchmarks/bench_na_cpu.py, one thread).

The backends are registered even when the extension is missing, so that forcing `cpp` says why
it cannot run (the reason megamed._ext recorded) instead of "unknown backend".
"""
from __future__ import annotations

import torch

from megamed import _ext
from megamed.ops.backends import register_backend
from megamed.ops import patch_autograd

CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the CUDA kernels have no fp64 path
PRIORITY_CPP = 10   # above reference (0)
PRIORITY_CUDA = 20  # a fused CUDA kernel beats everything that can run on the same tensors
# neighborhood attention on CPU: above `tiled` (5), which it beats on every measured shape
# (benchmarks/bench_na_cpu.py); `triton` (15) is refused on CPU tensors in automatic choice
PRIORITY_NA_CPP = 10
NA_OP = "neighborhood_attention"


# --- backends -----------------------------------------------------------------------------------

def _not_loaded() -> "str | None":
    if _ext.extension() is None:
        return f"megamed._C is not loaded ({_ext.extension_status()['reason']})"
    return None


def cpp_can_run(x, weight, bias, *, factor, skip=None, lerp=None) -> "str | None":
    """None if the C++ CPU kernels can run these arguments, else why not."""
    reason = _not_loaded()
    if reason is not None:
        return reason
    if x.device.type != "cpu":
        return f"x is on {x.device}; the cpp backend runs on CPU tensors"
    if x.dtype not in CPU_DTYPES:
        return f"x dtype {x.dtype} is not supported (float32, float64, float16, bfloat16)"
    return None


def cuda_can_run(x, weight, bias, *, factor, skip=None, lerp=None) -> "str | None":
    """None if the CUDA kernels of megamed._C can run these arguments, else why not."""
    reason = _not_loaded()
    if reason is not None:
        return reason
    if not _ext.extension_status().get("cuda", False):
        return f"megamed._C was built without CUDA (against torch {_ext.extension_status().get('torch_version')})"
    if x.device.type != "cuda":
        return f"x is on {x.device}; the cuda backend runs on CUDA tensors"
    if x.dtype not in CUDA_DTYPES:
        return f"x dtype {x.dtype} is not supported on CUDA (float32, float16, bfloat16)"
    return None


def patch_merge(x, weight, bias=None, *, factor=2):
    return torch.ops.megamed.patch_merge(x, weight, bias, factor)


def patch_split(x, weight, bias=None, *, factor=2, skip=None, lerp=None):
    return torch.ops.megamed.patch_split(x, weight, bias, factor, skip, lerp)


if _ext.extension() is not None:
    # (fakes registered here: csrc/module.cpp names this module as their home)
    torch.library.register_fake("megamed::patch_merge", patch_autograd.merge_fake)
    torch.library.register_fake("megamed::patch_split", patch_autograd.split_fake)
    patch_autograd.register_patch_autograd("megamed::patch_merge", "megamed::patch_split",
                                           torch.ops.megamed.patch_merge, torch.ops.megamed.patch_split)

# The dispatcher picks the CPU or CUDA kernel from the tensors, so both backends share fn.
for _name, _can_run, _prio in (("cpp", cpp_can_run, PRIORITY_CPP), ("cuda", cuda_can_run, PRIORITY_CUDA)):
    register_backend("patch_merge", _name, can_run=_can_run, fn=patch_merge, priority=_prio)
    register_backend("patch_split", _name, can_run=_can_run, fn=patch_split, priority=_prio)


# --- neighborhood attention (CPU) ----------------------------------------------------------------

# Decided once at import (the ops come with megamed._C): keeps can_run cheap and free of try/except.
HAS_NA_OP = _ext.has_op("na2d_cpp_fwd")


def na_cpp_can_run(q, k, v, kernel_size, *, dilation, scale) -> "str | None":
    """None if the C++ CPU neighborhood-attention kernels can run these arguments, else why not."""
    reason = _not_loaded()
    if reason is not None:
        return reason
    if not HAS_NA_OP:
        return ("megamed._C has no na2d_cpp_fwd (built from older sources); rebuild: "
                "pip install --no-build-isolation -e .")
    if q.device.type != "cpu":
        return f"q is on {q.device}; the cpp neighborhood-attention backend runs on CPU tensors"
    if q.dtype not in CPU_DTYPES:
        return f"q dtype {q.dtype} is not supported (float32, float64, float16, bfloat16)"
    return None


def na_cpp_forward(q, k, v, kernel_size, *, dilation, scale):
    """-> (out [B, H, W, heads, D] in q.dtype, lse float32 [B, H, W, heads])."""
    return torch.ops.megamed.na2d_cpp_fwd(q, k, v, kernel_size, dilation, scale)


def na_cpp_backward(grad_out, q, k, v, out, lse, kernel_size, *, dilation, scale):
    """-> (dq, dk, dv) in the inputs' dtype; consumes any backend's (out, lse)."""
    return torch.ops.megamed.na2d_cpp_bwd(grad_out, q, k, v, out, lse, kernel_size, dilation, scale)


def _na_fwd_fake(q, k, v, kernel_size, dilation, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=torch.float32)


def _na_bwd_fake(grad_out, q, k, v, out, lse, kernel_size, dilation, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _na_setup_context(ctx, inputs, output):
    q, k, v, kernel_size, dilation, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (kernel_size, dilation, scale)
    ctx.mark_non_differentiable(lse)


def _na_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:  # only lse was used downstream; it is not differentiable
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.megamed.na2d_cpp_bwd(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


if HAS_NA_OP:
    # the public path is megamed::na2d_fwd (megamed.ops.natten), whose autograd calls our bwd
    # through the backend registry; this autograd makes torch.ops.megamed.na2d_cpp_fwd usable alone
    torch.library.register_fake("megamed::na2d_cpp_fwd", _na_fwd_fake)
    torch.library.register_fake("megamed::na2d_cpp_bwd", _na_bwd_fake)
    torch.library.register_autograd("megamed::na2d_cpp_fwd", _na_backward, setup_context=_na_setup_context)

register_backend(NA_OP, "cpp", can_run=na_cpp_can_run, fn=na_cpp_forward, bwd=na_cpp_backward,
                 priority=PRIORITY_NA_CPP)

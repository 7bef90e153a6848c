"""Backends `cpp` and `cuda` for patch_merge / patch_split, served by the compiled megamed._C.

C++ (csrc/) defines the schemas

    megamed::patch_merge(Tensor x, Tensor weight, Tensor? bias, int factor) -> Tensor
    megamed::patch_split(Tensor x, Tensor weight, Tensor? bias, int factor, Tensor? skip, Tensor? lerp) -> Tensor

and their CPU (and, with CUDA torch, CUDA) kernels. This module adds what torch wants from Python:
fake kernels (shapes only, for torch.compile / export) and autograd formulas. The backward passes
reuse the forward ops, because each op's input gradient is the other op with the weight transposed:

    merge:  out = blocks(x) @ W^T         d x = split(grad, W^T)    d W = grad^T @ blocks(x)
    split:  y   = unblocks(x @ W^T)       d x = merge(grad, W^T)    d W = blocks(grad)^T @ x

where blocks() is the (row-in-block, column-in-block, channel) flattening both ops share.

The backends are registered even when the extension is missing, so that forcing `cpp` says why
it cannot run (the reason megamed._ext recorded) instead of "unknown backend".
"""
from __future__ import annotations

import torch

from megamed import _ext
from megamed.ops.backends import register_backend

CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the CUDA kernels have no fp64 path
PRIORITY_CPP = 10   # above reference (0)
PRIORITY_CUDA = 20  # a fused CUDA kernel beats everything that can run on the same tensors


def _blocks(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*(H/f)*(W/f), f*f*C], each f x f block flattened in (i, j, c) order."""
    B, H, W, C = x.shape
    f = factor
    x = x.reshape(B, H // f, f, W // f, f, C).permute(0, 1, 3, 2, 4, 5)  # [B, h, w, f, f, C]
    return x.reshape(-1, f * f * C)


# --- fake kernels: output shape/dtype only (output is always contiguous channels-last) ---------

def _patch_merge_fake(x, weight, bias, factor):
    B, H, W, _ = x.shape
    return x.new_empty((B, H // factor, W // factor, weight.shape[0]))


def _patch_split_fake(x, weight, bias, factor, skip, lerp):
    B, h, w, _ = x.shape
    return x.new_empty((B, h * factor, w * factor, weight.shape[0] // (factor * factor)))


# --- autograd -----------------------------------------------------------------------------------

def _patch_merge_setup(ctx, inputs, output):
    x, weight, bias, factor = inputs
    ctx.factor = factor
    ctx.save_for_backward(x, weight)


def _patch_merge_backward(ctx, grad):
    # grad [B, h, w, Cout]
    x, weight = ctx.saved_tensors
    f = ctx.factor
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:  # [B, H, W, C]: block gradient grad @ W, scattered back = split with W^T [f*f*C, Cout]
        grad_x = torch.ops.megamed.patch_split(grad, weight.t(), None, f, None, None)
    if need_w:  # [Cout, f*f*C]
        grad_w = grad.reshape(-1, weight.shape[0]).t() @ _blocks(x, f)
    if need_b:
        grad_b = grad.sum((0, 1, 2))
    return grad_x, grad_w, grad_b, None


def _patch_split_setup(ctx, inputs, output):
    x, weight, bias, factor, skip, lerp = inputs
    ctx.factor = factor
    ctx.save_for_backward(x, weight, bias, skip, lerp)


def _patch_split_backward(ctx, grad):
    # grad [B, h*f, w*f, Cout]
    x, weight, bias, skip, lerp = ctx.saved_tensors
    f = ctx.factor
    need_x, need_w, need_b, _, need_skip, need_lerp = ctx.needs_input_grad
    grad_skip = grad_lerp = None
    grad_y = grad  # gradient w.r.t. the un-blended y
    if skip is not None:
        # out = skip + lerp * (y - skip):  d y = lerp * grad,  d skip = (1 - lerp) * grad
        grad_y = (grad * lerp).to(grad.dtype)
        if need_skip:
            grad_skip = grad - grad_y
        if need_lerp:
            # d lerp = sum grad * (y - skip). y is recomputed rather than saved: lerp is usually a
            # frozen or slowly-trained gate, and saving y would hold a full-resolution activation.
            y = torch.ops.megamed.patch_split(x, weight, bias, f, None, None)
            d = grad * (y - skip)
            grad_lerp = (d.sum() if lerp.dim() == 0 else d.sum((0, 1, 2))).to(lerp.dtype)
    grad_x = grad_w = grad_b = None
    if need_x:  # [B, h, w, Cin]: blocks(grad_y) @ W = merge with W^T [Cin, f*f*Cout]
        grad_x = torch.ops.megamed.patch_merge(grad_y, weight.t(), None, f)
    if need_w or need_b:
        gb = _blocks(grad_y, f)  # [M, f*f*Cout]
        if need_w:
            grad_w = gb.t() @ x.reshape(-1, x.shape[-1])
        if need_b:
            grad_b = gb.sum(0)
    return grad_x, grad_w, grad_b, None, grad_skip, grad_lerp


def _register_torch_library() -> None:
    torch.library.register_fake("megamed::patch_merge", _patch_merge_fake)
    torch.library.register_fake("megamed::patch_split", _patch_split_fake)
    torch.library.register_autograd("megamed::patch_merge", _patch_merge_backward, setup_context=_patch_merge_setup)
    torch.library.register_autograd("megamed::patch_split", _patch_split_backward, setup_context=_patch_split_setup)


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
    _register_torch_library()

# The dispatcher picks the CPU or CUDA kernel from the tensors, so both backends share fn.
for _name, _can_run, _prio in (("cpp", cpp_can_run, PRIORITY_CPP), ("cuda", cuda_can_run, PRIORITY_CUDA)):
    register_backend("patch_merge", _name, can_run=_can_run, fn=patch_merge, priority=_prio)
    register_backend("patch_split", _name, can_run=_can_run, fn=patch_split, priority=_prio)

"""Fake kernels and autograd for a pair of compiled patch_merge / patch_split ops.

Every fused backend (the C++/CUDA ops of megamed._C, the Triton custom ops) registers the same
formulas, because each op's input gradient is the other op with the weight transposed (a
strided view, no copy):

    merge:  out = blocks(x) @ W^T         d x = split(grad, W^T)    d W = grad^T @ blocks(x)
    split:  y   = unblocks(x @ W^T)       d x = merge(grad, W^T)    d W = blocks(grad)^T @ x

where blocks() is the (row-in-block, column-in-block, channel) flattening both ops share.
"""
from __future__ import annotations

from typing import Callable

import torch


def blocks(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*(H/f)*(W/f), f*f*C], each f x f block flattened in (i, j, c) order."""
    B, H, W, C = x.shape
    f = factor
    return x.reshape(B, H // f, f, W // f, f, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, f * f * C)


def merge_fake(x, weight, bias, factor):
    B, H, W, _ = x.shape
    return x.new_empty((B, H // factor, W // factor, weight.shape[0]))


def split_fake(x, weight, bias, factor, skip, lerp):
    B, h, w, _ = x.shape
    return x.new_empty((B, h * factor, w * factor, weight.shape[0] // (factor * factor)))


def register_patch_autograd(merge_name: str, split_name: str, merge: Callable, split: Callable) -> None:
    """Register autograd for ops `merge_name` / `split_name` ("megamed::..."), whose callables are
    merge(x, weight, bias, factor) and split(x, weight, bias, factor, skip, lerp).

    Fakes (merge_fake / split_fake above) are registered by the caller itself: torch checks that a
    C++ op's fake is registered from the Python module its schema names (m.set_python_module)."""

    def merge_setup(ctx, inputs, output):
        x, weight, bias, factor = inputs
        ctx.factor = factor
        ctx.save_for_backward(x, weight)

    def merge_backward(ctx, grad):  # grad [B, h, w, Cout]
        x, weight = ctx.saved_tensors
        f = ctx.factor
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:  # [B, H, W, C]: grad @ W scattered back into blocks = split with W^T [f*f*C, Cout]
            grad_x = split(grad, weight.t(), None, f, None, None)
        if need_w:  # [Cout, f*f*C]
            grad_w = grad.reshape(-1, weight.shape[0]).t() @ blocks(x, f)
        if need_b:
            grad_b = grad.sum((0, 1, 2))
        return grad_x, grad_w, grad_b, None

    def split_setup(ctx, inputs, output):
        x, weight, bias, factor, skip, lerp = inputs
        ctx.factor = factor
        ctx.save_for_backward(x, weight, bias, skip, lerp)

    def split_backward(ctx, grad):  # grad [B, h*f, w*f, Cout]
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
                # d lerp = sum grad * (y - skip). y is recomputed rather than saved: saving it would
                # hold a full-resolution activation for a gate that is usually frozen or slow.
                y = split(x, weight, bias, f, None, None)
                d = grad * (y - skip)
                grad_lerp = (d.sum() if lerp.dim() == 0 else d.sum((0, 1, 2))).to(lerp.dtype)
        grad_x = grad_w = grad_b = None
        if need_x:  # [B, h, w, Cin]: blocks(grad_y) @ W = merge with W^T [Cin, f*f*Cout]
            grad_x = merge(grad_y, weight.t(), None, f)
        if need_w or need_b:
            gb = blocks(grad_y, f)  # [M, f*f*Cout]
            if need_w:
                grad_w = gb.t() @ x.reshape(-1, x.shape[-1])
            if need_b:
                grad_b = gb.sum(0)
        return grad_x, grad_w, grad_b, None, grad_skip, grad_lerp

    torch.library.register_autograd(merge_name, merge_backward, setup_context=merge_setup)
    torch.library.register_autograd(split_name, split_backward, setup_context=split_setup)

"""Patch merge (f x f pixel-unshuffle + linear) and patch split (linear + pixel-shuffle,
optionally lerped into a skip connection), channels-last [B, H, W, C].

These move a multi-scale transformer between resolution levels. The flattening order of an
f x f block is (row-in-block, column-in-block, channel) in both directions, so a split
with weight W_s undoes a merge with W_m when W_s @ W_m = I.
"""
from __future__ import annotations

import torch

from megamed.ops import reference
from megamed.ops.backends import choose_backend, get_backend, register_backend


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, H, W, C] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")


def _check_weight_bias(x: torch.Tensor, weight, bias, in_features: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.shape[1] != in_features:
        raise ValueError(f"weight shape {tuple(weight.shape)}: expected {in_features} input features")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match x ({x.dtype}, {x.device})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias ({bias.dtype}, {bias.device}) must match x ({x.dtype}, {x.device})")


def check_patch_merge_args(x, weight, bias, factor: int) -> None:
    """ValueError naming the offending argument (weight is [C_out, f*f*C])."""
    _check_factor(factor)
    _check_x(x)
    B, H, W, C = x.shape
    if H % factor:
        raise ValueError(f"H = {H} (x.shape[1]) is not divisible by factor = {factor}")
    if W % factor:
        raise ValueError(f"W = {W} (x.shape[2]) is not divisible by factor = {factor}")
    _check_weight_bias(x, weight, bias, factor * factor * C)


def check_patch_split_args(x, weight, bias, factor: int, skip, lerp) -> None:
    """ValueError naming the offending argument (weight is [f*f*C_out, C_in])."""
    _check_factor(factor)
    _check_x(x)
    _check_weight_bias(x, weight, bias, x.shape[-1])
    if weight.shape[0] % (factor * factor):
        raise ValueError(f"weight.shape[0] = {weight.shape[0]} must be factor**2 * C_out = {factor * factor} * C_out")
    if (skip is None) != (lerp is None):
        raise ValueError("skip and lerp go together: pass both (skip + lerp * (y - skip)) or neither")
    if skip is None:
        return
    B, H, W, _ = x.shape
    c_out = weight.shape[0] // (factor * factor)
    if not isinstance(skip, torch.Tensor) or skip.shape != (B, H * factor, W * factor, c_out):
        raise ValueError(f"skip must be [B, H*f, W*f, C_out] = {[B, H * factor, W * factor, c_out]}, "
                         f"got {getattr(skip, 'shape', type(skip).__name__)}")
    if not isinstance(lerp, torch.Tensor) or lerp.shape not in ((), (c_out,)):
        raise ValueError(f"lerp must be a 0-d tensor or per-channel [{c_out}], "
                         f"got {getattr(lerp, 'shape', type(lerp).__name__)}")
    for name, t in (("skip", skip), ("lerp", lerp)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} ({t.dtype}, {t.device}) must match x ({x.dtype}, {x.device})")


register_backend("patch_merge", "reference", can_run=lambda x, weight, bias, *, factor: None,
                 fn=reference.patch_merge, priority=0)
register_backend("patch_split", "reference", can_run=lambda x, weight, bias, *, factor, skip, lerp: None,
                 fn=reference.patch_split, priority=0)


def patch_merge(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None, *, factor: int = 2,
                backend: "str | None" = None) -> torch.Tensor:
    """x [B, H, W, C] -> [B, H/f, W/f, C_out].

    Each f x f block is flattened in (row-in-block, column-in-block, channel) order into
    f*f*C features and multiplied by weight [C_out, f*f*C] (+ bias [C_out]).
    H and W must be divisible by factor (ValueError naming which is not).
    """
    check_patch_merge_args(x, weight, bias, factor)
    name = choose_backend("patch_merge", x, weight, bias, factor=factor, backend=backend)
    return get_backend("patch_merge", name).fn(x, weight, bias, factor=factor)


def patch_split(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None, *, factor: int = 2,
                skip: "torch.Tensor | None" = None, lerp: "torch.Tensor | None" = None,
                backend: "str | None" = None) -> torch.Tensor:
    """x [B, H, W, C_in] -> [B, H*f, W*f, C_out].

    y = x @ weight.T (+ bias) with weight [f*f*C_out, C_in]; each output vector is regrouped
    into an f x f block in (row-in-block, column-in-block, channel) order.
    With skip [B, H*f, W*f, C_out] and lerp (0-d or per-channel [C_out]) returns
    skip + lerp * (y - skip): a learned interpolation into the skip path (gradients reach
    lerp and skip). skip and lerp must be given together.
    """
    check_patch_split_args(x, weight, bias, factor, skip, lerp)
    name = choose_backend("patch_split", x, weight, bias, factor=factor, skip=skip, lerp=lerp, backend=backend)
    return get_backend("patch_split", name).fn(x, weight, bias, factor=factor, skip=skip, lerp=lerp)

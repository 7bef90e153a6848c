"""Global (self or cross) attention, layout [B, N, heads, D].

Backends: `reference` is torch's scaled_dot_product_attention (which itself picks flash /
memory-efficient / math kernels); `flash_attn` (the flash-attn package, imported lazily)
serves fp16/bf16 CUDA tensors without a padding mask when it is installed.
"""
from __future__ import annotations

import importlib.util

import torch

from megamed.ops import reference
from megamed.ops.backends import choose_backend, get_backend, register_backend

OP = "attention"


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_padding_mask: "torch.Tensor | None") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, N, heads, D], got shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be floating point, got {q.dtype}")
    B, _, heads, D = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)} in B, heads, D")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} != q device {q.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor [B, Nk] (True = real token)")
        if key_padding_mask.shape != (B, k.shape[1]):
            raise ValueError(f"key_padding_mask shape {tuple(key_padding_mask.shape)} != [B, Nk] = {[B, k.shape[1]]}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask device {key_padding_mask.device} != q device {q.device}")


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

register_backend(OP, "reference", can_run=lambda q, k, v, *, key_padding_mask, scale: None,
                 fn=reference.attention, priority=0)

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _flash_can_run(q, k, v, *, key_padding_mask, scale) -> "str | None":
    if not _HAS_FLASH_ATTN:
        return "flash-attn is not installed (pip install flash-attn)"
    if not q.is_cuda:
        return "needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16, got {q.dtype}"
    if key_padding_mask is not None:
        return "key_padding_mask is not supported (SDPA handles masks)"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"head dim must be a multiple of 8 and <= 256, got {q.shape[-1]}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "needs unit stride in the last (head) dimension"
    return None


def _flash_fn(q, k, v, *, key_padding_mask, scale):
    from flash_attn import flash_attn_func  # lazy: optional package, CUDA only

    return flash_attn_func(q, k, v, softmax_scale=scale)  # same [B, N, heads, D] layout


register_backend(OP, "flash_attn", can_run=_flash_can_run, fn=_flash_fn, priority=10)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: "torch.Tensor | None" = None,
              scale: "float | None" = None, backend: "str | None" = None) -> torch.Tensor:
    """Global attention. q [B, Nq, heads, D], k/v [B, Nk, heads, D] -> [B, Nq, heads, D].

    key_padding_mask: bool [B, Nk], True = real token, False = padding (ignored as a key).
    A batch row whose keys are ALL padding returns zeros for every query (not NaN), so padded
    empty prompts are harmless.
    scale: multiplies q.k; defaults to D ** -0.5.
    backend: force a backend by name ("reference" = SDPA, "flash_attn"); default chooses.
    """
    check_attention_args(q, k, v, key_padding_mask)
    scale = reference.scale_or_default(scale, q.shape[-1])
    name = choose_backend(OP, q, k, v, key_padding_mask=key_padding_mask, scale=scale, backend=backend)
    return get_backend(OP, name).fn(q, k, v, key_padding_mask=key_padding_mask, scale=scale)

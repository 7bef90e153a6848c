"""Backends `cpp` and `cuda` for patch_merge / patch_split, served by the compiled megamed._C.

C++ (csrc/) defines the schemas

    megamed::patch_merge(Tensor x, Tensor weight, Tensor? bias, int factor) -> Tensor
    megamed::patch_split(Tensor x, Tensor weight, Tensor? bias, int factor, Tensor? skip, Tensor? lerp) -> Tensor

and their CPU (and, with CUDA torch, CUDA) kernels. This module adds what torch wants from Python
(fake kernels and autograd, shared with the Triton ops: megamed.ops.patch_autograd) and the backends.

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

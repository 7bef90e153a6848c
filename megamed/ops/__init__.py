"""megamed.ops: the op contract between models and kernels.

Four public functions, each resolving a backend (megamed.ops.backends) and calling it:

    neighborhood_attention(q, k, v, kernel_size, *, dilation=1, scale=None, backend=None)  [B, H, W, heads, D]
    attention(q, k, v, *, key_padding_mask=None, scale=None, backend=None)                 [B, N, heads, D]
    patch_merge(x, weight, bias=None, *, factor=2, backend=None)                           [B, H, W, C]
    patch_split(x, weight, bias=None, *, factor=2, skip=None, lerp=None, backend=None)     [B, H, W, C]

`reference` (plain PyTorch, megamed.ops.reference) always serves; faster backends register
themselves from the optional modules listed in _BACKEND_MODULES when those import.
"""
from __future__ import annotations

import importlib
import logging

from megamed.ops.attention import attention
from megamed.ops.backends import (BackendUnavailable, available_backends, can_run, choose_backend,
                                  register_backend, unregister_backend)
from megamed.ops.natten import neighborhood_attention, neighborhood_attention_with_lse
from megamed.ops.patch import patch_merge, patch_split

log = logging.getLogger("megamed.ops")

# Modules that register extra backends on import (compiled extension, Triton, CUDA).
# A module that is not written yet is skipped; one that fails to import is logged, and
# the backends it would have registered are simply absent (forcing them says so).
_BACKEND_MODULES = ("megamed.ops._cpp", "megamed.ops._triton", "megamed.ops._tiled", "megamed.ops._cuda_na")

for _name in _BACKEND_MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as _e:
        if _e.name != _name:
            log.warning("megamed: backend module %s failed to import: %s", _name, _e)
    except Exception as _e:  # a broken optional backend must not break the reference path
        log.warning("megamed: backend module %s failed to import: %s: %s", _name, type(_e).__name__, _e)

__all__ = ["neighborhood_attention", "neighborhood_attention_with_lse", "attention", "patch_merge",
           "patch_split", "BackendUnavailable", "register_backend", "unregister_backend", "available_backends",
           "can_run", "choose_backend"]

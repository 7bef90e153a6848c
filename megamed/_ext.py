"""Load the compiled extension `megamed._C` if it is there and matches this torch.

If it is missing, disabled, or was built against another torch, importing megamed
still works: one log line says why, and the reference backends serve.
"""
from __future__ import annotations

import logging

from megamed import flags

log = logging.getLogger("megamed")

_STATUS: dict = {"loaded": False, "reason": "not attempted"}


def _load() -> None:
    if flags.extension_disabled():
        _STATUS.update(loaded=False, reason=f"disabled by {flags.NO_EXT_ENV}")
        return
    try:
        import importlib

        import torch  # noqa: F401  (the extension links against libtorch)
        _C = importlib.import_module("megamed._C")
    except ImportError as e:  # missing, or built for another torch (undefined symbols)
        _STATUS.update(loaded=False, reason=f"megamed._C not importable ({e}); reference backends serve")
        log.warning("megamed: compiled extension unavailable: %s", _STATUS["reason"])
        return
    built_for = getattr(_C, "torch_version", "unknown")
    import torch

    if built_for != "unknown" and built_for.split("+")[0] != torch.__version__.split("+")[0]:
        _STATUS.update(loaded=False, reason=f"megamed._C was built for torch {built_for}, running {torch.__version__}")
        log.warning("megamed: %s; reference backends serve. Rebuild: pip install --no-build-isolation -e .", _STATUS["reason"])
        return
    _STATUS.update(loaded=True, reason="ok", module=_C, torch_version=built_for,
                   cuda=bool(getattr(_C, "with_cuda", False)))


def extension_status() -> dict:
    """{'loaded': bool, 'reason': str, ...}: whether `megamed._C` serves the `cpp`/`cuda` backends."""
    return dict(_STATUS)


def extension():
    """The loaded `megamed._C` module, or None."""
    return _STATUS.get("module") if _STATUS["loaded"] else None


def has_op(name: str) -> bool:
    """Whether the loaded extension registered torch.ops.megamed.<name> (a CPU-only build lacks the
    CUDA ones)."""
    if extension() is None:
        return False
    import torch

    try:
        getattr(torch.ops.megamed, name)
    except (AttributeError, RuntimeError):
        return False
    return True


_load()

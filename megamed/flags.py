"""Every environment variable megamed reads, in one place.

Keeping them here means `grep flags.` finds every knob, and tests can patch one module.
"""
from __future__ import annotations

import os
from pathlib import Path

# Force one backend for every op ("reference", "cpp", "triton", "cuda", ...).
# A forced backend that cannot run is an error, never a silent fallback.
BACKEND_ENV = "MEGAMED_BACKEND"
# Where fetched wheels, extracted data, and generated (non-shippable) artefacts live.
CACHE_ENV = "MEGAMED_CACHE"
# Set to 1 to skip loading the compiled extension megamed._C (reference backends serve).
NO_EXT_ENV = "MEGAMED_NO_EXT"
# Test hook read by the C++ CPU neighborhood-attention ops (csrc/na2d_cpu.cpp): 1 fills their
# outputs with NaN before the kernels run, so an element they forget to write shows up.
NA_CPP_POISON_ENV = "MEGAMED_NA_CPP_POISON"


def forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    return value or None


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    path = Path(root) if root else Path.home() / ".cache" / "megamed"
    path.mkdir(parents=True, exist_ok=True)
    return path


def extension_disabled() -> bool:
    return os.environ.get(NO_EXT_ENV, "0") not in ("", "0", "false", "False")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

"""megamed: high-resolution text-to-image diffusion for medical images."""
from __future__ import annotations

__version__ = "0.1.0"

from megamed._ext import extension_status  # noqa: E402  (loads megamed._C once, logs once)

__all__ = ["__version__", "extension_status"]

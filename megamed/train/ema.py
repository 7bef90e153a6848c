"""Exponential moving average of the weights, with k-diffusion's power warmup.

A fixed decay of 0.9999 averages over ~10k steps, so early in training the EMA would be
dominated by the random initialisation. The warmup decay 1 - (1 + step)^-power grows from 0
towards 1 (power 3/4: 0.82 at step 10, 0.97 at step 100, 0.9994 at 10k) and is capped at
max_decay; it is a pure function of the step, so a resumed run needs only the step.
"""
from __future__ import annotations

import torch
from torch import nn


def ema_decay(step: int, *, power: float = 0.75, max_decay: float = 0.9999) -> float:
    """Decay to use for the update after optimizer step `step` (0-based count of updates done)."""
    if not 0.0 <= max_decay < 1.0:
        raise ValueError(f"max_decay must be in [0, 1), got {max_decay}")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    ema_params = dict(ema_model.named_parameters())
    for name, p in model.named_parameters():
        e = ema_params[name]
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)

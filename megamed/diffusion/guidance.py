"""Classifier-free guidance (Ho & Salimans 2022) with an optional guidance interval.

    D_cfg = D(x; sigma, uncond) + scale * (D(x; sigma, cond) - D(x; sigma, uncond))

The conditional and unconditional halves go through the network as one batch [cond; uncond]
(one forward instead of two). Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance
in a limited interval improves sample and distribution quality"): guidance only helps in the
middle of the noise range; at high sigma it pulls samples towards a few modes and at low sigma
it does nothing useful, so outside (lo, hi] the plain conditional prediction is returned (and
the unconditional half is not computed when no batch item is inside).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


def _pad_dim1(t: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 of [B, L, ...] with zeros (False for bool masks, i.e. 'not a token')."""
    if t.shape[1] == length:
        return t
    pad = [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]]  # F.pad lists the last dim first
    if t.dtype == torch.bool:
        return F.pad(t.to(torch.uint8), pad).bool()
    return F.pad(t, pad)


def cat_cond(cond: dict, uncond: dict, batch: int) -> dict:
    """Concatenate two conditioning dicts along the batch: out[k] = [cond[k]; uncond[k]].

    Tensor values must have batch dim `batch`, or 1 (one prompt for all images: broadcast);
    sequences of different lengths on dim 1 (text_ids [B, L], text_mask [B, L], text_context
    [B, L, D]) are right-padded with zeros/False to the longer one, so padded positions must be
    masked out by the model (pass text_mask). A dataclass of tensors (e.g. a TextContext with
    states/mask/pooled) is concatenated field by field. Other values must be equal in both.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got cond={sorted(cond)} uncond={sorted(uncond)}")
    out = {}
    for key, c in cond.items():
        u = uncond[key]
        if c is None and u is None:
            out[key] = None
            continue
        if dataclasses.is_dataclass(c) and not isinstance(c, type) and type(u) is type(c):
            fields = [f.name for f in dataclasses.fields(c)]
            parts = cat_cond({f: getattr(c, f) for f in fields}, {f: getattr(u, f) for f in fields}, batch)
            out[key] = type(c)(**parts)
            continue
        if not (torch.is_tensor(c) and torch.is_tensor(u)):
            if torch.is_tensor(c) or torch.is_tensor(u) or c != u:
                raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors or be equal")
            out[key] = c
            continue
        if c.ndim == 0 or c.shape[0] not in (1, batch):
            raise ValueError(f"cond[{key!r}] must have batch dim {batch} (or 1), got shape {tuple(c.shape)}")
        if u.ndim != c.ndim or u.shape[0] not in (1, batch):
            raise ValueError(f"uncond[{key!r}] shape {tuple(u.shape)} does not match cond shape {tuple(c.shape)}")
        c, u = c.expand(batch, *c.shape[1:]), u.expand(batch, *u.shape[1:])  # batch-1 values broadcast
        if c.ndim >= 2 and c.shape[1] != u.shape[1]:
            length = max(c.shape[1], u.shape[1])
            c, u = _pad_dim1(c, length), _pad_dim1(u, length)
        if c.shape[1:] != u.shape[1:]:
            raise ValueError(f"cond[{key!r}] {tuple(c.shape)} and uncond[{key!r}] {tuple(u.shape)} differ "
                             f"beyond the sequence dim")
        out[key] = torch.cat([c, u.to(c.dtype)])
    return out


class CFGDenoiser(nn.Module):
    """Wrap a denoiser: forward(x, sigma, **cond) -> guided x0 estimate.

    scale: guidance weight (1 = conditional only, 0 = unconditional only).
    uncond: the conditioning kwargs of the negative / empty prompt (same keys as cond).
    interval: (lo, hi); guidance is applied where lo < sigma <= hi, else the cond prediction.
    """

    def __init__(self, denoiser, scale: float, *, uncond: dict, interval: tuple[float, float] | None = None):
        super().__init__()
        if interval is not None:
            if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
                raise ValueError(f"interval must be (lo, hi) with 0 <= lo < hi, got {interval!r}")
            interval = (float(interval[0]), float(interval[1]))
        if not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of conditioning kwargs, got {type(uncond).__name__}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = uncond
        self.interval = interval

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(batch)  # [B]
        if self.interval is None:
            guided = torch.ones(batch, dtype=torch.bool, device=x.device)
        else:
            lo, hi = self.interval
            guided = (sigma > lo) & (sigma <= hi)
        if self.scale == 1.0 or not guided.any():
            return self.denoiser(x, sigma, **cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_cond(cond, self.uncond, batch))
        d_cond, d_uncond = both[:batch], both[batch:]
        out = d_uncond + self.scale * (d_cond - d_uncond)
        return torch.where(guided.reshape(-1, *[1] * (x.ndim - 1)), out, d_cond)

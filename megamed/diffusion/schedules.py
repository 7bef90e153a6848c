"""Sampling noise schedules, k-diffusion's definitions.

Each get_sigmas_* returns n + 1 decreasing values: n noise levels followed by a final 0
(the clean image), so a sampler takes n steps sigmas[i] -> sigmas[i + 1].
"""
from __future__ import annotations

import math

import torch

from megamed.diffusion.config import DiffusionConfig, resolution_shift


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be a positive int, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """EDM's schedule: uniform in sigma^(1/rho); rho=7 spends more steps at low noise."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).float().to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> torch.Tensor:
    """Uniform in log(sigma)."""
    _check(n, sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return append_zero(sigmas).float().to(device)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                               device="cpu") -> torch.Tensor:
    """log(sigma) interpolated along ramp^rho; rho=1 is the exponential schedule."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas).float().to(device)


def get_sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3,
                  device="cpu") -> torch.Tensor:
    """The continuous VP-SDE schedule (Song et al. 2021) expressed as sigmas, t from 1 to eps_s."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be a positive int, got {n!r}")
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    sigmas = torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1)
    return append_zero(sigmas).float().to(device)


SCHEDULES = {
    "karras": get_sigmas_karras,
    "exponential": get_sigmas_exponential,
    "polyexponential": get_sigmas_polyexponential,
}


def get_sigmas(name: str, n: int, cfg: DiffusionConfig, height: int | None = None, width: int | None = None,
               device="cpu") -> torch.Tensor:
    """Schedule `name` over [cfg.sigma_min, cfg.sigma_max]; shifted for (height, width) if given.

    "vp" ignores the config's range (its range is fixed by beta_d/beta_min).
    """
    if name == "vp":
        sigmas = get_sigmas_vp(n, device=device)
    elif name in SCHEDULES:
        sigmas = SCHEDULES[name](n, cfg.sigma_min, cfg.sigma_max, device=device)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join([*SCHEDULES, 'vp'])}")
    if height is not None or width is not None:
        if height is None or width is None:
            raise ValueError("give both height and width (or neither) to shift the schedule")
        sigmas = shift_sigmas(sigmas, height, width, cfg)
    return sigmas


def shift_sigmas(sigmas: torch.Tensor, height: int, width: int, cfg: DiffusionConfig) -> torch.Tensor:
    """Apply the resolution shift of training (see DiffusionConfig.noise_shift) to a schedule.

    Multiplies every sigma by sqrt(H*W) / shift_base_resolution, i.e. adds log(res/base_res) to
    log(sigma), the same shift sigmas_from_normal applies, so sampling visits the noise levels
    the model was trained on at this size. The final 0 stays 0.
    """
    return sigmas * resolution_shift(height, width, cfg)

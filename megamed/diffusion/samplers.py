"""Samplers for the probability-flow ODE / reverse SDE in k-diffusion's sigma form.

All samplers share one signature:

    sample_x(denoiser, x, sigmas, *, generator=None, callback=None, disable_progress=False, **cond)

  denoiser(x [B,...], sigma [B], **cond) -> x0 estimate [B,...]   (e.g. Denoiser, CFGDenoiser)
  x        the starting noise, already scaled: x = sigmas[0] * randn(...)
  sigmas   [n + 1] decreasing noise levels, usually ending with 0 (see schedules.py)
  generator  torch.Generator for the stochastic samplers (same generator state -> same sample)
  callback   called after every step with {"i", "x", "sigma", "denoised"}

Stochastic: ddim with eta > 0, euler-ancestral, and euler/heun with s_churn > 0 (EDM churn);
they draw one randn of x's shape from `generator` per noisy step. The rest are deterministic.

The ODE is dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3 with s(t)=1, sigma(t)=t).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import trange

from megamed.diffusion.denoiser import append_dims


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - D) / sigma (also the epsilon estimate)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma_from -> sigma_to into a deterministic part down to sigma_down and fresh
    noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2. eta=0: no noise (DDIM)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _check(x: torch.Tensor, sigmas: torch.Tensor) -> list[float]:
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 values, got "
                         f"{tuple(sigmas.shape) if torch.is_tensor(sigmas) else type(sigmas).__name__}")
    s = sigmas.tolist()
    if any(b >= a for a, b in zip(s, s[1:])) or s[-1] < 0:
        raise ValueError("sigmas must be strictly decreasing and non-negative")
    if s[0] <= 0:
        raise ValueError("sigmas[0] must be > 0")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch [B, ...], got shape {tuple(x.shape)}")
    return s


def _step_sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.new_full([x.shape[0]], sigma)  # one noise level per batch item, [B]


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def _churn(x, sigma: float, n_steps: int, generator, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float):
    """EDM's stochastic "churn" (Karras et al. 2022, Algorithm 2): raise the noise level from sigma
    to sigma_hat = sigma * (1 + gamma) by adding fresh noise, so the following ODE step also
    corrects earlier errors. gamma = min(s_churn / n_steps, sqrt(2) - 1) inside [s_tmin, s_tmax]."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + _noise(x, generator) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5, sigma_hat


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, disable_progress=False,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 **cond):
    """Euler on the PF-ODE: first order, one denoiser call per step. s_churn > 0 adds EDM churn."""
    s = _check(x, sigmas)
    for i in trange(len(s) - 1, disable=disable_progress, desc="euler"):
        x, sigma = _churn(x, s[i], len(s) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, _step_sigma(x, sigma), **cond)
        x = x + to_d(x, _step_sigma(x, sigma), denoised) * (s[i + 1] - sigma)
        _report(callback, i, x, s[i], denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, disable_progress=False,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                **cond):
    """Heun's method (EDM Algorithm 1; with s_churn > 0, Algorithm 2): second order, two calls per
    step except the step to sigma=0, which is Euler (the derivative at 0 is undefined)."""
    s = _check(x, sigmas)
    for i in trange(len(s) - 1, disable=disable_progress, desc="heun"):
        x, sigma = _churn(x, s[i], len(s) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, _step_sigma(x, sigma), **cond)
        d = to_d(x, _step_sigma(x, sigma), denoised)
        dt = s[i + 1] - sigma
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = denoiser(x_2, _step_sigma(x, s[i + 1]), **cond)
            d_2 = to_d(x_2, _step_sigma(x, s[i + 1]), denoised_2)
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, s[i], denoised)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, eta: float = 0.0, generator=None, callback=None,
                disable_progress=False, **cond):
    """DDIM (Song et al. 2021) in sigma form.

    With x_sigma = x_vp / sqrt(alpha_bar) and sigma = sqrt((1 - alpha_bar) / alpha_bar), DDIM's
    update becomes x_next = D + sigma_down * eps + sigma_up * z with eps = (x - D) / sigma and
    (sigma_down, sigma_up) = get_ancestral_step(sigma, sigma_next, eta): DDIM's eta-scaled std
    divided by sqrt(alpha_bar_next) is exactly k-diffusion's sigma_up. So eta=0 is the Euler
    step and eta=1 is ancestral sampling (DDPM-like). z is drawn from `generator` once per step
    that ends above sigma=0.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    s = _check(x, sigmas)
    for i in trange(len(s) - 1, disable=disable_progress, desc="ddim"):
        denoised = denoiser(x, _step_sigma(x, s[i]), **cond)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        x = denoised + to_d(x, _step_sigma(x, s[i]), denoised) * sigma_down
        if sigma_up > 0:
            x = x + _noise(x, generator) * sigma_up
        _report(callback, i, x, s[i], denoised)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, eta: float = 1.0, generator=None, callback=None,
                           disable_progress=False, **cond):
    """Euler ancestral (k-diffusion): the same update as DDIM with eta (default 1)."""
    return sample_ddim(denoiser, x, sigmas, eta=eta, generator=generator, callback=callback,
                       disable_progress=disable_progress, **cond)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, disable_progress=False, **cond):
    """DPM-Solver++(2M) (Lu et al. 2022), k-diffusion's formulation, in t = -log(sigma).

    Exact exponential integration of the linear part, with D linearly extrapolated from the
    current and previous denoised estimates (second order, one call per step). The first step
    and the step to sigma=0 are first order (= DDIM), as in k-diffusion and diffusers'
    DPMSolverMultistepScheduler with final_sigmas_type="zero".
    """
    s = _check(x, sigmas)
    old_denoised, h_last = None, None
    for i in trange(len(s) - 1, disable=disable_progress, desc="dpm++2m"):
        denoised = denoiser(x, _step_sigma(x, s[i]), **cond)
        if s[i + 1] == 0:
            x = denoised  # the exponential integrator's limit as sigma_next -> 0
        else:
            h = math.log(s[i] / s[i + 1])  # step size in t = -log(sigma), > 0
            ratio, phi = s[i + 1] / s[i], -math.expm1(-h)  # sigma_next/sigma and 1 - sigma_next/sigma
            if old_denoised is None:
                d_est = denoised
            else:
                r = h_last / h
                d_est = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = ratio * x + phi * d_est
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, s[i], denoised)
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "euler-ancestral": sample_euler_ancestral,
    "dpmpp-2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None

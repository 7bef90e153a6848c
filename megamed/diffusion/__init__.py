"""Diffusion in k-diffusion's conventions: x = x0 + sigma * noise, denoiser(x, sigma, **cond) -> x0.

    config.py     DiffusionConfig (JSON), loss-weighting names, the resolution noise shift
    denoiser.py   EDM preconditioning (Denoiser), training sigmas, per-sample loss
    schedules.py  sampling noise schedules (karras, exponential, polyexponential, vp) + shift
    samplers.py   euler, heun, ddim(eta), euler-ancestral, dpmpp-2m; SAMPLERS / get_sampler
    guidance.py   CFGDenoiser: classifier-free guidance with a guidance interval
"""
from __future__ import annotations

from megamed.diffusion.config import DiffusionConfig, resolution_shift
from megamed.diffusion.denoiser import Denoiser, edm_scalings, loss_weight, sigmas_from_normal
from megamed.diffusion.guidance import CFGDenoiser
from megamed.diffusion.samplers import (SAMPLERS, get_sampler, sample_ddim, sample_dpmpp_2m, sample_euler,
                                        sample_euler_ancestral, sample_heun)
from megamed.diffusion.schedules import (get_sigmas, get_sigmas_exponential, get_sigmas_karras,
                                         get_sigmas_polyexponential, get_sigmas_vp, shift_sigmas)

__all__ = [
    "DiffusionConfig", "resolution_shift", "Denoiser", "edm_scalings", "loss_weight", "sigmas_from_normal",
    "CFGDenoiser", "SAMPLERS", "get_sampler", "sample_euler", "sample_heun", "sample_ddim",
    "sample_euler_ancestral", "sample_dpmpp_2m", "get_sigmas", "get_sigmas_karras", "get_sigmas_exponential",
    "get_sigmas_polyexponential", "get_sigmas_vp", "shift_sigmas",
]

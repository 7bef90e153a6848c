"""Our sigma-form samplers against diffusers' schedulers, on the same noise levels and model.

What is matched:
  * diffusers works on x_vp with alpha_bar(t); we work on x_sigma = x_vp / sqrt(alpha_bar) with
    sigma = sqrt((1 - alpha_bar) / alpha_bar). Both are driven by ONE denoiser D(x_sigma, sigma);
    diffusers sees it as an epsilon model eps = (x_sigma - D) / sigma evaluated at its timestep.
  * DDIMScheduler(clip_sample=False, set_alpha_to_one=True): the last step goes to alpha_bar=1,
    i.e. sigma=0, so our schedule is [sigma(t) for t in timesteps] + [0].
  * DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    final_sigmas_type="zero", use_karras_sigmas False and True): its `sigmas` already are
    sigma-form noise levels ending in 0, and its last step is first order, as ours.
  * EulerDiscreteScheduler / HeunDiscreteScheduler (defaults, Karras sigmas off and on): they
    keep x in sigma form and feed the model x / sqrt(sigma^2 + 1); Heun lists inner sigmas twice.
  * Start (DDIM, DPM-Solver): diffusers' x_T = z (init_noise_sigma = 1), ours x = z * sqrt(1 + sigma_T^2); the end
    is at alpha_bar = 1, where x_vp = x_sigma, so final samples compare directly.
"""
from __future__ import annotations

import pytest
import torch

from megamed.diffusion.samplers import sample_ddim, sample_dpmpp_2m
from megamed.diffusion.schedules import get_sigmas_karras

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= notice inside diffusers
diffusers = pytest.importorskip("diffusers", reason="pip install diffusers (megamed[diffusers]) for parity tests")


def make_denoiser(dim: int = 6, seed: int = 0):
    """A nonlinear denoiser: Gaussian-data closed form plus a small random tanh-MLP term."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim + 1, 16, generator=g, dtype=torch.float64) / dim ** 0.5
    w2 = torch.randn(16, dim, generator=g, dtype=torch.float64) / 4
    mu, s = 0.3, 0.5

    def denoiser(x, sigma):  # x [B, dim], sigma [B]
        sig = sigma.to(x.dtype)[:, None]
        gauss = mu + s ** 2 / (s ** 2 + sig ** 2) * (x - mu)
        h = torch.tanh(torch.cat([x / (1 + sig ** 2).sqrt(), sig.log() / 4], dim=1) @ w1)
        return gauss + 0.2 * torch.tanh(h @ w2)
    return denoiser


def run_diffusers(scheduler, denoiser, z, sigma_of_step, **step_kwargs):
    x = z * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sigma = torch.full([z.shape[0]], float(sigma_of_step(i, t)), dtype=torch.float64)
        x_sigma = x * (1 + sigma[:, None] ** 2).sqrt()
        eps = (x_sigma - denoiser(x_sigma, sigma)) / sigma[:, None]
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("steps", [7, 20])
def test_ddim_eta0_matches_diffusers(steps):
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod.double()
    sigma_t = lambda t: ((1 - abar[t]) / abar[t]).sqrt()
    denoiser = make_denoiser()
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = run_diffusers(sched, denoiser, z, lambda i, t: sigma_t(t), eta=0.0)

    sigmas = torch.tensor([float(sigma_t(t)) for t in sched.timesteps] + [0.0], dtype=torch.float64)
    ours = sample_ddim(denoiser, z * (1 + sigmas[0] ** 2).sqrt(), sigmas, eta=0.0, disable_progress=True)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-6), (ours - ref).abs().max()


def test_ddim_eta1_matches_diffusers_with_same_generator():
    # DDIM's eta-scaled noise, rescaled to sigma form, is k-diffusion's sigma_up; both draw one
    # randn of the sample's shape per step from the generator, so the same seed gives the same path.
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)
    abar = sched.alphas_cumprod.double()
    sigma_t = lambda t: ((1 - abar[t]) / abar[t]).sqrt()
    denoiser = make_denoiser(seed=3)
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = run_diffusers(sched, denoiser, z, lambda i, t: sigma_t(t), eta=1.0,
                        generator=torch.Generator().manual_seed(7))
    sigmas = torch.tensor([float(sigma_t(t)) for t in sched.timesteps] + [0.0], dtype=torch.float64)
    ours = sample_ddim(denoiser, z * (1 + sigmas[0] ** 2).sqrt(), sigmas, eta=1.0,
                       generator=torch.Generator().manual_seed(7), disable_progress=True)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-6), (ours - ref).abs().max()
    # and the noise matters: a different seed gives a different sample
    other = sample_ddim(denoiser, z * (1 + sigmas[0] ** 2).sqrt(), sigmas, eta=1.0,
                        generator=torch.Generator().manual_seed(8), disable_progress=True)
    assert (other - ref).abs().max() > 1e-2


@pytest.mark.parametrize("steps,karras", [(5, False), (12, False), (25, False), (12, True)])
def test_dpmpp_2m_matches_diffusers(steps, karras):
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                  use_karras_sigmas=karras, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()  # [steps + 1], sigma form, last = 0
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1
    if karras:  # diffusers' Karras sigmas span its training range: our schedule must give the same
        abar = sched.alphas_cumprod.double()
        full = ((1 - abar) / abar).sqrt()
        assert torch.allclose(get_sigmas_karras(steps, full[0].item(), full[-1].item()).double(), sigmas, rtol=1e-5)
    denoiser = make_denoiser(seed=5)
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = run_diffusers(sched, denoiser, z, lambda i, t: sigmas[i])
    ours = sample_dpmpp_2m(denoiser, z * (1 + sigmas[0] ** 2).sqrt(), sigmas, disable_progress=True)
    # diffusers keeps its alpha/sigma coefficients in float32, hence the looser tolerance
    assert torch.allclose(ours, ref, atol=2e-6, rtol=2e-6), (ours - ref).abs().max()


def run_diffusers_sigma_form(scheduler, denoiser, z):
    """Euler/Heun-style schedulers keep x in sigma form and feed the model x / sqrt(sigma^2 + 1)."""
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_vp = scheduler.scale_model_input(x, t)
        sigma = scheduler.sigmas[scheduler.step_index].double().expand(z.shape[0])
        x_sigma = x_vp * (1 + sigma[:, None] ** 2).sqrt()
        eps = (x_sigma - denoiser(x_sigma, sigma)) / sigma[:, None]
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_and_heun_match_diffusers(name, karras):
    from megamed.diffusion.samplers import get_sampler

    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}[name]
    sched = cls(use_karras_sigmas=karras)
    sched.set_timesteps(9)
    denoiser = make_denoiser(seed=6)
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = run_diffusers_sigma_form(sched, denoiser, z)
    # Heun's scheduler lists every inner noise level twice (two model calls per step): undo that
    sigmas = torch.unique_consecutive(sched.sigmas.double())
    assert len(sigmas) == 10 and sigmas[-1] == 0
    ours = get_sampler(name)(denoiser, z * sched.init_noise_sigma, sigmas, disable_progress=True)
    assert torch.allclose(ours, ref, atol=2e-6, rtol=2e-6), (ours - ref).abs().max()

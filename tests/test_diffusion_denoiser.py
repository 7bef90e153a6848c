"""EDM preconditioning, loss weighting, the resolution shift, config JSON, and CFG."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from megamed.diffusion import CFGDenoiser, Denoiser, DiffusionConfig, edm_scalings, loss_weight, sigmas_from_normal
from megamed.utils.dataclass_json import ConfigError, from_dict, load_json, save_json


class Recorder(nn.Module):
    """Inner model that returns a fixed function of its input and records what it was given."""

    def __init__(self, fn=lambda x, c: torch.zeros_like(x)):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x, c_noise, **cond):
        self.calls.append((x.clone(), c_noise.clone(), cond))
        return self.fn(x, c_noise)


class SmallNet(nn.Module):
    """A real (random) conv net, so the loss test is not trivially zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x, c_noise, **cond):
        return self.conv(torch.cat([x, c_noise[:, None, None, None].expand_as(x)], 1))


# ---- preconditioning ----

@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 3.0, 80.0])
def test_preconditioning_gives_unit_variance_input_and_target(sigma):
    sd = 0.5
    g = torch.Generator().manual_seed(0)
    x0 = sd * torch.randn(400_000, generator=g, dtype=torch.float64)
    x = x0 + sigma * torch.randn(400_000, generator=g, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(sigma, dtype=torch.float64), sd)
    assert (c_in * x).var().item() == pytest.approx(1.0, rel=0.01)
    target = (x0 - c_skip * x) / c_out  # what F is trained to output
    assert target.var().item() == pytest.approx(1.0, rel=0.01)
    # c_skip is the least-squares regression of x0 on x, so the target is uncorrelated with x
    assert abs(torch.corrcoef(torch.stack([target, x]))[0, 1].item()) < 0.01
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4)


def test_zero_network_is_the_ideal_denoiser_for_gaussian_data():
    # For x0 ~ N(0, sd^2) the posterior mean is sd^2/(sd^2+sigma^2) x; with F = 0, D = c_skip x.
    cfg = DiffusionConfig(sigma_data=0.7)
    inner = Recorder()
    den = Denoiser(inner, cfg)
    x = torch.randn(3, 1, 5, 7)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    out = den(x, sigma, text_ids="passed-through")
    ref = 0.49 / (0.49 + sigma[:, None, None, None] ** 2) * x
    assert torch.allclose(out, ref, rtol=1e-6)
    x_in, c_noise, cond = inner.calls[0]
    assert torch.allclose(x_in, x / (sigma[:, None, None, None] ** 2 + 0.49).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4) and cond == {"text_ids": "passed-through"}
    # a float sigma broadcasts over the batch
    assert torch.allclose(den(x, 1.0), 0.49 / 1.49 * x)


def test_denoiser_bad_sigma():
    den = Denoiser(Recorder(), DiffusionConfig())
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        den(x, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="sigma must be a scalar or shape"):
        den(x, torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        den.loss(x, torch.randn(2, 1, 4, 5), torch.ones(2))


# ---- loss ----

@pytest.mark.parametrize("weighting", ["edm", "snr", "snr+1", "uniform", "min-snr-5"])
def test_loss_is_weighted_x0_error(weighting):
    cfg = DiffusionConfig(loss_weighting=weighting)
    den = Denoiser(SmallNet(), cfg).double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 6, 5, generator=g, dtype=torch.float64) * 0.5
    noise = torch.randn(4, 1, 6, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=torch.float64)
    loss = den.loss(x0, noise, sigma)
    # independent path: run the denoiser, take the x0-space error, weight it by hand
    d = den(x0 + sigma[:, None, None, None] * noise, sigma)
    mse = (d - x0).pow(2).flatten(1).mean(1)
    lam = {"edm": (sigma ** 2 + 0.25) / (sigma ** 2 * 0.25), "snr": sigma ** -2, "snr+1": sigma ** -2 + 1,
           "uniform": torch.ones(4, dtype=torch.float64), "min-snr-5": (sigma ** -2).clamp(max=5)}[weighting]
    assert loss.shape == (4,)
    assert torch.allclose(loss.double(), lam * mse, rtol=1e-5)
    loss.sum().backward()  # differentiable through the inner model
    assert den.inner_model.conv.weight.grad.abs().sum() > 0


def test_loss_weight_values():
    s = torch.tensor([0.5, 2.0, 0.1])
    assert torch.allclose(loss_weight(s, DiffusionConfig()), torch.tensor([8.0, 4.25, 104.0]))  # sd=0.5
    assert torch.allclose(loss_weight(s, DiffusionConfig(loss_weighting="snr+1")), torch.tensor([5.0, 1.25, 101.0]))
    assert torch.allclose(loss_weight(s, DiffusionConfig(loss_weighting="min-snr-5")), torch.tensor([4.0, 0.25, 5.0]))
    assert torch.allclose(loss_weight(s, DiffusionConfig(loss_weighting="min-snr-2.5")), torch.tensor([2.5, 0.25, 2.5]))
    # EDM weighting with sigma_data = 1 is exactly the v-prediction ("snr+1") weighting
    assert torch.allclose(loss_weight(s, DiffusionConfig(sigma_data=1.0)),
                          loss_weight(s, DiffusionConfig(loss_weighting="snr+1")))


# ---- training sigmas and the resolution shift ----

def test_sigmas_from_normal_lognormal_and_shift():
    cfg = DiffusionConfig(P_mean=-1.2, P_std=1.2, shift_base_resolution=64)
    z = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = sigmas_from_normal(z, 64, 64, cfg)
    assert torch.allclose(base, torch.exp(-1.2 + 1.2 * z))
    assert base.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert base.log().std().item() == pytest.approx(1.2, rel=0.01)
    # 1024x1024 has 256x the pixels of 64x64: sigmas scale by sqrt(256) = 16, log(sigma) by log 16
    big = sigmas_from_normal(z, 1024, 1024, cfg)
    assert torch.allclose(big.log() - base.log(), torch.full_like(z, math.log(16.0)))
    assert torch.allclose(sigmas_from_normal(z, 128, 32, cfg), base)  # same pixel count as 64x64
    off = DiffusionConfig(noise_shift="none")
    assert torch.allclose(sigmas_from_normal(z, 1024, 1024, off), base)
    with pytest.raises(ValueError, match="1-D"):
        sigmas_from_normal(z.reshape(2, -1), 64, 64, cfg)
    with pytest.raises(ValueError, match="height and width"):
        sigmas_from_normal(z, 0, 64, cfg)


# ---- config ----

def test_config_json_roundtrip_and_errors(tmp_path):
    cfg = DiffusionConfig(sigma_data=0.6, loss_weighting="min-snr-5", noise_shift="none")
    save_json(cfg, tmp_path / "d.json")
    assert load_json(DiffusionConfig, tmp_path / "d.json") == cfg
    with pytest.raises(ConfigError, match="sigma_dta"):
        from_dict(DiffusionConfig, {"sigma_dta": 0.5})
    for bad, match in [({"loss_weighting": "l2"}, "loss_weighting"), ({"noise_shift": "sd3"}, "noise_shift"),
                       ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"), ({"sigma_data": 0}, "sigma_data"),
                       ({"shift_base_resolution": 0}, "shift_base_resolution"),
                       ({"loss_weighting": "min-snr-0"}, "gamma")]:
        with pytest.raises(ValueError, match=match):
            DiffusionConfig(**bad)
    assert json.loads((tmp_path / "d.json").read_text())["loss_weighting"] == "min-snr-5"


# ---- classifier-free guidance ----

class TextDenoiser(nn.Module):
    """D depends on a masked mean of token embeddings, so padding with mask=False is invisible."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 3)
        self.batches = []

    def forward(self, x, sigma, *, text_ids, text_mask):
        self.batches.append(x.shape[0])
        m = text_mask.float()[..., None]
        pooled = (self.emb(text_ids) * m).sum(1) / m.sum(1).clamp(min=1)  # [B, 3]
        return x / (1 + sigma[:, None, None, None] ** 2) + pooled[:, :, None, None]


def _cond(ids):
    ids = torch.tensor(ids)
    return {"text_ids": ids, "text_mask": ids > 0}


def test_cfg_combines_cond_and_uncond_in_one_forward():
    den = TextDenoiser()
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([1.0, 2.0])
    cond = _cond([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]])  # [B=2, L=5]
    uncond = _cond([[1, 2]])                            # one (shorter) negative prompt for all
    d_c = den(x, sigma, **cond)
    d_u = den(x, sigma, **_cond([[1, 2], [1, 2]]))
    den.batches.clear()
    for scale, ref in [(0.0, d_u), (1.0, d_c), (3.5, d_u + 3.5 * (d_c - d_u))]:
        out = CFGDenoiser(den, scale, uncond=uncond)(x, sigma, **cond)
        assert torch.allclose(out, ref, atol=1e-6), scale
    assert den.batches == [4, 2, 4]  # one batched forward; scale 1 skips the unconditional half


def test_cfg_guidance_interval():
    den = TextDenoiser()
    x = torch.randn(3, 3, 2, 2)
    cond, uncond = _cond([[3, 4], [5, 0], [6, 7]]), _cond([[1, 2, 2, 1]])
    cfg = CFGDenoiser(den, 2.0, uncond=uncond, interval=(0.5, 5.0))
    sigma = torch.tensor([0.5, 1.0, 5.0])  # (lo, hi]: only the last two are guided
    d_c = den(x, sigma, **cond)
    d_u = den(x, sigma, **_cond([[1, 2, 2, 1]] * 3))
    out = cfg(x, sigma, **cond)
    assert torch.allclose(out[0], d_c[0]) and not torch.allclose(out[1], d_c[1])
    assert torch.allclose(out[1:], (d_u + 2 * (d_c - d_u))[1:], atol=1e-6)
    den.batches.clear()
    assert torch.allclose(cfg(x, 10.0, **cond), den(x, torch.full((3,), 10.0), **cond))
    assert den.batches == [3, 3]  # outside the interval only the conditional half runs


def test_cfg_bad_input():
    den = TextDenoiser()
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(den, 2.0, uncond={"text_ids": torch.ones(1, 2, dtype=torch.long)})(x, 1.0, **_cond([[1], [2]]))
    with pytest.raises(ValueError, match="does not match"):
        CFGDenoiser(den, 2.0, uncond=_cond([[1], [2], [3]]))(x, 1.0, **_cond([[1], [2]]))
    with pytest.raises(ValueError, match="interval"):
        CFGDenoiser(den, 2.0, uncond={}, interval=(3.0, 1.0))


def test_cfg_concatenates_dataclass_conditioning():
    # e.g. a precomputed TextContext(states [B, L, D], mask [B, L], pooled [B, D]) passed as text_context
    from dataclasses import dataclass

    @dataclass
    class Ctx:
        states: torch.Tensor
        mask: torch.Tensor

    def den(x, sigma, *, ctx):
        m = ctx.mask.float()[..., None]
        return x + ((ctx.states * m).sum(1) / m.sum(1).clamp(min=1))[:, :, None]  # x [B, D, 1]

    x = torch.zeros(2, 4, 1)
    cond = Ctx(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    uncond = Ctx(torch.randn(1, 5, 4), torch.tensor([[1, 1, 1, 1, 0]]).bool())
    out = CFGDenoiser(den, 2.0, uncond={"ctx": uncond})(x, 1.0, ctx=cond)
    d_c = den(x, None, ctx=cond)
    d_u = den(x, None, ctx=Ctx(uncond.states.expand(2, -1, -1), uncond.mask.expand(2, -1)))
    assert torch.allclose(out, d_u + 2 * (d_c - d_u), atol=1e-6)
    # a batch-1 prompt broadcasts over the image batch, on the cond side too
    one = Ctx(cond.states[:1], cond.mask[:1])
    out1 = CFGDenoiser(den, 2.0, uncond={"ctx": uncond})(x, 1.0, ctx=one)
    d_c1 = den(x, None, ctx=Ctx(one.states.expand(2, -1, -1), one.mask.expand(2, -1)))
    assert torch.allclose(out1, d_u + 2 * (d_c1 - d_u), atol=1e-6)
    with pytest.raises(ValueError, match="batch dim 2"):
        CFGDenoiser(den, 2.0, uncond={"ctx": uncond})(x, 1.0, ctx=Ctx(torch.zeros(3, 3, 4), torch.ones(3, 3).bool()))

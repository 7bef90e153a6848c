"""EDM preconditioning, training-noise draws and loss weighting.

The raw network F is wrapped so that its inputs and training targets have unit variance at
every noise level (Karras et al. 2022, "Elucidating the design space", Sec. 5 / App. B.6):

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

    c_skip  = sd^2 / (sigma^2 + sd^2)           (sd = sigma_data)
    c_out   = sigma * sd / sqrt(sigma^2 + sd^2)
    c_in    = 1 / sqrt(sigma^2 + sd^2)
    c_noise = log(sigma) / 4

Everything here is a pure function of its inputs: the trainer draws noise and sigma itself
(from keyed generators), so runs are reproducible and resumable.
"""
from __future__ import annotations

import torch
from torch import nn

from megamed.diffusion.config import DiffusionConfig, parse_loss_weighting, resolution_shift


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dims in all, so it broadcasts against an image batch."""
    if t.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of shape {tuple(t.shape)} to {ndim} dims")
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise), each shaped like sigma."""
    var = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = var.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """lambda(sigma), the weight on the x0-space error ||D(x; sigma) - x0||^2.

    SNR here is the usual 1 / sigma^2 (= alpha_bar / (1 - alpha_bar) of a VP model), so the
    names mean what they mean in the literature:
      "edm"       (sigma^2 + sd^2) / (sigma * sd)^2: unit weight on the preconditioned F target
      "snr"       1/sigma^2: the epsilon-prediction loss
      "snr+1"     1/sigma^2 + 1: the v-prediction loss (= "edm" when sd = 1)
      "min-snr-g" min(SNR, g): Min-SNR-gamma (Hang et al. 2023), eps loss clipped at high SNR
      "uniform"   1: plain x0-prediction loss
    """
    kind, gamma = parse_loss_weighting(cfg.loss_weighting)
    snr = sigma.pow(-2)
    if kind == "edm":
        sd2 = cfg.sigma_data ** 2
        return (sigma ** 2 + sd2) / (sigma ** 2 * sd2)
    if kind == "snr":
        return snr
    if kind == "snr+1":
        return snr + 1
    if kind == "min-snr":
        return snr.clamp(max=gamma)
    return torch.ones_like(sigma)  # "uniform"


def sigmas_from_normal(z: torch.Tensor, height: int, width: int, cfg: DiffusionConfig) -> torch.Tensor:
    """Map standard-normal draws z [B] to training noise levels sigma [B].

    log(sigma) = P_mean + P_std * z + log(shift), shift = sqrt(H*W) / shift_base_resolution
    (or 1 with noise_shift="none"). Not clamped to [sigma_min, sigma_max], like EDM.
    """
    if z.ndim != 1:
        raise ValueError(f"z must be a 1-D tensor [B], got shape {tuple(z.shape)}")
    shift = resolution_shift(height, width, cfg)
    return (cfg.P_mean + cfg.P_std * z).exp() * shift


class Denoiser(nn.Module):
    """EDM-preconditioned wrapper: forward(x, sigma, **cond) -> D(x; sigma), the x0 estimate.

    inner_model(x_in [B,C,H,W], c_noise [B], **cond) -> [B,C,H,W] is the raw network F
    (MegaMedModel.forward(x, c_noise, *, text_ids=None, text_mask=None, text_context=None)).
    """

    def __init__(self, inner_model: nn.Module, cfg: DiffusionConfig):
        super().__init__()
        self.inner_model = inner_model
        self.cfg = cfg

    @property
    def sigma_data(self) -> float:
        return self.cfg.sigma_data

    def _sigma(self, x: torch.Tensor, sigma) -> torch.Tensor:
        # Accept a float, a 0-d tensor or [B]; hand back [B] on x's device, in at least float32
        # (a bf16 sigma would quantise c_noise = log(sigma)/4 to a handful of levels).
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.promote_types(x.dtype, torch.float32))
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"sigma must be a scalar or shape [B]=[{x.shape[0]}], got {tuple(sigma.shape)}")
        if (sigma <= 0).any():
            raise ValueError("sigma must be > 0 for the denoiser (log(sigma) is its noise input)")
        return sigma.expand(x.shape[0])

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = self._sigma(x, sigma)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)  # each [B]
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))
        return c_skip * x + c_out * self.inner_model(c_in * x, c_noise, **cond)

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """Per-sample weighted loss [B] = lambda(sigma) * mean over pixels of (D(x0 + sigma*noise) - x0)^2.

        Computed in the preconditioned F space, where the target has unit variance:
        (D - x0)^2 = c_out^2 (F - target)^2 with target = (x0 - c_skip * x) / c_out, so the
        weight there is lambda * c_out^2 (= 1 for "edm"); this avoids multiplying a huge
        lambda (small sigma) by a tiny error in float32.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        sigma = self._sigma(x0, sigma)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        x = x0 + append_dims(sigma, x0.ndim) * noise
        out = self.inner_model(append_dims(c_in, x.ndim) * x, c_noise, **cond)
        target = (x0 - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)
        mse = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # [B]
        return (loss_weight(sigma.float(), self.cfg) * c_out.float() ** 2) * mse

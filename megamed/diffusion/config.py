"""Diffusion hyper-parameters: one dataclass, JSON round-trippable via megamed.utils.dataclass_json.

Conventions follow EDM (Karras et al. 2022) / k-diffusion: a noisy image is x = x0 + sigma * n,
n ~ N(0, I), and the network predicts the clean image D(x; sigma). Images live in [-1, 1], so
their standard deviation is about sigma_data = 0.5.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

NOISE_DISTS = ("lognormal",)
NOISE_SHIFTS = ("resolution", "none")
# "min-snr-<gamma>" is accepted for any positive gamma; these are the fixed names.
LOSS_WEIGHTINGS = ("edm", "snr", "snr+1", "uniform", "min-snr-5")
_MIN_SNR = re.compile(r"^min-snr-(\d+(?:\.\d*)?)$")


@dataclass
class DiffusionConfig:
    # Std of the training data; EDM's preconditioning is derived from it. 0.5 for images in [-1, 1].
    sigma_data: float = 0.5
    # Noise range used for sampling schedules (before any resolution shift). EDM's values.
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    # Training noise distribution: log(sigma) ~ N(P_mean, P_std^2) (EDM, "lognormal").
    noise_dist: str = "lognormal"
    P_mean: float = -1.2
    P_std: float = 1.2
    # Resolution-aware noise shift. Neighbouring pixels are strongly correlated, so at a higher
    # resolution the same sigma destroys less of the image's information: averaging an s x s
    # patch keeps the signal but divides the noise std by s. To put the same amount of
    # corruption on an image with k times more pixels per side, sigma must grow k-fold, i.e.
    # log(sigma) shifts by log(res / base_res) with res = sqrt(height * width)
    # (Hoogeboom et al. 2023 "simple diffusion"; Esser et al. 2024 SD3 resolution shift).
    # "resolution" applies it, at training (sigmas_from_normal) and sampling (shift_sigmas) time;
    # "none" disables it. At res == shift_base_resolution the shift is the identity.
    noise_shift: str = "resolution"
    shift_base_resolution: int = 64
    # Per-sigma loss weight lambda(sigma) on ||D(x; sigma) - x0||^2 (see loss_weight()).
    loss_weighting: str = "edm"

    def __post_init__(self):
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")
        if self.noise_dist not in NOISE_DISTS:
            raise ValueError(f"noise_dist must be one of {NOISE_DISTS}, got {self.noise_dist!r}")
        if not self.P_std > 0:
            raise ValueError(f"P_std must be > 0, got {self.P_std}")
        if self.noise_shift not in NOISE_SHIFTS:
            raise ValueError(f"noise_shift must be one of {NOISE_SHIFTS}, got {self.noise_shift!r}")
        if not (isinstance(self.shift_base_resolution, int) and self.shift_base_resolution > 0):
            raise ValueError(f"shift_base_resolution must be a positive int, got {self.shift_base_resolution!r}")
        parse_loss_weighting(self.loss_weighting)  # raises ValueError on an unknown name


def parse_loss_weighting(name: str) -> tuple[str, float | None]:
    """'min-snr-5' -> ('min-snr', 5.0); other known names -> (name, None). ValueError otherwise."""
    m = _MIN_SNR.match(name) if isinstance(name, str) else None
    if m:
        gamma = float(m.group(1))
        if gamma <= 0:
            raise ValueError(f"loss_weighting {name!r}: gamma must be > 0")
        return "min-snr", gamma
    if name not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS} (or 'min-snr-<gamma>'), got {name!r}")
    return name, None


def resolution_shift(height: int, width: int, cfg: DiffusionConfig) -> float:
    """Factor that multiplies sigma at this resolution: sqrt(H*W) / base_res (1.0 if disabled)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got height={height}, width={width}")
    if cfg.noise_shift == "none":
        return 1.0
    return math.sqrt(height * width) / cfg.shift_base_resolution

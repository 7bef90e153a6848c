"""benchmarks/lesion_analysis.py's model observer: the search model against its closed form, and
the DoG channels' blindness to a uniform offset (what lets them score a nodule on any background)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lesion_analysis import dog_channels, search_auroc  # noqa: E402


@pytest.mark.parametrize("d", [0.0, 1.0, 2.5])
def test_search_model_with_one_spot_is_the_two_gaussians_auroc(d):
    # one spot: lesion N(d, 1) against background N(0, 1), AUROC = Phi(d / sqrt 2)
    assert search_auroc(np.array([d]), 1, draws=20000) == pytest.approx(norm.cdf(d / np.sqrt(2)), abs=0.01)


def test_search_model_falls_with_spots_and_is_chance_without_signal():
    d = np.array([2.5, 3.0])
    got = [search_auroc(d, k) for k in (1, 5, 50, 200)]
    assert all(a > b for a, b in zip(got, got[1:]))
    assert search_auroc(np.array([0.0]), 50) == pytest.approx(0.5, abs=0.02)
    assert search_auroc(np.array([8.0]), 200) > 0.99


def test_dog_channels_are_unit_norm_and_blind_to_an_offset():
    ch = dog_channels(32, 1.0)
    assert ch.shape == (7, 64, 64)
    assert np.allclose(np.linalg.norm(ch.reshape(7, -1), axis=1), 1.0)
    # the widest channel (sigma 7.5 px, surround 12.6 px) in a 64 px box keeps almost no DC response
    assert np.abs(ch.reshape(7, -1).sum(1)).max() < 0.05 * np.sqrt(64 * 64)
    # a centred disk excites them; the same disk moved off centre much less
    yy, xx = np.mgrid[:64, :64] + 0.5
    disk = lambda cy, cx: ((yy - cy) ** 2 + (xx - cx) ** 2 < 25).astype(float)
    assert np.abs(ch.reshape(7, -1) @ disk(32, 32).ravel()).sum() > 3 * np.abs(ch.reshape(7, -1) @ disk(10, 10).ravel()).sum()

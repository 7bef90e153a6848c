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


# --- the searching observer (lesion_analysis scan) -----------------------------------------

from lesion_analysis import background_stats, channel_maps, hotelling_z, search_region  # noqa: E402


def test_channel_maps_are_the_observer_box_at_every_pixel():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 40, 37))                  # not a multiple of anything
    ch = dog_channels(6, 0.5)                               # [7, 12, 12]
    got = channel_maps(img, ch)
    assert got.shape == (2, 7, 40, 37)
    for y, x in ((6, 6), (20, 17), (33, 30)):               # cmd_observer's box: rows y-6..y+5
        box = img[:, y - 6:y + 6, x - 6:x + 6].reshape(2, -1)
        assert np.allclose(got[:, :, y, x], box @ ch.reshape(7, -1).T)


def _blob_images(n, rng, amp, size=48, at=None):
    """White noise with a Gaussian blob (sigma 1.5 px) of height amp at `at` or at a random spot."""
    yy, xx = np.mgrid[:size, :size]
    out, where = rng.standard_normal((n, size, size)), []
    for img in out:
        y, x = at if at is not None else rng.integers(12, size - 12, 2)
        img += amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5 ** 2))
        where.append((y, x))
    return out, np.array(where)


def test_hotelling_z_is_unit_normal_on_background_and_finds_a_known_blob():
    rng = np.random.default_rng(1)
    ch = dog_channels(8, 0.5)
    mu, kinv, n = background_stats(channel_maps(rng.standard_normal((k, 48, 48)), ch) for k in (300, 300))
    assert n == 600
    blob, _ = _blob_images(1, np.random.default_rng(2), 1.0, at=(24, 24))
    template = channel_maps(blob - np.random.default_rng(2).standard_normal((1, 48, 48)), ch)[0, :, 24, 24]
    z_bg = hotelling_z(channel_maps(rng.standard_normal((200, 48, 48)), ch), mu, kinv, template[None])
    assert z_bg.shape == (200, 1, 48, 48)
    inner = z_bg[:, 0, 8:-8, 8:-8]
    assert abs(inner.mean()) < 0.05 and inner.std() == pytest.approx(1.0, abs=0.06)
    pos, _ = _blob_images(100, rng, 1.0, at=(24, 24))
    z_pos = hotelling_z(channel_maps(pos, ch), mu, kinv, template[None])[:, 0, 24, 24]
    d = z_pos.mean() - z_bg[:, 0, 24, 24].mean()
    # the template's own d' = sqrt(s' K^-1 s) with s its response: the blob's energy, about 1.5 * sqrt(pi) * 1.0
    assert d == pytest.approx(np.sqrt(template @ kinv[24, 24] @ template), rel=0.2)
    assert d > 2


def test_searching_costs_detectability_and_no_signal_is_chance():
    rng = np.random.default_rng(3)
    ch = dog_channels(8, 0.5)
    mu, kinv, _ = background_stats([channel_maps(rng.standard_normal((400, 48, 48)), ch)])
    s, _ = _blob_images(1, np.random.default_rng(4), 1.0, at=(24, 24))
    t = channel_maps(s - np.random.default_rng(4).standard_normal((1, 48, 48)), ch)[0, :, 24, 24][None]
    region = np.zeros((48, 48), bool)
    region[10:38, 10:38] = True

    def auroc(amp):
        pos, where = _blob_images(150, rng, amp)
        neg = rng.standard_normal((150, 48, 48))
        zp = hotelling_z(channel_maps(pos, ch), mu, kinv, t)[:, 0]
        zn = hotelling_z(channel_maps(neg, ch), mu, kinv, t)[:, 0]
        known = np.mean([(zn[:, y, x] < zp[i, y, x]).mean() for i, (y, x) in enumerate(where)])
        sp, sn = zp[:, region].max(1), zn[:, region].max(1)
        return known, (sn[None] < sp[:, None]).mean()

    known, search = auroc(1.0)
    assert known > 0.9 and search < known - 0.05            # not knowing where costs AUROC
    known0, search0 = auroc(0.0)
    assert abs(known0 - 0.5) < 0.1 and abs(search0 - 0.5) < 0.1


def test_search_region_covers_centres_and_fills_holes():
    c = np.array([[10, 10], [10, 30], [30, 10], [30, 30]] + [[y, x] for y in (10, 30) for x in range(10, 31, 4)]
                 + [[y, x] for x in (10, 30) for y in range(10, 31, 4)], float)
    r = search_region(c, (41, 41), 2)
    assert r[10, 10] and r[30, 30] and r[20, 20]            # the ring's inside is filled
    assert not r[0, 0] and not r[40, 20]

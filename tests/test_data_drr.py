"""DRR renderer: geometry against closed-form projections, exposure, noise, linearity, bad input."""
import math

import numpy as np
import pytest
import torch

from megamed.data.ct import load_ct
from megamed.data.drr import (Exposure, Geometry, deform, expose, project, project_box, sample_exposure,
                              sample_geometry, to_uint16)

PX = 96


@pytest.fixture(scope="module")
def ct():
    torch.set_num_threads(1)
    return load_ct(4)   # 2.8 mm in-plane: small and fast; cached after the first run


def _centroid_mm(ct, mask):
    """Physical (x, y, z) mm centroid of a boolean (ap, si, lr) mask."""
    idx = np.argwhere(mask).mean(0)
    ap, si, lr = (idx - (np.array(ct.shape) - 1) / 2) * np.array(ct.spacing)
    return np.array([lr, si, ap])


def _column_centroid(img):
    w = img.sum(0)
    return float((w * np.arange(len(w))).sum() / w.sum())


def _pix(geom, xyz):
    u, v = geom.to_detector(xyz)
    return u / geom.detector_mm * PX + PX / 2 - 0.5, v / geom.detector_mm * PX + PX / 2 - 0.5


def test_ct_orientation(ct):
    """Axes are (ap, si, lr): heart is anterior-left, vertebrae posterior, lungs above liver."""
    heart = _centroid_mm(ct, ct.mask("heart"))
    spine = _centroid_mm(ct, ct.mask("vertebrae_T"))
    liver = _centroid_mm(ct, ct.mask("liver"))
    lungs = _centroid_mm(ct, ct.mask("lung_"))
    assert heart[0] > 0 and heart[2] > spine[2] + 40        # left of midline, well in front of the spine
    assert lungs[1] < liver[1]                              # y grows inferiorly
    assert _centroid_mm(ct, ct.mask("lung_upper_lobe_left"))[0] > _centroid_mm(ct, ct.mask("lung_upper_lobe_right"))[0]
    assert ct.mu.dtype == np.float32 and ct.mu.min() >= 0 and ct.labels.shape == ct.mu.shape


@pytest.mark.parametrize("kw", [dict(shift=(20.0, 0.0, 0.0)), dict(yaw=8.0), dict(view="AP", sdd=1000.0, odd=135.0),
                                dict(roll=-6.0, shift=(-13.0, 7.0, 4.0), pitch=3.0)])
def test_spine_moves_as_geometry_predicts(ct, kw):
    """Project the vertebrae alone; their centroid column matches the closed-form projection of
    their 3-D centroid (Geometry.to_detector: plain matrix algebra, not the ray caster)."""
    spine = ct.mask("vertebrae_")
    mu = np.where(spine, ct.mu, 0).astype(np.float32)
    geom = Geometry(**kw)
    img = project(mu, ct.spacing, geom, PX).numpy()
    col_expected, _ = _pix(geom, _centroid_mm(ct, spine))
    assert abs(_column_centroid(img) - col_expected) < 1.0


def test_translation_and_yaw_move_rendered_spine_band(ct):
    """On the full rendered image, find the spine as the bright narrow vertical band (column
    profile of the upper chest minus its 15-px running mean, peak near the middle). +x shift
    moves it right; +yaw turns the posterior spine to the patient's right = image left; both
    by what the closed-form projection of the vertebrae centroid predicts."""
    from scipy.ndimage import uniform_filter1d

    spine_mm = _centroid_mm(ct, ct.mask("vertebrae_T"))
    rows = slice(PX // 6, PX // 2)

    def band(**kw):
        img = expose(project(ct.mu, ct.spacing, Geometry(**kw), PX), Exposure(), PX).numpy()
        p = img[rows].mean(0)
        hp = p - uniform_filter1d(p, 15)
        c = int(np.argmax(hp[PX // 3: 2 * PX // 3])) + PX // 3
        w = np.clip(hp[c - 3:c + 4], 0, None)                  # sub-pixel peak
        return c - 3 + float((w * np.arange(7)).sum() / w.sum())

    c0 = band()
    assert abs(c0 - _pix(Geometry(), spine_mm)[0]) < 3.0     # the band is the spine, not a rib or edge
    for kw in (dict(shift=(15.0, 0.0, 0.0)), dict(yaw=10.0)):
        expect = _pix(Geometry(**kw), spine_mm)[0] - _pix(Geometry(), spine_mm)[0]
        moved = band(**kw) - c0
        assert abs(expect) > 2.5 and np.sign(moved) == np.sign(expect) and abs(moved - expect) < 1.5, (kw, moved, expect)


def test_water_block_path_length():
    """A water slab T mm thick: centre ray integral is T, a corner ray T * |r| / r_z."""
    D, H, W = 40, 50, 60
    sp = (2.0, 3.0, 2.5)
    mu = np.zeros((D, H, W), np.float32)
    mu[10:30] = 1.0                                       # 20 slices x 2 mm = 40 mm of water
    geom = Geometry(sdd=1000.0, odd=100.0, detector_mm=100.0)
    L = project(mu, sp, geom, 64).numpy()
    assert L[31:33, 31:33].mean() == pytest.approx(40.0, rel=1e-3)
    u = (0.5 / 64) * 100 - 50                              # corner pixel centre, mm
    factor = math.sqrt(2 * u * u + 1000.0 ** 2) / 1000.0
    # corner rays still cross the full slab inside the volume (its in-plane extent is large enough)
    assert L[0, 0] == pytest.approx(40.0 * factor, rel=2e-3)


def test_box_projection_is_linear(ct):
    rng = np.random.default_rng(0)
    start = (13, 41, 22)                                  # odd start: not aligned with the 2-voxel slabs
    delta = rng.uniform(0, 1, size=(9, 7, 11)).astype(np.float32)
    geom = Geometry(view="AP", sdd=1000.0, odd=140.0, yaw=4.0, pitch=-3.0, roll=2.0, shift=(5.0, -8.0, 3.0))
    full = ct.mu.copy()
    full[tuple(slice(s, s + n) for s, n in zip(start, delta.shape))] += delta
    ref = project(full, ct.spacing, geom, PX) - project(ct.mu, ct.spacing, geom, PX)
    box = project_box(delta, start, ct.shape, ct.spacing, geom, PX)
    assert (box != 0).sum() < PX * PX / 20                 # only the footprint was computed
    torch.testing.assert_close(box, ref, atol=2e-3, rtol=1e-4)
    assert ref.abs().max() > 1.0


def test_exposure_monotonic_and_noise(ct):
    """Film-like display: more exposure -> darker image; relative noise falls with dose."""
    L = project(ct.mu, ct.spacing, Geometry(), 64)
    means = [expose(L, Exposure(exposure=e), 64).mean().item() for e in (0.5, 1.0, 2.0)]
    assert means[0] > means[1] > means[2]
    # a wide window never clips, so display = (D - lo) / (hi - lo) is linear in the log signal
    noise = []
    for e in (0.25, 4.0):
        exp = Exposure(exposure=e, unsharp=0, window=(-5.0, 15.0))
        noisy = expose(L, exp, 64, torch.Generator().manual_seed(1))
        noise.append((noisy - expose(L, exp, 64)).std().item() * 20.0)   # back to log units
    # quantum noise of log(N) is ~1/sqrt(N): 16x the dose -> ~4x less (read noise adds a bit)
    assert 3.0 < noise[0] / noise[1] < 4.5
    clean = expose(L, Exposure(unsharp=0), 64)
    # bright = absorbed: the spine column is brighter than the lungs beside it
    img = clean.numpy()
    assert img[20:30, 30:34].mean() > img[20:30, 16:20].mean()


def test_deform_changes_body_keeps_labels(ct):
    b = deform(ct, 3)
    assert b.mu.shape == ct.mu.shape and b.labels.dtype == np.uint8
    assert deform(ct, 0) is ct
    assert not np.allclose(b.mu, ct.mu)
    np.testing.assert_array_equal(b.mu, deform(ct, 3).mu)          # seeded
    # anatomy moves but stays anatomy: same structures, similar lung volume (global scale <= 7%^3)
    v0, v1 = ct.mask("lung_").sum(), b.mask("lung_").sum()
    assert 0.75 < v1 / v0 < 1.3


def test_sampled_params_are_valid_and_seeded():
    a = sample_geometry(np.random.default_rng(5))
    assert a == sample_geometry(np.random.default_rng(5))
    assert sample_geometry(np.random.default_rng(1), "AP").sdd < 1200 < sample_geometry(np.random.default_rng(1), "PA").sdd
    e = sample_exposure(np.random.default_rng(5))
    assert e.exposure > 0 and e.window[1] > e.window[0]


def test_to_uint16_range():
    out = to_uint16(torch.tensor([[-0.5, 0.0, 0.5, 1.0, 2.0]]))
    assert out.dtype == np.uint16 and out.tolist() == [[0, 0, 32768, 65535, 65535]]


@pytest.mark.parametrize("kw, word", [(dict(view="LAT"), "view"), (dict(sdd=100.0), "sdd"),
                                      (dict(detector_mm=0.0), "detector_mm")])
def test_bad_geometry(kw, word):
    with pytest.raises(ValueError, match=word):
        Geometry(**kw)


@pytest.mark.parametrize("kw, word", [(dict(exposure=0.0), "exposure"), (dict(window=(3.0, 1.0)), "window")])
def test_bad_exposure(kw, word):
    with pytest.raises(ValueError, match=word):
        Exposure(**kw)


def test_bad_px(ct):
    with pytest.raises(ValueError, match="px"):
        project(ct.mu, ct.spacing, Geometry(), 0)


def test_ap_magnifies_the_anterior_heart_more_than_pa(ct):
    """Supine AP (short sdd, source in front) enlarges the heart; the ratio of footprint widths
    matches the pinhole magnification sdd / (source-to-heart distance) of each geometry."""
    heart = ct.mask("heart")
    pa, ap = Geometry(), Geometry(view="AP", sdd=1000.0, odd=135.0)

    def width(geom):
        img = project(heart.astype(np.float32), ct.spacing, geom, PX).numpy()
        cols = np.nonzero(img.max(0) > 5.0)[0]
        return (cols.max() - cols.min() + 1) * geom.detector_mm / PX

    z = _centroid_mm(ct, heart)[2]
    mag = lambda g: g.sdd / abs(z - g.z_source)
    assert width(ap) / width(pa) == pytest.approx(mag(ap) / mag(pa), rel=0.06)
    assert mag(ap) / mag(pa) > 1.08                     # ~10% larger heart on AP


def test_packed_cache_loads_the_ct_offline(ct, tmp_path, monkeypatch):
    """pack_cache copies what a cached load_ct reads; a machine given only that folder (no wheel,
    no NIfTI, no registry) loads the same volume."""
    import megamed.data.fetch as fetch_mod
    from megamed import flags
    from megamed.data.ct import pack_cache

    nbytes = pack_cache(tmp_path / "pack", factor=4)
    files = sorted(p.relative_to(tmp_path / "pack").as_posix() for p in (tmp_path / "pack").rglob("*") if p.is_file())
    assert len(files) == 4 and files[-1].endswith("structures.csv") and not any(f.endswith(".nii.gz") for f in files)
    assert nbytes == sum((tmp_path / "pack" / f).stat().st_size for f in files)

    def offline(*a, **k):
        raise fetch_mod.FetchError("offline")
    monkeypatch.setattr(fetch_mod, "fetch", offline)
    monkeypatch.setenv(flags.CACHE_ENV, str(tmp_path / "pack"))
    again = load_ct(4)
    assert np.array_equal(again.mu, ct.mu) and np.array_equal(again.labels, ct.labels)
    assert again.spacing == ct.spacing and again.structures == ct.structures
    with pytest.raises(fetch_mod.FetchError, match="offline"):
        load_ct(2)                       # not packed: it would need the wheel

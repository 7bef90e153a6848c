"""Findings change the RENDERED radiograph where a radiologist would look for them."""
import numpy as np
import pytest
import torch

from megamed.data.ct import load_ct
from megamed.data.drr import Exposure, Geometry, expose, project, project_box
from megamed.data.findings import FINDINGS, labels_for, simulate
from megamed.data.layout import OBSERVATIONS

PX = 128
PA = Geometry()
AP = Geometry(view="AP", sdd=1000.0, odd=135.0)


@pytest.fixture(scope="module")
def ct():
    torch.set_num_threads(1)
    return load_ct(4)


@pytest.fixture(scope="module")
def base(ct):
    return {g.view: project(ct.mu, ct.spacing, g, PX) for g in (PA, AP)}


def render(ct, base, name, severity=1.0, side=None, geom=PA, seed=1):
    """(normal, with finding, edits) display images in [0, 1], noise-free."""
    work = ct.mu.copy()
    edits = simulate(name, ct, work, np.random.default_rng(seed), severity, side, geom.view)
    L = base[geom.view].clone()
    for e in edits:
        L += project_box(e.delta, e.start, ct.shape, ct.spacing, geom, PX)
    show = lambda x: expose(x, Exposure(unsharp=0.0), PX).numpy()   # no edge-enhancement halos
    return show(base[geom.view]), show(L), edits


def region(ct, prefixes, geom=PA):
    """Detector footprint (bool PX x PX) of labelled structures (projected label mask)."""
    m = ct.mask(*prefixes).astype(np.float32)
    return project(m, ct.spacing, geom, PX).numpy() > 20.0      # > 20 mm of the structure along the ray


def heart_span(img, ref, heart, thorax):
    """Widest run of heart-bright pixels per row through the heart's centre column, over the
    thoracic width (the cardiothoracic ratio). The per-row threshold, halfway between lung and
    heart intensity, comes from the reference (normal) image so both images are measured alike."""
    cols = np.nonzero(thorax.any(0))[0]
    c0 = int(round(np.nonzero(heart)[1].mean()))
    best = 0
    for r in np.nonzero(heart.any(1) & thorax.any(1))[0]:
        thr = 0.5 * (np.percentile(ref[r, cols.min():cols.max()], 15) + ref[r, c0])
        line = img[r]
        a = b = c0
        while a > cols.min() and line[a - 1] > thr:
            a -= 1
        while b < cols.max() and line[b + 1] > thr:
            b += 1
        best = max(best, b - a + 1)
    return best / (cols.max() - cols.min() + 1)


def test_cardiomegaly_raises_cardiothoracic_ratio(ct, base):
    heart = region(ct, ("heart",))
    thorax = region(ct, ("lung_",))
    normal, sick, _ = render(ct, base, "Cardiomegaly", 1.0)
    _, mild, _ = render(ct, base, "Cardiomegaly", 0.4)
    r0, r_mild, r1 = (heart_span(x, normal, heart, thorax) for x in (normal, mild, sick))
    assert 0.3 < r0 < 0.6                        # this patient's heart is normal-sized
    assert r1 > r0 + 0.06
    assert r0 < r_mild < r1                       # monotonic in severity
    # it grows mostly to the patient's left (image right)
    grow = (sick - normal)[heart.any(1)] > 0.02
    cols = np.nonzero(grow)[1]
    assert (cols > np.nonzero(heart)[1].mean()).mean() > 0.6


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_whitens_costophrenic_angle(ct, base, side):
    lung = region(ct, (f"lung_lower_lobe_{side}",))
    rows, cols = np.nonzero(lung)
    low = rows >= np.percentile(rows, 85)
    lateral = cols >= np.percentile(cols, 70) if side == "left" else cols <= np.percentile(cols, 30)
    cp = (rows[low & lateral], cols[low & lateral])
    normal, sick, _ = render(ct, base, "Pleural Effusion", 0.8, side)
    assert sick[cp].mean() > normal[cp].mean() + 0.05
    other = region(ct, ("lung_lower_lobe_right" if side == "left" else "lung_lower_lobe_left",))
    assert abs(sick[other].mean() - normal[other].mean()) < 0.01   # the other side is untouched


def test_supine_effusion_is_a_basal_veil(ct, base):
    lung = region(ct, ("lung_upper_lobe_right", "lung_lower_lobe_right", "lung_middle_lobe_right"), AP)
    normal, sick, _ = render(ct, base, "Pleural Effusion", 0.8, "right", AP)
    rows = np.nonzero(lung.any(1))[0]
    top = lung & (np.arange(PX)[:, None] < np.percentile(rows, 30))
    bottom = lung & (np.arange(PX)[:, None] > np.percentile(rows, 70))
    rise_top, rise_bottom = (sick - normal)[top].mean(), (sick - normal)[bottom].mean()
    assert rise_bottom > rise_top > 0.0          # hazy over the hemithorax, denser at the base


@pytest.mark.parametrize("side", ["left", "right"])
def test_pneumothorax_darkens_apex(ct, base, side):
    lung = region(ct, (f"lung_upper_lobe_{side}",))
    rows, cols = np.nonzero(lung)
    apex = (rows <= np.percentile(rows, 20))
    normal, sick, _ = render(ct, base, "Pneumothorax", 1.0, side)
    assert sick[rows[apex], cols[apex]].mean() < normal[rows[apex], cols[apex]].mean() - 0.01


def test_lesion_brightens_its_own_spot(ct, base):
    normal, sick, edits = render(ct, base, "Lung Lesion", 1.0, "right", seed=3)
    e = edits[0]
    centre = (np.array(e.start) + np.array(e.delta.shape) / 2 - 0.5 - (np.array(ct.shape) - 1) / 2) * ct.spacing
    u, v = PA.to_detector(centre[::-1])
    c, r = (np.array([u, v]) / PA.detector_mm * PX + PX / 2 - 0.5).round().astype(int)
    assert sick[r - 1:r + 2, c - 1:c + 2].mean() > normal[r - 1:r + 2, c - 1:c + 2].mean() + 0.05
    assert c < PX // 2                            # patient's right is the image's left
    far = np.abs(sick - normal)[:, PX // 2 + 10:]
    assert far.max() < 1e-3                       # nothing changes on the other side


def test_lesion_placed_last_in_aerated_lung_clear_of_shadows(ct):
    """The lesion is simulated after the image's other findings and placed where a frontal film
    shows it: not inside what they filled, its disk projected clear of the shadow organs (heart,
    upper abdomen, clavicle) and of the filled columns. Checked against brute-force distances."""
    from megamed.data.findings import SHADOW_ORGANS, simulation_order

    assert simulation_order(["Atelectasis", "Lung Lesion", "Pleural Effusion"]) == \
        ["Atelectasis", "Pleural Effusion", "Lung Lesion"]
    assert simulation_order(["Cardiomegaly", "Fracture"]) == ["Cardiomegaly", "Fracture"]
    organs = ct.mask(*SHADOW_ORGANS).any(axis=0)                    # (si, lr) columns
    mm = np.stack(np.meshgrid(*[np.arange(n) * sp for n, sp in zip(ct.shape[1:], ct.spacing[1:])],
                              indexing="ij"), -1)                   # (si, lr, 2) column positions
    for seed in range(5):
        work = ct.mu.copy()
        rng = np.random.default_rng(seed)
        for name in ("Cardiomegaly", "Consolidation"):
            simulate(name, ct, work, rng, 1.0, "right", "PA")
        filled = (work - ct.mu > 0.05) & (work >= 0.5)
        severity = 0.2 + 0.15 * seed
        (lesion,) = simulate("Lung Lesion", ct, work, rng, severity, "right", "PA")
        core = np.zeros(ct.shape, bool)
        core[lesion.box] = lesion.delta > 0.3
        assert core.sum() > 10 and (core & filled).sum() <= 0.02 * core.sum()
        r = (10.0 + 30.0 * severity) / 2
        centre = np.argwhere(core).mean(0)[1:] * ct.spacing[1:]      # (si, lr) mm
        for shadow in (organs, filled.any(axis=0)):
            nearest = np.sqrt(((mm[shadow] - centre) ** 2).sum(-1)).min()
            assert nearest > r - 2 * max(ct.spacing[1:]), (seed, nearest, r)


@pytest.mark.parametrize("name", ["Lung Opacity", "Consolidation", "Atelectasis"])
def test_airspace_findings_raise_lung_density(ct, base, name):
    lung = region(ct, ("lung_upper_lobe_left", "lung_lower_lobe_left"))
    normal, sick, _ = render(ct, base, name, 1.0, "left")
    diff = (sick - normal)[lung]
    assert np.percentile(diff, 95) > 0.03 and diff.min() > -1e-3     # clearly denser somewhere, never lighter


def test_devices_add_metal_and_fracture_stays_local(ct, base):
    normal, sick, edits = render(ct, base, "Support Devices", 1.0, seed=2)
    assert np.percentile(sick, 99.8) > np.percentile(normal, 99.8) + 0.02 or sick.max() > normal.max() + 0.05
    normal, sick, edits = render(ct, base, "Fracture", 1.0, "left")
    changed = np.abs(sick - normal) > 1e-3
    assert changed.any() and changed.mean() < 0.02          # a small spot of the image
    assert np.nonzero(changed)[1].mean() > PX // 2           # on the patient's left


def test_edits_stay_in_their_box_and_compose(ct):
    work = ct.mu.copy()
    rng = np.random.default_rng(0)
    total = np.zeros_like(ct.mu)
    for name in ("Cardiomegaly", "Pleural Effusion", "Lung Lesion"):
        for e in simulate(name, ct, work, rng, 0.7, None, "PA"):
            total[e.box] += e.delta
    np.testing.assert_allclose(ct.mu + total, work, atol=1e-5)   # deltas sum to the edited volume
    assert (total != 0).mean() < 0.2


def test_labels_follow_chexpert_convention():
    assert labels_for({})["No Finding"] == 1.0
    lab = labels_for({"Support Devices": {}})
    assert lab["No Finding"] == 1.0 and lab["Support Devices"] == 1.0       # devices are not pathology
    lab = labels_for({"Consolidation": {}, "Cardiomegaly": {}})
    positive = {o for o, v in lab.items() if v == 1.0}
    assert positive == {"Consolidation", "Lung Opacity", "Cardiomegaly", "Enlarged Cardiomediastinum"}
    assert list(lab) == OBSERVATIONS and set(lab.values()) <= {0.0, 1.0}
    for name in ("Lung Lesion", "Atelectasis"):
        assert labels_for({name: {}})["Lung Opacity"] == 1.0
    assert all(labels_for({n: {}})["No Finding"] == (1.0 if n == "Support Devices" else 0.0) for n in FINDINGS)
    with pytest.raises(ValueError, match="Edema"):
        labels_for({"Edema": {}})


@pytest.mark.parametrize("kw, word", [(dict(name="Nodule"), "finding"), (dict(severity=0.0), "severity"),
                                      (dict(severity=1.5), "severity"), (dict(side="up"), "side"),
                                      (dict(view="LAT"), "view")])
def test_bad_input(ct, kw, word):
    args = dict(name="Lung Lesion", severity=0.5, side="left", view="PA") | kw
    with pytest.raises(ValueError, match=word):
        simulate(args["name"], ct, ct.mu.copy(), np.random.default_rng(0), args["severity"], args["side"], args["view"])

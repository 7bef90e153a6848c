"""megamed.measure: against hand-built phantoms with known geometry, and on radiographs rendered
from the project's CT with and without the cardiomegaly finding (same body, same pose)."""
import math

import numpy as np
import pytest

from megamed.measure import cardiothoracic_ratio, heart_and_thorax, heart_width, lung_masks


def phantom(h=128, w=128, notch=80, seed=0):
    """Body 0.7 on a black background, two dark rectangular lungs (0.2), rows 20..100.
    Image-left lung: cols 16..55. Image-right lung: cols 72..111, but from row 70 down it starts
    at col `notch` (the heart bulging into it). Expected: heart = notch - 55 - 1, thorax = 96."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w))
    img[:, 4:w - 4] = 0.7
    img[20:101, 16:56] = 0.2
    img[20:70, 72:112] = 0.2
    img[70:101, notch:112] = 0.2
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)


def test_phantom_exact_geometry():
    for notch, heart in [(72, 16), (80, 24), (90, 34)]:
        m = heart_and_thorax(phantom(notch=notch))
        # edges move by ~1 px: the lung threshold sits below the midpoint of lung and body
        assert abs(m["heart_width"] - heart) <= 2, (notch, m)
        assert abs(m["thoracic_width"] - 96) <= 2, m
        assert m["ctr"] == pytest.approx(heart / 96, abs=0.03)
        assert (70 if notch > 72 else 55) <= m["heart_row"] <= 100   # lower half of the lungs


def test_phantom_awkward_size_and_masks():
    # 97 x 75: the same layout squeezed; masks are the two rectangles, nothing from the background
    img = np.zeros((97, 75))
    img[:, 2:73] = 0.7
    img[15:80, 8:33] = 0.15
    img[15:80, 42:67] = 0.15
    left, right = lung_masks(img)
    assert left[40, 20] and right[40, 55] and not left[40, 38] and not right[40, 38]
    assert not left[:, 40:].any() and not right[:, :36].any()
    assert heart_width(img) == pytest.approx(42 - 32 - 1, abs=2)   # +-1 px per edge (threshold bias)
    assert cardiothoracic_ratio(img) == pytest.approx(9 / 59, abs=0.05)


def test_integer_input_and_blank_image():
    img16 = (phantom() * 65535).astype(np.uint16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):   # integers must be scaled by the caller
        cardiothoracic_ratio(img16)
    assert math.isnan(cardiothoracic_ratio(np.full((64, 64), 0.5)))
    assert math.isnan(cardiothoracic_ratio(np.zeros((64, 64))))
    assert math.isnan(heart_width(np.full((64, 64), 0.5)))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8)), "16x16"),
    (np.zeros((32, 32, 3)), "2-D"),
    (np.full((32, 32), np.nan), "NaN"),
    (np.full((32, 32), 1.5), r"\[0, 1\]"),
    (np.full((32, 32), -0.1), r"\[0, 1\]"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        cardiothoracic_ratio(bad)


def _render(view: str, size: int, cardiomegaly: bool):
    import torch

    from megamed.data.ct import load_ct
    from megamed.data.drr import Exposure, Geometry, expose, project, project_box
    from megamed.data.findings import simulate

    body = load_ct(2)   # body seed 0: the undeformed CT (no deformation cost)
    geom = Geometry(view="PA") if view == "PA" else Geometry(view="AP", sdd=1000.0, odd=135.0)
    L = project(body.mu, body.spacing, geom, size)
    if cardiomegaly:
        work = body.mu.copy()
        for e in simulate("Cardiomegaly", body, work, np.random.default_rng(1), 1.0, "none", view):
            L = L + project_box(e.delta, e.start, body.shape, body.spacing, geom, size)
    return expose(L, Exposure(), size, torch.Generator().manual_seed(0)).numpy()


@pytest.mark.parametrize("view, size", [("PA", 128), ("AP", 96)])
def test_cardiomegaly_raises_ctr_on_rendered_radiographs(view, size):
    normal = heart_and_thorax(_render(view, size, False))
    big = heart_and_thorax(_render(view, size, True))
    assert 0.3 < normal["ctr"] < 0.65, normal             # a plausible normal CTR
    assert big["ctr"] > normal["ctr"] + 0.1, (normal, big)
    assert big["heart_width"] > normal["heart_width"]
    # same body: the thorax moves little (the enlarged heart can hide the image-right lung's
    # lower lateral recess, which shaves ~10% off; the heart grows far more than that)
    assert abs(big["thoracic_width"] - normal["thoracic_width"]) <= 0.12 * normal["thoracic_width"]
    assert big["heart_width"] / normal["heart_width"] > 1.25

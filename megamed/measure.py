"""Measurements on a frontal chest radiograph, from the IMAGE alone (no labels, no CT).

Used by the quickstart to check that generated images change with the prompt the way the
findings do, e.g. "cardiomegaly" widens the cardiac silhouette relative to the chest.

How the cardiothoracic ratio (CTR) is measured, on img [H, W] in [0, 1] (bright = dense):

  1. smooth a little and threshold the lungs: they are the dark air regions INSIDE the body.
     The threshold is Otsu's, computed only on pixels inside the body (the black background
     outside the patient would otherwise pull it down), from the central columns.
  2. open the dark mask (cuts thin bridges), drop dark components touching the image border
     (outside the thorax), keep the largest remaining one in each half of the image: the
     image-left and image-right lung. Anything else dark (stomach gas, noise) is dropped.
  3. for every row: gap(row) = inner edge of the right lung - inner edge of the left lung - 1,
     the mediastinum (spine, great vessels) above and the heart below.
  4. heart width = max gap over the lower half of the image-left lung, above its base (where
     the heart sits on the diaphragm; below the base the lung tapers into its costophrenic
     recess); thoracic width = outermost right-lung column - outermost left-lung column + 1;
     CTR = heart / thorax.
     (A radiologist's CTR: widest cardiac diameter / widest internal thoracic diameter.)

Sizes are in pixels, so a measurement is resolution independent only as a ratio. If two
lungs cannot be found (a blank or very blurry image), the measures are NaN, not an error:
the caller counts how many images were measurable.
"""
from __future__ import annotations

import math

import numpy as np

MIN_LUNG_FRACTION = 0.005   # a lung component must cover >= 0.5% of the image
LUNG_LEVEL = 0.7            # lung threshold between the two Otsu levels (0 = first, 1 = second)


def _check_image(img) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"img: expected a 2-D [H, W] array, got shape {img.shape}")
    if min(img.shape) < 16:
        raise ValueError(f"img: at least 16x16 pixels needed, got {img.shape}")
    if not np.issubdtype(img.dtype, np.floating) and not np.issubdtype(img.dtype, np.integer):
        raise ValueError(f"img: expected a numeric array, got dtype {img.dtype}")
    img = img.astype(np.float64)
    if not np.isfinite(img).all():
        raise ValueError("img: contains NaN or Inf")
    if img.min() < 0 or img.max() > 1:
        raise ValueError(f"img: values must be in [0, 1], got {img.min():.3g}..{img.max():.3g}")
    return img


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(float(values.min()), float(values.max()) + 1e-9))
    p = hist / max(1, hist.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = -1
    return float(centres[int(np.argmax(between))])


def _opening_radius(w: int) -> int:
    return max(1, round(w / 40))   # ~3 px at 128^2: wider than a chest-wall strip, far thinner than a lung


def lung_masks(img) -> tuple[np.ndarray, np.ndarray] | None:
    """(image-left lung, image-right lung) boolean masks [H, W], or None if not found."""
    from scipy import ndimage

    img = _check_image(img)
    h, w = img.shape
    smooth = ndimage.gaussian_filter(img, sigma=max(0.5, w / 128))
    # body = not the black background: Otsu on the whole image separates air outside the patient
    body = smooth > _otsu(smooth.ravel()) * 0.5
    body = ndimage.binary_fill_holes(body)
    core = smooth[:, w // 8: w - w // 8][body[:, w // 8: w - w // 8]]   # body pixels, central columns
    if core.size < 64 or core.max() - core.min() < 1e-3:
        return None
    # Two Otsu levels: the first splits air-containing tissue (lungs AND the thin soft tissue
    # of the chest wall / axillae) from dense tissue; the second, within the darker class,
    # keeps the lungs' air, which is darker still than the chest wall.
    t1 = _otsu(core)
    t2 = _otsu(core[core < t1]) if (core < t1).sum() >= 64 else t1
    dark = (smooth < LUNG_LEVEL * t2 + (1 - LUNG_LEVEL) * t1) & body
    # opening cuts the thin dark bridges between a lung and the soft tissue outside the ribs
    r = _opening_radius(w)
    disk = np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r
    dark = ndimage.binary_opening(dark, structure=disk)
    labels, n = ndimage.label(dark)
    if n == 0:
        return None
    # dark regions touching the image border are outside the thorax (axilla, background)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    dark[np.isin(labels, border[border > 0])] = False
    labels, n = ndimage.label(dark)
    if n == 0:
        return None
    sizes = ndimage.sum(dark, labels, index=np.arange(1, n + 1))
    centroids = ndimage.center_of_mass(dark, labels, index=np.arange(1, n + 1))
    out = []
    for half in (0, 1):
        best, best_size = None, MIN_LUNG_FRACTION * h * w
        for k in range(n):
            cy, cx = centroids[k]
            in_half = cx < w / 2 if half == 0 else cx >= w / 2
            if in_half and sizes[k] > best_size:
                best, best_size = k + 1, sizes[k]
        if best is None:
            return None
        out.append(labels == best)
    return out[0], out[1]


def heart_and_thorax(img) -> dict:
    """{"heart_width", "thoracic_width" (px), "ctr", "heart_row"} (NaNs when lungs are not found)."""
    nan = {"heart_width": math.nan, "thoracic_width": math.nan, "ctr": math.nan, "heart_row": -1}
    masks = lung_masks(img)
    if masks is None:
        return nan
    left, right = masks
    r = _opening_radius(left.shape[1])
    both = np.flatnonzero(left.any(1) & right.any(1))       # rows where both lungs are seen
    if both.size < 4:
        return nan
    h, w = left.shape
    cols = np.arange(w)
    big = np.iinfo(np.int64).max
    # per row [H]: outer and inner column of each lung (-1 / big where the lung is absent)
    l_min, l_max = np.where(left, cols, big).min(1), np.where(left, cols, -1).max(1)
    r_min, r_max = np.where(right, cols, big).min(1), np.where(right, cols, -1).max(1)
    # Thorax: outermost lung columns over ALL rows (an enlarged heart hides the lower rows of
    # the image-right lung, so a per-row span would shrink with the heart).
    chest_wall = r_max.max()                                # image-right chest wall (outermost lung)
    thorax = chest_wall - l_min.min() + 1
    # Heart rows: the lower half of the image-LEFT lung (the patient's right, which an enlarged
    # heart does not displace), down to its base: the last row at least half as wide as its
    # widest row (below, the lung tapers into the costophrenic recess and the gap between
    # the lungs would measure the diaphragm). The heart grows towards image right: where it
    # has pushed the image-right lung out of a row entirely, it reaches the chest wall.
    l_rows = np.flatnonzero(left.any(1))
    l_w = left.sum(1)
    # stop r rows above the base: the opening rounds a lung's corners there (radius r)
    base = np.flatnonzero(l_w >= 0.5 * l_w.max())[-1] - r
    top = min(l_rows[0], np.flatnonzero(right.any(1))[0])
    heart_rows = np.arange(int(top + (base - top) / 2), base + 1)
    right_border = np.where(r_max[heart_rows] >= 0, r_min[heart_rows], chest_wall + 1)
    gap = right_border - l_max[heart_rows] - 1              # [rows] heart (mediastinum) width
    k = int(np.argmax(gap))
    heart, chest = float(gap[k]), float(thorax)
    if heart <= 0 or chest <= 0:
        return nan
    return {"heart_width": heart, "thoracic_width": chest, "ctr": heart / chest, "heart_row": int(heart_rows[k])}


def cardiothoracic_ratio(img) -> float:
    """Widest cardiac silhouette / widest internal thorax, in (0, 1); NaN if not measurable."""
    return heart_and_thorax(img)["ctr"]


def heart_width(img) -> float:
    """Widest cardiac silhouette in pixels; NaN if not measurable."""
    return heart_and_thorax(img)["heart_width"]

"""Radiological findings simulated in 3-D on the (deformed) CT, before projection.

Each finding reads the TotalSegmentator label map to know where the heart, lungs (lobes),
ribs, trachea and great veins are, and edits attenuation only inside a bounding box:

    edit = simulate(name, body, work, rng, severity, side, view)  ->  Edit(start, delta)

`work` is the body's mu (D, H, W) = (ap, si, lr), edited in place so findings compose
(an effusion under a consolidation sees the consolidation); `delta` (d, h, w) is what this
finding changed, so drr.project_box(delta) adds exactly its contribution to the radiograph.
Severity is in (0, 1]; side is the PATIENT's side ("left" = high lr index).

Findings are keyed by their CheXpert observation name (metadata.csv's findings column):

    Cardiomegaly      heart mask scaled about a point near its right border: grows mostly
                      to the left, a little in depth and height (-> + Enlarged Cardiomediastinum)
    Pleural Effusion  water in the pleural space at the lung base. PA (upright): fluid fills
                      the lowest lung up to a meniscus that rises laterally (blunted
                      costophrenic angle). AP (supine): fluid layers posteriorly, a veil
                      denser towards the base.
    Lung Opacity      ill-defined ground-glass blob in one lobe (partial density)
    Consolidation     dense lobar/segmental blob, bronchi left aerated (air bronchograms)
                      (-> + Lung Opacity)
    Pneumothorax      lung shrunk towards its hilum: air between chest wall and a thin
                      visceral pleural line, apical and lateral
    Lung Lesion       round nodule/mass 10-40 mm, soft-tissue density, lobulated, in aerated
                      lung whose frontal projection is clear of the heart, the upper abdomen
                      and denser lung (-> + Lung Opacity)
    Atelectasis       plate-like band of collapsed lung in a lower lobe (or the right
                      upper lobe) (-> + Lung Opacity)
    Support Devices   some of: endotracheal tube, central venous line, ECG leads, pacemaker
                      (thin metal: HU 3000, drawn thick in depth to match metal's much higher
                      attenuation at radiographic energies)
    Fracture          a rib cut through with a gap and its lateral fragment displaced

No Finding convention (CheXpert's labeller): support devices are not a pathology, so an
image whose only finding is Support Devices keeps No Finding = 1.0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from megamed.data.ct import CTVolume
from megamed.data.layout import OBSERVATIONS

# Bump when a change to a finding changes the images of an unchanged plan: example.json records
# it, so a folder rendered by another version is never resumed or grown into a mixed set.
# 2: lung lesions are simulated last and placed where a frontal film shows them.
FINDINGS_VERSION = 2
SIDES = ("left", "right", "bilateral", "none")
WATER, SOFT = 1.0, 1.04   # mu / mu_water of pleural fluid and of collapsed/consolidated lung
METAL = 4.0               # HU 3000 at CT energies
# Devices are thinner than a voxel and metal absorbs radiographic photons far more than CT
# numbers suggest (photoelectric effect); one voxel-wide wire of HU 3000 would be invisible,
# so drawn metal gets DEVICE_GAIN x METAL (partial volume x energy correction).
DEVICE_GAIN = 4.0


@dataclass
class Edit:
    start: tuple            # (ap, si, lr) voxel index of delta[0, 0, 0]
    delta: np.ndarray       # (d, h, w) float32 change of mu

    @property
    def box(self) -> tuple:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.delta.shape))


# -----------------------------------------------------------------------------------------
# helpers

def _bbox(mask: np.ndarray, pad: int | tuple = 0, shape: tuple | None = None) -> tuple:
    """Bounding box slices of a boolean mask, grown by pad voxels per axis (clipped)."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        raise ValueError("empty mask: the structure is not in this CT")
    pad = (pad,) * 3 if isinstance(pad, int) else pad
    shape = shape or mask.shape
    return tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + 1 + p)) for i, p, n in zip(idx, pad, shape))


def _coords(body: CTVolume, box: tuple) -> tuple:
    """Physical (z, y, x) mm coordinates (broadcastable, origin at volume centre) of a box."""
    out = []
    for ax, (sl, sp, n) in enumerate(zip(box, body.spacing, body.shape)):
        c = (np.arange(sl.start, sl.stop) - (n - 1) / 2) * sp
        shape = [1, 1, 1]
        shape[ax] = len(c)
        out.append(c.reshape(shape).astype(np.float32))
    return tuple(out)


def _lung_ids(body: CTVolume, side: str) -> list[int]:
    sides = ("left", "right") if side in ("bilateral", "none") else (side,)
    return [i for s in sides for i in body.ids("lung_") if _label_name(body, i).endswith(s)]


def _label_name(body: CTVolume, label_id: int) -> str:
    for name, i in body.structures.items():
        if i == label_id:
            return name
    raise KeyError(label_id)


def _pick_side(rng: np.random.Generator, side: str | None, choices=("left", "right")) -> str:
    return side if side is not None else str(rng.choice(choices))


def _smooth_noise(rng: np.random.Generator, shape: tuple, cells: int = 4) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] on a box (lobulated edges, patchy density)."""
    coarse = rng.normal(size=tuple(cells for _ in shape))
    return ndimage.zoom(coarse, [n / cells for n in shape], order=1, mode="nearest")[
        tuple(slice(0, n) for n in shape)].astype(np.float32)


def _commit(work: np.ndarray, box: tuple, new: np.ndarray) -> Edit:
    delta = (new - work[box]).astype(np.float32)
    work[box] = new
    return Edit(tuple(s.start for s in box), delta)


def _not_bone(body: CTVolume, box: tuple) -> np.ndarray:
    return body.mu[box] < 1.15


def _visible_lung(body: CTVolume, mask: np.ndarray, box: tuple) -> np.ndarray:
    """Restrict lung candidates (mask lives in box) to where a frontal film shows them:
    lateral of the mediastinum (|x| > 45 mm) and above the diaphragm's dome region.
    Falls back to the whole mask when that leaves nothing."""
    z, y, x = _coords(body, box)
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    if len(ys) == 0:
        return mask
    y_cut = y.ravel()[int(ys.min() + 0.75 * (ys.max() - ys.min()))]
    sel = mask & (np.abs(x) > 45.0) & (y < y_cut)
    return sel if sel.any() else mask


def _wall_distance(mask: np.ndarray, spacing: tuple) -> np.ndarray:
    """Distance (mm) from each True voxel to the nearest False one, computed on a 2x coarser
    in-plane grid (4x faster; a millimetre of error does not matter for smooth findings)."""
    coarse = mask[::2, :, ::2]
    d = ndimage.distance_transform_edt(coarse, sampling=(spacing[0] * 2, spacing[1], spacing[2] * 2))
    d = np.repeat(np.repeat(d, 2, axis=0), 2, axis=2)[: mask.shape[0], :, : mask.shape[2]]
    return np.where(mask, d, 0.0).astype(np.float32)


def _random_voxel(rng: np.random.Generator, mask: np.ndarray, box: tuple) -> np.ndarray:
    """Global index (3,) of a uniformly chosen True voxel of mask (which lives in box)."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        raise ValueError("no candidate voxel for this finding")
    return idx[rng.integers(len(idx))] + np.array([s.start for s in box])


# -----------------------------------------------------------------------------------------
# the findings

def cardiomegaly(body, work, rng, severity, side, view) -> Edit:
    heart = body.mask("heart", "atrial_appendage_left")
    hb = _bbox(heart)
    f = np.array([1 + 0.15 * severity, 1 + 0.20 * severity, 1 + 0.65 * severity])   # (ap, si, lr) scale
    # scale about a point near the heart's RIGHT border: the left ventricle grows leftwards
    idx = np.argwhere(heart[hb]) + [s.start for s in hb]
    centre = idx.mean(0)
    anchor = centre.copy()
    anchor[2] = np.percentile(idx[:, 2], 15)
    grow = np.ceil((np.array([s.stop - s.start for s in hb]) * (f - 1))).astype(int) + 2
    box = _bbox(heart, pad=tuple(grow), shape=heart.shape)
    # inverse map: output voxel i came from anchor + (i - anchor) / f
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    src = [anchor[k] + (grids[k] - anchor[k]) / f[k] for k in range(3)]
    # smooth the scaled mask so the enlarged silhouette is round, not the label map's staircase
    inside = ndimage.map_coordinates(heart.astype(np.float32), src, order=1)
    inside = ndimage.gaussian_filter(inside, sigma=(2.0, 1.0, 2.0)) > 0.5
    new = work[box].copy()
    replace = inside & _not_bone(body, box)
    new[replace] = np.maximum(new[replace], SOFT)        # blood and myocardium: homogeneous soft tissue
    return _commit(work, box, new)


def pleural_effusion(body, work, rng, severity, side, view) -> Edit:
    side = _pick_side(rng, side, ("left", "right", "bilateral"))
    lung = np.isin(body.labels, _lung_ids(body, side))
    box = _bbox(lung, pad=2)
    lung_b = lung[box]
    z, y, x = _coords(body, box)
    new = work[box].copy()
    for s in (("left", "right") if side == "bilateral" else (side,)):
        m = lung_b & ((x > 0) if s == "left" else (x < 0))
        if not m.any():
            continue
        ys = np.nonzero(m.any(axis=(0, 2)))[0]
        y_top, y_bot = y.ravel()[ys.min()], y.ravel()[ys.max()]
        height = y_bot - y_top
        xs = x.ravel()[np.nonzero(m.any(axis=(0, 1)))[0]]
        x_med = xs.max() if s == "right" else xs.min()          # mediastinal edge
        lat = np.clip(np.abs(x - x_med) / (xs.max() - xs.min()), 0, 1)   # 0 medial .. 1 lateral
        if view == "PA":
            # upright: fluid fills the base and climbs the chest wall (meniscus): a voxel is
            # wet below a level that is higher the closer it lies to the pleural surface, so the
            # top of the opacity is concave, highest laterally, and fades instead of a flat line
            wall = _wall_distance(m, body.spacing)                               # mm to the pleura
            level = y_bot - height * (0.10 + 0.30 * severity) \
                - (25.0 + 60.0 * severity) * np.exp(-wall / 12.0) * (0.4 + 0.6 * lat)
            fluid = m & (y > level)
        else:
            # supine: fluid layers in the dependent (posterior) pleural space, deeper at the base
            zs = z.ravel()[np.nonzero(m.any(axis=(1, 2)))[0]]
            depth = z - zs.min()                                 # mm from the most posterior lung
            frac = np.clip((y - y_top) / height, 0, 1)
            thick = (25.0 + 75.0 * severity) * (0.35 + 0.65 * frac)
            fluid = m & (depth < thick)
        new[fluid] = WATER
    return _commit(work, box, new)


def _lobe_blob(body, work, rng, severity, side, dense: bool) -> Edit:
    side = _pick_side(rng, side)
    lobe = int(rng.choice(_lung_ids(body, side)))
    lobe_mask = body.labels == lobe
    lb = _bbox(lobe_mask)
    c = _random_voxel(rng, _visible_lung(body, ndimage.binary_erosion(lobe_mask[lb], iterations=3), lb), lb)
    radius = (30.0 + 40.0 * severity) * (1.0 if dense else 1.3)
    r_vox = np.ceil(radius * 1.4 / np.array(body.spacing)).astype(int)
    box = tuple(slice(max(0, ci - r), min(n, ci + r + 1)) for ci, r, n in zip(c, r_vox, body.shape))
    z, y, x = _coords(body, box)
    cz, cy, cx = [(ci - (n - 1) / 2) * sp for ci, n, sp in zip(c, body.shape, body.spacing)]
    d = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / radius
    w = np.clip(1.2 - d + 0.35 * _smooth_noise(rng, d.shape), 0, 1)          # patchy, soft edge
    w = np.clip(w * 3, 0, 1) if dense else w * (0.35 + 0.35 * severity)
    inside = body.labels[box] == lobe                                          # stops at the fissures
    cur = work[box]
    new = cur.copy()
    target = SOFT if dense else 0.9
    mix = cur + w * (target - cur)
    if dense:
        mix = np.where(cur < 0.05, cur, mix)     # air bronchograms: aerated bronchi stay dark
    new[inside] = np.maximum(cur, mix)[inside]
    return _commit(work, box, new)


def lung_opacity(body, work, rng, severity, side, view) -> Edit:
    return _lobe_blob(body, work, rng, severity, side, dense=False)


def consolidation(body, work, rng, severity, side, view) -> Edit:
    return _lobe_blob(body, work, rng, severity, side, dense=True)


def pneumothorax(body, work, rng, severity, side, view) -> Edit:
    side = _pick_side(rng, side)
    lung = np.isin(body.labels, _lung_ids(body, side))
    box = _bbox(lung, pad=2)
    lung_b = lung[box]
    idx = np.argwhere(lung_b)
    # anchor low and medial: the lung falls away from the apex and lateral wall (where free air
    # rises in an upright patient) and stays on the diaphragm
    hil = np.array([np.median(idx[:, 0]), np.percentile(idx[:, 1], 97),
                    np.percentile(idx[:, 2], 90 if side == "right" else 10)])
    k = 1.0 - (0.15 + 0.35 * severity)                                          # lung keeps k of its size
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in lung_b.shape], indexing="ij")
    src = [hil[i] + (grids[i] - hil[i]) / k for i in range(3)]
    collapsed = ndimage.map_coordinates(lung_b.astype(np.float32), src, order=1) > 0.5
    tex = ndimage.map_coordinates(body.mu[box], src, order=1)
    cur = work[box]
    new = cur.copy()
    air = lung_b & ~collapsed
    new[air] = 0.0                                                              # free pleural air
    # collapsed lung: its tissue compressed into less volume, a bit denser
    new[collapsed & lung_b] = np.clip(tex[collapsed & lung_b] / k, 0, SOFT)
    # visceral pleural line: the collapsed lung's surface, one voxel, soft-tissue density
    # (only where free air lies outside it: that is what makes the line visible)
    rim = collapsed & ~ndimage.binary_erosion(collapsed) & lung_b & ndimage.binary_dilation(air)
    new[rim] = 1.2
    return _commit(work, box, new)


# Organs whose shadow hides a nodule on a frontal film: the film sums the whole ray, so a nodule
# in front of or behind the heart, in the lung that dips behind the diaphragm's dome over the
# liver, spleen or stomach, or in the apex behind the clavicle, adds little to a bright column.
SHADOW_ORGANS = ("heart", "atrial_appendage", "aorta", "pulmonary_vein", "superior_vena_cava",
                 "inferior_vena_cava", "esophagus", "liver", "spleen", "stomach", "clavicula")
CHANGED = 0.05  # |mu change| (units of water) that marks a voxel an earlier finding edited
FILLED = 0.5    # edited to at least this: filled (fluid, consolidation, collapse, heart)
EMPTIED = 0.02  # edited to below this: free air (a pneumothorax's pleural space)


def _filled_emptied(body: CTVolume, work: np.ndarray, box: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of box an earlier finding filled, and those it emptied (work = body.mu + edits)."""
    w = work[box]
    changed = np.abs(w - body.mu[box]) > CHANGED
    return changed & (w >= FILLED), changed & (w < EMPTIED)


def _shadow_free(shadow: np.ndarray, spacing: tuple, r: float) -> np.ndarray:
    """(h, w) columns at least r mm (in the image plane) from every shadow column."""
    return ndimage.distance_transform_edt(~shadow, sampling=spacing[1:]) > r


def lung_lesion(body, work, rng, severity, side, view) -> Edit:
    """Simulated after every other finding of its image (simulation_order), so it can avoid
    them: a nodule inside a consolidation, under an effusion or in a collapsed lung changes the
    image by almost nothing, and its label would name a finding no reader could see."""
    side = _pick_side(rng, side)
    lung = np.isin(body.labels, _lung_ids(body, side))
    diam = 10.0 + 30.0 * severity
    r = diam / 2
    lb = _bbox(lung)
    # Candidate centres, each constraint dropped (the last first) only if nothing is left, so a
    # lesion is always placed:
    #   1. deep enough in aerated lung (not filled or emptied by an earlier finding) that the
    #      lesion is surrounded by lung
    #   2. lateral of the mediastinum and above the dome (_visible_lung)
    #   3. its whole disk projected clear of the shadow organs
    #   4. ... and clear of what earlier findings filled
    filled, emptied = _filled_emptied(body, work, lb)
    deep = _wall_distance(lung[lb] & ~filled & ~emptied, body.spacing) > max(r, 8.0)
    if not deep.any():
        deep = _wall_distance(lung[lb], body.spacing) > max(r, 8.0)
    cand = _visible_lung(body, deep, lb)
    organs = np.isin(body.labels[:, lb[1], lb[2]], body.ids(*SHADOW_ORGANS)).any(axis=0)   # whole rays
    for shadow in (organs, organs | filled.any(axis=0)):
        narrower = cand & _shadow_free(shadow, body.spacing, r)[None]
        if narrower.any():
            cand = narrower
    c = _random_voxel(rng, cand, lb)
    r_vox = np.ceil(1.5 * r / np.array(body.spacing)).astype(int) + 1
    box = tuple(slice(max(0, ci - rv), min(n, ci + rv + 1)) for ci, rv, n in zip(c, r_vox, body.shape))
    z, y, x = _coords(body, box)
    cz, cy, cx = [(ci - (n - 1) / 2) * sp for ci, n, sp in zip(c, body.shape, body.spacing)]
    d = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2)
    rr = r * (1 + 0.15 * _smooth_noise(rng, d.shape, cells=3))                 # lobulated margin
    w = np.clip((rr - d) / 1.5 + 0.5, 0, 1)                                     # ~1.5 mm soft edge
    cur = work[box]
    new = np.maximum(cur, cur + w * (SOFT - cur))
    return _commit(work, box, new)


def atelectasis(body, work, rng, severity, side, view) -> Edit:
    """Lobar volume loss: the lobe collapses towards its hilar corner into a dense wedge.

    The space it gives up stays aerated lung (the neighbouring lobe over-expands and the fissure
    shifts), so only the collapsed lobe itself gets denser: for the left lower lobe the classic
    triangular retrocardiac opacity, for the right upper lobe a paratracheal wedge.
    """
    side = _pick_side(rng, side)
    names = [f"lung_lower_lobe_{side}"] + (["lung_upper_lobe_right"] if side == "right" else [])
    name = str(rng.choice(names))
    lobe_mask = body.labels == body.structures[name]
    box = _bbox(lobe_mask, pad=1)
    inside = lobe_mask[box]
    idx = np.argwhere(inside)
    medial = 90 if side == "right" else 10
    upper = "upper" in name
    anchor = np.array([np.percentile(idx[:, 0], 25 if not upper else 50),            # posterior
                       np.percentile(idx[:, 1], 5 if upper else 70),                 # apex / lower
                       np.percentile(idx[:, 2], medial)])                            # medial
    k = np.array([0.85, 0.75, 0.65]) - 0.35 * severity                             # kept size per axis
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in inside.shape], indexing="ij")
    src = [anchor[i] + (grids[i] - anchor[i]) / k[i] for i in range(3)]
    collapsed = ndimage.map_coordinates(inside.astype(np.float32), src, order=1) > 0.5
    cur = work[box]
    new = cur.copy()
    # lung tissue squeezed into prod(k) of its volume: density rises towards soft tissue
    dense = np.clip(cur / float(np.prod(k)), 0, SOFT)
    sel = collapsed & inside
    new[sel] = np.maximum(cur[sel], dense[sel])
    return _commit(work, box, new)


def _tube(work: np.ndarray, body: CTVolume, points_mm: np.ndarray, radius_mm: float, mu: float) -> Edit:
    """Draw a tube along a polyline (N, 3) of (z, y, x) mm points; returns its Edit."""
    sp = np.array(body.spacing)
    ctr = (np.array(body.shape) - 1) / 2
    # densely resample the polyline, then splat spheres of the radius
    seg = np.linalg.norm(np.diff(points_mm, axis=0), axis=1)
    t = np.concatenate([[0], np.cumsum(seg)])
    s = np.arange(0, t[-1], 0.5)
    pts = np.stack([np.interp(s, t, points_mm[:, k]) for k in range(3)], 1)   # (M, 3)
    vox = pts / sp + ctr
    pad = np.ceil(radius_mm / sp).astype(int) + 2
    lo = np.maximum(np.floor(vox.min(0)).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(vox.max(0)).astype(int) + pad + 1, body.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = np.zeros([b - a for a, b in zip(lo, hi)], bool)
    ii = np.round(vox - lo).astype(int)
    ii = ii[(ii >= 0).all(1) & (ii < mask.shape).all(1)]
    mask[tuple(ii.T)] = True
    dist = ndimage.distance_transform_edt(~mask, sampling=sp)
    w = np.clip(radius_mm + 0.5 - dist, 0, 1).astype(np.float32)
    new = np.maximum(work[box], w * mu)
    return _commit(work, box, new)


def _centreline(body: CTVolume, name: str) -> np.ndarray:
    """(K, 3) mm points: the structure's centroid per axial row (si), top to bottom."""
    m = body.mask(name)
    out = []
    ctr = (np.array(body.shape) - 1) / 2
    for yi in np.nonzero(m.any(axis=(0, 2)))[0]:
        a, b = np.nonzero(m[:, yi, :])
        out.append([a.mean(), yi, b.mean()])
    if not out:
        raise ValueError(f"{name} is not in this CT")
    return (np.array(out) - ctr) * np.array(body.spacing)


def support_devices(body, work, rng, severity, side, view) -> list[Edit]:
    """1-3 of: endotracheal tube, central venous line, pacemaker (+ lead), ECG electrodes.
    Severity has no meaning for devices and is ignored; side is chosen per device."""
    kinds = ["ett", "line", "ecg", "pacer"]
    n = 1 + int(rng.random() < 0.6) + int(rng.random() < 0.3)
    chosen = list(rng.choice(kinds, size=n, replace=False))
    edits = []
    depth = body.extent_mm[0] / 2
    sp = np.array(body.spacing)
    ctr = (np.array(body.shape) - 1) / 2
    if "ett" in chosen:
        tr = _centreline(body, "trachea")
        tip = len(tr) - 1 - int(rng.uniform(8, 16))        # 2-4 cm above the carina (2.5 mm rows)
        path = tr[: max(tip, 2)]
        path = np.concatenate([path[:1] - [0, 60, 0], path])    # exit through the mouth above the CT
        for off in (-3.0, 3.0):                                 # two walls of a radiopaque stripe
            edits.append(_tube(work, body, path + [0, 0, off], 0.7, METAL * DEVICE_GAIN / 2))
    if "line" in chosen:
        svc = _centreline(body, "superior_vena_cava")
        s = str(rng.choice(["left", "right"]))
        sub = _centreline(body, f"brachiocephalic_vein_{s}")
        path = np.concatenate([sub[:: max(1, len(sub) // 6)], svc[: len(svc) * 2 // 3: max(1, len(svc) // 6)]])
        path = np.concatenate([path[:1] + [0, -40, 40 if s == "left" else -40], path])
        edits.append(_tube(work, body, path, 0.9, METAL * DEVICE_GAIN))
    if "pacer" in chosen:
        s = "left" if rng.random() < 0.8 else "right"
        sign = 1 if s == "left" else -1
        can = np.array([depth * 0.55, -body.extent_mm[1] * 0.27, sign * 85.0])   # infraclavicular
        # the generator: a flat metal box under the skin of the upper anterior chest
        c = np.round(can / sp + ctr).astype(int)
        half = np.ceil(np.array([4.0, 20.0, 23.0]) / sp).astype(int)
        box = tuple(slice(max(0, a - h), a + h + 1) for a, h in zip(c, half))
        z, y, x = _coords(body, box)
        # a rounded can: superellipse in the coronal plane, 8 mm thick
        r = ((np.abs(y - can[1]) / 20.0) ** 3 + (np.abs(x - can[2]) / 23.0) ** 3) ** (1 / 3)
        can_w = np.clip((1.0 - r) * 20.0, 0, 1) * (np.abs(z - can[0]) <= 4.0)
        edits.append(_commit(work, box, np.maximum(work[box], can_w * METAL * DEVICE_GAIN)))
        # the lead: subclavian vein -> superior vena cava -> right atrium -> right ventricular apex
        svc = _centreline(body, "superior_vena_cava")
        hidx = np.argwhere(body.mask("heart"))
        hmm = (hidx - ctr) * sp                                                   # (n, 3) z, y, x mm
        apex = hmm[np.argmax(hmm[:, 1] + 0.6 * hmm[:, 2] + 0.3 * hmm[:, 0])]    # inferior, left, anterior
        ra = svc[-1] + [0.0, 25.0, 0.0]
        lead = np.concatenate([[can, can + [0, 5, -sign * 30], svc[0] + [0, -10, sign * 15]],
                               svc[::max(1, len(svc) // 4)], [ra, 0.5 * (ra + apex) + [0, 10, 0], apex]])
        edits.append(_tube(work, body, lead, 0.9, METAL * DEVICE_GAIN))
    if "ecg" in chosen:
        for k in range(int(rng.integers(3, 6))):
            # electrodes on the anterior skin: small metal buttons
            xk = rng.uniform(-120, 120)
            yk = rng.uniform(-0.4, 0.3) * body.extent_mm[1]
            col = body.mu[:, int(yk / body.spacing[1] + (body.shape[1] - 1) / 2),
                          int(xk / body.spacing[2] + (body.shape[2] - 1) / 2)]
            skin = np.nonzero(col > 0.5)[0]
            if len(skin) == 0:
                continue
            zk = (skin.max() - (body.shape[0] - 1) / 2) * body.spacing[0]
            ring = [[zk, yk + 5 * math.sin(a), xk + 5 * math.cos(a)] for a in np.linspace(0, 2 * math.pi, 13)]
            edits.append(_tube(work, body, np.array(ring), 1.2, METAL * DEVICE_GAIN))
            wire = np.array([[zk + 3, yk, xk], [zk + 6, yk + 40, xk * 1.3], [zk + 6, yk + 90, xk * 1.6]])
            edits.append(_tube(work, body, wire, 0.6, METAL * DEVICE_GAIN))
    return edits


def fracture(body, work, rng, severity, side, view) -> Edit:
    """A rib broken where it runs across the film, with a gap and the lateral fragment
    displaced vertically (a cortical step-off)."""
    side = _pick_side(rng, side)
    rib = body.structures[f"rib_{side}_{int(rng.integers(5, 9))}"]
    mask = body.labels == rib
    rb = _bbox(mask)
    idx = np.argwhere(mask[rb]) + [s.start for s in rb]
    ctr = (np.array(body.shape) - 1) / 2
    mm = (idx - ctr) * np.array(body.spacing)                                  # (n, 3) z, y, x
    lat = np.abs(mm[:, 2]) / np.abs(mm[:, 2]).max()
    cand = np.nonzero((lat > 0.35) & (lat < 0.85))[0]
    cand = rng.permutation(cand if len(cand) else np.arange(len(idx)))[:60]

    def course(i):                                   # the rib's local direction (unit, z y x) at voxel i
        near = mm[np.linalg.norm(mm - mm[i], axis=1) < 15.0]
        return np.linalg.svd(near - near.mean(0), full_matrices=False)[2][0]

    # break where the rib runs across the film (|x| component large): a vertical step-off there
    # is what a radiologist sees; where the rib runs along the beam a break is invisible
    dirs = {i: course(i) for i in cand}
    ci = max(cand, key=lambda i: abs(dirs[i][2]))
    direction = dirs[ci]
    c, cmm = idx[ci], mm[ci]
    if direction[2] * np.sign(cmm[2]) < 0:
        direction = -direction                                                   # point laterally
    half = np.ceil(np.array([25.0, 20.0, 25.0]) / np.array(body.spacing)).astype(int)
    box = tuple(slice(max(0, a - h), min(n, a + h + 1)) for a, h, n in zip(c, half, body.shape))
    m = mask[box]
    z, y, x = _coords(body, box)
    along = (z - cmm[0]) * direction[0] + (y - cmm[1]) * direction[1] + (x - cmm[2]) * direction[2]
    gap = 2.0 + 4.0 * severity
    cur = work[box]
    new = cur.copy()
    new[m] = np.minimum(cur[m], SOFT)                 # erase the rib here ...
    keep = m & (np.abs(along) > gap / 2)
    frag = keep & (along > 0)                         # ... and put it back, the lateral fragment displaced
    new[keep & ~frag] = cur[keep & ~frag]
    shift_vox = max(1, int(round((3.0 + 7.0 * severity) / body.spacing[1]))) * (1 if rng.random() < 0.5 else -1)
    moved = np.roll(np.where(frag, cur, 0.0), shift_vox, axis=1)
    moved_mask = np.roll(frag, shift_vox, axis=1)
    new[moved_mask] = np.maximum(new[moved_mask], moved[moved_mask])
    return _commit(work, box, new)


FINDINGS = {
    "Cardiomegaly": cardiomegaly,
    "Pleural Effusion": pleural_effusion,
    "Lung Opacity": lung_opacity,
    "Consolidation": consolidation,
    "Pneumothorax": pneumothorax,
    "Lung Lesion": lung_lesion,
    "Atelectasis": atelectasis,
    "Support Devices": support_devices,
    "Fracture": fracture,
}
# which CheXpert observations a finding makes positive
IMPLIES = {
    "Cardiomegaly": ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    "Pleural Effusion": ("Pleural Effusion",),
    "Lung Opacity": ("Lung Opacity",),
    "Consolidation": ("Consolidation", "Lung Opacity"),
    "Pneumothorax": ("Pneumothorax",),
    "Lung Lesion": ("Lung Lesion", "Lung Opacity"),
    "Atelectasis": ("Atelectasis", "Lung Opacity"),
    "Support Devices": ("Support Devices",),
    "Fracture": ("Fracture",),
}
NOT_PATHOLOGY = {"Support Devices"}
# sides a finding may take ("none" for findings without laterality)
SIDE_CHOICES = {
    "Cardiomegaly": ("none",),
    "Pleural Effusion": ("left", "right", "bilateral"),
    "Support Devices": ("none",),
}


# findings simulated last, in this order, after the others: they place themselves where the
# earlier ones left the lung visible
SIMULATE_LAST = ("Lung Lesion",)


def simulation_order(names) -> list[str]:
    """The order an image's findings are applied in: as given, SIMULATE_LAST moved to the end."""
    names = list(names)
    return [n for n in names if n not in SIMULATE_LAST] + [n for n in SIMULATE_LAST if n in names]


def simulate(name: str, body: CTVolume, work: np.ndarray, rng: np.random.Generator, severity: float,
             side: str | None = None, view: str = "PA") -> list[Edit]:
    """Apply one finding to `work` in place; return its edits (usually one)."""
    if name not in FINDINGS:
        raise ValueError(f"unknown finding {name!r}; choose from {sorted(FINDINGS)}")
    if not 0.0 < severity <= 1.0:
        raise ValueError(f"severity must be in (0, 1], got {severity}")
    if side is not None and side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if view not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {view!r}")
    if side == "none" and name not in SIDE_CHOICES:
        side = None
    out = FINDINGS[name](body, work, rng, float(severity), side, view)
    return out if isinstance(out, list) else [out]


def labels_for(findings: dict) -> dict[str, float]:
    """CheXpert labels (all 14, 1.0/0.0) for {finding name: {...}}."""
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}; choose from {sorted(FINDINGS)}")
    labels = {o: 0.0 for o in OBSERVATIONS}
    for name in findings:
        for obs in IMPLIES[name]:
            labels[obs] = 1.0
    labels["No Finding"] = 0.0 if set(findings) - NOT_PATHOLOGY else 1.0
    return labels

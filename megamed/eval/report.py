"""`megamed eval report PATH --out FILE.html`: one page with every evaluation result under PATH.

Looks (recursively) for what the other `megamed eval` commands write and shows each part, or
says "not run" with the command that makes it:

    alignment.json (+ grids/)           prompt alignment: per-finding table, and each prompt's grid
                                        beside reference images of the same finding (--reference DATA)
    fidelity.json / fidelity.md         FID, KID, precision/recall, MS-SSIM
    memorisation.json (+ _pairs.png)    nearest training images, closest pairs
    classifier.json from `classifier predict` (has "split"), and the judges they used
    augment.json / augment.md (+ PNGs)  the augmentation experiment

Images are embedded as data: URIs by default, so the one HTML file opens anywhere offline;
inline=False links them by relative path instead (reference grids then go to FILE_files/).
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from megamed.report import esc, page, table

PARTS = ("alignment", "fidelity", "memorisation", "classifier", "augment")
HOW = {
    "alignment": "megamed eval alignment --model MODEL --judge JUDGE --out DIR",
    "fidelity": "megamed eval fidelity --reference DATA --generated DIR --out DIR",
    "memorisation": "megamed eval memorisation --reference DATA --generated DIR --out DIR",
    "classifier": "megamed eval classifier predict --checkpoint JUDGE --data DATA --out DIR",
    "augment": "megamed eval augment ... --out DIR",
}
EXTRA_CSS = "<style>img.grid { max-width: 100%; image-rendering: pixelated; } td img.grid { max-width: 520px; }</style>"


def find_results(root: str | Path) -> dict[str, list[Path]]:
    """{part: [directories holding that part's output]} under root (root itself included), sorted.
    A classifier.json counts only as a `classifier predict` result (it has "split"); a judge's own
    classifier.json (it has "model") is found through the predictions that name it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"path: {root} is not a directory")
    found: dict[str, list[Path]] = {p: [] for p in PARTS}
    for name in ("alignment.json", "fidelity.json", "memorisation.json", "augment.json", "augment.md"):
        for f in sorted(root.rglob(name)):
            part = name.split(".")[0]
            if f.parent not in found[part]:
                found[part].append(f.parent)
    for f in sorted(root.rglob("classifier.json")):
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(d, dict) and "split" in d and "auroc" in d:
            found["classifier"].append(f.parent)
    return found


# -----------------------------------------------------------------------------------------
# small renderers

def md_to_html(text: str, demote: int = 2) -> str:
    """The markdown the eval commands write -> HTML: headings (demoted), pipe tables, '- ' lists,
    paragraphs, `code`. Everything is escaped first; links keep only their text."""
    def inline(s: str) -> str:
        s = esc(s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", s)

    out, para, lines, i = [], [], text.splitlines(), 0

    def flush():
        if para:
            out.append("<p>" + " ".join(inline(x) for x in para) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            continue
        m = re.match(r"^(#+)\s+(.*)$", line)
        if m:
            flush()
            level = min(6, len(m.group(1)) + demote)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif line.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return "\n".join(out)


def _png_bytes(img01: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(img01, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class _Images:
    """Puts images into the page: data: URIs (inline) or relative links (files next to the HTML)."""

    def __init__(self, html_path: Path, inline: bool):
        self.html_dir, self.inline = html_path.parent, inline
        self.files = html_path.parent / (html_path.stem + "_files")

    def file(self, path: Path, alt: str) -> str:
        if self.inline:
            src = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        else:
            src = Path(os.path.relpath(Path(path).resolve(), self.html_dir.resolve())).as_posix()
        return f'<img class="grid" src="{src}" alt="{esc(alt)}">'

    def array(self, img01: np.ndarray, name: str, alt: str) -> str:
        data = _png_bytes(img01)
        if self.inline:
            return f'<img class="grid" src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{esc(alt)}">'
        self.files.mkdir(parents=True, exist_ok=True)
        (self.files / name).write_bytes(data)
        return self.file(self.files / name, alt)


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None


def _where(d: Path, root: Path) -> str:
    rel = d.relative_to(root).as_posix() if d != root else "."
    return f"<p class=note>from <code>{esc(rel)}</code></p>"


# -----------------------------------------------------------------------------------------
# reference images of a finding

def _row_findings(row: dict) -> set[str]:
    """The findings of a reference row: its findings JSON (example set), else its positive labels."""
    from megamed.eval.classifier import FINDING_NAMES

    cell = (row.get("findings") or "").strip()
    if cell:
        return set(json.loads(cell))
    return {n for n in FINDING_NAMES if (row.get(n) or "").strip() == "1.0"}


def reference_grid(data: str | Path, finding: str, k: int, size: int, view: str = "PA") -> np.ndarray | None:
    """[H, W] grid of up to k reference images of `finding` ("No Finding": rows without any),
    that finding alone first, the prompt's view first; None if the data set has none."""
    import torch
    from PIL import Image

    from megamed.data.images import read_image
    from megamed.data.layout import read_metadata
    from megamed.generate import make_grid

    data = Path(data)
    rows = read_metadata(data)
    if finding == "No Finding":
        cand = [r for r in rows if not _row_findings(r)]
    else:
        cand = [r for r in rows if finding in _row_findings(r)]
    if not cand:
        return None
    cand.sort(key=lambda r: (len(_row_findings(r)), (r.get("AP/PA") or "") != view, r["Path"]))
    imgs = []
    for r in cand[:k]:
        img = read_image(data / r["Path"])
        if img.shape != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BOX), dtype=np.float32)
        imgs.append(np.clip(img, 0, 1))
    return make_grid(torch.from_numpy(np.stack(imgs)[:, None]), ncol=min(k, 8)).numpy()


# -----------------------------------------------------------------------------------------
# the sections

def _alignment(d: Path, root: Path, images: _Images, reference, n_ref: int) -> str:
    r = _load(d / "alignment.json")
    s, c = r["summary"], r["config"]
    parts = [_where(d, root),
             f"<p>Model <code>{esc(r['model'])}</code> (weights {esc(r['model_hash'])}), {r['n_images']} images at "
             f"{r['size']} px, {c['per_finding']} prompts per finding ({esc(c['wording'])} wording); judge "
             f"<code>{esc(r['judge'])}</code> ({esc(r['judge_check'])}: {esc(r['judge_note'])}). Mean AUROC "
             f"{_fmt(s['mean_auroc'])}, unasked rate {_fmt(s['mean_unasked_rate'])}, balanced accuracy "
             f"{_fmt(s['mean_balanced_accuracy'])}, severity Spearman {_fmt(s['mean_severity_spearman'])}, "
             f"side accuracy {_fmt(s['mean_side_accuracy'])}.</p>"]
    parts += [f"<p class=note>Note: {esc(n)}.</p>" for n in r.get("notes", [])]
    rows = []
    for name, v in r["per_finding"].items():
        sv, sd = v.get("severity") or {}, v.get("side") or {}
        rows.append([name, _fmt(v["auroc"]), _fmt(v["auroc_vs_normal"]), _fmt(v["hit_rate"]), _fmt(v["unasked_rate"]),
                     _fmt(v["balanced_accuracy"]), _fmt(sv.get("spearman")), _fmt(sd.get("accuracy"))])
    parts.append(table(["finding", "AUROC", "AUROC vs normal", "hit rate", "unasked rate", "balanced acc.",
                        "severity Spearman", "side acc."], rows, numeric=set(range(1, 8))))
    if r.get("contrastive"):
        k = r["contrastive"]
        parts.append(f"<p>Contrastive score (<code>{esc(k['model'])}</code>): matched cosine {k['matched']:.4f}, "
                     f"mismatched {k['mismatched']:.4f} (gap {k['gap']:+.4f}); top-1 finding retrieval "
                     f"{k['top1_retrieval']:.3f} (chance {k['chance_top1']:.3f}).</p>")
    else:
        parts.append("<p class=note>Contrastive image-text score: not run (no --align).</p>")
    parts.append("<h3>Grids per prompt beside reference images</h3>")
    if reference is None:
        parts.append("<p class=note>No --reference data set given: generated grids only.</p>")
    grid_rows = []
    entries = [("No Finding", r["normal"])] + list(r["per_finding"].items())
    for name, v in entries:
        if not v.get("grid") or not (d / v["grid"]).is_file():
            continue
        gen = images.file(d / v["grid"], f"generated {name}")
        ref = ""
        if reference is not None:
            g = reference_grid(reference, name, n_ref, r["size"], c.get("view") or "PA")
            ref = images.array(g, f"reference_{name.lower().replace(' ', '_')}.png", f"reference {name}") \
                if g is not None else "(none in the reference set)"
        grid_rows.append(f"<tr><td>{esc(name)}<br><span class=note>{esc(v.get('prompt') or '')}</span></td>"
                         f"<td>{gen}</td><td>{ref}</td></tr>")
    parts.append("<table><tr><th>prompt</th><th>generated (column j: seed offset j)</th><th>reference</th></tr>"
                 + "".join(grid_rows) + "</table>")
    return "\n".join(parts)


def _markdown_part(d: Path, root: Path, name: str, images: _Images, pngs=()) -> str:
    parts = [_where(d, root)]
    md = d / f"{name}.md"
    if md.is_file():
        parts.append(md_to_html(md.read_text()))
    elif (d / f"{name}.json").is_file():
        parts.append(f"<pre>{esc(json.dumps(_load(d / f'{name}.json'), indent=1)[:20000])}</pre>")
    for png in pngs:
        parts.append(f"<figure>{images.file(png, png.name)}<figcaption class=note>{esc(png.name)}</figcaption></figure>")
    return "\n".join(parts)


def _classifier(d: Path, root: Path, images: _Images) -> str:
    r = _load(d / "classifier.json")
    ckpt = Path(r.get("checkpoint", ""))
    note = ""
    if (ckpt / "classifier.json").is_file():
        meta = _load(ckpt / "classifier.json")
        t, prov = meta.get("train") or {}, meta.get("data_provenance") or {}
        control = " <b>shuffled-label control</b>," if t.get("shuffle_labels") else ""
        note = (f"<p class=note>Judge <code>{esc(ckpt)}</code>:{control} trained on <code>{esc(t.get('data'))}</code> "
                f"at {esc(t.get('size'))} px ({esc(prov.get('train_rows', '?'))} train rows, "
                f"{esc(prov.get('generated_rows', '?'))} generated), best val mean AUROC "
                f"{_fmt((meta.get('result') or {}).get('best_val_auroc'))}.</p>")
    figs = [d / "localization.png"] if (d / "localization.png").is_file() else []   # an lse judge's pointing
    return _markdown_part(d, root, "classifier", images, figs) + note


def write_report(path: str | Path, out: str | Path, reference: str | Path | None = None, inline: bool = True,
                 n_reference: int = 6) -> Path:
    """Assemble the page; returns its path. Parts not found say "not run" (and how to run them)."""
    from megamed.report import versions

    root = Path(path)
    found = find_results(root)
    if reference is not None and not (Path(reference) / "metadata.csv").is_file():
        raise FileNotFoundError(f"reference: {reference} has no metadata.csv (a megamed-layout data set)")
    if n_reference < 1:
        raise ValueError(f"n_reference: must be >= 1, got {n_reference}")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"out: expected an .html file name, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    images = _Images(out, inline)

    summary = []
    for d in found["alignment"]:
        s = _load(d / "alignment.json")["summary"]
        summary.append(["alignment", _where_text(d, root), f"mean AUROC {_fmt(s['mean_auroc'])}, unasked rate "
                                                            f"{_fmt(s['mean_unasked_rate'])}"])
    for d in found["fidelity"]:
        f = _load(d / "fidelity.json")
        summary.append(["fidelity", _where_text(d, root), f"FID {_fmt(f.get('fid'), 2)}, KID {_fmt(f.get('kid'), 4)}"])
    for d in found["memorisation"]:
        m = _load(d / "memorisation.json")
        summary.append(["memorisation", _where_text(d, root),
                        f"flagged: feature {_fmt(m['feature']['share'])}, pixel {_fmt(m['pixel']['share'])} "
                        f"(expect ~{m['quantile']})"])
    for d in found["classifier"]:
        c = _load(d / "classifier.json")
        summary.append(["judge", _where_text(d, root), f"{c.get('split')} mean AUROC {_fmt(c.get('mean_auroc'))}"])
    for d in found["augment"]:
        summary.append(["augmentation", _where_text(d, root), "see below"])

    body = [EXTRA_CSS, f"<p class=note>Evaluation results found under <code>{esc(root)}</code>. Reference images: "
                       f"{esc(reference) if reference else 'none given'}. All images are synthetic.</p>",
            "<h2>Summary</h2>",
            table(["part", "where", "headline"], summary) if summary else "<p>No results found.</p>"]
    sections = {
        "alignment": ("Prompt alignment", lambda d: _alignment(d, root, images, reference, n_reference)),
        "fidelity": ("Fidelity and diversity", lambda d: _markdown_part(d, root, "fidelity", images)),
        "memorisation": ("Memorisation", lambda d: _markdown_part(
            d, root, "memorisation", images, [p for p in [d / "memorisation_pairs.png"] if p.is_file()])),
        "classifier": ("The judge on reference data", lambda d: _classifier(d, root, images)),
        "augment": ("Augmentation experiment", lambda d: _markdown_part(d, root, "augment", images,
                                                                        sorted(d.glob("*.png")))),
    }
    for part, (title, render) in sections.items():
        body.append(f"<h2>{esc(title)}</h2>")
        if not found[part]:
            body.append(f"<p><b>not run</b> <span class=note>(<code>{esc(HOW[part])}</code>)</span></p>")
        for d in found[part]:
            body.append(render(d))
    body.append("<h2>Versions</h2>")
    body.append(table(["", ""], [[k, v] for k, v in versions().items()]))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page("MegaMed evaluation report", "\n".join(body)))
    tmp.replace(out)
    return out


def _where_text(d: Path, root: Path) -> str:
    return d.relative_to(root).as_posix() if d != root else "."


__all__ = ["write_report", "find_results", "md_to_html", "reference_grid"]

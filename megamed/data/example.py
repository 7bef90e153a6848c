"""The example data set: chest radiographs rendered from one real CT (`megamed data example`).

    DIR/metadata.csv          megamed.data.layout columns (CheXpert's + split/prompt/findings/params)
    DIR/images/000123.png     16-bit grayscale ('I;16'), size x size

How an image is made (everything keyed by (seed, index), so a data set is reproducible
byte for byte and any image can be re-rendered alone):

  plan     per image: a body (deformation seed), its split, the view (PA/AP), 0-3 findings
           with severity and side; ~25% are normal.
  body     drr.deform(ct, body_seed): smooth random warp + global scale (cached per worker;
           tasks are ordered by body so a worker reuses it).
  findings findings.simulate() edits a copy of the body's attenuation in small boxes.
  render   drr.project(body) once for the pose, plus drr.project_box() of each finding's
           delta (linearity of line integrals), then drr.expose() (noise, log, window).
  regions  each finding's bounding box in the image, where its projected delta is at least
           REGION_LEVEL of its peak: metadata.csv's regions column, {finding: [x0, y0, x1, y1]}
           as fractions of the width/height (x right, y down; x1, y1 exclusive). The judge can
           learn *where* a finding is from it (`megamed eval classifier train --localize`).

Splits are by BODY: train/val/test get ~80/10/10% of the body seeds, so no test image shares
anatomy with a training image.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megamed.data.layout import COLUMNS, OBSERVATIONS, label_str, read_metadata, write_metadata
from megamed.data.layout import image_path as indexed_image_path
from megamed.text.prompts import prompt_from_labels

log = logging.getLogger(__name__)

NORMAL_FRACTION = 0.25
SAVE_EVERY = 50                 # rewrite metadata.csv (atomically) every this many finished images
REGION_LEVEL = 0.25             # a region is where |projected delta| >= this share of its peak
                                # (a sphere's disk down to 0.97 of its radius)


@dataclass
class ExampleConfig:
    count: int = 200
    size: int = 512
    seed: int = 0
    workers: int = 1
    bodies: int | None = None   # distinct deformation seeds; default max(10, count // 5)
    render_px: int = 512        # rays are cast at min(size, render_px), then upsampled
    ct_factor: int = 2          # CT in-plane downsampling (2 -> 1.41 mm voxels)

    def __post_init__(self):
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be an integer >= 1, got {self.count!r}")
        if not isinstance(self.size, int) or self.size < 32:
            raise ValueError(f"size must be an integer >= 32, got {self.size!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.bodies is not None and (not isinstance(self.bodies, int) or self.bodies < 1):
            raise ValueError(f"bodies must be an integer >= 1, got {self.bodies!r}")
        if not isinstance(self.render_px, int) or self.render_px < 16:
            raise ValueError(f"render_px must be an integer >= 16, got {self.render_px!r}")

    @property
    def n_bodies(self) -> int:
        return self.bodies if self.bodies is not None else max(10, self.count // 5)


# -----------------------------------------------------------------------------------------
# planning: cheap, deterministic, no rendering

def body_seed(seed: int, b: int) -> int:
    """Deformation seed of body b (never 0: that is the undeformed CT, kept for tests)."""
    return int(np.random.default_rng([seed, b, 7]).integers(1, 2**31 - 1))


def body_splits(n_bodies: int, seed: int) -> list[str]:
    """Split of each body: ~80/10/10 with at least one val and one test body when n >= 3."""
    order = np.random.default_rng([seed, 11]).permutation(n_bodies)
    n_val = n_test = max(1, round(0.1 * n_bodies)) if n_bodies >= 3 else 0
    split = ["train"] * n_bodies
    for r, b in enumerate(order):
        if r < n_test:
            split[b] = "test"
        elif r < n_test + n_val:
            split[b] = "val"
    return split


def sample_findings(rng: np.random.Generator) -> dict:
    """{} with p=NORMAL_FRACTION, else 1-3 distinct findings, severity ~ U(0.1, 1], a side each."""
    from megamed.data.findings import FINDINGS, SIDE_CHOICES

    if rng.random() < NORMAL_FRACTION:
        return {}
    names = sorted(FINDINGS)
    k = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    out = {}
    for name in rng.choice(names, size=k, replace=False):
        sides = SIDE_CHOICES.get(str(name), ("left", "right"))
        out[str(name)] = {"severity": round(float(rng.uniform(0.1, 1.0)), 3), "side": str(rng.choice(sides))}
    return dict(sorted(out.items()))


def plan(cfg: ExampleConfig) -> list[dict]:
    """One dict per image: index, body, body_seed, split, view, findings, pose, exposure."""
    from megamed.data.drr import sample_exposure, sample_geometry

    splits = body_splits(cfg.n_bodies, cfg.seed)
    items = []
    for i in range(cfg.count):
        rng = np.random.default_rng([cfg.seed, i])
        b = i % cfg.n_bodies
        findings = sample_findings(rng)
        geom = sample_geometry(rng)
        exp = sample_exposure(rng)
        items.append({"index": i, "body": b, "body_seed": body_seed(cfg.seed, b), "split": splits[b],
                      # through JSON so the plan equals what metadata.csv reads back (tuples -> lists)
                      "findings": findings, "geometry": json.loads(json.dumps(asdict(geom))),
                      "exposure": json.loads(json.dumps(asdict(exp)))})
    return items


def make_prompt(labels: dict, findings: dict, view: str) -> str:
    """The image's prompt: MegaMed's wording with the view ("PA chest X-ray showing ...")."""
    return prompt_from_labels(labels, findings, view=view)


def image_path(item: dict) -> str:
    """Where a planned image lies in its set (metadata.csv's Path)."""
    return indexed_image_path(item["index"])


def make_row(item: dict) -> dict:
    """The metadata.csv row of a planned image (no rendering needed)."""
    from megamed.data.findings import labels_for

    labels = labels_for(item["findings"])
    view = item["geometry"]["view"]
    row = {"Path": image_path(item), "Sex": "Unknown", "Age": "Unknown",
           "Frontal/Lateral": "Frontal", "AP/PA": view}
    row.update({o: label_str(labels[o]) for o in OBSERVATIONS})
    row["split"] = item["split"]
    row["prompt"] = make_prompt(labels, item["findings"], view)
    row["findings"] = item["findings"]
    row["params"] = {"index": item["index"], "body": item["body"], "body_seed": item["body_seed"],
                     "geometry": item["geometry"], "exposure": item["exposure"]}
    return row


# -----------------------------------------------------------------------------------------
# rendering (runs in workers)

_CT = None
_BODIES: dict = {}


def _init_worker(ct_factor: int) -> None:
    import torch

    global _CT
    torch.set_num_threads(1)   # workers share the cores; 1 thread each is also what makes bytes reproducible
    from megamed.data.ct import load_ct
    _CT = load_ct(ct_factor)
    _BODIES.clear()            # bodies deformed from another CT resolution must not be reused


def _body(seed: int):
    from megamed.data.drr import deform

    if seed not in _BODIES:
        if len(_BODIES) >= 2:
            _BODIES.pop(next(iter(_BODIES)))
        _BODIES[seed] = deform(_CT, seed)
    return _BODIES[seed]


def finding_region(dL) -> list[float]:
    """Bounding box [x0, y0, x1, y1] (fractions of the side; x1, y1 exclusive) of where a finding's
    projected delta dL [px, px] reaches REGION_LEVEL of its peak; [] when it changes nothing."""
    a = dL.abs()
    peak = float(a.max())
    if peak <= 0:
        return []
    ys, xs = (a >= REGION_LEVEL * peak).nonzero(as_tuple=True)
    h, w = a.shape
    return [round(int(xs.min()) / w, 4), round(int(ys.min()) / h, 4),
            round((int(xs.max()) + 1) / w, 4), round((int(ys.max()) + 1) / h, 4)]


def finding_changes(item: dict, px: int, seed: int):
    """Yield (finding, dL) for a planned image (in a process set up by _init_worker), in
    simulation order: dL [px, px] is the change the finding makes to the line integrals, each
    finding simulated on the body as the earlier ones left it."""
    from megamed.data.drr import Geometry, project_box
    from megamed.data.findings import simulate, simulation_order

    if not item["findings"]:
        return
    body, geom = _body(item["body_seed"]), Geometry(**item["geometry"])
    work = body.mu.copy()
    # a finding's random stream is keyed by its place in the (sorted) findings, not by when it is
    # simulated: moving the lesion last left every other finding's draws as they were
    key = {name: k for k, name in enumerate(item["findings"])}
    for name in simulation_order(item["findings"]):
        f = item["findings"][name]
        rng = np.random.default_rng([seed, item["index"], 100 + key[name]])
        yield name, sum(project_box(e.delta, e.start, body.shape, body.spacing, geom, px)
                        for e in simulate(name, body, work, rng, f["severity"], f["side"], geom.view))


def render_item(item: dict, size: int, render_px: int, seed: int, image: bool = True, leave_out: tuple = ()):
    """(size, size) uint16 radiograph of a planned image (in a process set up by _init_worker) and
    its regions {finding: [x0, y0, x1, y1]}. image=False computes only the regions (no projection
    of the body, no exposure): how a set rendered before regions existed gets them. Findings named
    in leave_out are simulated (what follows sees what they did) but their change is not added
    to the image, noise draw unchanged: the same image without them, all else equal (how
    docs/eval/judge.md asks whether other findings hide a nodule)."""
    import torch

    from megamed.data.drr import Exposure, Geometry, expose, project, to_uint16

    unknown = sorted(set(leave_out) - set(item["findings"]))
    if unknown:
        raise ValueError(f"leave_out: {unknown} not among this item's findings {sorted(item['findings'])}")
    body = _body(item["body_seed"])
    geom, exp = Geometry(**item["geometry"]), Exposure(**item["exposure"])
    px = min(size, render_px)
    L = project(body.mu, body.spacing, geom, px) if image else None
    regions = {}
    for name, dL in finding_changes(item, px, seed):
        regions[name] = finding_region(dL)
        if image and name not in leave_out:
            L += dL
    regions = {name: regions[name] for name in item["findings"]}       # metadata keeps the sorted order
    if not image:
        return None, regions
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, item["index"], 3]).integers(2**62)))
    return to_uint16(expose(L, exp, size, gen)), regions


def write_png16(path: Path, img: np.ndarray) -> None:
    """Write a 16-bit grayscale PNG atomically (temp file + rename: never a half file)."""
    from PIL import Image

    tmp = path.with_name(path.name + ".part")
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint16)).save(tmp, format="PNG")
    os.replace(tmp, path)


def png_complete(path: Path, size: int) -> bool:
    """True when path is a readable PNG of the expected size (a crash mid-write leaves only .part)."""
    from PIL import Image

    if not path.exists():
        return False
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (size, size)
    except Exception:
        return False


def _task(args) -> tuple[int, dict]:
    item, out, size, render_px, seed, image = args
    img, regions = render_item(item, size, render_px, seed, image=image)
    if image:
        write_png16(Path(out) / image_path(item), img)
    return item["index"], regions


def _run(args: list, cfg: ExampleConfig):
    """Yield the index of each finished image: in this process, or in a spawn pool of workers."""
    import multiprocessing as mp

    import torch

    if cfg.workers == 1 or len(args) <= 1:
        threads = torch.get_num_threads()
        _init_worker(cfg.ct_factor)
        try:
            yield from map(_task, args)
        finally:
            torch.set_num_threads(threads)
        return
    from megamed.data.ct import load_ct
    load_ct(cfg.ct_factor)   # build the CT cache once here, not racing in every worker
    # tasks are sorted by body: chunks of about one body's images let a worker reuse it
    chunk = max(1, min(8, len(args) // max(1, cfg.n_bodies)))
    with mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.ct_factor,)) as pool:
        yield from pool.imap_unordered(_task, args, chunksize=chunk)


def _claim(out: Path, cfg: ExampleConfig) -> None:
    """Record the settings that decide the images in out/example.json, and refuse to resume into a
    folder made with other settings: its finished PNGs would be kept under the new plan's labels.

    A larger --count is allowed (the set grows): item i's plan depends only on (seed, i) and its
    body i % n_bodies, so with the same n_bodies every finished image stays what it was. With the
    default --bodies, n_bodies follows count and the change is refused by that setting."""
    from megamed.data.findings import FINDINGS_VERSION

    settings = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    settings["n_bodies"] = cfg.n_bodies
    settings["findings_version"] = FINDINGS_VERSION
    path = out / "example.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if not diff:
            return
        if diff != ["count"] or not isinstance(old.get("count"), int) or cfg.count < old["count"]:
            hint = ("; --count may only grow" if diff == ["count"] else "")
            raise ValueError(f"{out} holds an example set made with other settings "
                             f"({', '.join(f'{k}: {old.get(k)} -> {settings.get(k)}' for k in diff)}){hint}; "
                             f"use another --out, or the same settings to resume")
        log.info("growing %s from %d to %d images", out, old["count"], cfg.count)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_config(out: str | Path, **override) -> ExampleConfig:
    """The settings an example set was made with (out/example.json, as _claim wrote them), with the
    fields in override replaced: how tools re-plan or re-render its items. Refuses a set made by
    another findings version: this megamed would simulate its findings elsewhere, so a re-render
    would show other patients than its stored images."""
    from megamed.data.findings import FINDINGS_VERSION

    path = Path(out) / "example.json"
    if not path.is_file():
        raise ValueError(f"{out}: no example.json; not a set made by `megamed data example`")
    saved = json.loads(path.read_text())
    if saved.get("findings_version") != FINDINGS_VERSION:
        raise ValueError(f"{out} was made with findings version {saved.get('findings_version')}, this megamed "
                         f"simulates version {FINDINGS_VERSION}: re-render the set first")
    fields = dict(count=saved["count"], size=saved["size"], seed=saved["seed"], bodies=saved["n_bodies"],
                  render_px=saved["render_px"], ct_factor=saved["ct_factor"])
    return ExampleConfig(**{**fields, **override})


def generate(out: str | Path, cfg: ExampleConfig, progress: bool = True) -> int:
    """Render the data set into `out`; returns how many images were rendered (not skipped)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _claim(out, cfg)
    items = plan(cfg)
    rows = {it["index"]: make_row(it) for it in items}
    # regions of images already rendered come from the metadata.csv a previous run wrote; an
    # image rendered before regions existed gets them computed alone (no re-render)
    known = {}
    if (out / "metadata.csv").is_file():
        known = {r["Path"]: r["regions"] for r in read_metadata(out) if (r.get("regions") or "").strip()}
    render, regions_only, done = [], [], set()
    for it in items:
        row = rows[it["index"]]
        if not png_complete(out / row["Path"], cfg.size):
            render.append(it)
        elif not it["findings"] or row["Path"] in known:
            row["regions"] = json.loads(known[row["Path"]]) if it["findings"] else {}
            done.add(it["index"])
        else:
            regions_only.append(it)
    log.info("%d images planned, %d already rendered, %d to render, %d to compute regions for",
             len(items), len(done) + len(regions_only), len(render), len(regions_only))

    def finished(i: int, regions: dict) -> None:
        rows[i]["regions"] = regions
        done.add(i)

    render_items(out, cfg, render, finished, save=lambda: write_metadata(out, [rows[i] for i in sorted(done)], COLUMNS),
                 regions_only=regions_only, total=len(items), progress=progress)
    return len(render)


def render_items(out: str | Path, cfg: ExampleConfig, items: list[dict], finished, save, regions_only: list[dict] = (),
                 total: int | None = None, progress: bool = True) -> None:
    """Render planned items into OUT/images at cfg's size on cfg.workers processes (and only the
    regions of regions_only), calling finished(index, regions) as each comes back and save()
    every SAVE_EVERY images and at the end, so a killed run keeps what it finished. The progress
    bar counts up to total (default: the items), starting from what is already done."""
    from tqdm import tqdm

    todo = sorted([*items, *regions_only], key=lambda it: (it["body"], it["index"]))   # a worker reuses the body
    is_render = {it["index"] for it in items}
    args = [(it, str(out), cfg.size, cfg.render_px, cfg.seed, it["index"] in is_render) for it in todo]
    total = len(todo) if total is None else total
    bar = tqdm(total=total, initial=total - len(todo), desc="render", unit="img", disable=not progress)
    for n, (i, regions) in enumerate(_run(args, cfg), 1):
        finished(i, regions)
        bar.update()
        if n % SAVE_EVERY == 0:
            save()
    bar.close()
    save()


# -----------------------------------------------------------------------------------------
# contact sheets: every finding at two severities, PA and AP, beside the same normal image

def contact_sheets(out: str | Path, size: int = 512, body_seed: int = 0, progress: bool = True) -> list[Path]:
    """docs/findings/<finding>.png: rows PA, AP; columns normal, severity 0.5, severity 1.0."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from megamed.data.ct import load_ct
    from megamed.data.drr import Exposure, Geometry, deform, expose, project, project_box
    from megamed.data.findings import FINDINGS, SIDE_CHOICES, simulate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = deform(load_ct(2), body_seed)
    geoms = {"PA": Geometry(view="PA"), "AP": Geometry(view="AP", sdd=1000.0, odd=135.0)}
    px = min(size, 512)
    base = {v: project(body.mu, body.spacing, g, px) for v, g in geoms.items()}
    paths = []
    for name in tqdm(sorted(FINDINGS), desc="contact sheets", disable=not progress):
        side = SIDE_CHOICES.get(name, ("left",))[0]
        tiles = []
        for view, g in geoms.items():
            row = []
            for sev in (None, 0.5, 1.0):
                L = base[view].clone()
                if sev is not None:
                    work = body.mu.copy()
                    for e in simulate(name, body, work, np.random.default_rng(1), sev, side, view):
                        L += project_box(e.delta, e.start, body.shape, body.spacing, g, px)
                img = expose(L, Exposure(), size, torch.Generator().manual_seed(0))
                row.append((img.numpy() * 255 + 0.5).astype(np.uint8))
            tiles.append(np.concatenate(row, axis=1))
        path = out / (name.lower().replace(" ", "_") + ".png")
        Image.fromarray(np.concatenate(tiles, axis=0)).save(path, optimize=True)
        paths.append(path)
    return paths

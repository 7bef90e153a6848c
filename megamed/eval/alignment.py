"""Prompt alignment (`megamed eval alignment`): does a generated image show what its prompt asks?

    plan      a balanced prompt set: for each finding of the example set, `per_finding` prompts
              naming it alone, spread over severity bins (mild/moderate/severe) and sides, plus
              `per_finding` normal prompts. Prompt j of every finding uses seed + j, so a column
              of the grids is one starting noise under different prompts.
    generate  OUT/generated/images/NNNNNN.png + metadata.csv (megamed layout, so fidelity and
              memorisation can read it). Resumable: a PNG already there whose provenance chunks
              match (prompt, seed, model hash, sampler settings) is kept; one made with other
              settings is an error, not silently reused.
    judge     the classifier (`megamed eval classifier train`), trained on REFERENCE images only
              (its classifier.json says so; a judge trained on generated images is refused),
              predicts every image.
    score     per finding, with positives = prompts naming it and negatives = prompts whose
              labels do not contain it (a consolidation prompt implies lung opacity, so it is
              neither for Lung Opacity):
                AUROC of the judge's probability (and vs the normal prompts only),
                hit rate (positives >= threshold), unasked rate (negatives >= threshold: the
                finding appears although no prompt asked for it), balanced accuracy, F1;
              with detailed prompts and a judge with severity/side heads (example set):
                severity: Spearman of prompted (bin centre 0.2/0.55/0.85) vs predicted severity,
                          MAE, share in the prompted bin; side: accuracy of the side head.
    align     optional (--align DIR): cosine similarity of each image with its own prompt
              (matched) vs with prompts of other findings (mismatched), and top-1 retrieval of
              the finding among the plain single-finding prompts, from the contrastive model.

Writes OUT/alignment.json, OUT/alignment.md, OUT/predictions.csv, OUT/grids/<finding>.png.
"""
from __future__ import annotations

import csv
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

NORMAL = "No Finding"
WORDINGS = ("detail", "plain")
# a severity word stands for its bin: the bin's centre is the prompted severity (as parse_prompt reads it)
BIN_CENTRES = (0.2, 0.55, 0.85)


@dataclass
class AlignmentConfig:
    per_finding: int = 6              # prompts naming each finding; as many normal prompts
    steps: int = 20
    sampler: str = "dpmpp-2m"
    guidance: float = 3.0
    size: int | None = None           # generated image side; None = the model's default resolution
    seed: int = 0                     # prompt j of every finding gets seed + j
    view: str = "PA"                  # "AP", "PA" or "" (no view word)
    wording: str = "detail"           # "detail": severity and side words; "plain": the finding name only
    threshold: float = 0.5            # judge probability that counts as "finding present"
    batch_size: int = 8

    def __post_init__(self):
        if not isinstance(self.per_finding, int) or self.per_finding < 1:
            raise ValueError(f"per_finding: expected a positive int, got {self.per_finding!r}")
        if self.wording not in WORDINGS:
            raise ValueError(f"wording: expected one of {WORDINGS}, got {self.wording!r}")
        if self.view not in ("AP", "PA", ""):
            raise ValueError(f"view: expected 'AP', 'PA' or '', got {self.view!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold: must be in (0, 1), got {self.threshold}")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 32):
            raise ValueError(f"size: expected an int >= 32 (the judge's minimum), got {self.size!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size!r}")


def slug(name: str) -> str:
    return name.lower().replace(" ", "_")


# -----------------------------------------------------------------------------------------
# the prompt set

def _combos(sides: tuple) -> list[tuple[int, str]]:
    """(bin, side) pairs in an order where every run of 3 covers the three bins and the sides
    alternate: r-th round pairs bin b with side (b + r) mod len(sides). All combinations appear."""
    return [(b, sides[(b + r) % len(sides)]) for r in range(len(sides)) for b in range(3)]


def prompt_plan(per_finding: int, view: str = "PA", wording: str = "detail") -> list[dict]:
    """The balanced prompt set, one dict per image:
    {"index", "finding" (a finding name or "No Finding"), "j" (its seed offset), "bin" (0-2 or None),
     "severity" (bin centre or None), "side" ("left"/"right"/"bilateral"/"none"), "prompt", "labels" {14}}.
    severity/side are what the prompt SAYS: None/"none" where the wording has no word for it."""
    from megamed.data.findings import SIDE_CHOICES, labels_for
    from megamed.eval.classifier import FINDING_NAMES
    from megamed.text.prompts import prompt_from_labels, severity_word

    if wording not in WORDINGS:
        raise ValueError(f"wording: expected one of {WORDINGS}, got {wording!r}")
    view = view or None
    plan = []
    for finding in (NORMAL,) + FINDING_NAMES:
        sides = SIDE_CHOICES.get(finding, ("left", "right"))
        has_grade = finding != NORMAL and severity_word(finding, 0.5) is not None
        combos = _combos(sides)
        for j in range(per_finding):
            item = {"index": len(plan), "finding": finding, "j": j, "bin": None, "severity": None, "side": "none"}
            if finding == NORMAL:
                labels, detail = labels_for({}), None
            else:
                b, side = combos[j % len(combos)]
                labels = labels_for({finding: {}})
                d = {}
                if wording == "detail":
                    if has_grade:
                        item["bin"], item["severity"] = b, BIN_CENTRES[b]
                        d["severity"] = BIN_CENTRES[b]
                    if side != "none":
                        item["side"] = d["side"] = side
                detail = {finding: d} if d else None
            item["prompt"] = prompt_from_labels(labels, detail, view=view, detail=detail is not None)
            item["labels"] = labels
            plan.append(item)
    return plan


# -----------------------------------------------------------------------------------------
# the judge

def check_judge(judge_dir: str | Path) -> dict:
    """Read the judge's classifier.json and make sure it learned from reference images only.
    Returns {"status": "ok" | "unverified", "note", "provenance"}; raises ValueError for a judge
    trained on generated images or on shuffled labels (the control run is not a judge)."""
    from megamed.data.layout import read_metadata
    from megamed.eval.classifier import CONFIG_NAME, WEIGHTS_NAME, generated_rows

    judge_dir = Path(judge_dir)
    if not (judge_dir / CONFIG_NAME).is_file() or not (judge_dir / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"judge: {judge_dir} has no {CONFIG_NAME} + {WEIGHTS_NAME} "
                                f"(train one with `megamed eval classifier train` on reference data)")
    meta = json.loads((judge_dir / CONFIG_NAME).read_text())
    train = meta.get("train") or {}
    prov = meta.get("data_provenance")
    if train.get("shuffle_labels") or (prov or {}).get("shuffled_labels"):
        raise ValueError(f"judge: {judge_dir} was trained with --shuffle-labels (the control run); "
                         f"use a judge trained on true labels")
    if prov is not None:
        if prov.get("generated_rows", 0):
            raise ValueError(f"judge: {judge_dir} was trained on {prov['generated_rows']} generated image(s) "
                             f"(classifier.json data_provenance); the judge must see reference images only")
        return {"status": "ok", "note": f"trained on {prov.get('train_rows')} reference images "
                                        f"(no generated rows) from {train.get('data', '?')}", "provenance": prov}
    # an older or foreign classifier.json: look at the data it names, if it is still there
    data = Path(train.get("data") or "")
    if train.get("data") and (data / "metadata.csv").is_file():
        n = generated_rows(read_metadata(data))
        if n:
            raise ValueError(f"judge: its training data {data} holds {n} generated image(s); "
                             f"the judge must be trained on reference images only")
        return {"status": "ok", "note": f"its training data {data} has no generated rows", "provenance": None}
    note = (f"{judge_dir}/{CONFIG_NAME} does not record its training data's provenance and the data "
            f"({train.get('data') or 'not named'}) is not here to check: make sure it saw reference images only")
    warnings.warn(f"judge: {note}", stacklevel=2)
    return {"status": "unverified", "note": note, "provenance": None}


# -----------------------------------------------------------------------------------------
# generation (resumable)

def generate_plan(pipe, plan: list[dict], out_dir: str | Path, cfg: AlignmentConfig, scfg,
                  progress: bool = True) -> dict:
    """Images for the plan -> out_dir/images/NNNNNN.png (+ metadata.csv, split "test"). Image i of
    the plan uses seed cfg.seed + plan[i]["j"]. Complete PNGs with matching provenance are kept."""
    from tqdm.auto import tqdm

    from megamed.data.layout import CHEXPERT_COLUMNS, COLUMNS, image_path, label_str, write_metadata
    from megamed.generate import _expected_text_matches, provenance, sample_images, save_image

    size = cfg.size or pipe.default_resolution
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "images").glob(".*.tmp"):          # write_png16's temp files from a killed run
        stale.unlink()
    params = dict(asdict(scfg), size=size, model_hash=pipe.model_hash, megamed_generate=True, alignment=True)

    def row(it: dict) -> dict:
        r = dict.fromkeys(CHEXPERT_COLUMNS, "")
        r.update({o: label_str(v) for o, v in it["labels"].items()})
        r.update({"Path": image_path(it["index"]), "Sex": "Unknown", "Age": "Unknown",
                  "Frontal/Lateral": "Frontal", "AP/PA": cfg.view, "split": "test", "prompt": it["prompt"],
                  "findings": "", "params": dict(params, seed=cfg.seed + it["j"])})
        return r

    def expected(it):
        return provenance(pipe, scfg, prompt=it["prompt"], seed=cfg.seed + it["j"], height=size, width=size)

    done, todo = {}, []
    for it in plan:
        path = out_dir / image_path(it["index"])
        if path.is_file() and _expected_text_matches(path, expected(it)):
            done[it["index"]] = row(it)
        else:
            todo.append(it)
    skipped = len(done)
    bar = tqdm(total=len(plan), initial=skipped, desc="generate", unit="img", disable=not progress)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        images = sample_images(pipe.model, pipe.diffusion, pipe.tokenizer, [it["prompt"] for it in batch],
                               [cfg.seed + it["j"] for it in batch], height=size, width=size, cfg=scfg,
                               batch_size=cfg.batch_size, device=pipe.device, progress=False)
        for it, image in zip(batch, images):
            save_image(out_dir / image_path(it["index"]), image, expected(it))
            done[it["index"]] = row(it)
        # after the PNGs: a listed row always has its image
        write_metadata(out_dir / "metadata.csv", [done[i] for i in sorted(done)], COLUMNS)
        bar.update(len(batch))
    bar.close()
    if not todo:
        write_metadata(out_dir / "metadata.csv", [done[i] for i in sorted(done)], COLUMNS)
    return {"size": size, "generated": len(todo), "skipped": skipped}


# -----------------------------------------------------------------------------------------
# scoring

def _rate(x: np.ndarray):
    return float(x.mean()) if len(x) else None


def _spearman(a: np.ndarray, b: np.ndarray):
    """Spearman's rho (average ranks for ties); None when either side is constant or n < 3."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def score_alignment(plan: list[dict], probs: np.ndarray, severity: np.ndarray | None, side: np.ndarray | None,
                    judge_findings: tuple, threshold: float = 0.5) -> dict:
    """The numbers, from judge outputs in plan order: probs [N, 14]; severity [N, F] and side [N, F]
    (indices into classifier.SIDES) for the judge's findings `judge_findings` (None: no heads)."""
    from megamed.data.layout import OBSERVATIONS
    from megamed.eval.classifier import FINDING_NAMES, SEVERITY_BINS, SIDES, severity_bin
    from megamed.eval.metrics import auroc, f1

    probs = np.asarray(probs, np.float64)
    if probs.shape != (len(plan), len(OBSERVATIONS)):
        raise ValueError(f"probs: expected [{len(plan)}, {len(OBSERVATIONS)}], got {probs.shape}")
    finding = np.array([it["finding"] for it in plan])
    normal = finding == NORMAL
    per = {}
    for name in FINDING_NAMES:
        k = OBSERVATIONS.index(name)
        pos = finding == name
        if not pos.any():
            continue
        neg = np.array([it["labels"][name] == 0.0 for it in plan])
        s, hit = probs[:, k], probs[:, k] >= threshold
        keep = pos | neg
        y = pos[keep].astype(np.float64)
        tpr, fpr = _rate(hit[pos]), _rate(hit[neg])
        a = auroc(s[keep], y)
        kn = pos | normal
        a_norm = auroc(s[kn], pos[kn].astype(np.float64))
        d = {"prompt": next(it["prompt"] for it in plan if it["finding"] == name),
             "n_prompted": int(pos.sum()), "n_unprompted": int(neg.sum()),
             "auroc": None if math.isnan(a) else a, "auroc_vs_normal": None if math.isnan(a_norm) else a_norm,
             "hit_rate": tpr, "unasked_rate": fpr, "unasked_rate_normal": _rate(hit[normal]),
             "balanced_accuracy": (tpr + 1 - fpr) / 2 if tpr is not None and fpr is not None else None,
             "f1": f1(hit[keep].astype(np.float64), y),
             "mean_prob_prompted": _rate(s[pos]), "mean_prob_unprompted": _rate(s[neg]),
             "severity": None, "side": None}
        j = judge_findings.index(name) if severity is not None and name in judge_findings else None
        said_sev = np.array([it["severity"] is not None for it in plan]) & pos
        if j is not None and said_sev.any():
            want = np.array([plan[i]["severity"] for i in np.flatnonzero(said_sev)])
            got = np.asarray(severity, np.float64)[said_sev, j]
            want_bin = np.array([plan[i]["bin"] for i in np.flatnonzero(said_sev)])
            got_bin = np.array([severity_bin(g) for g in got])
            d["severity"] = {"n": int(said_sev.sum()), "spearman": _spearman(want, got),
                             "mae": float(np.abs(want - got).mean()), "bin_accuracy": float((want_bin == got_bin).mean()),
                             "mean_predicted_by_bin": {SEVERITY_BINS[b]: float(got[want_bin == b].mean())
                                                       for b in range(3) if (want_bin == b).any()}}
        said_side = np.array([it["side"] != "none" for it in plan]) & pos
        if j is not None and said_side.any():
            want = np.array([SIDES.index(plan[i]["side"]) for i in np.flatnonzero(said_side)])
            got = np.asarray(side)[said_side, j]
            d["side"] = {"n": int(said_side.sum()), "accuracy": float((want == got).mean())}
        per[name] = d

    def mean_of(key, sub=None):
        vals = [(v[key] or {}).get(sub) if sub else v[key] for v in per.values()]
        vals = [x for x in vals if x is not None]
        return float(np.mean(vals)) if vals else None

    nine = [OBSERVATIONS.index(n) for n in FINDING_NAMES]
    clean = ~(probs[normal][:, nine] >= threshold).any(1)
    return {"per_finding": per,
            "normal": {"n": int(normal.sum()), "clean_rate": _rate(clean),
                       "prompt": next((it["prompt"] for it in plan if it["finding"] == NORMAL), None)},
            "summary": {"mean_auroc": mean_of("auroc"), "mean_auroc_vs_normal": mean_of("auroc_vs_normal"),
                        "mean_hit_rate": mean_of("hit_rate"), "mean_unasked_rate": mean_of("unasked_rate"),
                        "mean_balanced_accuracy": mean_of("balanced_accuracy"),
                        "mean_severity_spearman": mean_of("severity", "spearman"),
                        "mean_severity_mae": mean_of("severity", "mae"),
                        "mean_side_accuracy": mean_of("side", "accuracy")}}


@torch.no_grad()
def contrastive_scores(align_model, images: torch.Tensor, plan: list[dict], view: str = "PA",
                       batch_size: int = 32) -> dict:
    """images [N, 1, H, W] in [-1, 1] in plan order -> matched vs mismatched cosine similarity and
    top-1 finding retrieval among the plain prompts (normal + each finding), overall and per finding."""
    from megamed.data.findings import labels_for
    from megamed.eval.classifier import FINDING_NAMES
    from megamed.text.prompts import prompt_from_labels

    prompts = sorted({it["prompt"] for it in plan})
    col = {p: c for c, p in enumerate(prompts)}
    names = (NORMAL,) + FINDING_NAMES
    plain = [prompt_from_labels(labels_for({} if n == NORMAL else {n: {}}), view=view or None) for n in names]
    sims, psims = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        sims.append(align_model.similarity(x, prompts).float().cpu())           # [b, P]
        psims.append(align_model.similarity(x, plain).float().cpu())            # [b, 10]
    sim, psim = torch.cat(sims).numpy(), torch.cat(psims).numpy()
    finding = np.array([it["finding"] for it in plan])
    p_finding = {p: next(it["finding"] for it in plan if it["prompt"] == p) for p in prompts}
    matched = np.array([sim[i, col[it["prompt"]]] for i, it in enumerate(plan)])
    other = np.array([[p_finding[p] != it["finding"] for p in prompts] for it in plan])      # [N, P]
    mismatched = (sim * other).sum(1) / np.maximum(other.sum(1), 1)
    top1 = np.array([names[int(psim[i].argmax())] == it["finding"] for i, it in enumerate(plan)])
    per = {n: {"matched": float(matched[finding == n].mean()), "mismatched": float(mismatched[finding == n].mean()),
               "top1": float(top1[finding == n].mean())} for n in names if (finding == n).any()}
    return {"matched": float(matched.mean()), "mismatched": float(mismatched.mean()),
            "gap": float(matched.mean() - mismatched.mean()), "top1_retrieval": float(top1.mean()),
            "chance_top1": 1.0 / len(names), "per_finding": per}


# -----------------------------------------------------------------------------------------
# the whole command

def _grids(out: Path, plan: list[dict], ds, index_of: dict, per_finding: int) -> dict:
    """OUT/grids/<finding>.png: that prompt's images in plan order (8-bit, for people)."""
    from megamed.generate import make_grid, to_unit
    from megamed.report import save_png8

    paths = {}
    for name in dict.fromkeys(it["finding"] for it in plan):
        imgs = torch.stack([ds[index_of[it["index"]]]["image"] for it in plan if it["finding"] == name])
        path = save_png8(out / "grids" / f"{slug(name)}.png", make_grid(to_unit(imgs), ncol=min(per_finding, 8)).numpy())
        paths[name] = path.relative_to(out).as_posix()
    return paths


def evaluate_alignment(model: str | Path, judge: str | Path, out: str | Path, cfg: AlignmentConfig | None = None,
                       scfg=None, align: str | Path | None = None, device: str = "auto",
                       progress: bool = True) -> dict:
    """Plan, generate (resumable), judge and score; writes the files listed in the module docstring."""
    from megamed.data.layout import OBSERVATIONS
    from megamed.eval.classifier import SIDES, load_classifier, open_split, predict
    from megamed.generate import SamplingConfig, load_pipeline

    cfg = cfg or AlignmentConfig()
    scfg = scfg or SamplingConfig(steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance)
    out = Path(out)
    t0 = time.perf_counter()
    judge_info = check_judge(judge)                  # before any sampling: a wrong judge fails fast
    if align is not None:
        from megamed.models.align import load_align
        align_model = load_align(align)              # likewise
    jmeta = json.loads((Path(judge) / "classifier.json").read_text())
    judge_size = int((jmeta.get("train") or {}).get("size") or 224)
    plan = prompt_plan(cfg.per_finding, cfg.view, cfg.wording)
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out / "prompts.csv", plan)

    pipe = load_pipeline(model, device=device)
    if not pipe.model.config.text.enabled:
        raise ValueError(f"model: {model} is unconditional (no text encoder); prompt alignment needs a "
                         f"text-conditioned model")
    gen = generate_plan(pipe, plan, out / "generated", cfg, scfg, progress=progress)
    t_gen = time.perf_counter() - t0
    hash_, dev = pipe.model_hash, str(pipe.device)
    del pipe

    notes = []
    if judge_size != gen["size"]:
        # a judge trained on sharp 256 px renders sees 128 px samples upsampled (blurred): it may
        # miss findings that are there. Train the judge at the generator's size for a fair reading.
        notes.append(f"the judge was trained at {judge_size} px and the images are {gen['size']} px (resized "
                     f"for the judge); a judge trained at {gen['size']} px reads them more fairly")
        warnings.warn(notes[-1], stacklevel=2)
    clf = load_classifier(judge)
    ds = open_split(out / "generated", "test", judge_size)
    index_of = {int(Path(r["Path"]).stem): k for k, r in enumerate(ds.rows)}
    missing = [it["index"] for it in plan if it["index"] not in index_of]
    if missing:
        raise RuntimeError(f"{out / 'generated'}: metadata.csv lacks {len(missing)} planned image(s), e.g. #{missing[0]}")
    p = predict(clf, ds, batch_size=32, device=dev, desc="judge")
    order = np.array([np.flatnonzero(p["index"] == index_of[it["index"]])[0] for it in plan])
    probs = p["probs"][order]
    sev = p["severity"][order] if "severity" in p else None
    side = p["side"][order] if "side" in p else None
    scores = score_alignment(plan, probs, sev, side, clf.cfg.findings, cfg.threshold)

    grids = _grids(out, plan, open_split(out / "generated", "test", gen["size"]), index_of, cfg.per_finding)
    for name, d in scores["per_finding"].items():
        d["grid"] = grids[name]
    scores["normal"]["grid"] = grids.get(NORMAL)

    contrastive = None
    if align is not None:
        ads = open_split(out / "generated", "test", align_model.cfg.image_size)
        images = torch.stack([ads[index_of[it["index"]]]["image"] for it in plan])
        contrastive = contrastive_scores(align_model, images, plan, cfg.view)
        contrastive["model"] = str(align)

    _write_predictions(out / "predictions.csv", plan, probs, sev, side, clf.cfg.findings, SIDES, OBSERVATIONS)
    result = {"model": str(model), "model_hash": hash_, "judge": str(judge),
              "judge_check": judge_info["status"], "judge_note": judge_info["note"], "judge_size": judge_size,
              "config": asdict(cfg), "sampling": asdict(scfg), "size": gen["size"], "n_images": len(plan),
              "generated": gen["generated"], "skipped": gen["skipped"], "notes": notes,
              **scores, "contrastive": contrastive,
              "seconds": {"generate": t_gen, "total": time.perf_counter() - t0}}
    return result


def _write_plan(path: Path, plan: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "finding", "seed_offset", "severity_bin", "severity", "side", "prompt"])
        for it in plan:
            w.writerow([it["index"], it["finding"], it["j"], "" if it["bin"] is None else it["bin"],
                        "" if it["severity"] is None else it["severity"], it["side"], it["prompt"]])
    tmp.replace(path)


def _write_predictions(path: Path, plan, probs, sev, side, findings, sides, observations) -> None:
    from megamed.data.layout import image_path
    from megamed.eval.classifier import FINDING_NAMES

    cols = [observations.index(n) for n in FINDING_NAMES]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "finding", "prompt", "prompted severity", "prompted side"]
                   + [f"p({n})" for n in FINDING_NAMES]
                   + ([f"{n} severity" for n in findings] + [f"{n} side" for n in findings] if sev is not None else []))
        for i, it in enumerate(plan):
            row = [it["index"], f"generated/{image_path(it['index'])}", it["finding"], it["prompt"],
                   "" if it["severity"] is None else it["severity"], it["side"]]
            row += [f"{probs[i, c]:.4f}" for c in cols]
            if sev is not None:
                row += [f"{v:.3f}" for v in sev[i]] + [sides[s] for s in side[i]]
            w.writerow(row)
    tmp.replace(path)


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def alignment_markdown(r: dict) -> str:
    s, c = r["summary"], r["config"]
    lines = ["# Prompt alignment", "",
             f"Model `{r['model']}` (weights {r['model_hash']}), {r['n_images']} images at {r['size']} px: "
             f"{c['per_finding']} prompts per finding ({c['wording']} wording, view {c['view'] or 'none'}) and "
             f"{r['normal']['n']} normal prompts; {r['sampling']['sampler']} {r['sampling']['steps']} steps, "
             f"guidance {r['sampling']['guidance']}, seeds {c['seed']}..{c['seed'] + c['per_finding'] - 1}.",
             f"Judge `{r['judge']}` at {r['judge_size']} px ({r['judge_check']}: {r['judge_note']}); "
             f"threshold {c['threshold']}."] + [f"Note: {n}." for n in r.get("notes", [])] + ["",
             f"Mean over findings: AUROC {_fmt(s['mean_auroc'])}, hit rate {_fmt(s['mean_hit_rate'])}, "
             f"unasked rate {_fmt(s['mean_unasked_rate'])}, balanced accuracy {_fmt(s['mean_balanced_accuracy'])}; "
             f"normal prompts with no finding detected: {_fmt(r['normal']['clean_rate'])}.", "",
             "| finding | AUROC | AUROC vs normal | hit rate | unasked rate | balanced acc. | F1 "
             "| severity Spearman | severity MAE | side acc. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in r["per_finding"].items():
        sv, sd = d["severity"] or {}, d["side"] or {}
        lines.append(f"| {name} | {_fmt(d['auroc'])} | {_fmt(d['auroc_vs_normal'])} | {_fmt(d['hit_rate'])} "
                     f"| {_fmt(d['unasked_rate'])} | {_fmt(d['balanced_accuracy'])} | {_fmt(d['f1'])} "
                     f"| {_fmt(sv.get('spearman'))} | {_fmt(sv.get('mae'))} | {_fmt(sd.get('accuracy'))} |")
    lines += ["", "AUROC: judge probability of the finding, prompts naming it vs prompts whose labels lack it. "
              "Hit rate: prompted images where the judge sees it. Unasked rate: images whose prompt lacks the "
              "finding where the judge sees it anyway. Severity/side: only for prompts that say them "
              "(detail wording) and a judge with severity/side heads."]
    if r["contrastive"]:
        k = r["contrastive"]
        lines += ["", "## Contrastive image-text score", "",
                  f"Alignment model `{k['model']}`: mean cosine with the image's own prompt {k['matched']:.4f}, "
                  f"with prompts of other findings {k['mismatched']:.4f} (gap {k['gap']:+.4f}); top-1 retrieval of "
                  f"the finding among {round(1 / k['chance_top1'])} plain prompts {k['top1_retrieval']:.3f} "
                  f"(chance {k['chance_top1']:.3f})."]
    else:
        lines += ["", "Contrastive image-text score: not run (no --align)."]
    lines += ["", "Grids (one row per finding prompt, column j = seed offset j): "
              + ", ".join(f"[{n}]({d['grid']})" for n, d in r["per_finding"].items()),
              f"; normal: [{NORMAL}]({r['normal']['grid']})"]
    return "\n".join(lines) + "\n"


__all__ = ["AlignmentConfig", "prompt_plan", "check_judge", "generate_plan", "score_alignment", "contrastive_scores",
           "evaluate_alignment", "alignment_markdown", "BIN_CENTRES", "NORMAL"]

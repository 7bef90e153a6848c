"""Why mild lung lesions miss: the analyses behind docs/eval/judge.md ("Seventh session", "Eighth session").

    python benchmarks/lesion_analysis.py bins PRED DATA [--finding "Lung Lesion"]
        AUROC per severity bin with a bootstrap 95% CI (positives and negatives resampled apart)
    python benchmarks/lesion_analysis.py groups PRED DATA
        mild lesions by severity and by the other findings in their image
    python benchmarks/lesion_analysis.py counterfactual DATA CHECKPOINT OUT
        each mild lesion that shares its image, rendered again without the other findings'
        changes (the nodule and the noise draw unchanged), scored by the judge at CHECKPOINT
    python benchmarks/lesion_analysis.py signal DATA
        each mild lesion's own projected signal, per mm of diameter, alone or with companions
    python benchmarks/lesion_analysis.py observer DATA [--max-severity 0.4] [--pred PRED] [--cache JSON]
        how visible each lesion is to a model observer told where it is and what it looks like
        (a channelized Hotelling observer, the standard stand-in for a reader in image quality
        work): its AUROC against the same spot of every negative, by severity

PRED is the predictions.csv of `megamed eval classifier predict --split test` on DATA, an example
set (`megamed data example`; its example.json says how to re-plan it). Every positive is ranked
against the test images whose Lung Lesion label is 0, so a group's mean rank is its AUROC.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

LESION, MILD = "Lung Lesion", 0.4          # mild: severity < 0.4 (megamed.text.prompts thresholds)
# Independent spots a reader must search, for the max-of-M model: two lung fields of about
# 20000 px at 256 px, over a mild nodule's 100 px disk, give about 200; 50 allows for spots that
# are not independent (the channels overlap) and parts of the lung a reader can rule out.
SEARCH_SITES = (50, 200)


# -----------------------------------------------------------------------------------------
# predictions and test rows

def read_predictions(path: str | Path, finding: str = LESION) -> dict:
    """{image file name: probability of `finding`} from a predictions.csv."""
    with open(path) as f:
        return {Path(r["path"]).name: float(r[finding]) for r in csv.DictReader(f)}


def test_rows(data: str | Path) -> list[dict]:
    from megamed.data.layout import read_metadata
    return [r for r in read_metadata(data) if r["split"] == "test"]


def findings_of(row: dict) -> dict:
    return json.loads(row["findings"] or "{}")


def negative_rows(rows: list[dict], finding: str = LESION) -> list[dict]:
    """The images labelled 0 for `finding` (as megamed.eval.classifier.severity_bin_auroc)."""
    return [r for r in rows if finding not in findings_of(r) and r[finding] in ("0", "0.0")]


def negatives(rows: list[dict], prob: dict, finding: str = LESION) -> np.ndarray:
    """Scores of the images labelled 0 for `finding`."""
    return np.array([prob[Path(r["Path"]).name] for r in negative_rows(rows, finding)])


def rank(score: float, neg: np.ndarray) -> float:
    """One positive's AUROC: the share of negatives it outranks (ties count half)."""
    return float((neg < score).mean() + 0.5 * (neg == score).mean())


def bootstrap_auroc(pos: np.ndarray, neg: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the AUROC, positives and negatives resampled apart (the project's bootstrap:
    megamed.eval.augment.bootstrap_weights and weighted_auroc)."""
    from megamed.eval.augment import bootstrap_weights, weighted_auroc

    w = np.concatenate([bootstrap_weights(len(pos), draws, seed), bootstrap_weights(len(neg), draws, seed + 1)], 1)
    got = weighted_auroc(np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))], w)
    return float(np.quantile(got, 0.025)), float(np.quantile(got, 0.975))


def bootstrap_mean_diff(a: np.ndarray, b: np.ndarray, draws: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b), each group resampled apart."""
    from megamed.eval.augment import bootstrap_indices

    d = a[bootstrap_indices(len(a), draws, seed)].mean(1) - b[bootstrap_indices(len(b), draws, seed + 1)].mean(1)
    return float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


# -----------------------------------------------------------------------------------------
# the analyses

def cmd_bins(args) -> None:
    from sklearn.metrics import roc_auc_score

    from megamed.eval.classifier import SEVERITY_BINS, severity_bin

    rows, prob = test_rows(args.data), read_predictions(args.pred, args.finding)
    neg = negatives(rows, prob, args.finding)
    for b, name in enumerate(SEVERITY_BINS):
        pos = np.array([prob[Path(r["Path"]).name] for r in rows if args.finding in findings_of(r)
                        and severity_bin(findings_of(r)[args.finding]["severity"]) == b])
        if not len(pos):
            continue
        auc = roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
        lo, hi = bootstrap_auroc(pos, neg)
        print(f"{args.finding} {name:9s} n+={len(pos):3d} n-={len(neg)}  AUROC {auc:.3f}  95% CI [{lo:.3f}, {hi:.3f}]")


def mild_lesion_rows(rows: list[dict], below: float = MILD) -> list[dict]:
    return [r for r in rows if LESION in findings_of(r) and findings_of(r)[LESION]["severity"] < below]


def cmd_groups(args) -> None:
    rows, prob = test_rows(args.data), read_predictions(args.pred)
    neg = negatives(rows, prob)
    mild = mild_lesion_rows(rows)
    sev = np.array([findings_of(r)[LESION]["severity"] for r in mild])
    others = np.array([len(findings_of(r)) - 1 for r in mild])
    auc = np.array([rank(prob[Path(r["Path"]).name], neg) for r in mild])
    print(f"{len(mild)} mild lesions against {len(neg)} negatives: AUROC {auc.mean():.3f}")
    for lo, hi in ((0.1, 0.15), (0.15, 0.2), (0.2, 0.3), (0.3, MILD)):
        m = (sev >= lo) & (sev < hi)
        print(f"  severity {lo:.2f}-{hi:.2f}: n={m.sum():3d}  AUROC {auc[m].mean():.3f}")
    for label, m in (("alone", others == 0), ("one other finding", others == 1), ("two or more", others >= 2)):
        print(f"  {label:18s} n={m.sum():3d}  AUROC {auc[m].mean():.3f}")
    alone, shared = auc[others == 0], auc[others > 0]
    lo, hi = bootstrap_mean_diff(alone, shared)
    print(f"  alone - shared: {alone.mean() - shared.mean():.3f}, bootstrap 95% CI [{lo:.3f}, {hi:.3f}]")


def planned_items(data: str | Path) -> tuple:
    """The example set's config and its planned items by index (the renderer's own plan)."""
    from megamed.data import example as E

    try:
        cfg = E.read_config(data)
    except ValueError as e:
        raise SystemExit(str(e))
    E._init_worker(cfg.ct_factor)
    return cfg, {it["index"]: it for it in E.plan(cfg)}


def cmd_counterfactual(args) -> None:
    """Render each mild lesion that shares its image twice, as stored and with leave_out= the
    other findings, into a megamed-layout folder OUT; score both with the judge."""
    from megamed.data import example as E
    from megamed.data.images import read_image
    from megamed.data.layout import OBSERVATIONS, write_metadata
    from megamed.eval.classifier import WithFindings, load_classifier, open_split, predict

    cfg, items = planned_items(args.data)
    shared = [r for r in mild_lesion_rows(test_rows(args.data)) if len(findings_of(r)) > 1]
    out, rows = Path(args.out), []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in shared:
        it = items[int(Path(r["Path"]).stem)]
        others = tuple(n for n in it["findings"] if n != LESION)
        for tag, leave_out in (("as_rendered", ()), ("lesion_only", others)):
            img, _ = E.render_item(it, cfg.size, cfg.render_px, cfg.seed, leave_out=leave_out)
            if tag == "as_rendered" and not np.array_equal(img.astype(np.float32) / 65535.0,   # read_image: /65535
                                                           read_image(Path(args.data) / r["Path"])):
                raise SystemExit(f"{r['Path']}: the renderer no longer reproduces the stored image "
                                 f"(another findings version?); re-render the set first")
            E.write_png16(out / "images" / f"{Path(r['Path']).stem}_{tag}.png", img)
            rows.append({**{k: (json.loads(v) if k in ("findings", "params", "regions") and v else v)
                            for k, v in r.items()}, "Path": f"images/{Path(r['Path']).stem}_{tag}.png"})
    write_metadata(out / "metadata.csv", rows)

    model = load_classifier(args.checkpoint)
    ds = open_split(out, "test", cfg.size)
    p = predict(model, WithFindings(ds, model.cfg.findings) if model.cfg.findings else ds, progress=False)
    col = list(OBSERVATIONS).index(LESION)
    prob = {Path(r["Path"]).name: float(p["probs"][i, col]) for i, r in enumerate(ds.rows)}
    test, judged = test_rows(args.data), read_predictions(args.pred)
    neg = negatives(test, judged)
    auc = {tag: {k.split("_")[0]: rank(v, neg) for k, v in prob.items() if k.endswith(f"_{tag}.png")}
           for tag in ("as_rendered", "lesion_only")}
    for tag, got in auc.items():
        print(f"{len(got)} mild lesions sharing their image, {tag.replace('_', ' ')}: AUROC {np.mean(list(got.values())):.3f}")
    alone = np.array([rank(judged[Path(r["Path"]).name], neg) for r in mild_lesion_rows(test) if len(findings_of(r)) == 1])
    only = np.array(list(auc["lesion_only"].values()))
    lo, hi = bootstrap_mean_diff(alone, only)
    print(f"{len(alone)} alone in their image: AUROC {alone.mean():.3f}; alone - lesion only: "
          f"{alone.mean() - only.mean():.3f}, bootstrap 95% CI [{lo:.3f}, {hi:.3f}]")
    companions = {Path(r["Path"]).stem: [n for n in findings_of(r) if n != LESION] for r in shared}
    for name in sorted({n for v in companions.values() for n in v}):
        ids = [i for i, v in companions.items() if name in v]
        print(f"  with {name:18s} n={len(ids):3d}  {np.mean([auc['as_rendered'][i] for i in ids]):.3f} -> "
              f"{np.mean([auc['lesion_only'][i] for i in ids]):.3f}")


def cmd_signal(args) -> None:
    """The nodule's own projected signal: peak |dL| per mm of diameter (diameter 10 + 30 x severity
    mm, megamed.data.findings.lung_lesion), relative to the lone lesions' mean."""
    from megamed.data import example as E

    cfg, items = planned_items(args.data)
    got = []
    for r in mild_lesion_rows(test_rows(args.data)):
        it = items[int(Path(r["Path"]).stem)]
        dL = dict(E.finding_changes(it, min(cfg.size, cfg.render_px), cfg.seed))[LESION]
        diameter = 10.0 + 30.0 * it["findings"][LESION]["severity"]
        got.append((len(it["findings"]) > 1, float(dL.abs().max()) / diameter))
    shared, per_mm = np.array([g[0] for g in got]), np.array([g[1] for g in got])
    ref = per_mm[~shared].mean()
    print(f"peak line-integral change per mm of diameter, relative to the {int((~shared).sum())} lone lesions: "
          f"sharing their image ({int(shared.sum())}) {per_mm[shared].mean() / ref:.3f} (mean), "
          f"{np.median(per_mm[shared]) / ref:.3f} (median)")


def dog_channels(half: int, scale: float, n: int = 7, q: float = 1.67, alpha: float = 1.4) -> np.ndarray:
    """[n, 2 half, 2 half] radial difference-of-Gaussian channels centred in the box (Abbey and
    Barrett's DoG channels, in pixels: sigma_j = scale * alpha^j, each G(q sigma) - G(sigma), unit norm)."""
    yy, xx = np.mgrid[-half:half, -half:half] + 0.5
    r2 = yy ** 2 + xx ** 2
    out = []
    for j in range(n):
        sig = scale * alpha ** j
        g = lambda s: np.exp(-r2 / (2 * s * s)) / (2 * np.pi * s * s)
        c = g(q * sig) - g(sig)
        out.append(c / np.linalg.norm(c))
    return np.stack(out)


def search_auroc(d: np.ndarray, sites: int, draws: int = 4000, seed: int = 0) -> float:
    """AUROC of a reader that must find the lesion: the image's score is its best of `sites`
    independent spots, each N(0, 1) on background and N(d', 1) on the lesion (the textbook
    max-of-M model of search). Mean over lesions with the detectability indices d."""
    rng = np.random.default_rng(seed)
    neg = rng.standard_normal((draws, sites)).max(1)
    other = rng.standard_normal((draws, sites - 1)).max(1) if sites > 1 else np.full(draws, -np.inf)
    z = rng.standard_normal(draws)
    return float(np.mean([np.searchsorted(np.sort(neg), np.maximum(z + di, other)).mean() / draws for di in d]))


def cmd_observer(args) -> None:
    """Render each test lesion again without the nodule (all else, the noise draw included, the same:
    render_item(leave_out=)); their difference is the nodule as displayed. A channelized Hotelling
    observer (DoG channels around the nodule's centre; background covariance from the test
    negatives at that spot) then scores the stored image and every negative at that spot. That
    observer knows where the nodule is and what it looks like, which the judge does not: a
    nodule it cannot tell from background is not one a judge should be expected to find."""
    from scipy.stats import norm
    from tqdm import tqdm

    from megamed.data import example as E
    from megamed.data.images import read_image

    cfg, items = planned_items(args.data)
    rows = test_rows(args.data)
    negs = np.stack([read_image(Path(args.data) / r["Path"]) for r in negative_rows(rows)]).astype(np.float64)
    pos_rows = mild_lesion_rows(rows, below=args.max_severity)
    size = negs.shape[-1]
    half, scale = round(32 * size / 256), size / 256         # a 64 px box at 256 px, the same field at other sizes
    chans = dog_channels(half, scale).reshape(-1, (2 * half) ** 2)
    # the cache holds one data set's results: refuse one made on another (its size or its images)
    cache = Path(args.cache) if args.cache else None
    key = {"data": str(Path(args.data).resolve()), "size": size}
    saved = json.loads(cache.read_text()) if cache and cache.is_file() else {**key, "lesions": {}}
    if {k: saved.get(k) for k in key} != key:
        raise SystemExit(f"{cache} holds results for {saved.get('data')} at {saved.get('size')} px; "
                         f"use another --cache for {key['data']} at {size} px")
    got = saved["lesions"]
    for r in tqdm([r for r in pos_rows if r["Path"] not in got], desc="observer", unit="lesion"):
        it = items[int(Path(r["Path"]).stem)]
        shown = read_image(Path(args.data) / r["Path"]).astype(np.float64)
        without, _ = E.render_item(it, cfg.size, cfg.render_px, cfg.seed, leave_out=(LESION,))
        s = shown - without.astype(np.float64) / 65535.0        # the nodule as displayed [size, size]
        a = np.abs(s)
        ys, xs = np.nonzero(a >= 0.25 * a.max())
        cy = int(np.clip(round(float(np.average(ys, weights=a[ys, xs]))), half, size - half))
        cx = int(np.clip(round(float(np.average(xs, weights=a[ys, xs]))), half, size - half))
        box = (slice(cy - half, cy + half), slice(cx - half, cx + half))
        v_neg = negs[(slice(None),) + box].reshape(len(negs), -1) @ chans.T      # [N-, channels]
        dv = chans @ s[box].ravel()                                              # the signal's channel response
        k = np.cov(v_neg, rowvar=False)
        w = np.linalg.solve(k, dv)                                               # Hotelling template
        d = float(np.sqrt(dv @ w))                                               # its detectability index
        got[r["Path"]] = {"severity": findings_of(r)[LESION]["severity"], "d": d,
                          "observer": rank(float(chans @ shown[box].ravel() @ w), v_neg @ w)}
        if cache:
            cache.write_text(json.dumps(saved))
    paths = [r["Path"] for r in pos_rows]
    sev, auc, d = (np.array([got[p][k] for p in paths]) for k in ("severity", "observer", "d"))
    judge = None
    if args.pred:
        prob = read_predictions(args.pred)
        neg = negatives(rows, prob)
        judge = np.array([rank(prob[Path(p).name], neg) for p in paths])
    print(f"{len(paths)} lesions, severity < {args.max_severity}, against {len(negs)} negatives at {size} px: "
          f"observer AUROC {auc.mean():.3f}")
    bands = [(lo, hi, (sev >= lo) & (sev < hi)) for lo, hi in
             ((0.1, 0.15), (0.15, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.7), (0.7, 1.01))]
    bands = [b for b in bands if b[2].any()]
    for lo, hi, m in bands:
        print(f"  severity {lo:.2f}-{min(hi, 1):.2f}: n={m.sum():3d}  observer AUROC {auc[m].mean():.3f}  "
              f"d' median {np.median(d[m]):.2f} (AUROC if Gaussian {norm.cdf(np.median(d[m]) / np.sqrt(2)):.3f}); "
              f"searching {', '.join(f'{k} spots {search_auroc(d[m], k):.3f}' for k in SEARCH_SITES)}"
              + (f"; judge {judge[m].mean():.3f}" if judge is not None else ""))
    if judge is None:
        return
    from scipy.stats import spearmanr
    rho = spearmanr(d, judge)
    print(f"judge rank against the observer's d': Spearman {rho.statistic:.2f} (p = {rho.pvalue:.1g})")
    # the one-parameter search model fitted to the judge over all bands (spots weighed by lesions):
    # does the judge find the faint nodules as well as it finds the clearer ones?
    fits = {k: sum(m.sum() * (search_auroc(d[m], k) - judge[m].mean()) ** 2 for _, _, m in bands)
            for k in (2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200)}
    k = min(fits, key=fits.get)
    print(f"search model fitted to the judge: {k} spots; per band model / judge: " + ", ".join(
        f"{lo:.2f}-{min(hi, 1):.2f} {search_auroc(d[m], k):.3f} / {judge[m].mean():.3f}" for lo, hi, m in bands))


# -----------------------------------------------------------------------------------------
# a reader that searches: the same observer at every pixel of the lung fields

SEVERITY_BANDS = ((0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.7), (0.7, 1.01))


def band_of(severity: float) -> int:
    """Index into SEVERITY_BANDS (severity is drawn from [0.1, 1])."""
    for i, (lo, hi) in enumerate(SEVERITY_BANDS):
        if severity < hi:
            return i
    return len(SEVERITY_BANDS) - 1



def channel_maps(images: np.ndarray, chans: np.ndarray) -> np.ndarray:
    """images [N, H, W], chans [n, 2 half, 2 half] -> [N, n, H, W]: at pixel (y, x), each channel's
    response over the box rows y-half..y+half-1, columns x-half..x+half-1 (cmd_observer's box with
    its centre there; zero beyond the image's edge)."""
    from scipy.signal import fftconvolve

    # a correlation is a convolution with the kernel flipped; "same" keeps the box's alignment
    # (and the first argument's shape, hence the broadcast)
    x = np.broadcast_to(images[:, None], (len(images), len(chans)) + images.shape[1:])
    return fftconvolve(x, chans[None, :, ::-1, ::-1], mode="same", axes=(2, 3))


def background_stats(batches) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-pixel mean [n, H, W] and inverse covariance [H, W, n, n] of channel maps ([N, n, H, W]
    batches of lesion-free images): the background a Hotelling observer whitens at each spot."""
    s1 = s2 = None
    count = 0
    for m in batches:
        s1 = m.sum(0) if s1 is None else s1 + m.sum(0)
        outer = np.einsum("bihw,bjhw->hwij", m, m)
        s2 = outer if s2 is None else s2 + outer
        count += len(m)
    if count < 2:
        raise ValueError(f"background_stats: need at least 2 images, got {count}")
    mu = s1 / count
    cov = (s2 - count * np.einsum("ihw,jhw->hwij", mu, mu)) / (count - 1)
    n = cov.shape[-1]
    ridge = 1e-9 * np.trace(cov, axis1=-2, axis2=-1)[..., None, None] * np.eye(n) + 1e-30 * np.eye(n)
    return mu, np.linalg.inv(cov + ridge), count


def hotelling_z(maps: np.ndarray, mu: np.ndarray, kinv: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """maps [N, n, H, W], templates [T, n] (a nodule's mean channel response) -> [N, T, H, W]:
    the Hotelling statistic at every pixel for every template, scaled to unit variance on
    background there, so that spots with busy and quiet anatomy compete on equal terms."""
    w = np.einsum("hwij,tj->thwi", kinv, templates)                         # [T, H, W, n]
    sigma = np.sqrt(np.einsum("thwi,ti->thw", w, templates))                # [T, H, W]
    return np.einsum("thwi,bihw->bthw", w, maps - mu) / sigma


def search_region(centres: np.ndarray, shape: tuple, radius: int) -> np.ndarray:
    """[H, W] bool: every pixel within `radius` of a nodule centre seen in training ([K, 2] (y, x)),
    holes filled: where a reader who has seen the training set looks for nodules."""
    from scipy.ndimage import binary_dilation, binary_fill_holes

    hit = np.zeros(shape, bool)
    yx = np.clip(np.round(centres).astype(int), 0, np.array(shape) - 1)
    hit[yx[:, 0], yx[:, 1]] = True
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return binary_fill_holes(binary_dilation(hit, yy ** 2 + xx ** 2 <= radius ** 2))


def boxed_lesion_rows(rows: list[dict]) -> list[dict]:
    """The rows with a lung lesion whose box metadata.csv's regions records."""
    return [r for r in rows if LESION in findings_of(r) and LESION in json.loads(r["regions"] or "{}")]


def lesion_centre(row: dict, size: int) -> tuple[int, int]:
    """(y, x), the pixel at the centre of the lesion box in metadata.csv's regions ([x0, y0, x1, y1]
    fractions of a size x size image)."""
    x0, y0, x1, y1 = json.loads(row["regions"])[LESION]
    return tuple(min(int(round(0.5 * (a + b) * size)), size - 1) for a, b in ((y0, y1), (x0, x1)))


def cmd_scan(args) -> None:
    """The observer of cmd_observer, made to search. Everything it knows comes from the training
    split: per-pixel background statistics from lesion-free training images, one template per
    severity band (the mean channel response of that band's training nodules at their box
    centres), and where nodules lie (their centres, dilated). On the test split every image is
    scored by its largest unit-variance Hotelling statistic over that region and the templates;
    the same statistic is also read at the nodule's known centre, and over windows around it,
    so the cost of not knowing where to look shows step by step."""
    from tqdm import tqdm

    from megamed.data.images import read_image
    from megamed.data.layout import read_metadata

    rows = read_metadata(args.data)
    train, test = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]
    read = lambda rs: np.stack([read_image(Path(args.data) / r["Path"]) for r in rs]).astype(np.float64)
    size = read(test[:1]).shape[-1]
    half, scale = round(32 * size / 256), size / 256
    chans = dog_channels(half, scale)

    def maps_of(rs, desc):
        for i in tqdm(range(0, len(rs), 32), desc=desc, unit="batch", leave=False):
            yield rs[i:i + 32], channel_maps(read(rs[i:i + 32]), chans)

    rng = np.random.default_rng(0)
    bg = negative_rows(train)
    bg = [bg[i] for i in sorted(rng.choice(len(bg), min(args.background, len(bg)), replace=False))]
    mu, kinv, n_bg = background_stats(m for _, m in maps_of(bg, "background"))

    # templates: the mean background-subtracted response of each band's training nodules
    sums, counts, centres = np.zeros((len(SEVERITY_BANDS), len(chans))), np.zeros(len(SEVERITY_BANDS)), []
    for rs, m in maps_of(boxed_lesion_rows(train), "templates"):
        for r, mi in zip(rs, m):
            y, x = lesion_centre(r, size)
            centres.append((y, x))
            band = band_of(findings_of(r)[LESION]["severity"])
            sums[band] += mi[:, y, x] - mu[:, y, x]
            counts[band] += 1
    if (counts == 0).any():
        raise SystemExit(f"no training nodule in severity band(s) "
                         f"{[SEVERITY_BANDS[i] for i in np.nonzero(counts == 0)[0]]}: too few training images")
    templates = sums / counts[:, None]
    region = search_region(np.array(centres, float), (size, size), args.radius)
    n_mild = sum(hi <= MILD for _, hi in SEVERITY_BANDS)
    print(f"{size} px; background from {n_bg} lesion-free training images; templates from "
          f"{int(counts.sum())} training nodules ({', '.join(f'{lo}-{min(hi, 1)}: {int(c)}' for (lo, hi), c in zip(SEVERITY_BANDS, counts))}); "
          f"search region {int(region.sum())} px ({region.mean():.1%} of the image)")

    # every test negative and nodule: the statistic maps of every template [T, H, W]
    neg_rows, pos_rows = negative_rows(test), boxed_lesion_rows(test)
    z = {}
    for rs, m in maps_of(neg_rows + pos_rows, "test"):
        z.update(zip((r["Path"] for r in rs), hotelling_z(m, mu, kinv, templates).astype(np.float32)))
    neg = [r["Path"] for r in neg_rows]
    zn = np.stack([z.pop(p) for p in neg])                                        # [N-, T, H, W]
    zn_all = zn.max(1)                                                            # any template [N-, H, W]
    whole_all, whole_mild = zn_all[:, region].max(1), zn[:, :n_mild].max(1)[:, region].max(1)
    windows = tuple(w for w in (8, 16, 32) if w < size // 2)
    res = []
    for r in pos_rows:
        p, sev = r["Path"], findings_of(r)[LESION]["severity"]
        (y, x), band, zp = lesion_centre(r, size), band_of(sev), z[p]
        got = {"path": p, "severity": sev, "known": rank(float(zp[band, y, x]), zn[:, band, y, x])}
        zp_all = zp.max(0)
        for w in windows:
            # the search region within w px of the centre (the centre itself always), cropped first
            y0, y1, x0, x1 = max(y - w, 0), min(y + w + 1, size), max(x - w, 0), min(x + w + 1, size)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            win = region[y0:y1, x0:x1] & ((yy - y) ** 2 + (xx - x) ** 2 <= w * w)
            win[y - y0, x - x0] = True
            got[f"r{w}"] = rank(float(zp_all[y0:y1, x0:x1][win].max()), zn_all[:, y0:y1, x0:x1][:, win].max(1))
        got["lungs"] = rank(float(zp_all[region].max()), whole_all)
        got["lungs_mild"] = rank(float(zp[:n_mild].max(0)[region].max()), whole_mild)
        got["in_region"] = bool(region[y, x])
        res.append(got)
    judge = None
    if args.pred:
        prob = read_predictions(args.pred)
        nj = negatives(test, prob)
        judge = np.array([rank(prob[Path(r["Path"]).name], nj) for r in pos_rows])
    cols = ["known"] + [f"r{w}" for w in windows] + ["lungs", "lungs_mild"]
    head = ["known spot and size"] + [f"within {w} px" for w in windows] + ["whole lungs", "lungs, mild templates"]
    print(f"AUROC against {len(neg)} test negatives, per severity band (mean of each nodule's rank):")
    print("| severity | n | " + " | ".join(head) + (" | judge |" if judge is not None else " |"))
    print("|---" * (len(head) + 2 + (judge is not None)) + "|")
    sev = np.array([g["severity"] for g in res])
    for lo, hi in SEVERITY_BANDS + ((0.1, MILD), (0.1, 1.01)):
        m = (sev >= lo) & (sev < hi)
        if not m.any():
            continue
        cells = [f"{np.mean([g[c] for g, k in zip(res, m) if k]):.3f}" for c in cols]
        print(f"| {lo:.1f}-{min(hi, 1):.1f} | {int(m.sum())} | " + " | ".join(cells)
              + (f" | {judge[m].mean():.3f} |" if judge is not None else " |"))
    print(f"{sum(not g['in_region'] for g in res)} test nodule centres lie outside the search region")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": str(Path(args.data).resolve()), "size": size,
                                               "background": n_bg, "region_px": int(region.sum()),
                                               "lesions": res}, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bins")
    b.add_argument("pred"), b.add_argument("data"), b.add_argument("--finding", default=LESION)
    g = sub.add_parser("groups")
    g.add_argument("pred"), g.add_argument("data")
    c = sub.add_parser("counterfactual")
    c.add_argument("data"), c.add_argument("checkpoint"), c.add_argument("out")
    c.add_argument("--pred", required=True, help="the judge's predictions.csv on DATA's test split (the negatives)")
    s = sub.add_parser("signal")
    s.add_argument("data")
    o = sub.add_parser("observer")
    o.add_argument("data"), o.add_argument("--max-severity", type=float, default=MILD)
    o.add_argument("--pred", help="a judge's predictions.csv on DATA's test split: its AUROC beside the observer's")
    o.add_argument("--cache", help="JSON of per-lesion results: written as they come, reused when rerun")
    sc = sub.add_parser("scan")
    sc.add_argument("data")
    sc.add_argument("--background", type=int, default=3000, help="lesion-free training images for the statistics")
    sc.add_argument("--radius", type=int, default=6, help="px around training nodule centres that make the search region")
    sc.add_argument("--pred", help="a judge's predictions.csv on DATA's test split: its AUROC beside the observer's")
    sc.add_argument("--json", help="write the per-lesion results here")
    args = ap.parse_args(argv)
    {"scan": cmd_scan, "bins": cmd_bins, "groups": cmd_groups, "counterfactual": cmd_counterfactual, "signal": cmd_signal,
     "observer": cmd_observer}[args.cmd](args)


if __name__ == "__main__":
    main()

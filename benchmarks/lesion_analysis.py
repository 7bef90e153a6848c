"""Why mild lung lesions miss: the analyses behind docs/eval/judge.md ("Seventh session").

    python benchmarks/lesion_analysis.py bins PRED DATA [--finding "Lung Lesion"]
        AUROC per severity bin with a bootstrap 95% CI (positives and negatives resampled apart)
    python benchmarks/lesion_analysis.py groups PRED DATA
        mild lesions by severity and by the other findings in their image
    python benchmarks/lesion_analysis.py counterfactual DATA CHECKPOINT OUT
        each mild lesion that shares its image, rendered again without the other findings'
        changes (the nodule and the noise draw unchanged), scored by the judge at CHECKPOINT
    python benchmarks/lesion_analysis.py signal DATA
        each mild lesion's own projected signal, per mm of diameter, alone or with companions

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


def negatives(rows: list[dict], prob: dict, finding: str = LESION) -> np.ndarray:
    """Scores of the images labelled 0 for `finding` (as megamed.eval.classifier.severity_bin_auroc)."""
    return np.array([prob[Path(r["Path"]).name] for r in rows
                     if finding not in findings_of(r) and r[finding] in ("0", "0.0")])


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


def mild_lesion_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if LESION in findings_of(r) and findings_of(r)[LESION]["severity"] < MILD]


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

    meta = json.loads((Path(data) / "example.json").read_text())
    cfg = E.ExampleConfig(count=meta["count"], size=meta["size"], bodies=meta["bodies"], seed=meta["seed"],
                          render_px=meta["render_px"], ct_factor=meta["ct_factor"])
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
    args = ap.parse_args(argv)
    {"bins": cmd_bins, "groups": cmd_groups, "counterfactual": cmd_counterfactual, "signal": cmd_signal}[args.cmd](args)


if __name__ == "__main__":
    main()

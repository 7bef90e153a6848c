"""`megamed eval classifier train|predict | fidelity | memorisation | alignment | report`: judge generated images.

Every command writes NAME.json (numbers) and NAME.md (a table for people) under --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _clean(v):
    """JSON-safe: numpy scalars -> Python, NaN -> null (strict JSON has no NaN)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


def _write(out: str, name: str, result: dict, markdown: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(_clean(result), indent=2, allow_nan=False) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.md')}")


def _blocks(text: str) -> tuple:
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 6,12,24,16, got {text!r}") from None
    if not blocks or min(blocks) < 1:
        raise argparse.ArgumentTypeError(f"blocks must be positive, got {text!r}")
    return blocks


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from megamed.eval.classifier import ClassifierConfig, TrainConfig, train_classifier

    model = ClassifierConfig(growth=args.growth, blocks=args.blocks, init_features=args.init_features, pool=args.pool,
                             input_scale=args.input_scale)
    cfg = TrainConfig(data=args.data, size=args.size, uncertain=args.uncertain, balanced=args.balanced,
                      epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                      schedule=args.schedule, augment=args.augment, localize=args.localize, seed=args.seed,
                      workers=args.workers,
                      device=args.device, model=model,
                      shuffle_labels=args.shuffle_labels, cache_images=args.cache_images, init=args.init or "")
    result = train_classifier(cfg, args.out, progress=not args.no_progress)
    print(f"best epoch {result['best_epoch']}: val mean AUROC {result['best_val_auroc']}; saved to {args.out}")
    return 0


def cmd_classifier_predict(args: argparse.Namespace) -> int:
    import csv

    import numpy as np

    from megamed.data.layout import OBSERVATIONS
    from megamed.eval.classifier import (SEVERITY_BINS, SIDES, WithFindings, finding_scores, load_classifier,
                                         open_split, predict, severity_bin_auroc)
    from megamed.eval.metrics import auroc, f1, per_label

    model = load_classifier(args.checkpoint)
    uncertain = args.uncertain
    if uncertain is None:                    # score with the policy the classifier was trained with
        saved = json.loads((Path(args.checkpoint) / "classifier.json").read_text())
        uncertain = saved.get("train", {}).get("uncertain", "ignore")
    ds = open_split(args.data, args.split, args.size, uncertain)
    findings = model.cfg.findings
    p = predict(model, WithFindings(ds, findings) if findings else ds, args.batch_size, args.device,
                progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"] + OBSERVATIONS + [f"{n} severity" for n in findings] + [f"{n} side" for n in findings])
        for k, i in enumerate(p["index"]):
            row = [ds.rows[i]["image_path"]] + [f"{v:.4f}" for v in p["probs"][k]]
            if findings:
                row += [f"{v:.3f}" for v in p["severity"][k]] + [SIDES[s] for s in p["side"][k]]
            w.writerow(row)
    aucs = per_label(auroc, p["probs"], p["labels"])
    f1s = per_label(f1, (p["probs"] >= args.threshold).astype(float), p["labels"])
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split, "n": len(p["probs"]),
              "uncertain": uncertain,
              "threshold": args.threshold,
              "auroc": {o: (None if np.isnan(a) else float(a)) for o, a in zip(OBSERVATIONS, aucs)},
              "f1": {o: float(v) for o, v in zip(OBSERVATIONS, f1s)},
              "mean_auroc": float(np.nanmean(aucs)) if not np.isnan(aucs).all() else None,
              "findings": finding_scores(p, findings) if findings else {}}
    # example-set rows (findings known): AUROC per finding and severity bin, positives of the bin vs negatives
    known = findings and (p["side_true"] >= 0).any()
    result["severity_bin_auroc"] = (severity_bin_auroc(p["probs"], p["labels"], p["severity_true"], p["side_true"],
                                                       findings) if known else {})
    lines = [f"# Classifier on {args.data} ({args.split}, {result['n']} images)", "",
             f"Mean AUROC {result['mean_auroc']}", "", "| label | AUROC | F1 |", "|---|---|---|"]
    lines += [f"| {o} | {'n/a' if np.isnan(a) else f'{a:.3f}'} | {v:.3f} |" for o, a, v in zip(OBSERVATIONS, aucs, f1s)]
    scored = {k: v for k, v in result["findings"].items() if v["n"]}
    if scored:                               # example-set rows carry severity/side truth
        lines += ["", "| finding | n | severity MAE | side accuracy |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['severity_mae']:.3f} | {v['side_accuracy']:.3f} |" for k, v in scored.items()]
    if result["severity_bin_auroc"]:
        cols = list(SEVERITY_BINS) + ["all"]

        def cell(d):
            return "n/a" if d["auroc"] is None else f"{d['auroc']:.3f} ({d['n_pos']})"
        lines += ["", "AUROC per severity bin (positives of the bin vs images without the label; "
                  "number of positives in brackets):", "",
                  "| finding | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(cell(v[c]) for c in cols) + " |"
                  for k, v in result["severity_bin_auroc"].items()]
    # an LSE judge on rows with finding boxes: does its top cell for a label sit on the finding?
    has_boxes = "boxes" in p and "cell_argmax" in p and not np.isnan(p["boxes"]).all()
    result["localization"] = {}
    if has_boxes:
        from megamed.eval.localization import localization_figure, localization_markdown, pointing_game

        result["localization"] = pointing_game(p["cell_argmax"], p["cell_grid"], p["boxes"], findings)
        lines += [""] + localization_markdown(result["localization"])
        if args.figure:
            fig = localization_figure(model, ds, p["boxes"], out / "localization.png",   # p is in ds order
                                      names=findings, device=args.device)
            lines += ["", f"Figure: `{fig.name}` (box in green, the label's cell probabilities in red)."]
    _write(args.out, "classifier", result, "\n".join(lines) + "\n")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    from megamed.eval.fidelity import evaluate_fidelity, fidelity_markdown

    r = evaluate_fidelity(args.reference, args.generated, args.extractor, args.size, args.reference_split,
                          k=args.k, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size)
    _write(args.out, "fidelity", r, fidelity_markdown(r))
    return 0


def cmd_memorisation(args: argparse.Namespace) -> int:
    from megamed.eval.memorisation import evaluate_memorisation, memorisation_markdown

    Path(args.out).mkdir(parents=True, exist_ok=True)
    split = None if args.reference_split == "all" else args.reference_split
    r = evaluate_memorisation(args.reference, args.generated, args.extractor, args.size, split,
                              quantile=args.quantile, out_png=Path(args.out) / "memorisation_pairs.png",
                              n_pairs=args.pairs)
    _write(args.out, "memorisation", r, memorisation_markdown(r))
    return 0


def _csv_of(kind, what: str):
    def parse(text: str) -> tuple:
        try:
            vals = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return vals
    return parse


def cmd_augment(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from megamed.eval.augment import PROFILES, config_for, run_augment

    width = {k: v for k, v in (("growth", args.growth), ("blocks", args.blocks), ("init_features", args.init_features))
             if v is not None}
    classifier = replace(PROFILES[args.profile]["classifier"], **width) if width else None
    cfg = config_for(args.profile, reference=args.reference, classifier=classifier, model=args.model or "",
                     generated=args.generated or "", fractions=args.fractions, per_class=args.per_class,
                     generated_per_class=args.generated_per_class, generated_labels=args.generated_labels,
                     seeds=args.seeds, size=args.size, epochs=args.epochs, patience=args.patience,
                     batch_size=args.batch_size, lr=args.lr, epoch_items=args.epoch_items,
                     balanced=args.balanced or None, uncertain=args.uncertain, bootstrap=args.bootstrap,
                     gen_steps=args.gen_steps, guidance=args.guidance, gen_size=args.gen_size, device=args.device,
                     workers=args.workers)
    r = run_augment(cfg, args.out, progress=not args.no_progress)
    out = Path(args.out)
    print((out / "augment.md").read_text())
    print(f"wrote {out / 'augment.json'}, {out / 'augment.md'}, {out / 'augment_mean.png'}, {out / 'augment_gain.png'}"
          f" ({r['wall_time_s']['cells_run_now']} cells trained, {r['wall_time_s']['cells_skipped']} already done)")
    return 0


def cmd_alignment(args: argparse.Namespace) -> int:
    from megamed.eval.alignment import AlignmentConfig, alignment_markdown, evaluate_alignment
    from megamed.generate import SamplingConfig

    cfg = AlignmentConfig(per_finding=args.per_finding, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                          size=args.size, seed=args.seed, view=args.view, wording=args.wording,
                          threshold=args.threshold, batch_size=args.batch_size)
    scfg = SamplingConfig(steps=args.steps, sampler=args.sampler, guidance=args.guidance)
    r = evaluate_alignment(args.model, args.judge, args.out, cfg, scfg, align=args.align, device=args.device,
                           progress=not args.no_progress)
    _write(args.out, "alignment", r, alignment_markdown(r))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from megamed.eval.report import write_report

    path = write_report(args.path, args.out, reference=args.reference, inline=not args.link_images,
                        n_reference=args.n_reference)
    print(f"wrote {path}")
    return 0


def _extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", default=None,
                   help="feature extractor: a classifier directory (the judge, recommended), a DenseNet-121 "
                        ".safetensors/.pth state dict, a TorchScript file (e.g. FID Inception, with --size 299), "
                        "or 'random-conv' (default; a fixed random net, last resort)")
    p.add_argument("--size", type=int, default=256, help="images are resized to SIZE x SIZE (default 256)")


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="evaluate generated images (classifier, fidelity, memorisation, "
                                            "alignment, report)")
    sub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")

    cls = sub.add_parser("classifier", help="the judge: a DenseNet-121-style multi-label classifier")
    csub = cls.add_subparsers(dest="classifier_command", metavar="ACTION")
    t = csub.add_parser("train", help="train on DATA's train split, early-stop on its val split; rerun the "
                                      "same command to resume after a crash (OUT/train_state.pt, every epoch)")
    t.add_argument("--data", required=True, help="data set root (megamed layout or CheXpert folder)")
    t.add_argument("--out", required=True, help="output directory (classifier.safetensors + classifier.json)")
    t.add_argument("--size", type=int, default=224)
    t.add_argument("--uncertain", choices=["ones", "zeros", "ignore"], default="ignore",
                   help="CheXpert uncertain labels: U-Ones, U-Zeros or U-Ignore (default)")
    t.add_argument("--balanced", action="store_true", help="class-balanced sampling")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--patience", type=int, default=3, help="early stopping patience in epochs (val mean AUROC)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--growth", type=int, default=32, help="channels per dense layer (width); 8 for a CPU variant")
    t.add_argument("--blocks", type=_blocks, default=(6, 12, 24, 16), help="layers per dense block (default 6,12,24,16)")
    t.add_argument("--init-features", type=int, default=64)
    t.add_argument("--pool", choices=["avg", "max", "avgmax", "lse"], default="avg",
                   help="global pool of the last feature map: avg (torchvision's) or max / avgmax, which keep "
                        "findings a few pixels wide from being averaged away; lse: the classifier at every cell, "
                        "soft maximum per label")
    t.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate per step: constant, or cosine from --lr down to lr/100 at the last epoch")
    t.add_argument("--augment", action="store_true",
                   help="random shift (6%%), zoom (8%%), rotation (5 deg) and contrast per training image; no flips")
    t.add_argument("--localize", type=float, default=0.0, metavar="W",
                   help="with --pool lse on the example set: add W x a per-cell loss that marks the cells of "
                        "each finding's box (metadata.csv regions) positive and the rest negative, so the judge "
                        "learns where a finding is, not only that the image has it (default 0: off)")
    t.add_argument("--init", metavar="WEIGHTS",
                   help="fine-tune from local weights: a classifier folder, or a torchvision-named DenseNet state "
                        "dict (.safetensors/.pt/.pth, e.g. torchxrayvision's saved with model.state_dict()); "
                        "the architecture flags must match it; heads of another size start random")
    t.add_argument("--input-scale", type=float, default=1.0,
                   help="images (in [-1, 1]) are multiplied by this first: 1024 for torchxrayvision's weights")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (logs and batch jobs)")
    t.add_argument("--cache-images", action="store_true",
                   help="decode train + val once, before epoch 1 (on --workers processes), and keep them in "
                        "memory as float16: later epochs and all workers skip decoding; needs 2 bytes a "
                        "pixel of RAM (4000 images: 0.5 GB at 256 px, 2 GB at 512 px)")
    t.add_argument("--shuffle-labels", action="store_true",
                   help="control run: permute label sets among the train (and val) images; expect AUROC ~0.5")
    t.set_defaults(func=cmd_classifier_train)

    p = csub.add_parser("predict", help="probabilities (+ severity/side) for a split, AUROC/F1 where labelled")
    p.add_argument("--checkpoint", required=True, help="a `megamed eval classifier train` output directory")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--uncertain", choices=["ones", "zeros", "ignore"], default=None,
                   help="uncertain-label policy for scoring (default: the one the classifier was trained with)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold for F1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and batch jobs)")
    p.add_argument("--no-figure", dest="figure", action="store_false",
                   help="skip localization.png (drawn for an lse judge on example-set rows with finding boxes)")
    p.set_defaults(func=cmd_classifier_predict)

    f = sub.add_parser("fidelity", help="FID, KID, precision/recall and within-prompt MS-SSIM")
    f.add_argument("--reference", required=True, help="reference image folder / data set")
    f.add_argument("--generated", required=True, help="generated image folder / data set")
    f.add_argument("--reference-split", default=None, choices=["train", "val", "test"],
                   help="use only this split of the reference (default: all)")
    f.add_argument("--out", required=True)
    f.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds (default 3)")
    f.add_argument("--kid-subsets", type=int, default=100)
    f.add_argument("--kid-subset-size", type=int, default=1000)
    _extractor_args(f)
    f.set_defaults(func=cmd_fidelity)

    m = sub.add_parser("memorisation", help="nearest training image of each generated image")
    m.add_argument("--reference", required=True, help="the training data set")
    m.add_argument("--generated", required=True)
    m.add_argument("--reference-split", default="train", choices=["train", "val", "test", "all"],
                   help="split of the reference to search (default train; 'all' for a plain folder)")
    m.add_argument("--quantile", type=float, default=0.05,
                   help="flag below this quantile of the training set's leave-one-out NN distances")
    m.add_argument("--pairs", type=int, default=8, help="closest pairs drawn in memorisation_pairs.png")
    m.add_argument("--out", required=True)
    _extractor_args(m)
    m.set_defaults(func=cmd_memorisation)

    g = sub.add_parser("augment", help="train the classifier on reference subsets with and without generated images")
    g.add_argument("--reference", required=True, help="reference data set with train/val/test splits")
    g.add_argument("--model", default=None, help="the generator: model directory or training run (RUN/model)")
    g.add_argument("--out", required=True, help="output directory (resumable: finished cells and images are kept)")
    g.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="defaults: cpu = 64² small classifier, fractions 0.05,0.1,0.25,1, 20 generated per label, "
                        "3 seeds (~30 min on 2 cores); gpu = 512² DenseNet-121, 100 per label, 2000 generated, "
                        "5 seeds")
    sz = g.add_mutually_exclusive_group()
    sz.add_argument("--fractions", type=_csv_of(float, "fractions in (0, 1]"), default=None,
                    help="fractions of the reference train split, e.g. 0.01,0.1,0.25,1")
    sz.add_argument("--per-class", type=_csv_of(int, "counts"), default=None,
                    help="reference images per label instead, e.g. 100 or 20,100")
    g.add_argument("--generated-per-class", type=int, default=None, help="generated images per augmented label")
    g.add_argument("--generated-labels", type=int, default=None,
                   help="augment only the M labels with the fewest positives in the subset (default: all)")
    g.add_argument("--generated", default=None,
                   help="use images generated earlier (a `megamed generate` output) instead of generating")
    g.add_argument("--seeds", type=_csv_of(int, "seeds"), default=None, help="e.g. 0,1,2")
    g.add_argument("--size", type=int, default=None, help="classifier input size")
    g.add_argument("--growth", type=int, default=None, help="classifier width (default: the profile's)")
    g.add_argument("--blocks", type=_blocks, default=None, help="classifier layers per dense block, e.g. 2,2,2,2")
    g.add_argument("--init-features", type=int, default=None)
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--patience", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--epoch-items", type=int, default=None, help="an epoch is at least this many images")
    g.add_argument("--balanced", action="store_true", help="class-balanced sampling (default: shuffled)")
    g.add_argument("--uncertain", choices=["ones", "zeros", "ignore"], default=None)
    g.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates of the gain's CI (default 1000)")
    g.add_argument("--gen-steps", type=int, default=None, help="sampling steps for generated images")
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--gen-size", type=int, default=None, help="generated resolution (default: the model's)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: the profile's)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_augment)

    a = sub.add_parser("alignment", help="generate a balanced prompt set and let the judge check each image")
    a.add_argument("--model", required=True, help="model directory or training run (RUN/model)")
    a.add_argument("--judge", required=True, help="a `megamed eval classifier train` output trained on reference data")
    a.add_argument("--out", required=True, help="output directory (resumable: finished images are kept)")
    a.add_argument("--per-finding", type=int, default=6,
                   help="prompts per finding, spread over severity bins and sides; as many normal prompts (default 6)")
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--sampler", default="dpmpp-2m")
    a.add_argument("--guidance", type=float, default=3.0)
    a.add_argument("--size", type=int, default=None, help="image side (default: the model's resolution)")
    a.add_argument("--seed", type=int, default=0, help="prompt j of every finding uses seed + j")
    a.add_argument("--view", default="PA", choices=["PA", "AP", ""], help="view word in the prompts ('' = none)")
    a.add_argument("--wording", default="detail", choices=["detail", "plain"],
                   help="detail: 'PA chest X-ray showing moderate left pneumothorax' (severity/side scored); "
                        "plain: the finding only (what a model trained on the example set's prompt column knows)")
    a.add_argument("--threshold", type=float, default=0.5, help="judge probability counted as 'present'")
    a.add_argument("--align", default=None, help="contrastive alignment model directory (`megamed align train`)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--device", default="auto")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_alignment)

    r = sub.add_parser("report", help="one HTML page with every evaluation result found under PATH")
    r.add_argument("path", help="directory holding alignment/fidelity/memorisation/classifier/augment outputs")
    r.add_argument("--out", required=True, help="the HTML file to write")
    r.add_argument("--reference", default=None,
                   help="reference data set (megamed layout): its images of each finding beside the generated grids")
    r.add_argument("--n-reference", type=int, default=6, help="reference images per finding (default 6)")
    r.add_argument("--link-images", action="store_true",
                   help="reference images by relative path instead of embedding them (smaller HTML)")
    r.set_defaults(func=cmd_report)

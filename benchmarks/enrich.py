"""Give a judge more examples of one finding at chosen severities: a copy of an example set with
extra training images that each carry that finding (how docs/eval/judge.md gives the judge more
mild nodules to learn from).

    python benchmarks/enrich.py DATA OUT --finding "Lung Lesion" --severity 0.1:0.4 --extra 4000 --workers 2

DATA is an example set (`megamed data example`; its example.json says how to re-plan it). The
extra images are the planned items DATA would have grown by with `--count COUNT+EXTRA` (indices
COUNT onward), of training bodies only, each with FINDING added to its planned findings (severity
uniform in the range, a side the finding allows; a finding already planned is replaced). Val and
test are untouched, so a judge trained on OUT is tested on DATA's unseen bodies as before.

OUT gets DATA's images hard-linked (copied where a link fails), the new ones, metadata.csv (DATA's
rows, then the new) and enrich.json (what was added). It has no example.json: its rows are not the
plan of any config, so the analyses that re-plan a set refuse it. Rerunning resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import megamed.data.example as E
from megamed.data.layout import COLUMNS, read_metadata, write_metadata


def parse_range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    try:
        lo, hi = float(lo), float(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--severity {text!r}: expected LO:HI, e.g. 0.1:0.4") from None
    if not (sep and 0.1 <= lo < hi <= 1.0):
        raise argparse.ArgumentTypeError(f"--severity {text!r}: need 0.1 <= LO < HI <= 1 (the example set's range)")
    return lo, hi


def extra_items(cfg: E.ExampleConfig, extra: int, finding: str, severity: tuple[float, float]) -> list[dict]:
    """The training-body items among the `extra` planned after cfg.count, each given `finding`."""
    from megamed.data.findings import SIDE_CHOICES

    items = [it for it in E.plan(replace(cfg, count=cfg.count + extra))[cfg.count:] if it["split"] == "train"]
    sides = SIDE_CHOICES.get(finding, ("left", "right"))
    for it in items:
        rng = np.random.default_rng([cfg.seed, it["index"], 99])      # its own stream: the plan's draws stay
        added = {"severity": round(float(rng.uniform(*severity)), 3), "side": str(rng.choice(sides))}
        it["findings"] = dict(sorted({**it["findings"], finding: added}.items()))
    return items


def link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv=None) -> int:
    from megamed.data.findings import FINDINGS, FINDINGS_VERSION

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--finding", required=True)
    ap.add_argument("--severity", type=parse_range, default=(0.1, 1.0), metavar="LO:HI")
    ap.add_argument("--extra", type=int, required=True, help="planned items to draw the training images from")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    if args.finding not in FINDINGS:
        ap.error(f"--finding {args.finding!r}: expected one of {', '.join(sorted(FINDINGS))}")
    if args.extra < 1:
        ap.error(f"--extra must be >= 1, got {args.extra}")

    data, out = Path(args.data), Path(args.out)
    if out.resolve() == data.resolve():
        raise SystemExit("OUT must be another folder than DATA")
    try:
        cfg = replace(E.read_config(data), workers=args.workers)
    except ValueError as e:
        raise SystemExit(str(e))
    settings = {"enriched": str(data.resolve()), "finding": args.finding, "severity": list(args.severity),
                "extra": args.extra, "findings_version": FINDINGS_VERSION}      # read_config refused any other
    if (out / "enrich.json").is_file() and json.loads((out / "enrich.json").read_text()) != settings:
        raise SystemExit(f"{out} was enriched with other settings ({out / 'enrich.json'}); use another OUT")
    base = read_metadata(data)
    items = extra_items(cfg, args.extra, args.finding, args.severity)
    clash = {E.image_path(it) for it in items} & {r["Path"] for r in base}
    if clash:
        raise SystemExit(f"DATA already holds {sorted(clash)[0]}: it has grown past its example.json's count?")

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "enrich.json").write_text(json.dumps(settings, indent=2) + "\n")
    for r in tqdm(base, desc="link", unit="img", leave=False):
        link_or_copy(data / r["Path"], out / r["Path"])
    rows = {}
    if (out / "metadata.csv").is_file():
        rows = {r["Path"]: r for r in read_metadata(out)[len(base):]}
    todo = [it for it in items if not (E.png_complete(out / E.image_path(it), cfg.size) and E.image_path(it) in rows)]
    by_index = {it["index"]: it for it in items}
    print(f"{len(items)} training images with {args.finding} at severity {args.severity[0]}-{args.severity[1]}, "
          f"{len(items) - len(todo)} already rendered, {len(todo)} to render", file=sys.stderr)

    def finished(i: int, regions: dict) -> None:
        rows[E.image_path(by_index[i])] = dict(E.make_row(by_index[i]), regions=regions)

    # DATA's rows first, unchanged; then the new ones rendered so far, in plan order
    E.render_items(out, cfg, todo, finished, save=lambda: write_metadata(
        out, base + [rows[E.image_path(it)] for it in items if E.image_path(it) in rows], COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

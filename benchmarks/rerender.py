"""Render a subset of an example set's images again at another size (how docs/eval/judge.md gets a
512 px judge check on a CPU without rendering all 12000 images at 512 px).

    python benchmarks/rerender.py DATA OUT --size 512 --take test --take val:400 --take train:2400

DATA is an example set (`megamed data example`; its example.json says how to re-plan it). Each
--take SPLIT[:N] keeps that split's first N planned images (all when N is left out). The images
are the same planned items (body, pose, findings, exposure, noise seed) cast at the new size, so
a judge trained at one size can be tested at another on the same patients. OUT gets images/,
metadata.csv (DATA's rows with regions recomputed at the new size) and example.json (DATA's, with
the new size and a "subset_of" entry). Rerunning resumes: finished PNGs are kept.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import megamed.data.example as E
from megamed.data.layout import COLUMNS, SPLITS, read_metadata, write_metadata


def parse_take(text: str) -> tuple[str, int | None]:
    split, _, n = text.partition(":")
    if split not in SPLITS:
        raise argparse.ArgumentTypeError(f"--take {text!r}: split must be one of {SPLITS}")
    if n and (not n.isdigit() or int(n) < 1):
        raise argparse.ArgumentTypeError(f"--take {text!r}: N must be a positive integer")
    return split, int(n) if n else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--take", type=parse_take, action="append", required=True, metavar="SPLIT[:N]")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)

    data, out = Path(args.data), Path(args.out)
    try:
        made = E.read_config(data)
    except ValueError as e:
        raise SystemExit(str(e))
    cfg = replace(made, size=args.size, render_px=max(made.render_px, args.size), workers=args.workers)
    old = json.loads((data / "example.json").read_text())
    items = E.plan(cfg)
    # the rows DATA wrote are the source of truth for labels/prompts; the plan must agree with them
    src = {r["Path"]: r for r in read_metadata(data)}
    chosen = []
    for split, n in args.take:
        of_split = [it for it in items if it["split"] == split and E.image_path(it) in src]
        chosen += of_split[:n]
    if not chosen:
        raise SystemExit("nothing to render: no planned item of the --take splits is in DATA's metadata.csv")
    for it in chosen:
        if json.loads(src[E.image_path(it)]["findings"] or "{}") != it["findings"]:
            raise SystemExit(f"{E.image_path(it)}: DATA's findings differ from the plan's; was DATA made by another megamed?")

    (out / "images").mkdir(parents=True, exist_ok=True)
    settings = dict(old, size=cfg.size, render_px=cfg.render_px,
                    subset_of=str(data.resolve()), take=[f"{s}:{n or 'all'}" for s, n in args.take])
    (out / "example.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    rows = {}
    if (out / "metadata.csv").is_file():
        rows = {r["Path"]: dict(r, regions=json.loads(r["regions"] or "{}")) for r in read_metadata(out)}
    todo = [it for it in chosen if not (E.png_complete(out / E.image_path(it), cfg.size) and E.image_path(it) in rows)]
    print(f"{len(chosen)} images chosen, {len(chosen) - len(todo)} already rendered, {len(todo)} to render",
          file=sys.stderr)

    def finished(i: int, regions: dict) -> None:
        path = E.image_path({"index": i})
        rows[path] = dict(src[path], regions=regions)

    E.render_items(out, cfg, todo, finished, save=lambda: write_metadata(
        out, [rows[E.image_path(it)] for it in chosen if E.image_path(it) in rows], COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

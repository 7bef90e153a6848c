"""`megamed quickstart --out DIR [--fast]`: example data, samples from the shipped checkpoint,
a measurement, a short training and DIR/report.html (see megamed.quickstart)."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="the whole pipeline, small, with an HTML report",
                              description="Render a small example set, sample every finding from the shipped "
                                          "pretrained checkpoint, measure the cardiac silhouette, train briefly "
                                          "from scratch, and write OUT/report.html. Rerunning skips finished "
                                          "images and the finished training.")
    p.add_argument("--out", default="quickstart", help="output directory (default ./quickstart)")
    p.add_argument("--fast", action="store_true", help="tiny sizes, under a minute: a smoke test, not results")
    p.add_argument("--pretrained", help="model dir to sample from (default: the shipped megamed/pretrained/small)")
    p.add_argument("--count", type=int, help="example images (default 80; --fast 4)")
    p.add_argument("--workers", type=int, help="render processes (default 2)")
    p.add_argument("--train-steps", type=int, help="steps of the from-scratch training (default 150)")
    p.add_argument("--seed", type=int, help="first sample seed (default 0)")
    p.set_defaults(func=run_quickstart)


def run_quickstart(args) -> int:
    from megamed.quickstart import FAST, QuickstartConfig, run

    fields = dict(FAST) if args.fast else {}
    for flag, field in (("pretrained", "pretrained"), ("count", "count"), ("workers", "workers"),
                        ("train_steps", "train_steps"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            fields[field] = getattr(args, flag)
    try:
        summary = run(args.out, QuickstartConfig(**fields))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {summary['total_s']:.0f} s: open {args.out}/report.html")
    return 0

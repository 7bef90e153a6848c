"""`megamed data example|inspect|contact-sheets`: the example data set rendered from a real CT."""
from __future__ import annotations

import argparse


def cmd_example(args: argparse.Namespace) -> int:
    from megamed.data.example import ExampleConfig, generate

    cfg = ExampleConfig(count=args.count, size=args.size, seed=args.seed, workers=args.workers,
                        bodies=args.bodies, render_px=args.render_px)
    n = generate(args.out, cfg)
    print(f"rendered {n} image(s); {cfg.count} in {args.out}/metadata.csv")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json
    from collections import Counter

    from megamed.data.layout import OBSERVATIONS, read_metadata

    rows = read_metadata(args.dir)
    print(f"{len(rows)} images in {args.dir}")
    print("splits:", dict(Counter(r.get("split", "") for r in rows)))
    print("views: ", dict(Counter(r.get("AP/PA", "") for r in rows)))
    bodies = {}
    for r in rows:
        if r.get("params"):
            bodies.setdefault(r.get("split"), set()).add(json.loads(r["params"]).get("body_seed"))
    print("bodies per split:", {k: len(v) for k, v in bodies.items()})
    for o in OBSERVATIONS:
        pos = sum(r.get(o) == "1.0" for r in rows)
        print(f"  {o:28s} {pos:6d}  {100.0 * pos / max(1, len(rows)):5.1f}%")
    for r in rows[: args.show]:
        print(f"{r['Path']}: {r['prompt']}")
    return 0


def cmd_contact_sheets(args: argparse.Namespace) -> int:
    from megamed.data.example import contact_sheets

    for p in contact_sheets(args.out, size=args.size):
        print(p)
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="example data set rendered from a real chest CT")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    p = sub.add_parser("example", help="render DIR/metadata.csv + DIR/images/*.png (resumable)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--count", type=int, default=200,
                   help="number of images (default 200); a larger count grows an existing --out")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, >= 32 (default 512)")
    p.add_argument("--seed", type=int, default=0, help="data set seed: same seed, same bytes")
    p.add_argument("--workers", type=int, default=1, help="render processes (1 torch thread each)")
    p.add_argument("--bodies", type=int, default=None, help="distinct bodies (default max(10, count // 5))")
    p.add_argument("--render-px", type=int, default=512, help="ray-casting resolution cap (default 512)")
    p.set_defaults(func=cmd_example)

    p = sub.add_parser("inspect", help="summarise a data set directory")
    p.add_argument("dir", help="directory holding metadata.csv")
    p.add_argument("--show", type=int, default=5, help="print this many prompts")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("contact-sheets", help="one PNG per finding (PA/AP x normal/0.5/1.0) for the docs")
    p.add_argument("--out", default="docs/findings", help="output directory (default docs/findings)")
    p.add_argument("--size", type=int, default=384, help="tile side in pixels (default 384)")
    p.set_defaults(func=cmd_contact_sheets)

    data.set_defaults(func=lambda args: data.print_help() or 2)

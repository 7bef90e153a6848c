"""`megamed text tokenizer|prompts`: build tokenizers, print prompts for label rows.

    megamed text tokenizer --kind templates --out DIR [--vocab-size 1024]
    megamed text tokenizer --kind reports [--out DIR] [--vocab-size 8192]   (default: the cache)
    megamed text prompts --labels CSV [--view] [--detail]
    megamed text prompts --sample N [--seed S]      (label sets drawn from CheXpert's statistics)
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("text", help="tokenizers and prompts")
    sub = p.add_subparsers(dest="text_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = sub.add_parser("tokenizer", help="train a byte-level BPE prompt tokenizer")
    t.add_argument("--kind", choices=("templates", "reports"), required=True,
                   help="templates: our prompt templates only (shippable); "
                        "reports: IU reports + CheXpert prompts (licensed data, stays in your cache)")
    t.add_argument("--out", default=None, help="output folder for tokenizer.json "
                                               "(required for templates; reports default to the cache)")
    t.add_argument("--vocab-size", type=int, default=None, help="default 1024 (templates) / 8192 (reports)")
    t.set_defaults(func=cmd_tokenizer)

    q = sub.add_parser("prompts", help="print one prompt per label row")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="CSV with CheXpert label columns (megamed metadata.csv works)")
    src.add_argument("--sample", type=int, help="draw N label sets from CheXpert's empirical distribution")
    q.add_argument("--seed", type=int, default=0, help="seed for --sample")
    q.add_argument("--view", action="store_true", help="put the row's view (AP/PA/lateral) in the prompt")
    q.add_argument("--detail", action="store_true", help="use the findings JSON column (severity, side)")
    q.set_defaults(func=cmd_prompts)


def cmd_tokenizer(args) -> int:
    from pathlib import Path

    from megamed.text.tokenizer import build_template_tokenizer, inside_git_checkout, train_report_tokenizer

    if args.vocab_size is not None and args.vocab_size < 259:
        print(f"--vocab-size must be >= 259 (256 bytes + 3 special tokens), got {args.vocab_size}", file=sys.stderr)
        return 2
    if args.kind == "templates":
        if not args.out:
            print("--out is required for --kind templates", file=sys.stderr)
            return 2
        tok = build_template_tokenizer(args.vocab_size or 1024)
        path = tok.save(args.out)
    else:
        if args.out and (repo := inside_git_checkout(args.out)):
            print(f"refusing --out {args.out}: it is inside the git checkout {repo}. The report tokenizer is "
                  f"derived from the IU reports (CC BY-NC-ND 4.0) and CheXpert labels (Stanford research terms); "
                  f"it must stay in your cache, never in a repository. Leave --out out to use the cache.",
                  file=sys.stderr)
            return 2
        tok = train_report_tokenizer(args.vocab_size or 8192, args.out)
        from megamed import flags
        from megamed.text.tokenizer import REPORTS_SUBDIR
        path = Path(args.out or flags.cache_dir() / REPORTS_SUBDIR) / "tokenizer.json"
    print(f"{path}  (vocab {tok.vocab_size})")
    return 0


def _row_view(row: dict) -> str | None:
    if (row.get("Frontal/Lateral") or "").strip().lower() == "lateral":
        return "lateral"
    view = (row.get("AP/PA") or "").strip().upper()
    return view if view in ("AP", "PA") else None


def cmd_prompts(args) -> int:
    import json

    from megamed.data.layout import OBSERVATIONS, read_metadata
    from megamed.text.prompts import prompt_from_labels

    if args.sample is not None:
        from megamed.text.labels import LabelSampler

        if args.sample < 0:
            print(f"--sample must be >= 0, got {args.sample}", file=sys.stderr)
            return 2
        for labels in LabelSampler.from_chexpert().sample(args.sample, seed=args.seed):
            print(prompt_from_labels(labels))
        return 0
    try:
        rows = read_metadata(args.labels)
    except (OSError, ValueError) as e:
        print(f"--labels: {e}", file=sys.stderr)
        return 2
    for line, row in enumerate(rows, start=2):
        try:
            labels = {n: row[n] for n in OBSERVATIONS if n in row}
            findings = json.loads(row["findings"]) if args.detail and (row.get("findings") or "").strip() else None
            print(prompt_from_labels(labels, findings, view=_row_view(row) if args.view else None,
                                     detail=findings is not None))
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            print(f"{args.labels}:{line}: {e}", file=sys.stderr)
            return 1
    return 0

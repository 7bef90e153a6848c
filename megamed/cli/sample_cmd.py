"""`megamed sample` (prompts -> 16-bit PNGs) and `megamed generate` (label CSV -> data set).

    megamed sample --model RUN --prompt "Chest X-ray showing cardiomegaly" --n 4 --grid --out OUT
    megamed generate --model RUN --labels labels.csv --out SYNTH --batch 8

--model takes a training run (its EMA export RUN/model is used) or a model directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_sampling_flags(p) -> None:
    p.add_argument("--model", required=True, help="training run dir (uses RUN/model) or model dir")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--sampler", default="dpmpp-2m", help="euler, heun, ddim, euler-ancestral, dpmpp-2m (default)")
    p.add_argument("--eta", type=float, help="ddim / euler-ancestral noise (defaults 0 / 1)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale, 1 = off (default 3)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="apply guidance only for LO < sigma <= HI")
    p.add_argument("--negative-prompt", default="", help="prompt to steer away from (default: unconditional)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--batch", type=int, default=8, help="images per forward batch (default 8)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample images for prompts",
                              description="Sample 16-bit PNGs with provenance text chunks.")
    _add_sampling_flags(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--size", type=int, help="square size (default: the model's default_resolution)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--grid", action="store_true", help="also write OUT/grid.png")
    p.set_defaults(func=run_sample)

    g = subparsers.add_parser("generate", help="generate a synthetic data set from a CheXpert label CSV",
                              description="One image per label row, written in megamed's data-set layout "
                                          "(OUT/metadata.csv + OUT/images/). Re-running resumes.")
    _add_sampling_flags(g)
    g.add_argument("--labels", required=True, help="CheXpert-format CSV (a 'prompt' column overrides the labels)")
    g.add_argument("--size", type=int, help="square size (default: the model's default_resolution)")
    g.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill after K images
    g.set_defaults(func=run_generate)


def _sampling_config(args):
    from megamed.generate import SamplingConfig

    return SamplingConfig(steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                          guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
                          negative_prompt=args.negative_prompt, eta=args.eta)


def run_sample(args) -> int:
    from megamed.generate import load_pipeline, sample_to_dir

    try:
        prompts = list(args.prompt)
        if args.prompts_file:
            lines = Path(args.prompts_file).read_text().splitlines()
            prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError("give --prompt and/or --prompts-file")
        if args.size is not None and (args.height is not None or args.width is not None):
            raise ValueError("give --size or --height/--width, not both")
        cfg = _sampling_config(args)
        pipe = load_pipeline(args.model, args.device)
        height = args.height or args.size
        width = args.width or args.size
        paths = sample_to_dir(pipe, prompts, args.out, n=args.n, seed=args.seed, height=height, width=width,
                              cfg=cfg, batch_size=args.batch, grid=args.grid, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} image(s) to {args.out}")
    return 0


def run_generate(args) -> int:
    from megamed.generate import generate_dataset, load_pipeline

    try:
        cfg = _sampling_config(args)
        pipe = load_pipeline(args.model, args.device)
        result = generate_dataset(pipe, args.labels, args.out, seed=args.seed, size=args.size, cfg=cfg,
                                  batch_size=args.batch, stop_after=args.stop_after, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['done']}/{result['total']} images in {args.out} "
          f"({result['generated']} new, {result['skipped']} already there)")
    return 0

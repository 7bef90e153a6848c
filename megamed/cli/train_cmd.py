"""`megamed train`: train a model on a data set in megamed's layout (or resume a run).

    megamed train --config tiny --data DATA --out RUN --max-steps 1000
    megamed train --out RUN --resume [--max-steps 2000]
    torchrun --nproc_per_node 2 -m megamed train ... --zero-stage 3     # DeepSpeed ZeRO, 2 processes
    deepspeed --num_gpus 8 --module megamed train ... --deepspeed configs/deepspeed/zero2.json

Every flag defaults to None here, so we know which ones the user actually gave: a fresh run
fills the rest from TrainConfig's defaults; a resumed run takes them from RUN/config.json and
refuses given flags that would change what a step computes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# flag dest -> TrainConfig field
_FIELDS = {
    "max_steps": "max_steps", "batch": "batch_size", "lr": "lr", "size": "size", "warmup_steps": "warmup_steps",
    "grad_clip": "grad_clip", "grad_checkpointing": "grad_checkpointing", "ema_decay": "ema_decay",
    "cond_drop": "cond_drop_prob", "save_every": "save_every", "keep_last": "keep_last",
    "sample_every": "sample_every", "sample_steps": "sample_steps", "log_every": "log_every", "seed": "seed",
    "tokenizer": "tokenizer", "device": "device", "workers": "num_workers", "split": "split",
    "tensorboard": "tensorboard", "grad_accum_steps": "grad_accum_steps",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a diffusion model (or --resume a run)",
                              description="Train a MegaMed diffusion model. Writes RUN/config.json, "
                                          "RUN/checkpoints/step-N/, RUN/model/ (EMA export), RUN/logs/, RUN/samples/.")
    p.add_argument("--config", help="model config name (tiny, small, base, large-1024, ...) or JSON path")
    p.add_argument("--diffusion", help="JSON file of DiffusionConfig fields (default: EDM settings)")
    p.add_argument("--data", help="data-set directory (metadata.csv + images/)")
    p.add_argument("--out", help="run directory RUN (required unless --plan)")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (default 1000)")
    p.add_argument("--batch", type=int, help="batch size (default 8)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, help="linear LR warmup steps (default 100)")
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--size", type=int, help="training resolution (default: the model's default_resolution)")
    p.add_argument("--grad-checkpointing", action="store_const", const=True, help="recompute activations in backward")
    p.add_argument("--ema-decay", type=float, help="max EMA decay (default 0.9999, with power warmup)")
    p.add_argument("--cond-drop", type=float, help="P(drop the prompt) per sample for CFG (default 0.1)")
    p.add_argument("--save-every", type=int, help="checkpoint every K steps (default 500)")
    p.add_argument("--keep-last", type=int, help="keep the newest K checkpoints, 0 = all (default 3)")
    p.add_argument("--sample-every", type=int, help="write RUN/samples/step-N.png every K steps, 0 = never (default 0)")
    p.add_argument("--sample-steps", type=int, help="sampler steps for the sample grids (default 20)")
    p.add_argument("--log-every", type=int, help="metrics row every K steps (default 10)")
    p.add_argument("--seed", type=int, help="seed of everything random (default 0)")
    p.add_argument("--tokenizer", help="'templates' (default) or a saved tokenizer directory")
    p.add_argument("--split", help="metadata split to train on (default train; 'all' = every row)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False,
                   help="metrics.csv only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--grad-accum-steps", type=int,
                   help="micro-batches per step and process: same global --batch, less activation memory (default 1)")
    g = p.add_argument_group("DeepSpeed ZeRO (launch with torchrun or deepspeed for several processes)")
    g.add_argument("--deepspeed", metavar="CONFIG",
                   help="DeepSpeed JSON config, or a shipped example name (zero1, zero2, zero3, zero3-offload, ...)")
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3],
                   help="shortcut that writes RUN/deepspeed.json: ZeRO stage (0 = plain data parallel)")
    g.add_argument("--offload-optimizer", choices=["cpu", "none"], help="with --zero-stage >= 1: Adam states on CPU")
    g.add_argument("--offload-params", choices=["cpu", "none"], help="with --zero-stage 3: parameters on CPU too")
    # the `deepspeed` launcher appends --local_rank=N (torchrun sets LOCAL_RANK); the value is read from the env
    g.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    from megamed.train.plan import add_arguments as add_plan_arguments

    add_plan_arguments(p)  # --plan, --gpu-memory, --gpus, --plan-dtype
    p.set_defaults(func=run_train)


def _overrides(args) -> dict:
    out = {}
    for dest, field in _FIELDS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if field == "split" and value == "all":
            value = None
        if field == "tokenizer" and value != "templates":
            value = str(Path(value).resolve())
        out[field] = value
    return out


def deepspeed_config(args) -> dict | None:
    """The DeepSpeed config the flags ask for (validated: an unknown key fails here, before any
    model is built), or None if they ask for none."""
    from megamed.train import zero

    offload = [f for f in ("offload_optimizer", "offload_params") if getattr(args, f, None) is not None]
    if args.deepspeed is not None and args.zero_stage is not None:
        raise ValueError("give --deepspeed CONFIG or --zero-stage N, not both")
    if args.deepspeed is not None:
        if offload:
            raise ValueError(f"--{offload[0].replace('_', '-')} goes with --zero-stage; with --deepspeed set "
                             f"zero_optimization.offload_* in the JSON")
        return zero.load_config(args.deepspeed)
    if args.zero_stage is not None:
        return zero.build_config(args.zero_stage, args.offload_optimizer, args.offload_params)
    if offload:
        raise ValueError(f"--{offload[0].replace('_', '-')} needs --zero-stage")
    return None


def run_train(args) -> int:
    from megamed.diffusion import DiffusionConfig
    from megamed.models import load_model_config
    from megamed.train import NonFiniteLossError, TrainConfig, load_run_config, train
    from megamed.train.config import apply_overrides, resume_conflicts
    from megamed.utils.dataclass_json import ConfigError, load_json

    if args.plan:
        from megamed.train import plan

        return plan.main(args)
    if not args.out:
        raise ValueError("--out is required (the run directory), unless --plan")
    run_dir = Path(args.out)
    if "local_rank" in args:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger().setLevel(logging.WARNING)  # only rank 0 reports progress
    overrides = _overrides(args)
    if args.data is not None:
        overrides["data"] = str(Path(args.data).resolve())
    ds_config = deepspeed_config(args)
    if ds_config is not None:
        overrides["deepspeed"] = True
    try:
        if args.resume and (run_dir / "config.json").is_file():
            model_cfg, diffusion_cfg, stored = load_run_config(run_dir)
            problems = resume_conflicts(stored, overrides)
            if args.config is not None and load_model_config(args.config) != model_cfg:
                problems.insert(0, f"config: {args.config!r} is not the model this run was started with")
            if args.diffusion is not None and load_json(DiffusionConfig, args.diffusion) != diffusion_cfg:
                problems.insert(0, f"diffusion: {args.diffusion} differs from the run's diffusion config")
            if problems:
                print(f"error: --resume: these flags disagree with {run_dir / 'config.json'} "
                      f"(drop them to keep the run's values, or start a new --out):\n  " + "\n  ".join(problems),
                      file=sys.stderr)
                return 2
            train_cfg = apply_overrides(stored, overrides)
        else:
            if args.config is None or args.data is None:
                print("error: --config and --data are required to start a run "
                      f"({run_dir / 'config.json'} not found{' to resume' if args.resume else ''})", file=sys.stderr)
                return 2
            model_cfg = load_model_config(args.config)
            diffusion_cfg = load_json(DiffusionConfig, args.diffusion) if args.diffusion else DiffusionConfig()
            train_cfg = TrainConfig(**overrides)
        result = train(run_dir, model_cfg, diffusion_cfg, train_cfg, resume=args.resume,
                       progress=not args.no_progress, deepspeed_config=ds_config)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) > 0:
        return 0
    if result["interrupted"]:
        print(f"interrupted at step {result['step']}: checkpoint {result['checkpoint']} written; "
              f"continue with: megamed train --out {run_dir} --resume")
    else:
        print(f"done: step {result['step']} ({result['steps_run']} this run), loss {result['loss']:.4f}, "
              f"{result['images_per_s']:.1f} images/s; model: {result['model_dir']}")
    return 0

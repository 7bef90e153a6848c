"""`megamed export-weights RUN`: write RUN/model/ (what `megamed sample` loads) from a checkpoint.

    megamed export-weights runs/big                      # EMA of the latest checkpoint -> RUN/model/
    megamed export-weights runs/big --step 4000 --weights train --out exports/step4000

Works for single-process and DeepSpeed ZeRO runs alike (a ZeRO checkpoint's training weights are
reassembled from every rank's partition on the CPU); needs neither GPUs nor a launcher.
"""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export-weights", help="write RUN/model/ from a training checkpoint",
                              description="Export a checkpoint of a training run as a model directory "
                                          "(safetensors + config + tokenizer), as the trainer does at every save.")
    p.add_argument("run", help="training run directory RUN")
    p.add_argument("--step", type=int, help="checkpoint step-N to export (default: the latest)")
    p.add_argument("--weights", choices=["ema", "train"], default="ema",
                   help="EMA weights (default; what the trainer exports) or the training weights")
    p.add_argument("--out", help="model directory to write (default: RUN/model, replaced atomically)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from megamed.train.trainer import export_checkpoint

    path = export_checkpoint(args.run, step=args.step, weights=args.weights, out=args.out)
    print(f"wrote {path} ({args.weights} weights)")
    return 0

"""`megamed align train|score`: the contrastive image-text alignment model (megamed.models.align).

    megamed align train --data DIR --out DIR [--size 128] [--steps 2000] [--batch 32] [--lr 5e-4] [--config JSON]
    megamed align score --model DIR --image PNG [PNG ...] --prompt TEXT
"""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("align", help="contrastive image-text alignment model (metric / reward)")
    sub = p.add_subparsers(dest="align_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="train on a megamed-layout data set (train split), "
                                     "report image->text retrieval on the val split")
    t.add_argument("--data", required=True, help="data set folder (metadata.csv + images/)")
    t.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, tokenizer/, "
                                                "metrics.json)")
    t.add_argument("--size", type=int, default=128, help="image side the model sees (default 128)")
    t.add_argument("--config", default=None, help="AlignConfig JSON (architecture; its image_size must equal "
                                                   "--size); default: AlignConfig(image_size=SIZE)")
    t.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    t.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    t.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("score", help="cosine similarity between image(s) and a prompt")
    s.add_argument("--model", required=True, help="folder written by `megamed align train`")
    s.add_argument("--image", nargs="+", required=True, help="PNG/JPEG file(s)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_score)


def cmd_train(args) -> int:
    from megamed.models.align import AlignConfig, train_align
    from megamed.utils.dataclass_json import load_json

    cfg = load_json(AlignConfig, args.config) if args.config else None
    metrics = train_align(args.data, args.out, size=args.size, cfg=cfg, steps=args.steps, batch_size=args.batch,
                          lr=args.lr, warmup=args.warmup, seed=args.seed, device=args.device,
                          workers=args.workers, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_score(args) -> int:
    import torch

    from megamed.data.images import read_image
    from megamed.data.loaders import center_crop_resize
    from megamed.models.align import load_align

    model = load_align(args.model, device=args.device)
    s = model.cfg.image_size
    images = []
    for path in args.image:
        img = center_crop_resize(torch.from_numpy(read_image(path)).float(), (s, s))  # [s, s] in [0, 1], as training
        images.append((img * 2 - 1)[None, None])                                      # [1, 1, s, s] in [-1, 1]
    scores = model.score(torch.cat(images), [args.prompt])
    for path, value in zip(args.image, scores.tolist()):
        print(f"{value:+.4f}  {path}")
    return 0

"""`megamed model info|convert`: inspect a model config (parameters, MACs, FLOPs) or re-save weights.

    megamed model info --config tiny --res 64          # one config, per-component breakdown
    megamed model info --config base --height 1024 --width 768
    megamed model info                                 # table of every shipped config at its default size
    megamed model convert runs/x/final out/x-fp16 --half
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="model configs: parameters, FLOPs; convert saved weights")
    sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")

    info = sub.add_parser("info", help="parameters, multiply-adds and FLOPs of one forward")
    info.add_argument("--config", default=None,
                      help="shipped config name or JSON path (default: table of all shipped configs)")
    info.add_argument("--res", type=int, default=None, help="square resolution (default: the config's)")
    info.add_argument("--height", type=int, default=None)
    info.add_argument("--width", type=int, default=None)
    info.add_argument("--text-length", type=int, default=None, help="prompt tokens (default: text.max_length)")
    info.set_defaults(func=cmd_info)

    convert = sub.add_parser("convert", help="re-save a saved model directory (e.g. as fp16)")
    convert.add_argument("src", help="directory written by save_pretrained")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--half", action="store_true", help="store float16 weights")
    convert.set_defaults(func=cmd_convert)

    model.set_defaults(func=lambda args: model.print_help() or 2)


def _size(args: argparse.Namespace, default: int) -> tuple[int, int]:
    if args.res is not None and (args.height is not None or args.width is not None):
        raise ValueError("--res and --height/--width: give one or the other")
    if args.res is not None:
        return args.res, args.res
    return (args.height if args.height is not None else default, args.width if args.width is not None else default)


def cmd_info(args: argparse.Namespace) -> int:
    try:
        return _info(args)
    except ValueError as e:  # bad name or size: one line, not a traceback
        print(f"megamed model info: error: {e}", file=sys.stderr)
        return 2


def _info(args: argparse.Namespace) -> int:
    from megamed.models import count_flops, list_configs, load_model_config
    from megamed.models.flops import format_table, human

    if args.config is None:
        if any(v is not None for v in (args.res, args.height, args.width)):
            raise ValueError("--res/--height/--width need --config (each shipped config has its own default size)")
        rows = [(name, count_flops(load_model_config(name), text_length=args.text_length)) for name in list_configs()]
        print(format_table(rows))
        return 0
    cfg = load_model_config(args.config)
    height, width = _size(args, cfg.default_resolution)
    r = count_flops(cfg, height, width, text_length=args.text_length)
    print(format_table([(str(args.config), r)]))
    print(f"\nper component (multiply-adds of one forward, batch 1, {r['text_length']} text tokens):")
    for name, macs in r["by_component"].items():
        if macs:
            print(f"  {name:<18} {human(macs):>12}  {100 * macs / r['macs']:5.1f}%")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from megamed.models.io import convert

    out = convert(args.src, args.dst, half=args.half)
    print(f"wrote {out}")
    return 0

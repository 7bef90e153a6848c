"""`megamed` command line. Each concern owns its subcommands in its own module.

A module listed in _COMMANDS exposes `register(subparsers)`, which adds its parser(s) and
sets `func=callable(args) -> int | None` on them. Modules are imported only when listed,
and heavy imports happen inside the command functions, so `megamed --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module path -> one-line description (shown when the module fails to import)
_COMMANDS = [
    "megamed.cli.data_cmd",        # megamed data example|inspect
    "megamed.cli.text_cmd",        # megamed text tokenizer|prompts
    "megamed.cli.model_cmd",       # megamed model info
    "megamed.cli.align_cmd",       # megamed align train
    "megamed.cli.train_cmd",       # megamed train
    "megamed.cli.export_weights_cmd",  # megamed export-weights
    "megamed.cli.sample_cmd",      # megamed sample | generate
    "megamed.cli.eval_cmd",        # megamed eval classifier|fidelity|memorisation
    "megamed.cli.quickstart_cmd",  # megamed quickstart
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamed", description="High-resolution medical image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # the `deepspeed` launcher runs `megamed --local_rank=N train ...` (its value is also in LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command module is not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input and known failures (FetchError, ConfigError, BackendUnavailable, ...) read as
        # one line; --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"megamed {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

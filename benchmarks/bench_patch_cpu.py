"""CPU timing of patch_merge / patch_split: the C++ backend (`cpp`, megamed._C) vs `reference`.

    .venv/bin/python benchmarks/bench_patch_cpu.py                   # B=2, 64x64, C=128, f=2
    .venv/bin/python benchmarks/bench_patch_cpu.py --threads 1 --dtype bfloat16

merge: x [B, S, S, C] -> [B, S/f, S/f, 2C]; split: x [B, S/f, S/f, 2C] -> [B, S, S, C], with and
without the fused skip/lerp blend. Both backends are checked to agree before timing.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from megamed import extension_status
from megamed.ops import patch_merge, patch_split


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="fine-level H = W")
    p.add_argument("--channels", type=int, default=128, help="fine-level C (the coarse level has 2C)")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = p.parse_args()
    for name in ("batch", "size", "channels", "factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.size % args.factor:
        p.error(f"--size {args.size} must be divisible by --factor {args.factor}")
    return args


def main() -> None:
    args = parse_args()
    if not extension_status()["loaded"]:
        raise SystemExit(f"megamed._C is not loaded ({extension_status()['reason']}); "
                         "build it: pip install --no-build-isolation -e .")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    B, S, C, f = args.batch, args.size, args.channels, args.factor
    g = torch.Generator().manual_seed(0)
    x_fine = torch.randn(B, S, S, C, generator=g).to(dtype)
    x_coarse = torch.randn(B, S // f, S // f, 2 * C, generator=g).to(dtype)
    w_merge = (torch.randn(2 * C, f * f * C, generator=g) / (f * f * C) ** 0.5).to(dtype)
    w_split = (torch.randn(f * f * C, 2 * C, generator=g) / (2 * C) ** 0.5).to(dtype)
    bias = torch.randn(2 * C, generator=g).to(dtype)
    lerp = torch.rand(C, generator=g).to(dtype)

    cases = {
        "merge": lambda be: patch_merge(x_fine, w_merge, bias, factor=f, backend=be),
        "split": lambda be: patch_split(x_coarse, w_split, factor=f, backend=be),
        "split+lerp": lambda be: patch_split(x_coarse, w_split, factor=f, skip=x_fine, lerp=lerp, backend=be),
    }
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    print(f"B={B} {S}x{S} C={C} f={f} {args.dtype}, threads={torch.get_num_threads()}")
    print(f"{'case':<12}{'reference ms':>14}{'cpp ms':>10}{'speed-up':>10}")
    for name, run in cases.items():
        torch.testing.assert_close(run("cpp").float(), run("reference").float(), atol=tol, rtol=tol)
        ms = {}
        for be in ("reference", "cpp"):
            t = benchmark.Timer("run(be)", globals={"run": run, "be": be}, num_threads=torch.get_num_threads())
            ms[be] = t.blocked_autorange(min_run_time=args.min_run_time).median * 1e3
        print(f"{name:<12}{ms['reference']:>14.2f}{ms['cpp']:>10.2f}{ms['reference'] / ms['cpp']:>9.2f}x")


if __name__ == "__main__":
    main()

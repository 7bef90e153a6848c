"""CPU timing of neighborhood attention: `reference`, the halo-tiled matmul backend (`tiled`) and the
compiled C++ kernels (`cpp`, csrc/na2d_cpu.cpp; skipped with a note when megamed._C lacks them).

    .venv/bin/python benchmarks/bench_na_cpu.py                    # 1 thread, attention + small train step
    .venv/bin/python benchmarks/bench_na_cpu.py --no-train-step --tile 4 8
    .venv/bin/python benchmarks/bench_na_cpu.py --no-train-step --batch 2 --head-dim 64 --shapes 32x4 64x4

Part 1, the op alone, by default at the shapes of the `small` model at 128^2 (patch 4: level 0
is 32x32 tokens with 2 heads of 64/32, level 1 is 16x16 with 4 heads), B=8, D=32, k=7: forward,
and forward+backward through autograd, q/k/v strided slices of one packed projection. Every
backend is checked against the reference before timing; speed-ups are over the reference.

Part 2, one whole `small` training step (batch 8, 128^2, text conditioning, AdamW) with
neighborhood attention forced to each backend through MEGAMED_BACKEND, as the trainer runs it.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils import benchmark

import megamed.ops._tiled as tiled  # registers the backend (until megamed.ops imports it itself)
from megamed import flags
from megamed.ops import can_run, neighborhood_attention

BACKENDS = ("reference", "tiled", "cpp")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--tile", type=int, nargs=2, default=list(tiled.DEFAULT_TILE), metavar=("TH", "TW"),
                   help="query tile of the tiled backend (op timings and train step)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per op measurement")
    p.add_argument("--train-steps", type=int, default=2, help="timed train steps per backend (after 1 warm-up)")
    p.add_argument("--no-train-step", action="store_true", help="skip part 2")
    p.add_argument("--shapes", nargs="+", default=["32x2", "16x4", "32x4"], metavar="SIZExHEADS",
                   help="token grids (SIZE x SIZE) and head counts of part 1")
    args = p.parse_args()
    try:
        args.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        p.error(f"--shapes must look like 32x2, got {args.shapes}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes):
        p.error(f"--shapes must look like 32x2, got {args.shapes}")
    for name in ("batch", "head_dim", "kernel_size", "threads", "train_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.kernel_size % 2 == 0:
        p.error("--kernel-size must be odd")
    if min(args.tile) < 1:
        p.error("--tile sizes must be >= 1")
    return args


def _timer(stmt_fn, min_run_time: float) -> float:
    """Median ms of stmt_fn() over blocked_autorange."""
    t = benchmark.Timer("f()", globals={"f": stmt_fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def runnable(args: argparse.Namespace) -> list[str]:
    """The backends of BACKENDS that can run here (a cpp without megamed._C is reported, not timed)."""
    q = torch.zeros(1, 8, 8, 1, args.head_dim, dtype=getattr(torch, args.dtype))
    out = []
    for be in BACKENDS:
        reason = can_run("neighborhood_attention", be, q, q, q, args.kernel_size, dilation=1, scale=1.0)
        if reason is None:
            out.append(be)
        else:
            print(f"  ({be} skipped: {reason})")
    return out


def bench_op(args: argparse.Namespace, size: int, heads: int, backends: list[str]) -> None:
    dtype = getattr(torch, args.dtype)
    B, D, ks = args.batch, args.head_dim, args.kernel_size
    g = torch.Generator().manual_seed(0)
    # q, k, v as strided slices of one packed projection, as the model produces them
    packed = torch.randn(B, size, size, 3, heads, D, generator=g).to(dtype).requires_grad_()
    q, k, v = packed.unbind(3)
    go = torch.randn(q.shape, generator=g).to(dtype)

    def fwd(be):
        return neighborhood_attention(q.detach(), k.detach(), v.detach(), ks, backend=be)

    def fwd_bwd(be):
        out = neighborhood_attention(q, k, v, ks, backend=be)
        return torch.autograd.grad(out, packed, go)[0]

    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    ref_f, ref_fb = fwd("reference").float(), fwd_bwd("reference").float()
    for be in backends[1:]:
        torch.testing.assert_close(fwd(be).float(), ref_f, atol=tol, rtol=tol)
        torch.testing.assert_close(fwd_bwd(be).float(), ref_fb, atol=tol, rtol=tol)
    for what, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        ms = {be: _timer(lambda: f(be), args.min_run_time) for be in backends}
        cols = "".join(f"{ms[be]:>10.1f} ({ms['reference'] / ms[be]:>4.1f}x)" for be in backends)
        print(f"{size:>3}x{size:<3} heads={heads}  {what:<8}{cols}")


def bench_train_step(args: argparse.Namespace) -> None:
    """Seconds per `small` training step (B=8, 128^2), per neighborhood-attention backend."""
    from megamed.diffusion import DiffusionConfig, Denoiser, sigmas_from_normal
    from megamed.models import load_model_config, make_model

    cfg = load_model_config("small")
    torch.manual_seed(0)
    model = make_model(cfg)
    denoiser = Denoiser(model, DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, S = args.batch, cfg.default_resolution
    x0 = torch.randn(B, cfg.in_channels, S, S)
    noise = torch.randn_like(x0)
    sigma = sigmas_from_normal(torch.randn(B), S, S, DiffusionConfig())
    ids = torch.randint(1, cfg.text.vocab_size, (B, cfg.text.max_length))
    mask = torch.ones(B, cfg.text.max_length, dtype=torch.bool)

    def step():
        loss = denoiser.loss(x0, noise, sigma, text_ids=ids, text_mask=mask).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    old = os.environ.get(flags.BACKEND_ENV)
    backends = runnable(args)
    times = {be: [] for be in backends}
    try:
        # backends alternate step by step, so a shared machine's load drifts onto both alike;
        # the first round is a warm-up (allocations, index-table caches)
        for i in range(args.train_steps + 1):
            for be in backends:
                os.environ[flags.BACKEND_ENV] = f"neighborhood_attention={be}"  # read at each op call
                t0 = time.perf_counter()
                step()
                if i:
                    times[be].append(time.perf_counter() - t0)
        secs = {be: sorted(t)[len(t) // 2] for be, t in times.items()}
    finally:
        if old is None:
            os.environ.pop(flags.BACKEND_ENV, None)
        else:
            os.environ[flags.BACKEND_ENV] = old
    print(f"\nsmall train step, B={B} {S}x{S}, threads={torch.get_num_threads()} "
          f"(median of {args.train_steps}, {flags.BACKEND_ENV}=neighborhood_attention=...)")
    for be in backends:
        print(f"  {be:<10}{secs[be]:>8.2f} s  ({secs['reference'] / secs[be]:.2f}x)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tiled.DEFAULT_TILE = tuple(args.tile)
    print(f"neighborhood attention, B={args.batch} D={args.head_dim} k={args.kernel_size} {args.dtype}, "
          f"tile={tuple(args.tile)}, threads={torch.get_num_threads()}")
    try:
        print(f"cpp kernels: {torch.ops.megamed.na2d_cpp_isa()} instruction set")
    except (AttributeError, RuntimeError):  # megamed._C missing or without the na2d kernels
        pass
    backends = runnable(args)
    print(f"{'tokens':<8}{'':<9}{'':<8}" + "".join(f"{be + ' ms':>18}" for be in backends))
    for size, heads in args.shapes:
        bench_op(args, size, heads, backends)
    if not args.no_train_step:
        bench_train_step(args)


if __name__ == "__main__":
    main()

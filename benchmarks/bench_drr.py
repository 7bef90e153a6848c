"""Throughput of the example-data renderer: images/s per size, end to end (plan, deform,
findings, projection, noise, 16-bit PNG), with W worker processes, plus a one-thread
breakdown of one image (CPU seconds: wall time on a shared machine measures the neighbours).

    .venv/bin/python benchmarks/bench_drr.py [--sizes 512 1024] [--count 12] [--workers 2]

Bodies are shared by 5 images as in a default `megamed data example` run (count // 5), so
the per-body deformation is amortised the same way. The machine's load average is printed:
on a shared machine the numbers are lower bounds.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the worker pool)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def breakdown(size: int) -> dict:
    """CPU seconds of each stage of one image (one thread)."""
    from pathlib import Path

    import numpy as np
    import torch

    from megamed.data.ct import load_ct
    from megamed.data.drr import Exposure, Geometry, deform, expose, project, project_box, to_uint16
    from megamed.data.example import write_png16
    from megamed.data.findings import simulate

    torch.set_num_threads(1)
    t, last = {}, [time.process_time()]

    def lap(name):
        now = time.process_time()
        t[name] = now - last[0]
        last[0] = now

    ct = load_ct(2)
    lap("load_ct (cached)")
    body = deform(ct, 12345)
    lap("deform (once per body)")
    geom, px = Geometry(yaw=3.0), min(size, 512)
    L = project(body.mu, body.spacing, geom, px)
    lap(f"project body ({px}^2 rays)")
    work = body.mu.copy()
    edits = []
    for name in ("Cardiomegaly", "Pleural Effusion"):
        edits += simulate(name, body, work, np.random.default_rng(0), 0.7, None, "PA")
    lap("simulate 2 findings")
    for e in edits:
        L += project_box(e.delta, e.start, body.shape, body.spacing, geom, px)
    lap("project finding boxes")
    img = to_uint16(expose(L, Exposure(), size, torch.Generator().manual_seed(0)))
    lap("expose + noise")
    with tempfile.TemporaryDirectory() as d:
        write_png16(Path(d) / "x.png", img)
    lap("16-bit png")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--count", type=int, default=12, help="images per size")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from megamed.data.ct import load_ct
    from megamed.data.example import ExampleConfig, generate

    load_ct(2)  # preprocess once, outside the timings
    print(f"cpus={os.cpu_count()} load average at start={os.getloadavg()}")
    for size in args.sizes:
        print(f"\n[{size}x{size}] one image, one thread, CPU time:")
        for k, v in breakdown(size).items():
            print(f"  {k:24s} {v * 1000:8.1f} ms")
        cfg = ExampleConfig(count=args.count, size=size, seed=1, workers=args.workers,
                            bodies=max(1, args.count // 5))
        with tempfile.TemporaryDirectory() as d:
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            generate(d, cfg, progress=False)
            dt = time.perf_counter() - t0
            cpu = _cpu_seconds() - c0
        print(f"  end to end: {args.count} images, {args.workers} workers: {dt:.1f} s wall -> "
              f"{args.count / dt:.2f} images/s (incl. worker start-up), load={os.getloadavg()[0]:.1f}")
        # on a shared machine wall time mostly measures the other jobs; CPU time does not
        print(f"  CPU: {cpu / args.count:.2f} core-s/image -> {args.workers * args.count / cpu:.2f} images/s "
              f"on {args.workers} idle cores")


if __name__ == "__main__":
    main()

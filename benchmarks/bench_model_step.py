"""One training step and one sampling step of a whole model: reference ops vs the fused ones.

    python benchmarks/bench_model_step.py --out OUT [--configs base large-1024] [--size 1024] [--batch 1]
    python benchmarks/bench_model_step.py --out OUT --configs tiny --size 32 --device cpu   # smoke test

For each model config, twice -- MEGAMED_BACKEND=reference (every megamed op in plain PyTorch) and
automatic choice (triton / cuda / cpp / tiled, whatever can run) -- it times

    train step    denoiser loss forward + backward + AdamW step, bf16 autocast on CUDA
    sample step   one denoiser forward under no_grad (what each sampler step costs, per CFG branch)

and records median ms, images/s, peak memory above the model + optimizer states, and which
backend each op resolved to. The ratio reference/fused per config is the number issue 4 asks for
(attention is a small share of the FLOPs of these models, so the end-to-end gain is smaller than
the kernel's). Results are appended to OUT/model_step.jsonl as they are measured and tabulated in
OUT/model_step.md; a config that runs out of memory is recorded as such and the next one runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_na2d import Writer, cuda_time  # noqa: E402  (same folder)

OPS = ("neighborhood_attention", "attention", "patch_merge", "patch_split")


def cpu_time(fn, *, reps: int = 3) -> float:
    """Median milliseconds of fn() on the CPU after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def resolved_backends(model, x, c_noise, cond) -> dict:
    """op -> backend names actually called during one forward (wraps choose_backend)."""
    from megamed.ops import backends

    seen: dict[str, set] = {op: set() for op in OPS}
    original = backends.choose_backend

    def spy(op, *args, **kwargs):
        name = original(op, *args, **kwargs)
        seen.setdefault(op, set()).add(name)
        return name

    backends.choose_backend = spy
    try:
        # the ops modules imported choose_backend by name: patch them too
        import megamed.ops.attention as a, megamed.ops.natten as n, megamed.ops.patch as p
        saved = [(m, m.choose_backend) for m in (a, n, p) if hasattr(m, "choose_backend")]
        for m, _ in saved:
            m.choose_backend = spy
        with torch.no_grad():
            model(x, c_noise, **cond)
    finally:
        backends.choose_backend = original
        for m, fn in saved:
            m.choose_backend = fn
    return {op: "/".join(sorted(v)) for op, v in seen.items() if v}


def bench_config(name: str, size: int, batch: int, device: torch.device, mode: str, writer: Writer) -> None:
    from megamed.diffusion import DiffusionConfig, Denoiser
    from megamed.models import load_model_config, make_model

    if mode == "reference":
        os.environ["MEGAMED_BACKEND"] = "reference"
    else:
        os.environ.pop("MEGAMED_BACKEND", None)
    cfg = load_model_config(name)
    torch.manual_seed(0)
    model = make_model(cfg).to(device).train()
    denoiser = Denoiser(model, DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, size, size, generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    sigma = torch.rand(batch, generator=gen).add(0.1).to(device)
    cond = {}
    if cfg.text.enabled:
        cond["text_ids"] = torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.max_length), generator=gen).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    row = {"config": name, "size": size, "batch": batch, "mode": mode,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    with amp:
        row["backends"] = " ".join(f"{op}={b}" for op, b in resolved_backends(model, x0, sigma, cond).items())

    def train_step():
        with amp:
            loss = denoiser.loss(x0, noise, sigma, **cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample_step():
        with torch.no_grad(), amp:
            denoiser(x0, sigma, **cond)

    timer = cuda_time if device.type == "cuda" else cpu_time
    for what, fn in (("train", train_step), ("sample", sample_step)):
        r = dict(row, step=what)
        try:
            if device.type == "cuda":
                train_step() if what == "train" else None  # optimizer states exist before the peak is taken
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                r["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            r["ms"] = timer(fn)
            r["images_per_s"] = batch / (r["ms"] * 1e-3)
        except torch.OutOfMemoryError as e:
            r["error"] = f"out of memory: {str(e).splitlines()[0][:120]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        writer.add(r)
    del model, opt, denoiser
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", nargs="+", default=["base", "large-1024"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=["reference", "fused"], choices=["reference", "fused"])
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new configs after this")
    args = p.parse_args()

    import megamed.ops  # noqa: F401  (registers every backend that can import)

    device = torch.device(args.device)
    writer = Writer(args.out, "model_step", ["config", "size", "batch", "mode", "step", "ms", "images_per_s",
                                            "peak_extra_MiB", "params_M", "backends", "error"])
    t0 = time.time()
    for name in args.configs:
        for mode in args.modes:
            if time.time() - t0 > args.budget_s:
                print(f"budget of {args.budget_s} s spent: skipping {name} {mode}", flush=True)
                continue
            bench_config(name, args.size, args.batch, device, mode, writer)
    # reference / fused speed-up per config and step, for RESULTS.md
    by = {(r["config"], r["step"], r["mode"]): r.get("ms") for r in writer.rows}
    lines = ["", "| config | step | reference ms | fused ms | speed-up |", "|---|---|---|---|---|"]
    for (cfg_name, step, mode), ms in by.items():
        if mode == "fused" and ms and by.get((cfg_name, step, "reference")):
            ref = by[(cfg_name, step, "reference")]
            lines.append(f"| {cfg_name} | {step} | {ref:.4g} | {ms:.4g} | {ref / ms:.2f}x |")
    with writer.md.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

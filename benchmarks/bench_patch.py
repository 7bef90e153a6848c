"""GPU benchmark of patch_merge / patch_split at the 1024^2 model's level transitions (run by gpu_check.sh).

    python benchmarks/bench_patch.py --out OUT_DIR [--dtype bfloat16] [--batch 4]

Transitions of a patch-4 model at 1024^2 (widths 128, 256, 384): 256^2 x 128 <-> 128^2 x 256 and
128^2 x 256 <-> 64^2 x 384, factor 2. For each, every registered backend (reference, triton, cuda if
present) is timed forward and forward+backward, next to a plain GEMM of the same size on
contiguous operands (torch.mm, the target: the regrouping should cost < 10% on top of it).
Split is timed with the fused skip/lerp blend (the model's use). Outputs are checked against
the reference before timing. Results: OUT/patch.jsonl and OUT/patch.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_na2d import Writer, cuda_time, machine_rates, peak_extra_mib, roofline  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=4)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_patch.py needs a CUDA device")
    import megamed.ops  # noqa: F401
    from megamed.ops import available_backends, patch_merge, patch_split
    from megamed.ops.backends import get_backend
    try:
        import megamed.ops._triton  # noqa: F401
    except ImportError as e:
        print(f"triton backend unavailable: {e}", file=sys.stderr)

    t0 = time.time()
    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    rates = machine_rates(dtype)
    w = Writer(args.out, "patch", ["op", "shape", "impl", "mode", "ms", "tflops", "pct_roofline", "vs_gemm",
                                   "peak_mib", "max_err", "note"])
    B, f = args.batch, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    for S, c_fine, c_coarse in ((256, 128, 256), (128, 256, 384)):
        x_fine, x_coarse = rnd(B, S, S, c_fine), rnd(B, S // f, S // f, c_coarse)
        w_merge = rnd(c_coarse, f * f * c_fine) / (f * f * c_fine) ** 0.5
        w_split = rnd(f * f * c_fine, c_coarse) / c_coarse ** 0.5
        lerp = torch.rand(c_fine, device="cuda", dtype=dtype)
        M = B * (S // f) ** 2  # coarse tokens: the GEMM's M for both ops
        cases = {
            # op: (call(backend), GEMM operands of the same size: [M, K] @ [K, N])
            "merge": (lambda be: patch_merge(x_fine, w_merge, None, factor=f, backend=be),
                      (rnd(M, f * f * c_fine), rnd(f * f * c_fine, c_coarse))),
            "split+lerp": (lambda be: patch_split(x_coarse, w_split, None, factor=f, skip=x_fine, lerp=lerp,
                                                  backend=be),
                           (rnd(M, c_coarse), rnd(c_coarse, f * f * c_fine))),
        }
        for op, (call, (a, b)) in cases.items():
            shape = f"{S}^2x{c_fine}<->{S // f}^2x{c_coarse}"
            flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            # minimal bytes: read the input and weight, write the output (+ read skip for split)
            nbytes = (a.numel() + b.numel() + a.shape[0] * b.shape[1] * (2 if op == "split+lerp" else 1)) * elem
            gemm_ms = cuda_time(lambda: a @ b)
            w.add({"op": op, "shape": shape, "impl": "gemm", "mode": "fwd", "ms": gemm_ms,
                   "tflops": flops / gemm_ms / 1e9,
                   "pct_roofline": 100 * flops / (gemm_ms * 1e-3) / roofline(flops, nbytes, rates),
                   "vs_gemm": 1.0, "note": "torch.mm, contiguous operands"})
            ref = call("reference")
            op_name = "patch_merge" if op == "merge" else "patch_split"
            args_ = (x_fine, w_merge, None) if op == "merge" else (x_coarse, w_split, None)
            kw = dict(factor=f) if op == "merge" else dict(factor=f, skip=x_fine, lerp=lerp)
            for name in available_backends(op_name):
                reason = get_backend(op_name, name).can_run(*args_, **kw)
                if reason is not None:
                    w.add({"op": op, "shape": shape, "impl": name, "mode": "-", "note": f"cannot run: {reason}"[:200]})
                    continue
                try:
                    err = (call(name).float() - ref.float()).abs().max().item()
                    ms = cuda_time(lambda: call(name))
                    peak = peak_extra_mib(lambda: call(name))
                    w.add({"op": op, "shape": shape, "impl": name, "mode": "fwd", "ms": ms,
                           "tflops": flops / ms / 1e9,
                           "pct_roofline": 100 * flops / (ms * 1e-3) / roofline(flops, nbytes, rates),
                           "vs_gemm": ms / gemm_ms, "peak_mib": peak, "max_err": err})
                    leaves = [t.detach().requires_grad_() for t in (args_[0], args_[1])]

                    def fwd_bwd():
                        if op == "merge":
                            y = patch_merge(leaves[0], leaves[1], None, factor=f, backend=name)
                        else:
                            y = patch_split(leaves[0], leaves[1], None, factor=f, skip=x_fine, lerp=lerp, backend=name)
                        torch.autograd.grad(y, leaves, torch.ones_like(y))
                    ms_b = cuda_time(fwd_bwd)
                    w.add({"op": op, "shape": shape, "impl": name, "mode": "fwd+bwd", "ms": ms_b,
                           "tflops": 3 * flops / ms_b / 1e9, "vs_gemm": ms_b / (3 * gemm_ms),
                           "peak_mib": peak_extra_mib(fwd_bwd), "note": "vs 3 GEMMs"})
                except Exception as e:
                    w.add({"op": op, "shape": shape, "impl": name, "mode": "-",
                           "note": f"FAILED {type(e).__name__}: {e}"[:200]})
        del x_fine, x_coarse
        torch.cuda.empty_cache()
    print(f"done in {time.time() - t0:.0f} s; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()

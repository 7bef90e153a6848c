"""GPU benchmark of 2-D neighborhood attention at the 1024^2 model's shapes (run by gpu_check.sh).

    python benchmarks/bench_na2d.py --out OUT_DIR [--dtype bfloat16] [--budget-s 240] [--quick]

For each shape (B=4; 256x256 tokens at width 128 and 128x128 tokens at width 256, i.e. the first two
levels of a patch-4 model at 1024^2; D = 64 and 128, so heads = width / D; kernel 7 and 13) and each
implementation -- every registered neighborhood_attention backend (reference, triton, cuda if
present), FlexAttention with a neighborhood block mask, and global SDPA over the same tokens for
scale -- it measures, forward and forward+backward:

    median time        CUDA events, after warm-up
    useful TFLOP/s     forward 4*N*k^2*D*heads, backward 2.5x that (N = B*H*W); SDPA counts N^2
    GB/s               over the minimal bytes (read q, k, v, write out + lse; backward also reads
                       out, dO, lse and writes dq, dk, dv)
    peak memory        torch.cuda.max_memory_allocated above what the inputs already hold
    % of roofline     roofline rate = min(measured matmul rate, measured copy BW * FLOP/byte)

and checks each output against the reference first. Results go to OUT/na2d.jsonl (one JSON object
per measurement, written as it goes, so a timeout still leaves partial results) and OUT/na2d.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# measurement helpers (bench_patch.py imports these)
# ---------------------------------------------------------------------------------------------

def cuda_time(fn, *, target_s: float = 0.3, max_reps: int = 50) -> float:
    """Median milliseconds of fn() over CUDA events; one warm-up call also sizes the repetitions."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()  # warm-up (compiles Triton kernels / torch.compile graphs on first use)
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = max(1, min(max_reps, int(target_s * 1e3 / max(first, 1e-3))))
    if reps > 1:
        fn()  # a second warm-up once the first (compile) call is out of the way
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mib(fn) -> float:
    """Peak memory fn() allocates beyond what is live before the call, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def machine_rates(dtype: torch.dtype) -> dict:
    """Measured dense-matmul FLOP/s (8192^3 in dtype) and device copy bandwidth (1 GiB copy)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_time(lambda: a @ b)
    mm = 2 * n**3 / (ms * 1e-3)
    del a, b
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / (ms * 1e-3)  # read + write
    del x, y
    torch.cuda.empty_cache()
    return {"matmul_flops": mm, "copy_bytes_per_s": bw}


def roofline(flops: float, nbytes: float, rates: dict) -> float:
    """Attainable FLOP/s = min(matmul rate, bandwidth * arithmetic intensity)."""
    return min(rates["matmul_flops"], rates["copy_bytes_per_s"] * flops / nbytes)


class Writer:
    """Appends one JSON line per result and rewrites a markdown table as it goes."""

    def __init__(self, out: Path, stem: str, columns: list[str]):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md, self.columns, self.rows = out / f"{stem}.jsonl", out / f"{stem}.md", columns, []

    def add(self, row: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows.append(row)
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in self.columns) + " |")
        self.md.write_text("\n".join(lines) + "\n")
        print(" ".join(f"{c}={_fmt(row.get(c, ''))}" for c in self.columns), flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# neighborhood attention implementations
# ---------------------------------------------------------------------------------------------

def na_flops(B, H, W, heads, D, k, backward: bool) -> float:
    fwd = 4.0 * B * H * W * k * k * D * heads
    return fwd * (1 + 2.5) if backward else fwd


def na_bytes(B, H, W, heads, D, elem: int, backward: bool) -> float:
    n = B * H * W * heads
    fwd = 4 * n * D * elem + 4 * n                       # q, k, v in; out, lse (fp32) out
    bwd = 8 * n * D * elem + 4 * n                       # q, k, v, out, dO, lse in; dq, dk, dv out
    return fwd + bwd if backward else fwd


def tiled_order(H: int, W: int, th: int = 8, tw: int = 16):
    """Permutations between row-major tokens and a 2-D tiled order (tiles of th x tw = 128 tokens).

    FlexAttention skips 128 x 128 blocks of the mask that are empty; with row-major tokens a block of
    queries is a strip one image row tall whose neighbourhoods span k rows, so nearly every block is
    partly live. Tiling queries (and keys) into 8 x 16 patches makes the live blocks few and dense."""
    r = torch.arange(H)[:, None].expand(H, W)
    c = torch.arange(W)[None, :].expand(H, W)
    key = ((r // th) * (W // tw) + c // tw) * (th * tw) + (r % th) * tw + c % tw  # tiled position of (r, c)
    perm = torch.empty(H * W, dtype=torch.long)
    perm[key.reshape(-1)] = torch.arange(H * W)                                    # tiled pos -> row-major idx
    return perm, key.reshape(-1)


def make_flex(H: int, W: int, k: int, device):
    """flex_attention over tiled tokens with the NATTEN window as a mask; returns fn(q, k, v) on
    [B, heads, N, D] tiled tensors, plus the permutation helpers."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    perm, _ = tiled_order(H, W)
    rows = (perm // W).to(device)  # tiled position -> image row / column
    cols = (perm % W).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        qr, qc, kr, kc = rows[q_idx], cols[q_idx], rows[kv_idx], cols[kv_idx]
        sr = torch.clamp(qr - k // 2, 0, H - k)
        sc = torch.clamp(qc - k // 2, 0, W - k)
        return (kr >= sr) & (kr < sr + k) & (kc >= sc) & (kc < sc + k)

    block_mask = create_block_mask(mask_mod, None, None, H * W, H * W, device=device, _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k_, v: compiled(q, k_, v, block_mask=block_mask), perm.to(device)


def to_tokens(x: torch.Tensor, perm: "torch.Tensor | None" = None) -> torch.Tensor:
    """[B, H, W, heads, D] -> [B, heads, N, D] (optionally reordered by perm)."""
    B, H, W, heads, D = x.shape
    t = x.reshape(B, H * W, heads, D)
    if perm is not None:
        t = t[:, perm]
    return t.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for na2d.jsonl / na2d.md")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new measurements after this")
    p.add_argument("--quick", action="store_true", help="one shape only (smoke test)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile is slow)")
    p.add_argument("--all-k", action="store_true",
                   help="time reference and FlexAttention at every shape (default: reference at k=7, the "
                        "model's kernel size, FlexAttention at k=7 and 256^2 tokens; fits ~2 minutes)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_na2d.py needs a CUDA device")
    import megamed.ops  # noqa: F401  (registers reference, cpp, and whatever _BACKEND_MODULES lists)
    from megamed.ops import available_backends, neighborhood_attention_with_lse
    from megamed.ops.backends import get_backend
    for mod in ("megamed.ops._triton", "megamed.ops._cuda_na"):  # in case _BACKEND_MODULES does not list them
        try:
            __import__(mod)
        except ImportError as e:
            print(f"{mod} unavailable: {e}", file=sys.stderr)

    t_start = time.time()
    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    rates = machine_rates(dtype)
    print(f"device {torch.cuda.get_device_name()}: matmul {rates['matmul_flops'] / 1e12:.1f} TFLOP/s, "
          f"copy {rates['copy_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "machine.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype,
                                                       **rates}, indent=1))
    w = Writer(args.out, "na2d", ["tokens", "D", "heads", "k", "impl", "mode", "ms", "tflops", "gbps",
                                  "pct_roofline", "peak_mib", "max_err", "note"])

    # (tokens per side, model width at that level): heads = width / D
    levels = [(256, 128), (128, 256)]
    # k=7 (the model's) first, so a budget cut loses the k=13 rows
    shapes = [(S, width // D, D, k) for k in (7, 13) for S, width in levels for D in (64, 128)]
    if args.quick:
        shapes = shapes[:1]
    backends = available_backends("neighborhood_attention")
    B = args.batch
    for S, heads, D, k in shapes:
        if time.time() - t_start > args.budget_s:
            print("budget spent; stopping (partial results written)", flush=True)
            break
        g = torch.Generator(device="cuda").manual_seed(0)
        q, kk, v = (torch.randn(B, S, S, heads, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        grad = torch.randn_like(q)
        ref_out, _ = neighborhood_attention_with_lse(q, kk, v, k, backend="reference")
        base = dict(tokens=f"{S}x{S}", D=D, heads=heads, k=k)

        def record(impl, mode, fn, out=None, flops=None, nbytes=None, note=""):
            backward = mode == "fwd+bwd"
            flops = na_flops(B, S, S, heads, D, k, backward) if flops is None else flops
            nbytes = na_bytes(B, S, S, heads, D, elem, backward) if nbytes is None else nbytes
            try:
                ms = cuda_time(fn)
                peak = peak_extra_mib(fn)
            except Exception as e:  # one failing implementation must not end the run
                w.add({**base, "impl": impl, "mode": mode, "note": f"FAILED {type(e).__name__}: {e}"[:200]})
                return
            rate = flops / (ms * 1e-3)
            row = {**base, "impl": impl, "mode": mode, "ms": ms, "tflops": rate / 1e12,
                   "gbps": nbytes / (ms * 1e-3) / 1e9, "pct_roofline": 100 * rate / roofline(flops, nbytes, rates),
                   "peak_mib": peak, "note": note}
            if out is not None:
                row["max_err"] = (out.float() - ref_out.float()).abs().max().item()
            w.add(row)

        slow_ok = k == 7 or args.all_k  # time reference / flex at this shape?
        for name in backends:
            if name == "reference" and not slow_ok:
                continue
            reason = get_backend("neighborhood_attention", name).can_run(q, kk, v, k, dilation=1, scale=D ** -0.5)
            if reason is not None:
                w.add({**base, "impl": name, "mode": "-", "note": f"cannot run: {reason}"[:200]})
                continue
            out, _ = neighborhood_attention_with_lse(q, kk, v, k, backend=name)
            record(name, "fwd", lambda: neighborhood_attention_with_lse(q, kk, v, k, backend=name), out=out)
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, kk, v))

            def fwd_bwd():
                o, _ = neighborhood_attention_with_lse(qg, kg, vg, k, backend=name)
                torch.autograd.grad(o, (qg, kg, vg), grad)
            # the cuda backend has no CUDA backward: its bwd is Triton's (megamed.ops._cuda_na)
            record(name, "fwd+bwd", fwd_bwd, note="backward: triton" if name == "cuda" else "")

        # FlexAttention compiles per shape (tens of seconds): by default only at the 256^2 level
        flex_ok = args.all_k or (k == 7 and S == 256)
        if flex_ok and not args.no_flex and time.time() - t_start < args.budget_s:
            try:
                flex, perm = make_flex(S, S, k, "cuda")
                qt, kt, vt = (to_tokens(t, perm) for t in (q, kk, v))
                out_t = flex(qt, kt, vt)  # [B, heads, N, D] in tiled order -> back to [B, S, S, heads, D]
                inv = torch.argsort(perm)
                out = out_t.transpose(1, 2)[:, inv].reshape(B, S, S, heads, D)
                record("flex", "fwd", lambda: flex(qt, kt, vt), out=out, note="tiled token order (8x16)")
                qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
                gt = to_tokens(grad, perm)
                record("flex", "fwd+bwd", lambda: torch.autograd.grad(flex(qg, kg, vg), (qg, kg, vg), gt))
            except Exception as e:
                w.add({**base, "impl": "flex", "mode": "-", "note": f"FAILED {type(e).__name__}: {e}"[:200]})

        # global attention over the same tokens, for scale (FLOPs count all N^2 pairs)
        N = S * S
        qs, ks, vs = (to_tokens(t) for t in (q, kk, v))
        sdpa_flops = 4.0 * B * heads * N * N * D
        sdpa_bytes = na_bytes(B, S, S, heads, D, elem, False)
        record("sdpa-global", "fwd", lambda: F.scaled_dot_product_attention(qs, ks, vs),
               flops=sdpa_flops, nbytes=sdpa_bytes, note="all N^2 pairs")
        qg, kg, vg = (t.detach().requires_grad_() for t in (qs, ks, vs))
        gs = torch.randn_like(qs)
        record("sdpa-global", "fwd+bwd",
               lambda: torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), gs),
               flops=3.5 * sdpa_flops, nbytes=na_bytes(B, S, S, heads, D, elem, True), note="all N^2 pairs")
        del q, kk, v, grad, ref_out, qs, ks, vs
        torch.cuda.empty_cache()
    print(f"done in {time.time() - t_start:.0f} s; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()

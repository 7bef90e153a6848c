"""Triton neighborhood attention (forward + backward) vs the PyTorch reference.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest), fp32 and
fp16 only (the interpreter's bf16 tl.dot is broken), on a fixed handful of tiny cases. The full
matrix (bf16, D = 32/64/128, kernel sizes 3..13, dilation) is marked `gpu`.

Accuracy rule (flash-attention's): with the fp64 reference as truth,
    err(triton in dtype) <= 2 * err(reference in dtype) + eps      (3x for gradients)
so the bound scales with what the precision itself allows.
"""
from __future__ import annotations

import pytest
import torch

from megamed import flags
from megamed.ops import BackendUnavailable, choose_backend, neighborhood_attention
from megamed.ops import reference as R
from megamed.ops.natten import na2d_bwd, na2d_fwd

triton = pytest.importorskip("triton", reason="needs triton (pip install megamed[triton])")
from megamed.kernels.triton import na2d  # noqa: E402
from megamed.ops import _triton  # noqa: E402,F401  (registers backend "triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_backend = pytest.mark.skipif(not CUDA and not flags.triton_interpret(),
                                   reason="needs CUDA or TRITON_INTERPRET=1")
EPS = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _qkv(B, H, W, heads, D, dtype=torch.float64, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3)]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _check_case(B, H, W, heads, D, ks, dil, dtype, tile=None, seed=0, device=DEVICE):
    """Forward and backward of the triton kernels vs the reference, both judged against fp64."""
    q64, k64, v64 = _qkv(B, H, W, heads, D, seed=seed, device=device)
    go64 = torch.randn(q64.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    scale = D ** -0.5
    out64, lse64 = R.na2d_forward(q64, k64, v64, ks, dil, scale)
    grads64 = R.na2d_backward(go64, q64, k64, v64, out64, lse64, ks, dil, scale)

    q, k, v, go = (t.to(dtype) for t in (q64, k64, v64, go64))
    ref_out, ref_lse = R.na2d_forward(q, k, v, ks, dil, scale)
    ref_grads = R.na2d_backward(go, q, k, v, ref_out, ref_lse, ks, dil, scale)
    out, lse = na2d.na2d_forward(q, k, v, ks, dilation=dil, scale=scale, tile=tile)
    grads = na2d.na2d_backward(go, q, k, v, out, lse, ks, dilation=dil, scale=scale, tile=tile)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:4]
    eps = EPS[dtype]
    assert _err(out, out64) <= 2 * _err(ref_out, out64) + eps, ("out", _err(out, out64), _err(ref_out, out64))
    assert _err(lse, lse64) <= 2 * _err(ref_lse, lse64) + eps, ("lse", _err(lse, lse64))
    for name, g, rg, g64 in zip(("dq", "dk", "dv"), grads, ref_grads, grads64):
        assert g.dtype == dtype and g.shape == q.shape
        assert _err(g, g64) <= 3 * _err(rg, g64) + 4 * eps, (name, _err(g, g64), _err(rg, g64))


# A fixed sample that runs in seconds under the interpreter: borders with H = k and k + 1,
# awkward sizes with dilation, a padded head dim (20 -> 32), two heads, batch 2, k = 13.
# 4 x 4 tiles give small images interior tiles (halo and inverse-neighbourhood bounds away from
# the clamp), 8 x 8 (the default) tiles span the whole image.
T4 = (4, 4)
CASES = [  # (B, H, W, heads, D, kernel_size, dilation, dtype, tile)
    (1, 9, 11, 1, 16, 3, 1, torch.float32, None),
    (1, 7, 8, 2, 16, 7, 1, torch.float32, None),    # H = k: every query sees the whole column range
    (1, 8, 9, 1, 16, 7, 1, torch.float16, T4),      # H = k + 1
    (1, 13, 19, 1, 20, 3, 2, torch.float32, None),  # awkward size, dilation 2, D padded
    (2, 10, 12, 1, 16, 5, 1, torch.float16, None),
    (1, 14, 13, 1, 16, 13, 1, torch.float32, None),  # k = 13, W = k
    (1, 11, 10, 1, 16, 3, 3, torch.float16, None),  # dilation 3, sub-grids of 4 and 3 rows
    (1, 13, 12, 1, 16, 5, 1, torch.float32, T4),    # interior tiles on both axes
]


@needs_backend
@pytest.mark.parametrize("B,H,W,heads,D,ks,dil,dtype,tile", CASES,
                         ids=[f"{c[1]}x{c[2]}-D{c[4]}-k{c[5]}-d{c[6]}-{str(c[7])[6:]}-t{(c[8] or (8, 8))[0]}"
                              for c in CASES])
def test_forward_backward_match_reference(B, H, W, heads, D, ks, dil, dtype, tile):
    _check_case(B, H, W, heads, D, ks, dil, dtype, tile)


@needs_backend
def test_query_range_of_key_tiles_covers_exactly_the_inverse_neighbourhood():
    """dK/dV walk [i_lo, i_hi] per key tile; check the closed form against the clamp rule itself."""
    for n in (3, 4, 9, 17):
        for ks in (1, 3, 5, 7):
            if ks > n:
                continue
            starts = [min(max(i - ks // 2, 0), n - ks) for i in range(n)]
            for r in range(n):
                seen_by = [i for i in range(n) if starts[i] <= r < starts[i] + ks]
                lo = 0 if r <= ks - 1 else r - ks // 2
                hi = n - 1 if r >= n - ks else r + ks // 2
                assert seen_by == list(range(lo, hi + 1)), (n, ks, r)


@needs_backend
def test_strided_inputs_and_every_output_written(monkeypatch):
    """q/k/v (and grad_out) are strided views of packed tensors; outputs start as NaN."""
    monkeypatch.setattr(na2d, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))
    B, H, W, heads, D, ks = 1, 9, 10, 2, 16, 5
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H, W, 3, heads, D, generator=g).to(DEVICE)  # one packed projection
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    go = torch.randn(B, H, W, heads, 2 * D, generator=g).to(DEVICE)[..., ::2]  # stride 2 along D
    out, lse = na2d.na2d_forward(q, k, v, ks, dilation=1, scale=0.3)
    dq, dk, dv = na2d.na2d_backward(go, q, k, v, out, lse, ks, dilation=1, scale=0.3)
    ref_out, ref_lse = R.na2d_forward(q, k, v, ks, 1, 0.3)
    ref = R.na2d_backward(go, q, k, v, ref_out, ref_lse, ks, 1, 0.3)
    for got, want in ((out, ref_out), (lse, ref_lse), (dq, ref[0]), (dk, ref[1]), (dv, ref[2])):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# through the public op: backend choice, custom ops, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def force_triton(monkeypatch):
    """On CPU the interpreter runs only when MEGAMED_BACKEND names triton (see megamed.ops._triton)."""
    monkeypatch.setenv(flags.BACKEND_ENV, "neighborhood_attention=triton")


@needs_backend
def test_public_op_autograd_matches_reference(force_triton):
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 6, 9, 1, 16, seed=4))
    out = neighborhood_attention(q, k, v, 3, dilation=2, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = neighborhood_attention(q, k, v, 3, dilation=2, backend="reference")
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_backend
def test_opcheck_custom_ops_with_triton():
    q, k, v = (t.float() for t in _qkv(1, 5, 6, 1, 16, seed=7))
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(na2d_fwd, (q, k, v, 3, 1, 0.5, "triton"))
    out, lse = na2d_fwd(q.detach(), k.detach(), v.detach(), 3, 1, 0.5, "triton")
    torch.library.opcheck(na2d_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                     3, 1, 0.5, "triton"), test_utils=("test_schema", "test_faketensor"))


@needs_backend
def test_torch_compile_fullgraph_forward_and_backward(force_triton):
    def f(q, k, v):
        return neighborhood_attention(q, k, v, 3, backend="triton").square().sum()

    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 5, 7, 1, 16, seed=8))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_r = neighborhood_attention(q, k, v, 3, backend="reference").square().sum()
    grads_r = torch.autograd.grad(loss_r, (q, k, v))
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# refusals and bad input
# ---------------------------------------------------------------------------------------------

def test_automatic_choice_never_picks_the_cpu_interpreter(monkeypatch):
    monkeypatch.delenv(flags.BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _qkv(1, 5, 5, 1, 16, dtype=torch.float32, device="cpu")
    assert choose_backend("neighborhood_attention", q, k, v, 3, dilation=1, scale=0.25) != "triton"
    # forcing it by argument still runs the interpreter, and matches the reference
    torch.testing.assert_close(neighborhood_attention(q, k, v, 3, backend="triton"),
                               neighborhood_attention(q, k, v, 3, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interpret,dtype,D,match", [
    ("0", torch.float32, 16, "TRITON_INTERPRET=1"),
    ("1", torch.bfloat16, 16, "not supported by the Triton interpreter"),
    ("1", torch.float64, 16, "not supported by the Triton interpreter"),
    ("1", torch.float32, 160, "head dim 160"),
])
def test_can_run_refuses_with_a_reason(monkeypatch, interpret, dtype, D, match):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setenv(flags.BACKEND_ENV, "neighborhood_attention=triton")
    q, k, v = _qkv(1, 5, 5, 1, D, dtype=dtype, device="cpu")
    reason = _triton.na_can_run(q, k, v, 3, dilation=1, scale=1.0)
    assert reason is not None and match in reason
    with pytest.raises(BackendUnavailable, match="triton"):
        neighborhood_attention(q, k, v, 3)


def test_launch_wrapper_rejects_bad_input():
    q, k, v = _qkv(1, 5, 5, 1, 16, device="cpu")
    with pytest.raises(ValueError, match="q dtype"):
        na2d.na2d_forward(q, k, v, 3)  # float64
    q, k, v = (t.float() for t in (q, k, v))
    with pytest.raises(ValueError, match="kernel_size"):
        na2d.na2d_forward(q, k, v, 7)
    with pytest.raises(ValueError, match="k shape/dtype"):
        na2d.na2d_forward(q, k[:, :4], v, 3)
    with pytest.raises(ValueError, match="tile"):
        na2d.na2d_forward(q, k, v, 3, tile=(2, 4))
    with pytest.raises(ValueError, match="lse must be float32"):
        na2d.na2d_backward(q, q, k, v, q, torch.zeros(1, 5, 5, 1, dtype=torch.float16), 3)


# ---------------------------------------------------------------------------------------------
# full matrix on a GPU (pytest -m gpu)
# ---------------------------------------------------------------------------------------------

# Each distinct (dtype, head-dim block, kernel size, dilation) compiles three kernels (seconds each),
# so the matrix is a chosen sample: every dtype, D in {32, 48 (padded), 64, 128}, k in {3, 5, 7, 13},
# dilation 1..3, awkward sizes; repeated configurations reuse compiled kernels.
GPU_CASES = [  # (B, H, W, heads, D, kernel_size, dilation, dtype)
    (2, 32, 40, 2, 64, 7, 1, torch.bfloat16),
    (1, 27, 30, 2, 64, 7, 1, torch.bfloat16),     # awkward size, same kernels as above
    (1, 29, 35, 2, 128, 13, 1, torch.bfloat16),
    (1, 20, 23, 2, 48, 5, 2, torch.float16),
    (1, 24, 25, 1, 32, 3, 3, torch.float16),
    (1, 16, 18, 1, 64, 7, 1, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B,H,W,heads,D,ks,dil,dtype", GPU_CASES)
def test_gpu_matrix(B, H, W, heads, D, ks, dil, dtype):
    _check_case(B, H, W, heads, D, ks, dil, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("ks", [7, 13])
def test_gpu_border_sizes(ks):
    for H in (ks, ks + 1):
        _check_case(1, H, ks + 2, 2, 64, ks, 1, torch.bfloat16, device="cuda")


# ---------------------------------------------------------------------------------------------
# offline GPU compile (no GPU needed: triton ships ptxas); catches errors the interpreter misses
# ---------------------------------------------------------------------------------------------

COMPILE_SCRIPT = r'''
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megamed.kernels.triton import na2d, patch

FP32_PTRS = {"LSE", "DELTA"}
def compile_one(fn, ptrs, dtype, consts, options):
    sig = {n: "constexpr" if n in consts else (("*fp32" if n in FP32_PTRS else "*" + dtype) if n in ptrs
           else "fp32" if n in ("qk_scale", "scale") else "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=options)
    print(fn.fn.__name__, dtype, "shared", k.metadata.shared, flush=True)

which = sys.argv[1]
if which == "na2d":
    ptrs = {"Q", "K", "V", "O", "LSE", "DELTA", "DO", "DQ", "DK", "DV"}
    for dtype, tdt, D, ks in (("bf16", torch.bfloat16, 64, 7), ("fp16", torch.float16, 128, 13)):
        cfg = na2d._config(ks, D, None, tdt)
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        for fn in (na2d._na2d_fwd_kernel, na2d._na2d_bwd_dq_kernel, na2d._na2d_bwd_dkdv_kernel):
            compile_one(fn, ptrs, dtype, dict(cfg, KS=ks, DIL=2, DOT_PREC="tf32"), options)
else:
    ptrs = {"X", "Wt", "Bias", "Skip", "Lerp", "Out"}
    cfg = patch._blocks(4096, 256, 512)
    options = {"num_warps": cfg.pop("num_warps")}
    compile_one(patch._patch_merge_kernel, ptrs, "bf16", dict(cfg, F=2, HAS_BIAS=True, DOT_PREC="tf32"), options)
    compile_one(patch._patch_split_kernel, ptrs, "bf16", dict(cfg, F=2, HAS_BIAS=True, HAS_SKIP=True,
                                                               DOT_PREC="tf32"), options)
'''


def compile_for_sm90(which: str) -> str:
    """Compile the kernels to sm_90 cubins in a subprocess (the interpreter flag is read at import)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, which], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """bf16 D=64 k=7 and fp16 D=128 k=13 (dilation 2) forward and both backward kernels build for H100."""
    out = compile_for_sm90("na2d")
    assert out.count("shared") == 6, out

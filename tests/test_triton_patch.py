"""Triton patch merge / split (GEMMs with the block regrouping in loads and stores) vs the reference.

CPU runs use the Triton interpreter (fp32 / fp16); the GPU matrix is marked `gpu`.
Accuracy rule: with fp64 as truth, err(triton in dtype) <= 2 * err(reference in dtype) + eps.
"""
from __future__ import annotations

import pytest
import torch

from megamed import flags
from megamed.ops import BackendUnavailable, choose_backend, patch_merge, patch_split
from megamed.ops import reference as R

triton = pytest.importorskip("triton", reason="needs triton (pip install megamed[triton])")
from megamed.kernels.triton import patch as P  # noqa: E402
from megamed.ops import _triton  # noqa: E402  (registers backend "triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and not flags.triton_interpret(), reason="needs CUDA or TRITON_INTERPRET=1")
EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _randn(*shape, seed, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _poison(monkeypatch):
    monkeypatch.setattr(P, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device))


# (B, H, W, C, Cout, factor): awkward channel counts (not multiples of 16), factor 3, odd block grids
MERGE_CASES = [(2, 6, 10, 3, 7, 2), (1, 9, 6, 5, 17, 3), (1, 4, 4, 40, 24, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,W,C,Cout,f", MERGE_CASES)
def test_merge_matches_reference(monkeypatch, B, H, W, C, Cout, f, dtype):
    _poison(monkeypatch)
    # x is a strided view: every other channel of a wider tensor
    x64 = _randn(B, H, W, 2 * C, seed=1)[..., ::2]
    w64, b64 = _randn(Cout, f * f * C, seed=2) / (f * C) ** 0.5, _randn(Cout, seed=3)
    want = R.patch_merge(x64, w64, b64, f)
    x, w, b = (t.to(dtype) for t in (x64, w64, b64))
    got = P.patch_merge(x, w, b, factor=f)
    assert got.shape == want.shape and got.dtype == dtype and not got.isnan().any()
    assert _err(got, want) <= 2 * _err(R.patch_merge(x, w, b, f), want) + EPS[dtype]
    assert _err(P.patch_merge(x, w, None, factor=f), R.patch_merge(x64, w64, None, f)) <= \
        2 * _err(R.patch_merge(x, w, None, f), R.patch_merge(x64, w64, None, f)) + EPS[dtype]


# (B, h, w, Cin, Cout, factor, lerp): per-channel, 0-d, or no skip
SPLIT_CASES = [(2, 3, 5, 6, 4, 2, "channel"), (1, 3, 2, 19, 5, 3, "scalar"), (1, 5, 3, 8, 3, 2, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,h,w,Cin,Cout,f,lerp_kind", SPLIT_CASES)
def test_split_matches_reference(monkeypatch, B, h, w, Cin, Cout, f, lerp_kind, dtype):
    _poison(monkeypatch)
    x64 = _randn(B, w, h, Cin, seed=4).transpose(1, 2)  # strided: [B, h, w, Cin] view of a transposed tensor
    w64, b64 = _randn(f * f * Cout, Cin, seed=5) / Cin ** 0.5, _randn(f * f * Cout, seed=6)
    skip64 = lerp64 = None
    if lerp_kind is not None:
        skip64 = _randn(B, h * f, w * f, 2 * Cout, seed=7)[..., Cout:]  # strided skip
        lerp64 = torch.rand(Cout if lerp_kind == "channel" else (), dtype=torch.float64).to(DEVICE)
    want = R.patch_split(x64, w64, b64, f, skip64, lerp64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, w, b, skip, lerp = map(cast, (x64, w64, b64, skip64, lerp64))
    got = P.patch_split(x, w, b, factor=f, skip=skip, lerp=lerp)
    assert got.shape == want.shape and got.dtype == dtype and not got.isnan().any()
    assert _err(got, want) <= 2 * _err(R.patch_split(x, w, b, f, skip, lerp), want) + EPS[dtype]


def test_split_undoes_merge():
    """A split whose weight is the inverse of the merge's recovers the input (independent of the reference)."""
    x = _randn(1, 6, 4, 3, seed=8).float()
    wm = torch.linalg.qr(_randn(12, 12, seed=9))[0].float().to(DEVICE)  # orthogonal: inverse = transpose
    y = P.patch_merge(x, wm, None, factor=2)
    torch.testing.assert_close(P.patch_split(y, wm.t(), None, factor=2), x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# autograd, custom ops, compile (through the public functions, triton forced)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv(flags.BACKEND_ENV, "patch_merge=triton,patch_split=triton")


def _leaves(*ts):
    return [t.float().requires_grad_() for t in ts]


def test_grads_match_reference(force_triton):
    x, wm, bm = _leaves(_randn(2, 4, 6, 3, seed=10), _randn(5, 12, seed=11), _randn(5, seed=12))
    ws, bs, skip, lerp = _leaves(_randn(20, 5, seed=13), _randn(20, seed=14), _randn(2, 4, 6, 5, seed=15),
                                 torch.rand(5, dtype=torch.float64).to(DEVICE))

    def down_up(backend):
        y = patch_merge(x, wm, bm, factor=2, backend=backend)
        return patch_split(y, ws, bs, factor=2, skip=skip, lerp=lerp, backend=backend)

    leaves = (x, wm, bm, ws, bs, skip, lerp)
    g = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    got = torch.autograd.grad(down_up("triton"), leaves, g)
    want = torch.autograd.grad(down_up("reference"), leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_opcheck():
    x, w, b = _leaves(_randn(1, 4, 6, 3, seed=17), _randn(5, 12, seed=18), _randn(5, seed=19))
    torch.library.opcheck(_triton.triton_patch_merge, (x, w, b, 2))
    xs, ws, skip, lerp = _leaves(_randn(1, 2, 3, 4, seed=20), _randn(12, 4, seed=21), _randn(1, 4, 6, 3, seed=22),
                                 torch.rand(3, dtype=torch.float64).to(DEVICE))
    torch.library.opcheck(_triton.triton_patch_split, (xs, ws, None, 2, skip, lerp),  # (dynamic aot: merge covers it)
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))


def test_torch_compile_fullgraph(force_triton):
    x, wm, ws, skip = _leaves(_randn(1, 4, 6, 3, seed=23), _randn(5, 12, seed=24), _randn(12, 5, seed=25),
                              _randn(1, 4, 6, 3, seed=26))
    lerp = torch.tensor(0.5, requires_grad=True, device=DEVICE)

    def down_up(x, wm, ws, skip, lerp, backend="triton"):
        y = patch_merge(x, wm, None, factor=2, backend=backend)
        return patch_split(y, ws, None, factor=2, skip=skip, lerp=lerp, backend=backend).square().sum()

    compiled = torch.compile(down_up, fullgraph=True, backend="aot_eager")
    leaves = (x, wm, ws, skip, lerp)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(down_up(*leaves, backend="reference"), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# refusals and bad input
# ---------------------------------------------------------------------------------------------

def test_refusals_on_cpu(monkeypatch):
    monkeypatch.delenv(flags.BACKEND_ENV, raising=False)
    x, w = torch.randn(1, 4, 4, 3), torch.randn(5, 12)
    assert choose_backend("patch_merge", x, w, None, factor=2) != "triton"  # never the interpreter by itself
    torch.testing.assert_close(patch_merge(x, w, factor=2, backend="triton"),  # but forcing it works
                               patch_merge(x, w, factor=2, backend="reference"), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(flags.BACKEND_ENV, "patch_merge=triton")
    with pytest.raises(BackendUnavailable, match="float16"):
        patch_merge(x.bfloat16(), w.bfloat16(), factor=2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _triton.merge_can_run(x, w, None, factor=2)


def test_launch_wrappers_reject_bad_shapes():
    with pytest.raises(ValueError, match="divisible by factor"):
        P.patch_merge(torch.randn(1, 5, 4, 3), torch.randn(5, 12), factor=2)
    with pytest.raises(ValueError, match="weight shape"):
        P.patch_merge(torch.randn(1, 4, 4, 3), torch.randn(5, 11), factor=2)
    with pytest.raises(ValueError, match="weight shape"):
        P.patch_split(torch.randn(1, 2, 2, 3), torch.randn(10, 3), factor=2)
    with pytest.raises(ValueError, match="skip and lerp"):
        P.patch_split(torch.randn(1, 2, 2, 3), torch.randn(8, 3), factor=2, skip=torch.randn(1, 4, 4, 2))


# ---------------------------------------------------------------------------------------------
# GPU (pytest -m gpu)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,C,Cout,f", [(2, 64, 48, 128, 256, 2), (1, 27, 9, 64, 72, 3)])
def test_gpu_merge_split(B, H, W, C, Cout, f, dtype):
    x64, w64 = _randn(B, H, W, C, seed=30), _randn(Cout, f * f * C, seed=31) / (f * C) ** 0.5
    want = R.patch_merge(x64, w64, None, f)
    got = P.patch_merge(x64.to(dtype), w64.to(dtype), None, factor=f)
    assert _err(got, want) <= 2 * _err(R.patch_merge(x64.to(dtype), w64.to(dtype), None, f), want) + EPS[dtype]
    ws64 = _randn(f * f * C, Cout, seed=32) / Cout ** 0.5
    skip64, lerp64 = _randn(B, H, W, C, seed=33), torch.rand(C, dtype=torch.float64, device="cuda")
    want = R.patch_split(want, ws64, None, f, skip64, lerp64)
    args = [t.to(dtype) for t in (got, ws64, skip64, lerp64)]
    got_s = P.patch_split(args[0], args[1], None, factor=f, skip=args[2], lerp=args[3])
    ref_s = R.patch_split(args[0], args[1], None, f, args[2], args[3])
    assert _err(got_s, want) <= 2 * _err(ref_s, want) + EPS[dtype]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    from test_triton_na2d import compile_for_sm90

    out = compile_for_sm90("patch")
    assert out.count("shared") == 2, out

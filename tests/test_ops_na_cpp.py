"""The C++ CPU neighborhood-attention kernels (torch.ops.megamed.na2d_cpp_fwd / na2d_cpp_bwd, backend
`cpp`) against the `reference` backend.

`reference` gathers each query's k*k keys with index tensors and multiplies elementwise in
PyTorch; it shares nothing with the kernels (staged transposed rows, one query per SIMD lane,
masked border strips, a key-by-key gradient scatter) and is itself checked against a brute-force
loop in test_ops_natten.py. Cases cover borders (H = k*d and k*d + 1), awkward sizes, more than one
strip of lanes per row (W > 16), feature counts that leave vector tails, dilation 1-3, kernels
1-13.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import megamed.ops._cpp as cpp
from megamed import _ext, extension_status, flags
from megamed.ops import BackendUnavailable, choose_backend, neighborhood_attention
from megamed.ops import reference as R
from megamed.ops.natten import na2d_bwd, na2d_fwd, neighborhood_attention_with_lse

pytestmark = pytest.mark.skipif(not extension_status()["loaded"] or not cpp.HAS_NA_OP,
                                reason=f"megamed._C (with na2d_cpp_fwd) not loaded: {extension_status()['reason']}")


def fwd(q, k, v, ks, d=1, scale=0.4):
    return torch.ops.megamed.na2d_cpp_fwd(q, k, v, ks, d, scale)


def bwd(go, q, k, v, out, lse, ks, d=1, scale=0.4):
    return torch.ops.megamed.na2d_cpp_bwd(go, q, k, v, out, lse, ks, d, scale)


def _qkv(B, H, W, heads, D, dtype=torch.float64, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, heads, D, generator=g, dtype=dtype) for _ in range(n)]


def _check_fp64(q, k, v, go, ks, d, scale=0.4):
    """Forward and all three gradients (from the reference's own out/lse) to fp64 rounding."""
    out, lse = fwd(q, k, v, ks, d, scale)
    ref_out, ref_lse = R.na2d_forward(q, k, v, ks, d, scale)
    assert out.dtype == q.dtype and out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == q.shape[:4]
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    got = bwd(go, q, k, v, ref_out, ref_lse, ks, d, scale)
    want = R.na2d_backward(go, q, k, v, ref_out, ref_lse, ks, d, scale)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


# (H, W, kernel_size, dilation, heads, D): H = k*d and k*d + 1 (every query clamped), one strip
# holding both borders, several strips per row (W > 16 lanes), primes, dilation classes of unequal
# length, k = 1 and 13, feature counts 1..20
CASES = [
    (7, 7, 7, 1, 2, 5), (8, 8, 7, 1, 2, 4), (8, 9, 7, 1, 1, 3), (3, 4, 3, 1, 2, 1), (13, 14, 13, 1, 1, 4),
    (11, 17, 3, 1, 2, 5), (9, 13, 5, 1, 2, 3), (6, 7, 3, 2, 2, 3), (7, 6, 3, 2, 1, 4), (11, 17, 3, 2, 2, 5),
    (10, 9, 3, 3, 2, 3), (15, 16, 5, 3, 1, 4), (14, 15, 7, 2, 2, 6), (9, 9, 1, 1, 2, 3), (30, 31, 13, 1, 1, 8),
    (11, 40, 5, 2, 1, 20), (6, 37, 5, 1, 1, 3),
]


@pytest.mark.parametrize("H,W,ks,d,heads,D", CASES)
def test_forward_and_backward_match_reference_fp64(H, W, ks, d, heads, D):
    q, k, v, go = _qkv(2, H, W, heads, D)
    _check_fp64(q, k, v, go, ks, d)


@pytest.mark.slow
def test_awkward_large_size_fp64():
    q, k, v, go = _qkv(1, 37, 53, 1, 4, seed=3)
    for ks, d in ((7, 1), (5, 3), (13, 2)):
        _check_fp64(q, k, v, go, ks, d)


def test_37x53_small():
    q, k, v, go = _qkv(1, 37, 53, 1, 2, seed=3)
    _check_fp64(q, k, v, go, 7, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H,W,ks,d,D", [(11, 19, 5, 1, 16), (12, 37, 3, 2, 20), (9, 10, 7, 1, 32)])
def test_error_comparable_to_same_precision_reference(dtype, H, W, ks, d, D):
    """The error vs the fp64 truth may not exceed ~2x what the reference backend makes on the same
    rounded inputs (both compute in fp32 and round once at the end): flash-attention's rule.
    D = 16, 20, 32 use the vectorised 8x8 staging (and its tail) that fp64 never takes."""
    q, k, v, go = _qkv(2, H, W, 2, D, seed=7)
    lo = [t.to(dtype) for t in (q, k, v, go)]
    truth = R.na2d_forward(*(t.double() for t in lo[:3]), ks, d, 0.35)
    truth_g = R.na2d_backward(*(t.double() for t in (lo[3], *lo[:3])), *truth, ks, d, 0.35)

    def errors(fwd_fn, bwd_fn):
        out, lse = fwd_fn(*lo[:3], ks, d, 0.35)
        assert out.dtype == dtype and lse.dtype == torch.float32
        grads = bwd_fn(lo[3], *lo[:3], out, lse, ks, d, 0.35)
        assert all(g.dtype == dtype for g in grads)
        return [(a.double() - b).abs().max().item() for a, b in zip((out, lse, *grads), (*truth, *truth_g))]

    err_c = errors(fwd, bwd)
    err_r = errors(R.na2d_forward, R.na2d_backward)
    for name, ec, er in zip(("out", "lse", "dq", "dk", "dv"), err_c, err_r):
        assert ec <= 2 * er + 1e-6, f"{name}: cpp error {ec:.2e} vs reference {er:.2e} in {dtype}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_strided_packed_qkv(dtype):
    """q, k, v as slices of one packed projection [B, H, W, 3, heads, D]: no copy, same result."""
    g = torch.Generator().manual_seed(5)
    packed = torch.randn(2, 9, 21, 3, 2, 16, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = packed.unbind(3)
    assert not q.is_contiguous()
    go = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    for d in (1, 2):
        out, lse = fwd(q, k, v, 3, d)
        out_c, lse_c = fwd(qc, kc, vc, 3, d)
        torch.testing.assert_close(out, out_c, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_c, rtol=0, atol=0)
        for a, b in zip(bwd(go, q, k, v, out, lse, 3, d), bwd(go, qc, kc, vc, out_c, lse_c, 3, d)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_features_not_contiguous_and_strided_outputs_in():
    """A feature stride != 1 (the element-by-element staging path), grad_out / out / lse views."""
    q, k, v, go = _qkv(1, 8, 10, 3, 4, dtype=torch.float32, seed=6)
    qt, kt, vt = (t.transpose(3, 4).contiguous().transpose(3, 4) for t in (q, k, v))  # strides (..., 1, heads)
    assert qt.stride(-1) == 3
    out, lse = fwd(qt, kt, vt, 3)
    ref_out, ref_lse = fwd(q, k, v, 3)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    go_t = go.transpose(3, 4).contiguous().transpose(3, 4)
    out_t = ref_out.transpose(3, 4).contiguous().transpose(3, 4)
    lse_t = ref_lse.transpose(1, 2).contiguous().transpose(1, 2)
    for a, b in zip(bwd(go_t, qt, kt, vt, out_t, lse_t, 3), bwd(go, q, k, v, ref_out, ref_lse, 3)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # an expanded grad_out (all strides 0), what out.sum().backward() hands down
    ones = torch.ones(()).expand(q.shape)
    for a, b in zip(bwd(ones, q, k, v, ref_out, ref_lse, 3), bwd(ones.contiguous(), q, k, v, ref_out, ref_lse, 3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_poisoned_outputs_are_all_written(monkeypatch):
    """MEGAMED_NA_CPP_POISON=1 makes the C++ ops fill out, lse and dq with NaN before the kernels
    run: an element the kernels skip stays NaN."""
    monkeypatch.setenv(flags.NA_CPP_POISON_ENV, "1")
    for H, W, ks, d in ((7, 8, 7, 1), (11, 37, 3, 3), (10, 19, 5, 2)):
        q, k, v, go = _qkv(2, H, W, 2, 3, seed=H)
        out, lse = fwd(q, k, v, ks, d)
        dq, dk, dv = bwd(go, q, k, v, out, lse, ks, d)
        for t in (out, lse, dq, dk, dv):
            assert torch.isfinite(t).all()
        _check_fp64(q, k, v, go, ks, d)


def test_cross_backend_lse_contract():
    """cpp forward + reference backward, reference forward + cpp backward: same gradients as the
    reference end to end (lse layout and meaning agree)."""
    q, k, v, go = _qkv(1, 10, 18, 2, 5, seed=8)
    ref_out, ref_lse = R.na2d_forward(q, k, v, 5, 2, 0.6)
    want = R.na2d_backward(go, q, k, v, ref_out, ref_lse, 5, 2, 0.6)
    c_out, c_lse = na2d_fwd(q, k, v, 5, 2, 0.6, "cpp")
    for a, b in zip(na2d_bwd(go, q, k, v, c_out, c_lse, 5, 2, 0.6, "reference"), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # lse is float32 by contract
    for a, b in zip(na2d_bwd(go, q, k, v, ref_out, ref_lse, 5, 2, 0.6, "cpp"), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_autograd_through_public_api_matches_reference():
    q, k, v, go = _qkv(2, 10, 19, 2, 4, seed=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    res = {}
    for be in ("cpp", "reference"):
        out = neighborhood_attention(q, k, v, 5, scale=0.6, backend=be)
        res[be] = (out, *torch.autograd.grad(out, (q, k, v), go))
    for a, b in zip(res["cpp"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_op_alone_is_differentiable():
    """torch.ops.megamed.na2d_cpp_fwd has its own autograd (megamed/ops/_cpp.py)."""
    q, k, v, go = _qkv(1, 6, 7, 2, 3, seed=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, _ = fwd(q, k, v, 3, 2)
    got = torch.autograd.grad(out, (q, k, v), go)
    ro, rl = R.na2d_forward(q.detach(), k.detach(), v.detach(), 3, 2, 0.4)
    for a, b in zip(got, R.na2d_backward(go, q.detach(), k.detach(), v.detach(), ro, rl, 3, 2, 0.4)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("H,W,ks,d", [(5, 6, 3, 1), (6, 7, 3, 2)])
def test_gradcheck(H, W, ks, d):
    q, k, v = (t.requires_grad_() for t in _qkv(1, H, W, 2, 2, seed=3, n=3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: neighborhood_attention(q, k, v, ks, dilation=d, backend="cpp"), (q, k, v), fast_mode=True)


def test_backward_blocks_and_threads_agree():
    """Many query-row blocks in the backward's two race-free phases (a tall image, one sequence):
    the result must not depend on the block split or on the number of threads."""
    q, k, v, go = _qkv(1, 48, 12, 1, 3, seed=4)
    out, lse = R.na2d_forward(q, k, v, 3, 1, 0.4)
    want = R.na2d_backward(go, q, k, v, out, lse, 3, 1, 0.4)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for a, b in zip(bwd(go, q, k, v, out, lse, 3), want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(fwd(q, k, v, 3)[0], out, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(old)


def test_large_logits_stay_finite():
    q, k, v, go = _qkv(2, 9, 20, 2, 8, dtype=torch.float32, seed=9)
    out, lse = fwd(q, k, v, 5, 1, 40.0)
    ref_out, ref_lse = R.na2d_forward(q, k, v, 5, 1, 40.0)
    assert lse.abs().max() > 100  # exp overflows fp32 without the max shift
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)
    for a, b in zip(bwd(go, q, k, v, ref_out, ref_lse, 5, 1, 40.0),
                    R.na2d_backward(go, q, k, v, ref_out, ref_lse, 5, 1, 40.0)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-2)


def test_opcheck():
    q, k, v, go = _qkv(1, 6, 7, 2, 3, dtype=torch.float32, seed=4)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.megamed.na2d_cpp_fwd.default, (q, k, v, 3, 1, 0.5))
    out, lse = fwd(q.detach(), k, v, 3, 1, 0.5)
    torch.library.opcheck(torch.ops.megamed.na2d_cpp_bwd.default, (go, q.detach(), k, v, out, lse, 3, 1, 0.5))
    qs, ks_, vs = torch.randn(1, 6, 7, 3, 2, 4).unbind(3)  # strided views
    torch.library.opcheck(na2d_fwd, (qs, ks_, vs, 3, 2, 0.3, "cpp"), test_utils=("test_schema", "test_faketensor"))


def test_empty_batch_and_zero_features():
    q, k, v = (t.requires_grad_() for t in _qkv(0, 5, 6, 2, 3, n=3))
    out, lse = neighborhood_attention_with_lse(q, k, v, 3, backend="cpp")
    assert out.shape == q.shape and lse.shape == q.shape[:4]
    out.sum().backward()
    assert q.grad.shape == q.shape
    q0 = torch.randn(1, 4, 5, 2, 0, dtype=torch.float64)
    out, lse = fwd(q0, q0, q0, 3)
    torch.testing.assert_close(lse, R.na2d_forward(q0, q0, q0, 3, 1, 1.0)[1])
    assert all(t.shape == q0.shape for t in bwd(q0, q0, q0, q0, out, lse, 3))


def test_chosen_automatically_on_cpu(monkeypatch):
    monkeypatch.delenv("MEGAMED_BACKEND", raising=False)
    q, k, v = _qkv(1, 5, 5, 1, 2, dtype=torch.float32, n=3)
    assert choose_backend("neighborhood_attention", q, k, v, 3, dilation=1, scale=1.0) == "cpp"


def test_refusals_say_why(monkeypatch):
    q = torch.empty(1, 5, 5, 1, 2, device="meta")
    reason = cpp.na_cpp_can_run(q, q, q, 3, dilation=1, scale=1.0)
    assert reason is not None and "CPU" in reason
    with pytest.raises(BackendUnavailable, match="cpp"):
        neighborhood_attention(q, q, q, 3, backend="cpp")
    qi = torch.zeros(1, 5, 5, 1, 2, dtype=torch.complex64)
    assert "dtype" in cpp.na_cpp_can_run(qi, qi, qi, 3, dilation=1, scale=1.0)
    monkeypatch.setattr(_ext, "extension", lambda: None)
    q = torch.zeros(1, 5, 5, 1, 2)
    assert "not loaded" in cpp.na_cpp_can_run(q, q, q, 3, dilation=1, scale=1.0)


def _bad(**over):
    q, k, v = _qkv(1, 7, 8, 2, 3, dtype=torch.float32, n=3)
    args = dict(q=q, k=k, v=v, ks=3, d=1)
    args.update(over)
    return fwd(args["q"], args["k"], args["v"], args["ks"], args["d"])


@pytest.mark.parametrize("over, match", [
    (dict(ks=4), "kernel_size must be a positive odd"),
    (dict(ks=-1), "kernel_size must be a positive odd"),
    (dict(ks=9), "kernel_size \\* dilation"),
    (dict(ks=3, d=3), "kernel_size \\* dilation = 3\\*3 must be <= min\\(H, W\\) = 7"),
    (dict(d=0), "dilation must be a positive"),
    (dict(k=torch.zeros(1, 7, 7, 2, 3)), "k shape"),
    (dict(v=torch.zeros(1, 7, 8, 2, 3, dtype=torch.float64)), "v dtype"),
    (dict(q=torch.zeros(7, 8, 2, 3)), "q must be \\[B, H, W, heads, D\\]"),
    (dict(q=torch.zeros(1, 7, 8, 2, 3, dtype=torch.int32)), "q must be float32"),
], ids=lambda x: str(x)[:40])
def test_bad_input_raises_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)


def test_bad_backward_input_raises_value_error():
    q, k, v, go = _qkv(1, 7, 8, 2, 3, dtype=torch.float32)
    out, lse = fwd(q, k, v, 3)
    with pytest.raises(ValueError, match="lse must be float32"):
        bwd(go, q, k, v, out, lse.double(), 3)
    with pytest.raises(ValueError, match="lse must be \\[B, H, W, heads\\]"):
        bwd(go, q, k, v, out, lse[..., :1], 3)
    with pytest.raises(ValueError, match="grad_out shape"):
        bwd(go[:, :-1], q, k, v, out, lse, 3)
    with pytest.raises(ValueError, match="out dtype"):
        bwd(go, q, k, v, out.double(), lse, 3)


_ISA_SCRIPT = """
import torch, megamed.ops
from megamed.ops import reference as R
print(torch.ops.megamed.na2d_cpp_isa())
g = torch.Generator().manual_seed(0)
for dtype, D, tol in ((torch.float64, 5, 1e-10), (torch.float32, 20, 1e-4), (torch.bfloat16, 16, 3e-2)):
    q, k, v, go = (torch.randn(2, 9, 23, 2, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    for ks, d in ((5, 1), (3, 2)):
        out, lse = torch.ops.megamed.na2d_cpp_fwd(q, k, v, ks, d, 0.4)
        ro, rl = R.na2d_forward(q, k, v, ks, d, 0.4)
        torch.testing.assert_close(out.double(), ro.double(), rtol=tol, atol=tol)
        for a, b in zip(torch.ops.megamed.na2d_cpp_bwd(go, q, k, v, ro, rl, ks, d, 0.4),
                        R.na2d_backward(go, q, k, v, ro, rl, ks, d, 0.4)):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_lower_instruction_sets(capability):
    """The kernels exist once per instruction set, picked from torch's CPU capability, which
    ATEN_CPU_CAPABILITY lowers: run the smaller copies too (in a fresh process: the pick is made once)."""
    if capability == "avx2" and torch.ops.megamed.na2d_cpp_isa() == "base":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[0] == {"default": "base", "avx2": "avx2"}[capability]

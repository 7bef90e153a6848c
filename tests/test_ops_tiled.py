"""The `tiled` CPU neighborhood-attention backend against the `reference` backend.

`reference` (gather k*k keys per query, elementwise) shares no code path with the tiled
halo matmuls, and is itself checked against a brute-force loop in test_ops_natten.py.
"""
from __future__ import annotations

import pytest
import torch

import megamed.ops._tiled as tiled
from megamed.ops import BackendUnavailable, available_backends, choose_backend, neighborhood_attention
from megamed.ops import reference as R
from megamed.ops.natten import na2d_bwd, na2d_fwd, neighborhood_attention_with_lse


@pytest.fixture(params=["fused", "bmm"])
def kernel(request, monkeypatch):
    """Run a test with each per-tile kernel: torch's fused CPU flash op and the explicit bmm one."""
    if request.param == "fused" and not tiled._FUSED:
        pytest.skip("this torch has no _scaled_dot_product_flash_attention_for_cpu")
    monkeypatch.setattr(tiled, "_FUSED", request.param == "fused")
    return request.param


def _qkv(B, H, W, heads, D, dtype=torch.float64, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, heads, D, generator=g, dtype=dtype) for _ in range(n)]


# (H, W, kernel_size, dilation, tile): H = k*d and k*d + 1, primes, tiles that do not divide
# H or W (partial edge tiles), 1x1 tiles, tiles larger than the grid, non-square tiles
CASES = [
    (7, 7, 7, 1, (8, 8)), (8, 8, 7, 1, (3, 3)), (8, 9, 7, 1, (3, 5)), (11, 17, 3, 1, (4, 5)),
    (9, 13, 5, 1, (8, 8)), (9, 13, 5, 1, (2, 3)), (5, 6, 5, 1, (1, 1)), (6, 5, 3, 1, (16, 2)),
    (11, 17, 3, 2, (3, 4)), (10, 9, 3, 3, (8, 8)), (14, 15, 7, 2, (4, 4)), (9, 9, 1, 1, (4, 4)),
    (30, 31, 3, 1, (24, 24)),  # halo of 26*26 keys: the fused kernel splits it into blocks, some all -inf
]


@pytest.mark.parametrize("H,W,ks,d,tile", CASES)
def test_forward_and_backward_match_reference(H, W, ks, d, tile, kernel):
    q, k, v, go = _qkv(*((2, H, W, 3, 5) if H * W < 500 else (1, H, W, 1, 5)), n=4)
    out, lse = tiled.na2d_tiled_forward(q, k, v, ks, dilation=d, scale=0.4, tile=tile)
    ref_out, ref_lse = R.na2d_forward(q, k, v, ks, d, 0.4)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:4]
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    # both backwards from the same (out, lse): they must agree to fp64 rounding
    got = tiled.na2d_tiled_backward(go, q, k, v, ref_out, ref_lse, ks, dilation=d, scale=0.4, tile=tile)
    want = R.na2d_backward(go, q, k, v, ref_out, ref_lse, ks, d, 0.4)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_autograd_through_public_api_matches_reference(kernel):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 10, 13, 2, 4, seed=1))
    go = torch.randn(q.shape, dtype=q.dtype)
    grads = {}
    for be in ("tiled", "reference"):
        out = neighborhood_attention(q, k, v, 5, scale=0.6, backend=be)
        grads[be] = (out, *torch.autograd.grad(out, (q, k, v), go))
    for a, b in zip(grads["tiled"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_strided_packed_qkv_matches_contiguous():
    g = torch.Generator().manual_seed(5)
    packed = torch.randn(2, 9, 11, 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = packed.unbind(3)  # strided views, like slices of a fused qkv projection
    assert not q.is_contiguous()
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
    for d in (1, 2):
        out = neighborhood_attention(q, k, v, 3, dilation=d, backend="tiled")
        out_c = neighborhood_attention(qc, kc, vc, 3, dilation=d, backend="reference")
        torch.testing.assert_close(out, out_c, rtol=1e-12, atol=1e-12)
        go = torch.randn_like(out)
        (g_packed,) = torch.autograd.grad(out, packed, go)
        g_c = torch.autograd.grad(out_c, (qc, kc, vc), go)
        torch.testing.assert_close(g_packed, torch.stack(g_c, dim=3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_comparable_to_reference(dtype, kernel):
    """fp16/bf16 inputs: the error vs the fp64 truth may not exceed ~2x what the reference
    backend makes at the same precision (both compute in fp32 and round once at the end)."""
    q, k, v, go = _qkv(2, 11, 12, 2, 8, seed=7, n=4)
    truth = R.na2d_forward(q, k, v, 5, 1, 0.35)
    truth_g = R.na2d_backward(go, q, k, v, *truth, 5, 1, 0.35)
    lo = [t.to(dtype) for t in (q, k, v, go)]

    def errors(fwd, bwd):
        out, lse = fwd(*lo[:3])
        assert out.dtype == dtype and lse.dtype == torch.float32
        grads = bwd(lo[3], *lo[:3], out, lse)
        assert all(g.dtype == dtype for g in grads)
        return [(a.double() - b).abs().max().item() for a, b in zip((out, lse, *grads), (*truth, *truth_g))]

    err_t = errors(lambda q, k, v: tiled.na2d_tiled_forward(q, k, v, 5, scale=0.35, tile=(4, 5)),
                   lambda go, q, k, v, o, l: tiled.na2d_tiled_backward(go, q, k, v, o, l, 5, scale=0.35,
                                                                       tile=(4, 5)))
    err_r = errors(lambda q, k, v: R.na2d_forward(q, k, v, 5, 1, 0.35),
                   lambda go, q, k, v, o, l: R.na2d_backward(go, q, k, v, o, l, 5, 1, 0.35))
    for name, et, er in zip(("out", "lse", "dq", "dk", "dv"), err_t, err_r):
        assert et <= 2 * er + 1e-3, f"{name}: tiled error {et:.2e} vs reference {er:.2e} in {dtype}"


def test_large_logits_stay_finite_and_exact(kernel):
    """Logits in the hundreds (exp overflows fp32 without the max shift): the bmm kernel reads
    lse off softmax's row max, which must still match the reference's logsumexp."""
    q, k, v, go = _qkv(2, 9, 10, 2, 8, dtype=torch.float32, seed=9, n=4)
    out, lse = tiled.na2d_tiled_forward(q, k, v, 5, scale=40.0, tile=(4, 4))
    ref_out, ref_lse = R.na2d_forward(q, k, v, 5, 1, 40.0)
    assert lse.abs().max() > 100  # really in the overflow regime
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)
    got = tiled.na2d_tiled_backward(go, q, k, v, ref_out, ref_lse, 5, scale=40.0, tile=(4, 4))
    want = R.na2d_backward(go, q, k, v, ref_out, ref_lse, 5, 1, 40.0)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-2)


def test_chunked_tiles_match_unchunked(monkeypatch):
    q, k, v, go = _qkv(2, 9, 11, 2, 3, seed=2, n=4)
    args = dict(dilation=1, scale=0.5, tile=(3, 4))
    out1, lse1 = tiled.na2d_tiled_forward(q, k, v, 5, **args)
    grads1 = tiled.na2d_tiled_backward(go, q, k, v, out1, lse1, 5, **args)
    monkeypatch.setattr(tiled, "_CHUNK_ELEMS", 1)  # one row of tiles per chunk
    out2, lse2 = tiled.na2d_tiled_forward(q, k, v, 5, **args)
    grads2 = tiled.na2d_tiled_backward(go, q, k, v, out2, lse2, 5, **args)
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse1, lse2)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,W,ks,d", [(5, 6, 3, 1), (6, 7, 3, 2)])
def test_gradcheck(H, W, ks, d, kernel):
    q, k, v = (t.requires_grad_() for t in _qkv(1, H, W, 2, 2, seed=3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: neighborhood_attention(q, k, v, ks, dilation=d, backend="tiled"), (q, k, v), fast_mode=True)


def test_opcheck_custom_ops_with_tiled_backend():
    q, k, v, go = _qkv(1, 6, 7, 2, 3, dtype=torch.float32, seed=4, n=4)
    q.requires_grad_()
    torch.library.opcheck(na2d_fwd, (q, k, v, 3, 1, 0.5, "tiled"))
    out, lse = na2d_fwd(q.detach(), k, v, 3, 1, 0.5, "tiled")
    # (the compiled-graph check already ran through the forward's autograd; skip it here: slow)
    torch.library.opcheck(na2d_bwd, (go, q.detach(), k, v, out, lse, 3, 1, 0.5, "tiled"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_empty_batch():
    q, k, v = (t.requires_grad_() for t in _qkv(0, 5, 6, 2, 3))
    out, lse = neighborhood_attention_with_lse(q, k, v, 3, backend="tiled")
    assert out.shape == q.shape and lse.shape == q.shape[:4]
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_registered_and_chosen_on_cpu(monkeypatch):
    monkeypatch.delenv("MEGAMED_BACKEND", raising=False)
    # the compiled `cpp` backend, where built, ranks above tiled (tests/test_ops_na_cpp.py): hide it
    from megamed.ops import backends
    monkeypatch.setitem(backends._REGISTRY, "neighborhood_attention",
                        {n: b for n, b in backends._REGISTRY["neighborhood_attention"].items() if n != "cpp"})
    names = available_backends("neighborhood_attention")
    assert "tiled" in names and names.index("tiled") < names.index("reference")
    q, k, v = _qkv(1, 5, 5, 1, 2)
    assert choose_backend("neighborhood_attention", q, k, v, 3, dilation=1, scale=1.0) == "tiled"


def test_refuses_non_cpu_tensors_with_reason():
    q, k, v = (torch.empty(1, 5, 5, 1, 2, device="meta") for _ in range(3))
    reason = tiled.na_can_run(q, k, v, 3, dilation=1, scale=1.0)
    assert reason is not None and "CPU" in reason
    with pytest.raises(BackendUnavailable, match="tiled"):
        neighborhood_attention(q, k, v, 3, backend="tiled")


@pytest.mark.parametrize("tile", [(0, 4), (4,), (4, 2.0), (True, 4), 8])
def test_bad_tile_raises(tile):
    q, k, v = _qkv(1, 5, 5, 1, 2)
    with pytest.raises(ValueError, match="tile"):
        tiled.na2d_tiled_forward(q, k, v, 3, scale=1.0, tile=tile)

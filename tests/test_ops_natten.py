"""Neighborhood attention vs an independent brute-force loop, gradients, custom-op contract."""
from __future__ import annotations

import pytest
import torch

from megamed.ops import can_run, neighborhood_attention
from megamed.ops import reference as R
from megamed.ops.natten import na2d_bwd, na2d_fwd, neighborhood_attention_with_lse


# ---------------------------------------------------------------------------------------------
# independent reference: a Python loop over queries applying the NATTEN rule literally
# ---------------------------------------------------------------------------------------------

def _window(i: int, length: int, k: int, d: int) -> list[int]:
    """Key positions of query position i along one axis, straight from the rule."""
    sub = [p for p in range(length) if p % d == i % d]  # i's residue sub-grid, in order
    t = sub.index(i)
    s = max(0, min(t - k // 2, len(sub) - k))
    return sub[s:s + k]


def brute_na(q, k, v, ks, d=1, scale=None):
    B, H, W, heads, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:4], dtype=q.dtype)
    for i in range(H):
        for j in range(W):
            keys = [(a, b) for a in _window(i, H, ks, d) for b in _window(j, W, ks, d)]
            kk = torch.stack([k[:, a, b] for a, b in keys], dim=1)  # [B, n, heads, D]
            vv = torch.stack([v[:, a, b] for a, b in keys], dim=1)
            s = torch.einsum("bhd,bnhd->bhn", q[:, i, j], kk) * scale
            out[:, i, j] = torch.einsum("bhn,bnhd->bhd", s.softmax(-1), vv)
            lse[:, i, j] = s.logsumexp(-1)
    return out, lse


def _qkv(B, H, W, heads, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, heads, D, generator=g, dtype=dtype) for _ in range(3)]


CASES = [  # (H, W, kernel_size, dilation): H = k*d and k*d + 1, awkward non-square sizes
    (3, 3, 3, 1), (4, 5, 3, 1), (5, 5, 5, 1), (6, 8, 5, 1), (7, 7, 7, 1), (8, 9, 7, 1),
    (6, 7, 3, 2), (7, 6, 3, 2), (11, 17, 3, 2), (11, 17, 5, 2), (9, 13, 3, 3), (10, 9, 3, 3),
    (11, 17, 3, 3), (15, 16, 5, 3), (14, 15, 7, 2),
]


@pytest.mark.parametrize("H,W,ks,d", CASES)
def test_matches_brute_force(H, W, ks, d):
    q, k, v = _qkv(2 if H * W < 100 else 1, H, W, 2, 3)
    out, lse = neighborhood_attention_with_lse(q, k, v, ks, dilation=d)
    ref_out, ref_lse = brute_na(q, k, v, ks, d)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:4]
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)


def test_custom_scale_and_public_default_backend():
    q, k, v = _qkv(1, 7, 9, 3, 4, seed=1)
    torch.testing.assert_close(neighborhood_attention(q, k, v, 5, scale=0.3), brute_na(q, k, v, 5, 1, 0.3)[0])


def test_limits_kernel_one_is_identity_and_full_kernel_is_global_attention():
    from megamed.ops import attention

    q, k, v = _qkv(2, 5, 7, 2, 3, seed=10)
    torch.testing.assert_close(neighborhood_attention(q, k, v, 1), v, rtol=0, atol=0)  # window = itself
    q, k, v = _qkv(2, 5, 5, 2, 3, seed=11)  # window = whole image: every query sees every key
    glob = attention(*(t.flatten(1, 2) for t in (q, k, v))).unflatten(1, (5, 5))
    torch.testing.assert_close(neighborhood_attention(q, k, v, 5), glob)


def test_empty_batch():
    q, k, v = (t.requires_grad_() for t in _qkv(0, 5, 6, 2, 3))
    out = neighborhood_attention(q, k, v, 3)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("length,ks,d", [(5, 3, 1), (12, 5, 2), (17, 3, 3), (7, 7, 1), (20, 3, 6)])
def test_index_table_windows_contain_query(length, ks, d):
    idx = R.neighborhood_index(length, ks, d)
    assert idx.shape == (length, ks)
    for i in range(length):
        assert idx[i].tolist() == _window(i, length, ks, d)
        assert i in idx[i].tolist()  # the window shifts but always covers its own query


def test_chunked_rows_match_unchunked(monkeypatch):
    q, k, v = _qkv(2, 9, 11, 2, 3, seed=2)
    go = torch.randn_like(q)
    out1, lse1 = R.na2d_forward(q, k, v, 5, 1, 0.5)
    grads1 = R.na2d_backward(go, q, k, v, out1, lse1, 5, 1, 0.5)
    monkeypatch.setattr(R, "_CHUNK_ELEMS", 1)  # one row per chunk
    out2, lse2 = R.na2d_forward(q, k, v, 5, 1, 0.5)
    grads2 = R.na2d_backward(go, q, k, v, out2, lse2, 5, 1, 0.5)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(lse1, lse2)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("H,W,ks,d,fast", [(6, 7, 3, 2, False), (5, 6, 3, 1, True), (5, 5, 5, 1, True)])
def test_gradcheck(H, W, ks, d, fast):
    # fast_mode checks random projections of the Jacobian (cheaper; still fails on a wrong gradient)
    q, k, v = (t.requires_grad_() for t in _qkv(1, H, W, 2, 2, seed=3))
    assert torch.autograd.gradcheck(lambda q, k, v: neighborhood_attention(q, k, v, ks, dilation=d), (q, k, v),
                                    fast_mode=fast)


def test_backward_consumes_any_correct_forward():
    """na2d_bwd needs only (out, lse): feeding it the brute-force forward's out/lse must give
    the brute force's own autograd gradients (this pins the lse contract)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 6, 7, 2, 3, seed=4))
    out, lse = brute_na(q, k, v, 3, 2, 0.7)
    go = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), go)
    got = na2d_bwd(go, q.detach(), k.detach(), v.detach(), out.detach(), lse.float(), 3, 2, 0.7, "reference")
    for a, b in zip(got, want):  # lse is float32 by contract: P is recomputed to ~1e-7 relative
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_strided_packed_qkv_matches_contiguous():
    g = torch.Generator().manual_seed(5)
    packed = torch.randn(2, 9, 10, 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = packed.unbind(3)  # strided views, like slices of a fused qkv projection
    assert not q.is_contiguous()
    out = neighborhood_attention(q, k, v, 3, dilation=2)
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_c = neighborhood_attention(qc, kc, vc, 3, dilation=2)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    go = torch.randn_like(out)
    (g_packed,) = torch.autograd.grad(out, packed, go)
    g_c = torch.autograd.grad(out_c, (qc, kc, vc), go)
    torch.testing.assert_close(g_packed, torch.stack(g_c, dim=3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype):
    """Forward and gradients in fp16/bf16 are at least about as accurate as the brute force
    run entirely in that dtype (the tolerance is that reference's own error vs fp32)."""
    q, k, v = _qkv(1, 7, 9, 2, 16, dtype=torch.float32, seed=6)
    go = torch.randn_like(q)

    def run(fn, dtype):
        args = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*args)
        return [t.float() for t in (out, *torch.autograd.grad(out, args, go.to(dtype)))]

    truth = run(lambda q, k, v: brute_na(q, k, v, 3, 2)[0], torch.float32)
    ours = run(lambda q, k, v: neighborhood_attention(q, k, v, 3, dilation=2), dtype)
    low = run(lambda q, k, v: brute_na(q, k, v, 3, 2)[0], dtype)
    for name, t, o, l in zip(("out", "dq", "dk", "dv"), truth, ours, low):
        own_err = (l - t).abs().max().item()
        err = (o - t).abs().max().item()
        assert err <= 1.5 * own_err + 1e-5, (name, err, own_err)


def test_opcheck_custom_ops():
    q, k, v = _qkv(1, 5, 6, 2, 3, seed=7)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(na2d_fwd, (q, k, v, 3, 1, 0.5, "reference"))
    out, lse = na2d_fwd(q.detach(), k.detach(), v.detach(), 3, 1, 0.5, "reference")
    torch.library.opcheck(na2d_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                     3, 1, 0.5, "reference"))
    qs, ks, vs = torch.randn(1, 6, 7, 3, 2, 4, requires_grad=True).unbind(3)  # strided views, fp32
    torch.library.opcheck(na2d_fwd, (qs, ks, vs, 3, 2, 0.3, "reference"), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend,dilation", [(None, 1), ("cpp", 2)])
def test_torch_compile_fullgraph_forward_and_backward(backend, dilation):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 7, 9, 2, 4, dtype=torch.float32, seed=8))
    if backend is not None and can_run("neighborhood_attention", backend, q, k, v, 3, dilation=dilation, scale=0.5):
        pytest.skip(f"{backend}: " + can_run("neighborhood_attention", backend, q, k, v, 3, dilation=dilation, scale=0.5))

    def f(q, k, v):
        return neighborhood_attention(q, k, v, 3, dilation=dilation, backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_bad_arguments_name_the_argument():
    q, k, v = _qkv(1, 7, 8, 2, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_attention(q, k, v, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_attention(q, k, v, 9)  # larger than H
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        neighborhood_attention(q, k, v, 3, dilation=3)  # 9 > 7
    with pytest.raises(ValueError, match="dilation"):
        neighborhood_attention(q, k, v, 3, dilation=0)
    with pytest.raises(ValueError, match="k shape"):
        neighborhood_attention(q, k[:, :, :-1], v, 3)
    with pytest.raises(ValueError, match="v dtype"):
        neighborhood_attention(q, k, v.float(), 3)
    with pytest.raises(ValueError, match="q must be"):
        neighborhood_attention(q[0], k[0], v[0], 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    q, k, v = (t.to(dtype) for t in _qkv(2, 13, 11, 2, 16, dtype=torch.float32, seed=9))
    go = torch.randn_like(q)
    outs, grads = [], []
    for device in ("cpu", "cuda"):
        qd, kd, vd = (t.to(device).requires_grad_() for t in (q, k, v))
        out = neighborhood_attention(qd, kd, vd, 5, dilation=2)
        outs.append(out.float().cpu())
        grads.append([g.float().cpu() for g in torch.autograd.grad(out, (qd, kd, vd), go.to(device))])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, **tol)

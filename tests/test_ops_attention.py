"""Global attention vs a manual softmax, padding masks, empty rows, strided inputs, dtypes."""
from __future__ import annotations

import pytest
import torch

from megamed.ops import attention, can_run


def manual_attention(q, k, v, mask=None, scale=None):
    """Independent reference: explicit logits, -inf on padding, softmax; empty rows -> 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, heads, Nq, Nk]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        keep = torch.ones(k.shape[1], dtype=torch.bool) if mask is None else mask[b]
        if not keep.any():
            continue
        p = logits[b][..., keep].softmax(-1)  # [heads, Nq, n_real]
        out[b] = torch.einsum("hqk,khd->qhd", p, v[b][keep])
    return out


def _rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("Nq,Nk", [(4, 4), (5, 7), (1, 3), (9, 1)])
def test_no_mask_matches_manual(Nq, Nk):
    q, k, v = _rand(2, Nq, 3, 5), _rand(2, Nk, 3, 5, seed=1), _rand(2, Nk, 3, 5, seed=2)
    torch.testing.assert_close(attention(q, k, v), manual_attention(q, k, v))
    torch.testing.assert_close(attention(q, k, v, scale=0.25), manual_attention(q, k, v, scale=0.25))


def test_padding_masks_of_varying_length():
    B, Nq, Nk = 4, 6, 7
    q, k, v = _rand(B, Nq, 2, 8), _rand(B, Nk, 2, 8, seed=1), _rand(B, Nk, 2, 8, seed=2)
    lengths = torch.tensor([7, 1, 4, 2])
    mask = torch.arange(Nk)[None, :] < lengths[:, None]  # [B, Nk], True = real token
    out = attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out, manual_attention(q, k, v, mask))
    # padding really is ignored: changing padded keys/values changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[~mask], v2[~mask] = 100.0, -100.0
    torch.testing.assert_close(attention(q, k2, v2, key_padding_mask=mask), out)


def test_all_masked_row_returns_zeros_not_nan():
    q, k, v = (_rand(3, 4, 2, 8, seed=s).requires_grad_() for s in range(3))
    mask = torch.tensor([[True, True, False, False], [False] * 4, [True, False, True, False]])
    out = attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, manual_attention(q, k, v, mask))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all()


def test_gradients_match_manual():
    q, k, v = (_rand(2, 3, 2, 4, seed=s).requires_grad_() for s in range(3))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, key_padding_mask=mask), (q, k, v))


def test_strided_packed_qkv():
    packed = _rand(2, 5, 3, 2, 8)  # [B, N, 3, heads, D], like a fused qkv projection
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    torch.testing.assert_close(attention(q, k, v), manual_attention(q.clone(), k.clone(), v.clone()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype):
    q, k, v = (_rand(2, 16, 2, 32, dtype=torch.float32, seed=s) for s in range(3))
    mask = torch.arange(16)[None] < torch.tensor([[16], [5]])
    truth = manual_attention(q, k, v, mask)
    out = attention(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=mask)
    assert out.dtype == dtype
    low = manual_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)  # all in `dtype`
    own_err = (low.float() - truth).abs().max().item()
    err = (out.float() - truth).abs().max().item()
    assert err <= 1.5 * own_err + 1e-5, (err, own_err)


def test_flash_attn_backend_refuses_cpu_with_reason():
    q = _rand(1, 4, 2, 8, dtype=torch.float32)
    reason = can_run("attention", "flash_attn", q, q, q, key_padding_mask=None, scale=0.5)
    assert isinstance(reason, str) and reason  # not installed, or needs CUDA: either way, says why


def test_empty_batch_and_single_key():
    assert attention(_rand(0, 3, 2, 4), _rand(0, 5, 2, 4), _rand(0, 5, 2, 4)).shape == (0, 3, 2, 4)
    q, k, v = _rand(2, 3, 2, 4), _rand(2, 1, 2, 4, seed=1), _rand(2, 1, 2, 4, seed=2)
    torch.testing.assert_close(attention(q, k, v), v.expand(2, 3, 2, 4))  # one key: softmax weight 1


def test_bad_arguments_name_the_argument():
    q, k = _rand(2, 4, 2, 8), _rand(2, 5, 2, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, k, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, k, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="k shape"):
        attention(q, _rand(2, 5, 3, 8), _rand(2, 5, 3, 8))
    with pytest.raises(ValueError, match="v shape"):
        attention(q, k, _rand(2, 6, 2, 8))
    with pytest.raises(ValueError, match="v dtype"):
        attention(q, k, k.float())
    with pytest.raises(ValueError, match="q must be"):
        attention(q[0], k[0], k[0])

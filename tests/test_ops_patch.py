"""patch_merge / patch_split vs explicit loops, round trips, skip-lerp, bad input, dtypes."""
from __future__ import annotations

import pytest
import torch

from megamed.ops import available_backends, patch_merge, patch_split

# Every registered backend is held to the same independent loops; one that cannot run on
# these CPU tensors (e.g. cuda, or cpp without a built extension) is skipped, saying why.
BACKENDS = available_backends("patch_merge")


def _skip_unless_runs(op, backend, *args, **kwargs):
    from megamed.ops import can_run

    reason = can_run(op, backend, *args, **kwargs)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def loop_merge(x, weight, bias, f):
    """Independent reference: build each block's feature vector element by element."""
    B, H, W, C = x.shape
    out = torch.zeros(B, H // f, W // f, weight.shape[0], dtype=x.dtype)
    for i in range(H // f):
        for j in range(W // f):
            feat = torch.stack([x[:, i * f + r, j * f + c, ch] for r in range(f) for c in range(f)
                                for ch in range(C)], dim=-1)  # [B, f*f*C] in (row, col, channel) order
            out[:, i, j] = feat @ weight.T + (0 if bias is None else bias)
    return out


def loop_split(x, weight, bias, f):
    B, H, W, _ = x.shape
    c_out = weight.shape[0] // (f * f)
    out = torch.zeros(B, H * f, W * f, c_out, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            y = x[:, i, j] @ weight.T + (0 if bias is None else bias)  # [B, f*f*C_out]
            for r in range(f):
                for c in range(f):
                    for ch in range(c_out):
                        out[:, i * f + r, j * f + c, ch] = y[:, (r * f + c) * c_out + ch]
    return out


@pytest.mark.parametrize("f,H,W,C,c_out", [(2, 4, 6, 3, 5), (3, 6, 9, 2, 4), (1, 3, 5, 4, 2), (4, 4, 8, 1, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_matches_loop(f, H, W, C, c_out, with_bias, backend):
    x, w = _rand(2, H, W, C), _rand(c_out, f * f * C, seed=1)
    b = _rand(c_out, seed=2) if with_bias else None
    _skip_unless_runs("patch_merge", backend, x, w, b, factor=f)
    torch.testing.assert_close(patch_merge(x, w, b, factor=f, backend=backend), loop_merge(x, w, b, f))


@pytest.mark.parametrize("f,H,W,c_in,c_out", [(2, 2, 3, 5, 3), (3, 3, 2, 4, 2), (1, 3, 4, 3, 2), (4, 1, 2, 6, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_split_matches_loop(f, H, W, c_in, c_out, with_bias, backend):
    x, w = _rand(2, H, W, c_in), _rand(f * f * c_out, c_in, seed=1)
    b = _rand(f * f * c_out, seed=2) if with_bias else None
    _skip_unless_runs("patch_split", backend, x, w, b, factor=f, skip=None, lerp=None)
    torch.testing.assert_close(patch_split(x, w, b, factor=f, backend=backend), loop_split(x, w, b, f))


@pytest.mark.parametrize("f,C", [(2, 3), (3, 2), (4, 1)])
def test_split_undoes_merge(f, C):
    x = _rand(2, 3 * f, 2 * f, C)
    n = f * f * C
    eye = torch.eye(n, dtype=x.dtype)
    torch.testing.assert_close(patch_split(patch_merge(x, eye, factor=f), eye, factor=f), x, rtol=0, atol=0)
    # any invertible pair works the same way: split(W^-1) o merge(W) = id
    w = _rand(n, n, seed=3) + n * eye
    torch.testing.assert_close(patch_split(patch_merge(x, w, factor=f), torch.linalg.inv(w), factor=f), x)


@pytest.mark.parametrize("lerp_shape", [(), (3,)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_lerp_matches_formula_and_gradients_flow(lerp_shape, backend):
    x, w, b = _rand(1, 2, 3, 4), _rand(12, 4, seed=1), _rand(12, seed=2)
    skip, lerp = _rand(1, 4, 6, 3, seed=3), _rand(*lerp_shape, seed=4)
    _skip_unless_runs("patch_split", backend, x, w, b, factor=2, skip=skip, lerp=lerp)
    y = loop_split(x, w, b, 2)
    torch.testing.assert_close(patch_split(x, w, b, factor=2, skip=skip, lerp=lerp, backend=backend),
                               skip + lerp * (y - skip))
    args = [t.clone().requires_grad_() for t in (x, w, b, skip, lerp)]
    fn = lambda x, w, b, s, l: patch_split(x, w, b, factor=2, skip=s, lerp=l, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    fn(*args).sum().backward()
    assert args[3].grad.abs().sum() > 0 and args[4].grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_gradcheck(backend):
    args = [t.requires_grad_() for t in (_rand(1, 4, 2, 2), _rand(3, 8, seed=1), _rand(3, seed=2))]
    _skip_unless_runs("patch_merge", backend, *args, factor=2)
    assert torch.autograd.gradcheck(lambda x, w, b: patch_merge(x, w, b, factor=2, backend=backend), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input(backend):
    base = _rand(2, 4, 6, 10)
    x = base[..., 1:7:2]  # [2, 4, 6, 3], channel stride 2
    w = _rand(5, 12, seed=1)
    _skip_unless_runs("patch_merge", backend, x, w, None, factor=2)
    torch.testing.assert_close(patch_merge(x, w, backend=backend), loop_merge(x.clone(), w, None, 2))
    xs = base.transpose(1, 2)[:, :3, :2, :4]  # [2, 3, 2, 4] transposed view
    ws = _rand(8, 4, seed=2)
    torch.testing.assert_close(patch_split(xs, ws, backend=backend), loop_split(xs.clone(), ws, None, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_close_to_fp32(dtype, backend):
    x, w, b = _rand(2, 4, 6, 16, dtype=torch.float32), _rand(8, 64, dtype=torch.float32, seed=1), \
        _rand(8, dtype=torch.float32, seed=2)
    truth = loop_merge(x, w, b, 2)
    _skip_unless_runs("patch_merge", backend, x.to(dtype), w.to(dtype), b.to(dtype), factor=2)
    out = patch_merge(x.to(dtype), w.to(dtype), b.to(dtype), backend=backend)
    assert out.dtype == dtype
    # same-precision reference: the loop run in `dtype` (its own error sets the tolerance)
    low = loop_merge(x.to(dtype), w.to(dtype), b.to(dtype), 2).float()
    own_err = (low - truth).abs().max().item()
    err = (out.float() - truth).abs().max().item()
    assert err <= 1.5 * own_err + 1e-5, (err, own_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = _rand(0, 4, 6, 3)
    _skip_unless_runs("patch_merge", backend, x, _rand(5, 12), None, factor=2)
    assert patch_merge(x, _rand(5, 12), factor=2, backend=backend).shape == (0, 2, 3, 5)
    assert patch_split(x, _rand(8, 3), factor=2, backend=backend).shape == (0, 8, 12, 2)


def test_bad_arguments_name_the_argument():
    x = _rand(1, 5, 4, 2)
    with pytest.raises(ValueError, match="H = 5"):
        patch_merge(x, _rand(3, 8))
    with pytest.raises(ValueError, match="W = 5"):
        patch_merge(x.transpose(1, 2), _rand(3, 8))
    with pytest.raises(ValueError, match="weight"):
        patch_merge(x[:, :4], _rand(3, 7))
    with pytest.raises(ValueError, match="bias"):
        patch_merge(x[:, :4], _rand(3, 8), _rand(4))
    with pytest.raises(ValueError, match="factor"):
        patch_merge(x, _rand(3, 2), factor=0)
    xs, ws = _rand(1, 2, 2, 3), _rand(8, 3)
    with pytest.raises(ValueError, match="lerp"):
        patch_split(xs, ws, skip=_rand(1, 4, 4, 2))
    with pytest.raises(ValueError, match="skip"):
        patch_split(xs, ws, lerp=torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="skip must be"):
        patch_split(xs, ws, skip=_rand(1, 4, 4, 3), lerp=torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="lerp must be"):
        patch_split(xs, ws, skip=_rand(1, 4, 4, 2), lerp=_rand(3))
    with pytest.raises(ValueError, match="weight.shape\\[0\\]"):
        patch_split(xs, _rand(6, 3))

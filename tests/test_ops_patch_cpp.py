"""The C++ CPU kernels of megamed._C (torch.ops.megamed.patch_merge / patch_split) against an
independent reference, plus their autograd / fake registrations (megamed/ops/_cpp.py).

The reference here is deliberately not the reshape/permute formulation used by the kernels'
backward and by megamed.ops.reference: it builds the blocks with strided slices x[:, i::f, j::f]
and multiplies with einsum in float64.
"""
from __future__ import annotations

import pytest
import torch

import megamed.ops  # noqa: F401  (imports megamed.ops._cpp: fake + autograd registrations)
from megamed import extension_status

pytestmark = pytest.mark.skipif(not extension_status()["loaded"],
                                reason=f"megamed._C not loaded: {extension_status()['reason']}")

merge = torch.ops.megamed.patch_merge if extension_status()["loaded"] else None
split = torch.ops.megamed.patch_split if extension_status()["loaded"] else None

# dtype -> (atol, rtol) against the float64 reference. Low precision accumulates in fp32 inside the
# kernel, so the error is one rounding of the output plus the rounding of the inputs (done before
# the reference sees them), hence small relative tolerances even for bf16.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2),
       torch.float16: (2e-3, 2e-3)}


def ref_merge(x, weight, bias, f):
    """[B, H, W, C] -> [B, H/f, W/f, Cout] in float64: block (i, j) of every pixel is x[:, i::f, j::f]."""
    x, weight = x.double(), weight.double()
    blocks = torch.cat([x[:, i::f, j::f, :] for i in range(f) for j in range(f)], dim=-1)  # [B, h, w, f*f*C]
    out = torch.einsum("bhwk,ok->bhwo", blocks, weight)
    return out + bias.double() if bias is not None else out


def ref_split(x, weight, bias, f, skip=None, lerp=None):
    """[B, h, w, Cin] -> [B, h*f, w*f, Cout] in float64, scattering column group (i, j) to out[:, i::f, j::f]."""
    x, weight = x.double(), weight.double()
    y = torch.einsum("bhwc,nc->bhwn", x, weight)
    if bias is not None:
        y = y + bias.double()
    B, h, w, N = y.shape
    cout = N // (f * f)
    out = torch.empty(B, h * f, w * f, cout, dtype=torch.float64)
    for i in range(f):
        for j in range(f):
            g = i * f + j
            out[:, i::f, j::f, :] = y[..., g * cout:(g + 1) * cout]
    if skip is not None:
        out = skip.double() + lerp.double() * (out - skip.double())
    return out


def close(out, ref, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


# (B, H, W, C, Cout, factor): odd channel counts, non-square, f = 1, 2 and 4, and one case with
# many GEMM rows (882) so the kernel runs several tiles, the last one partial.
SHAPES = [(1, 6, 10, 3, 5, 2), (3, 14, 6, 5, 7, 2), (2, 8, 12, 1, 9, 4), (1, 4, 4, 7, 3, 4),
          (2, 3, 5, 3, 4, 1), (2, 42, 42, 3, 5, 2)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_patch_merge_matches_reference(shape, dtype):
    B, H, W, C, cout, f = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, W, C, generator=g).to(dtype)
    weight = torch.randn(cout, f * f * C, generator=g).to(dtype)
    bias = torch.randn(cout, generator=g).to(dtype)
    close(merge(x, weight, bias, f), ref_merge(x, weight, bias, f), dtype)
    close(merge(x, weight, None, f), ref_merge(x, weight, None, f), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_patch_split_matches_reference(shape, dtype):
    B, H, W, C, cout, f = shape  # here x is the coarse [B, H/f, W/f, C]
    h, w = H // f, W // f
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, h, w, C, generator=g).to(dtype)
    weight = torch.randn(f * f * cout, C, generator=g).to(dtype)
    bias = torch.randn(f * f * cout, generator=g).to(dtype)
    skip = torch.randn(B, h * f, w * f, cout, generator=g).to(dtype)
    close(split(x, weight, bias, f, None, None), ref_split(x, weight, bias, f), dtype)
    close(split(x, weight, None, f, None, None), ref_split(x, weight, None, f), dtype)
    for lerp in (torch.rand(cout, generator=g).to(dtype), torch.tensor(0.3, dtype=dtype)):
        close(split(x, weight, bias, f, skip, lerp), ref_split(x, weight, bias, f, skip, lerp), dtype)


def test_merge_then_split_roundtrip():
    """A split whose weight is the inverse of the merge's undoes it (the layouts agree)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 10, 3, dtype=torch.float64, generator=g)
    wm = torch.randn(12, 12, dtype=torch.float64, generator=g)
    out = split(merge(x, wm, None, 2), torch.linalg.inv(wm), None, 2, None, None)
    torch.testing.assert_close(out, x)


def strided_views(B, H, W, C, dtype, g):
    """[B, H, W, C] views that are not contiguous: a slice of a bigger tensor, a transposed
    (W, H) tensor, channels with stride 2, and channels-first memory."""
    big = torch.randn(B, H + 3, 2 * W, C + 4, generator=g).to(dtype)
    yield "slice", big[:, 2:H + 2, ::2, 1:C + 1]
    yield "transposed", torch.randn(B, W, H, C, generator=g).to(dtype).transpose(1, 2)
    yield "channel-stride", torch.randn(B, H, W, 2 * C, generator=g).to(dtype)[..., ::2]
    yield "channels-first", torch.randn(B, C, H, W, generator=g).to(dtype).permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    B, H, W, C, cout, f = 2, 6, 10, 3, 5, 2
    weight_m = torch.randn(cout, f * f * C, generator=g).to(dtype).t().contiguous().t()  # transposed weight
    weight_s = torch.randn(f * f * cout, C, generator=g).to(dtype)
    skip = torch.randn(B, W * f, H * f, cout, generator=g).to(dtype).transpose(1, 2)
    lerp = torch.rand(1, generator=g).to(dtype).expand(cout)  # stride-0 gate
    for name, x in strided_views(B, H, W, C, dtype, g):
        assert not x.is_contiguous(), name
        close(merge(x, weight_m, None, f), ref_merge(x, weight_m, None, f), dtype)
        close(split(x, weight_s, None, f, skip, lerp), ref_split(x, weight_s, None, f, skip, lerp), dtype)


def test_no_copy_of_x():
    """The regroup happens in the kernel's loads: no aten op other than ours sees a tensor of x's shape."""
    x = torch.randn(4, 8, 12, 16)[:, :, :, :6]  # [4, 8, 12, 6], not contiguous
    weight = torch.randn(5, 24)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        merge(x, weight, None, 2)
    seen = [(e.name, e.input_shapes) for e in prof.events()]
    assert any(name == "megamed::patch_merge" for name, _ in seen)
    offenders = [name for name, shapes in seen if name != "megamed::patch_merge" and list(x.shape) in shapes]
    assert not offenders, f"ops touched a full-size copy of x: {offenders}"


def test_threads_agree():
    """Result does not depend on the thread count (tile size and chunking change with it)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 42, 42, 3, generator=g)
    weight = torch.randn(5, 12, generator=g)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge(x, weight, None, 2)
        torch.set_num_threads(2)
        two = merge(x, weight, None, 2)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)


def test_empty_batch():
    assert merge(torch.randn(0, 4, 4, 3), torch.randn(5, 12), None, 2).shape == (0, 2, 2, 5)
    assert split(torch.randn(0, 2, 2, 3), torch.randn(20, 3), None, 2, None, None).shape == (0, 4, 4, 5)


def _merge_args(**over):
    a = dict(x=torch.randn(2, 6, 10, 3), weight=torch.randn(5, 12), bias=torch.randn(5), factor=2)
    a.update(over)
    return a


def _split_args(**over):
    a = dict(x=torch.randn(2, 3, 5, 4), weight=torch.randn(12, 4), bias=None, factor=2,
             skip=torch.randn(2, 6, 10, 3), lerp=torch.rand(3))
    a.update(over)
    return a


@pytest.mark.parametrize("over, match", [
    (dict(x=torch.randn(6, 10, 3)), "x must be 4-D"),
    (dict(x=torch.randn(2, 7, 10, 3)), "divisible by factor"),
    (dict(x=torch.randn(2, 6, 9, 3)), "divisible by factor"),
    (dict(factor=0), "factor must be >= 1"),
    (dict(weight=torch.randn(5, 13)), r"weight must be \[Cout, factor\*factor\*C\] = \[Cout, 12\]"),
    (dict(weight=torch.randn(5, 12, 1)), "weight must be 2-D"),
    (dict(weight=torch.randn(5, 12, dtype=torch.float64)), "weight dtype"),
    (dict(bias=torch.randn(4)), r"bias must be \[Cout\] = \[5\]"),
    (dict(bias=torch.randn(5, dtype=torch.bfloat16)), "bias dtype"),
    (dict(x=torch.ones(2, 6, 10, 3, dtype=torch.int32), weight=torch.ones(5, 12, dtype=torch.int32)), "x must be float"),
])
def test_patch_merge_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        merge(**_merge_args(**over))


@pytest.mark.parametrize("over, match", [
    (dict(x=torch.randn(3, 5, 4)), "x must be 4-D"),
    (dict(weight=torch.randn(12, 5)), "Cin = 4"),
    (dict(weight=torch.randn(10, 4)), "divisible by factor"),
    (dict(bias=torch.randn(3)), r"bias must be \[factor\*factor\*Cout\] = \[12\]"),
    (dict(skip=torch.randn(2, 6, 8, 3)), r"skip must be \[B, h\*factor, w\*factor, Cout\]"),
    (dict(skip=torch.randn(2, 6, 10, 3, dtype=torch.float64)), "skip dtype"),
    (dict(lerp=torch.rand(2)), r"lerp must be 0-d or \[Cout\] = \[3\]"),
    (dict(lerp=None), "skip and lerp must be given together"),
    (dict(skip=None), "skip and lerp must be given together"),
    (dict(factor=-1), "factor must be >= 1"),
])
def test_patch_split_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        split(**_split_args(**over))


# --- autograd, fake kernels, compile -----------------------------------------------------------

def _merge_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 3, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(5, 12, dtype=dtype, generator=g).requires_grad_()
    b = torch.randn(5, dtype=dtype, generator=g).requires_grad_()
    return x, w, b


def _split_inputs(dtype=torch.float64, lerp_shape=(3,)):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 3, 4, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(12, 4, dtype=dtype, generator=g).requires_grad_()
    b = torch.randn(12, dtype=dtype, generator=g).requires_grad_()
    skip = torch.randn(2, 4, 6, 3, dtype=dtype, generator=g).requires_grad_()
    lerp = torch.rand(lerp_shape, dtype=dtype, generator=g).requires_grad_()
    return x, w, b, skip, lerp


def test_gradcheck_patch_merge():
    x, w, b = _merge_inputs()
    assert torch.autograd.gradcheck(lambda x, w, b: merge(x, w, b, 2), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: merge(x, w, b, 2), (x, w, b))
    xs = torch.randn(2, 7, 4, 3, dtype=torch.float64).transpose(1, 2)[:, :, :6].requires_grad_()  # strided, f=2
    assert torch.autograd.gradcheck(lambda x: merge(x, w, None, 2), (xs,))


@pytest.mark.parametrize("lerp_shape", [(3,), ()], ids=["per-channel", "scalar"])
def test_gradcheck_patch_split(lerp_shape):
    args = _split_inputs(lerp_shape=lerp_shape)
    fn = lambda x, w, b, s, l: split(x, w, b, 2, s, l)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    x, w = args[:2]
    assert torch.autograd.gradcheck(lambda x, w: split(x, w, None, 2, None, None), (x, w))


def test_bf16_grads_match_reference():
    """Low-precision backward runs through the same ops; compare with fp64 autograd of the reference."""
    x, w, b = (t.detach().to(torch.bfloat16).requires_grad_() for t in _merge_inputs())
    merge(x, w, b, 2).square().sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref_merge(x64, w64, b64, 2).square().sum().backward()
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=0.1 * want.abs().max().item(), rtol=0.05)


def test_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch (static + dynamic shapes)."""
    torch.library.opcheck(merge.default, (*_merge_inputs(), 2))
    x, w, b, skip, lerp = _split_inputs()
    torch.library.opcheck(split.default, (x, w, b, 2, skip, lerp))


def test_torch_compile_fullgraph():
    x, w, b = _merge_inputs(torch.float32)
    _, ws, bs, skip, lerp = _split_inputs(torch.float32)
    ws = torch.randn(12, 5, requires_grad=True)

    def down_up(x, w, b, ws, skip, lerp):
        return split(merge(x, w, b, 2), ws, None, 2, skip, lerp)

    compiled = torch.compile(down_up, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, ws, skip, lerp)
    out.sum().backward()
    grads = [t.grad.clone() for t in (x, w, b, ws, skip, lerp)]
    for t in (x, w, b, ws, skip, lerp):
        t.grad = None
    want = down_up(x, w, b, ws, skip, lerp)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for got, t in zip(grads, (x, w, b, ws, skip, lerp)):
        torch.testing.assert_close(got, t.grad)


def test_public_api_uses_cpp_backend():
    """megamed.ops.patch_merge/patch_split pick `cpp` on CPU and agree with `reference`."""
    from megamed.ops import choose_backend, patch_merge, patch_split
    x, w, b = (t.detach().float() for t in _merge_inputs())
    assert choose_backend("patch_merge", x, w, b, factor=2) == "cpp"
    torch.testing.assert_close(patch_merge(x, w, b, backend="cpp"), patch_merge(x, w, b, backend="reference"))
    x, w, b, skip, lerp = (t.detach().float() for t in _split_inputs())
    assert choose_backend("patch_split", x, w, b, factor=2, skip=skip, lerp=lerp) == "cpp"
    torch.testing.assert_close(patch_split(x, w, b, skip=skip, lerp=lerp, backend="cpp"),
                               patch_split(x, w, b, skip=skip, lerp=lerp, backend="reference"))


# --- CUDA kernels (kernels/cuda/patch.cu): only with a CUDA torch and a GPU ---------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not extension_status().get("cuda"),
                    reason="needs a GPU and megamed._C built against CUDA torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 130, 66, 67, 129, 2)], ids=str)  # > one 64x64 tile each way
def test_cuda_kernels_match_reference(shape, dtype):
    B, H, W, C, cout, f = shape
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, W, H, C, generator=g).to(dtype).transpose(1, 2)  # strided [B, H, W, C]
    wm = torch.randn(cout, f * f * C, generator=g).to(dtype)
    bm = torch.randn(cout, generator=g).to(dtype)
    close(merge(x.cuda(), wm.cuda(), bm.cuda(), f).cpu(), ref_merge(x, wm, bm, f), dtype)
    xs = torch.randn(B, H // f, W // f, C, generator=g).to(dtype)
    ws = torch.randn(f * f * cout, C, generator=g).to(dtype)
    skip = torch.randn(B, H, W, cout, generator=g).to(dtype)
    lerp = torch.rand(cout, generator=g).to(dtype)
    got = split(xs.cuda(), ws.cuda(), None, f, skip.cuda(), lerp.cuda()).cpu()
    close(got, ref_split(xs, ws, None, f, skip, lerp), dtype)

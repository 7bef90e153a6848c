"""The CUDA neighborhood-attention forward (backend `cuda`, kernels/cuda/na2d.cu) vs the reference.

Three layers:
  * CPU, in CI: the backend is registered and refuses CPU tensors / CPU builds with a reason, and
    its can_run reasons (on fake CUDA tensors).
  * CPU, in CI: the kernel's block body itself (kernels/cuda/na2d_block.cuh) compiled with g++
    against a CUDA emulation (tests/cuda_emu: a thread per CUDA thread, barriers, whole-tile WMMA)
    and run on a fixed sample of small cases, fp32 / fp16 / bf16 and D = 32 / 64 / 128. This checks
    the index arithmetic, masking, online softmax and lse without a GPU; not speed, not the
    compiled glue.
  * GPU (`pytest -m gpu`): the full matrix through the real extension, strided inputs, poisoned
    memory, opcheck, torch.compile, and gradients through autograd (the backward is Triton's).

Accuracy rule (flash-attention's): with the fp64 reference as truth,
    err(kernel in dtype) <= 2 * err(reference in dtype) + eps      (3x for gradients)
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megamed.ops import BackendUnavailable, available_backends, choose_backend, neighborhood_attention
from megamed.ops import _cuda_na
from megamed.ops import reference as R
from megamed.ops.natten import na2d_fwd, neighborhood_attention_with_lse

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
EPS = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _qkv64(B, H, W, heads, D, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64).to(device) for _ in range(3)]


def _check_forward(fwd, B, H, W, heads, D, ks, dil, dtype, seed=0, device="cpu"):
    """fwd(q, k, v, ks, dil, scale) -> (out, lse) vs the reference, both judged against fp64."""
    q64, k64, v64 = _qkv64(B, H, W, heads, D, seed=seed, device=device)
    scale = D ** -0.5
    out64, lse64 = R.na2d_forward(q64, k64, v64, ks, dil, scale)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    ref_out, ref_lse = R.na2d_forward(q, k, v, ks, dil, scale)
    out, lse = fwd(q, k, v, ks, dil, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:4]
    assert not out.isnan().any() and not lse.isnan().any()
    eps = EPS[dtype]
    assert _err(out, out64) <= 2 * _err(ref_out, out64) + eps, ("out", _err(out, out64), _err(ref_out, out64))
    assert _err(lse, lse64) <= 2 * _err(ref_lse, lse64) + eps, ("lse", _err(lse, lse64), _err(ref_lse, lse64))


# ---------------------------------------------------------------------------------------------
# registration and refusals (CPU)
# ---------------------------------------------------------------------------------------------

def test_backend_registered_and_refuses_cpu_tensors_with_a_reason():
    assert "cuda" in available_backends("neighborhood_attention")
    order = available_backends("neighborhood_attention")
    assert order.index("triton") < order.index("cuda") < order.index("reference")  # untimed: below triton
    q = torch.randn(1, 5, 5, 1, 32)
    reason = _cuda_na.na_can_run(q, q, q, 3, dilation=1, scale=1.0)
    assert reason is not None
    # on a CPU machine the build is the reason; with a CUDA build, the device
    assert any(s in reason for s in ("megamed._C", "without CUDA", "na2d_cuda_fwd", "CUDA tensors")), reason
    with pytest.raises(BackendUnavailable, match="backend 'cuda'") as e:
        neighborhood_attention(q, q, q, 3, backend="cuda")
    assert "unknown backend" not in str(e.value)
    # automatic choice never lands on it for CPU tensors
    assert choose_backend("neighborhood_attention", q, q, q, 3, dilation=1, scale=1.0) != "cuda"


def test_can_run_reasons_on_fake_cuda_tensors(monkeypatch):
    """The reasons past the build checks, on FakeTensor 'cuda' tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_cuda_na._ext, "extension", lambda: object())
    monkeypatch.setattr(_cuda_na._ext, "extension_status", lambda: {"loaded": True, "reason": "ok", "cuda": True,
                                                                     "torch_version": torch.__version__})
    monkeypatch.setattr(_cuda_na, "HAS_OP", True)
    with FakeTensorMode():
        def can(shape=(1, 8, 8, 2, 64), dtype=torch.bfloat16, device="cuda", last_stride_2=False):
            strides = torch.empty(*shape[:-1], 2 * shape[-1]).stride() if last_stride_2 else None
            strides = (*strides[:-1], 2) if last_stride_2 else torch.empty(shape).stride()
            t = torch.empty_strided(shape, strides, dtype=dtype, device=device)
            return _cuda_na.na_can_run(t, t, t, 3, dilation=1, scale=1.0)

        assert can() is None
        assert can(dtype=torch.float32) is None and can(shape=(1, 8, 8, 2, 32)) is None
        assert "dtype torch.float64" in can(dtype=torch.float64)
        assert "head dim 48" in can(shape=(1, 8, 8, 2, 48))
        assert "contiguous along D" in can(last_stride_2=True)
        assert "CUDA tensors" in can(device="cpu")
    # and the build reasons, in order
    monkeypatch.setattr(_cuda_na, "HAS_OP", False)
    assert "no na2d_cuda_fwd" in _cuda_na.na_can_run(torch.empty(1, 5, 5, 1, 32), None, None, 3, dilation=1,
                                                     scale=1.0)
    monkeypatch.setattr(_cuda_na._ext, "extension_status", lambda: {"loaded": True, "cuda": False,
                                                                     "torch_version": "x"})
    assert "built without CUDA" in _cuda_na.na_can_run(None, None, None, 3, dilation=1, scale=1.0)


def test_backward_falls_back_to_reference_where_triton_cannot_run(monkeypatch):
    """bwd = Triton's where triton can run the tensors, else the reference (here: triton refuses)."""
    from megamed.ops import backends

    q, k, v = (t.float() for t in _qkv64(1, 6, 7, 1, 32, seed=2))
    go = torch.randn_like(q)
    out, lse = R.na2d_forward(q, k, v, 3, 1, 0.3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton refuses CPU tensors without the interpreter
    if "triton" in backends.available_backends("neighborhood_attention"):
        assert backends.get_backend("neighborhood_attention", "triton").can_run(q, k, v, 3, dilation=1,
                                                                                  scale=0.3) is not None
    got = _cuda_na.na_backward(go, q, k, v, out, lse, 3, dilation=1, scale=0.3)
    want = R.na2d_backward(go, q, k, v, out, lse, 3, 1, 0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the kernel body under CPU emulation (g++, no GPU)
# ---------------------------------------------------------------------------------------------

_EMU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """ctypes handle of tests/cuda_emu/na2d_emu.cpp compiled with g++ (skips where g++ / _Float16 is missing)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the CUDA emulator")
    so = tmp_path_factory.mktemp("na2d_emu") / "na2d_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           f"-I{ROOT / 'kernels' / 'cuda'}", str(ROOT / "tests" / "cuda_emu" / "na2d_emu.cpp"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if "_Float16" in proc.stderr or "barrier" in proc.stderr:
            pytest.skip(f"the emulator needs C++20 <barrier> and _Float16 (GCC >= 12): {proc.stderr[-300:]}")
        pytest.fail(f"compiling the CUDA emulator failed:\n{proc.stderr[-3000:]}")
    lib = ctypes.CDLL(str(so))
    lib.na2d_emu_fwd.restype = ctypes.c_int
    lib.na2d_emu_fwd.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_void_p, ctypes.c_void_p]
                                 + [ctypes.c_int] * 7 + [ctypes.c_float])
    lib.na2d_emu_smem_bytes.restype = ctypes.c_long
    lib.na2d_emu_smem_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
    return lib


def _emu_forward(lib):
    def fwd(q, k, v, ks, dil, scale):
        for t in (q, k, v):
            assert t.stride(-1) == 1
        B, H, W, heads, D = q.shape
        out = torch.full(q.shape, float("nan"), dtype=q.dtype)   # poisoned: every element must be written
        lse = torch.full(q.shape[:4], float("nan"), dtype=torch.float32)
        strides = (ctypes.c_int64 * 12)(*(s for t in (q, k, v) for s in t.stride()[:4]))
        rc = lib.na2d_emu_fwd(_EMU_DTYPES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                              ctypes.cast(strides, ctypes.c_void_p), out.data_ptr(), lse.data_ptr(),
                              B, H, W, heads, D, ks, dil, scale)
        assert rc == 0
        return out, lse
    return fwd


# (B, H, W, heads, D, kernel_size, dilation, dtype): borders H = k and k + 1, awkward sizes, dilation
# with uneven residues, k = 13, partial tiles on both axes, several key chunks per halo
EMU_CASES = [
    (1, 9, 11, 1, 32, 3, 1, torch.float32),
    (1, 7, 8, 2, 64, 7, 1, torch.float16),     # H = k
    (2, 8, 9, 1, 32, 7, 1, torch.bfloat16),    # H = k + 1
    (1, 13, 19, 1, 128, 3, 2, torch.float16),  # dilation 2, residues of 7 and 6 rows
    (1, 14, 13, 1, 32, 13, 1, torch.float32),  # k = 13, W = k
    (1, 11, 10, 1, 64, 3, 3, torch.bfloat16),  # dilation 3
]
EMU_CASES_SLOW = [
    (1, 37, 53, 1, 32, 7, 1, torch.float16),
    (1, 17, 20, 2, 128, 13, 1, torch.bfloat16),
    (1, 21, 23, 1, 64, 5, 2, torch.float32),
    (1, 26, 27, 1, 128, 13, 2, torch.float32),
]


def _ids(cases):
    return [f"{c[1]}x{c[2]}-D{c[4]}-k{c[5]}-d{c[6]}-{str(c[7])[6:]}" for c in cases]


@pytest.mark.parametrize("B,H,W,heads,D,ks,dil,dtype", EMU_CASES, ids=_ids(EMU_CASES))
def test_emulated_kernel_matches_reference(emu, B, H, W, heads, D, ks, dil, dtype):
    _check_forward(_emu_forward(emu), B, H, W, heads, D, ks, dil, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("B,H,W,heads,D,ks,dil,dtype", EMU_CASES_SLOW, ids=_ids(EMU_CASES_SLOW))
def test_emulated_kernel_matches_reference_larger(emu, B, H, W, heads, D, ks, dil, dtype):
    _check_forward(_emu_forward(emu), B, H, W, heads, D, ks, dil, dtype)


def test_emulated_kernel_strided_inputs(emu):
    """q, k, v as slices of one packed qkv projection [B, H, W, 3, heads, D]."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 10, 12, 3, 2, 32, generator=g).half()
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    out, lse = _emu_forward(emu)(q, k, v, 5, 1, 0.3)
    ref_out, ref_lse = R.na2d_forward(q, k, v, 5, 1, 0.3)
    torch.testing.assert_close(out, ref_out, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_emulated_shared_memory_fits_the_gpus(emu):
    """Dynamic shared memory per block must fit sm_80 (163 KB opt-in) and sm_90 (227 KB)."""
    for dt in (0, 1, 2):
        for D in (32, 64, 128):
            assert 0 < emu.na2d_emu_smem_bytes(dt, D) <= 163 * 1024, (dt, D)
    assert emu.na2d_emu_smem_bytes(1, 48) == -1


# ---------------------------------------------------------------------------------------------
# GPU: the real kernel (pytest -m gpu)
# ---------------------------------------------------------------------------------------------

def _cuda_forward(q, k, v, ks, dil, scale):
    return neighborhood_attention_with_lse(q, k, v, ks, dilation=dil, scale=scale, backend="cuda")


def _gpu_matrix():
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for D in (32, 64, 128):
            for ks in (3, 7, 13):
                for dil in (1, 2):
                    # awkward size, then the border sizes: every sub-grid exactly k rows, then k + 1
                    for H, W in ((37, 53), (ks * dil, ks * dil + 3), (ks * dil + dil, ks * dil + 1)):
                        if ks * dil <= min(H, W):
                            cases.append((1, H, W, 2, D, ks, dil, dtype))
    return cases


GPU_CASES = _gpu_matrix()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B,H,W,heads,D,ks,dil,dtype", GPU_CASES, ids=_ids(GPU_CASES))
def test_gpu_forward_matrix(B, H, W, heads, D, ks, dil, dtype):
    _check_forward(_cuda_forward, B, H, W, heads, D, ks, dil, dtype, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_batch_and_many_heads():
    _check_forward(_cuda_forward, 3, 24, 19, 5, 64, 7, 1, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_strided_inputs_and_poisoned_memory(dtype):
    """q/k/v sliced from a packed qkv tensor; the caching allocator is first filled with NaN of the
    outputs' sizes, so `out`/`lse` most likely reuse poisoned blocks: any unwritten element shows."""
    B, H, W, heads, D, ks = 2, 19, 23, 2, 64, 5
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H, W, 3, heads, D, generator=g).to("cuda", dtype)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    poison = [torch.full((B, H, W, heads, D), float("nan"), dtype=dtype, device="cuda"),
              torch.full((B, H, W, heads), float("nan"), dtype=torch.float32, device="cuda")]
    del poison
    out, lse = torch.ops.megamed.na2d_cuda_fwd(q, k, v, ks, 1, 0.3)
    assert out.is_contiguous() and lse.is_contiguous()
    assert not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = R.na2d_forward(q, k, v, ks, 1, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_gpu_automatic_choice_picks_cuda():
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv64(1, 9, 9, 1, 64))
    assert choose_backend("neighborhood_attention", q, k, v, 3, dilation=1, scale=0.125) == "cuda"
    # not for a head dim the kernel lacks (triton takes it)
    q48 = torch.randn(1, 9, 9, 1, 48, device="cuda", dtype=torch.bfloat16)
    assert "head dim 48" in _cuda_na.na_can_run(q48, q48, q48, 3, dilation=1, scale=1.0)
    assert choose_backend("neighborhood_attention", q48, q48, q48, 3, dilation=1, scale=1.0) != "cuda"


@pytest.mark.gpu
@needs_cuda
def test_gpu_glue_rejects_bad_input():
    q = torch.randn(1, 9, 9, 1, 64, device="cuda")
    op = torch.ops.megamed.na2d_cuda_fwd
    with pytest.raises(RuntimeError, match="head dim 48"):
        op(q[..., :48].contiguous(), q[..., :48].contiguous(), q[..., :48].contiguous(), 3, 1, 1.0)
    with pytest.raises(RuntimeError, match="contiguous along D"):
        s = torch.randn(1, 9, 9, 1, 128, device="cuda")[..., ::2]
        op(s, s, s, 3, 1, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q.double(), q.double(), q.double(), 3, 1, 1.0)
    with pytest.raises(RuntimeError, match="kernel_size"):
        op(q, q, q, 4, 1, 1.0)
    with pytest.raises(RuntimeError, match="min\\(H, W\\)"):
        op(q, q, q, 5, 2, 1.0)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        op(q.cpu(), q.cpu(), q.cpu(), 3, 1, 1.0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_opcheck():
    q, k, v = (t.to("cuda", torch.float16) for t in _qkv64(1, 9, 10, 2, 32, seed=7))
    torch.library.opcheck(torch.ops.megamed.na2d_cuda_fwd.default, (q, k, v, 3, 1, 0.5))
    qg, kg, vg = (t.float().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(na2d_fwd, (qg, kg, vg, 5, 1, 0.5, "cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,dil", [(torch.float32, 1), (torch.bfloat16, 2), (torch.float16, 1)])
def test_gpu_grads_through_autograd(dtype, dil):
    """Forward by the CUDA kernel, backward by its bwd (Triton's) from the kernel's out and lse."""
    B, H, W, heads, D, ks = 1, 21, 26, 2, 64, 7
    q64, k64, v64 = _qkv64(B, H, W, heads, D, seed=11, device="cuda")
    go64 = torch.randn(q64.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to("cuda")

    def grads(q, k, v, go, backend):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = neighborhood_attention(q, k, v, ks, dilation=dil, backend=backend)
        return torch.autograd.grad(out, (q, k, v), go)

    g64 = grads(q64, k64, v64, go64, "reference")
    q, k, v, go = (t.to(dtype) for t in (q64, k64, v64, go64))
    got = grads(q, k, v, go, "cuda")
    ref = grads(q, k, v, go, "reference")
    for name, a, r, t in zip(("dq", "dk", "dv"), got, ref, g64):
        assert a.dtype == dtype and not a.isnan().any()
        assert _err(a, t) <= 3 * _err(r, t) + 4 * EPS[dtype], (name, _err(a, t), _err(r, t))


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph():
    def f(q, k, v):
        return neighborhood_attention(q, k, v, 5, backend="cuda").float().square().sum()

    q, k, v = (t.to("cuda", torch.bfloat16).requires_grad_() for t in _qkv64(1, 12, 13, 2, 64, seed=8))
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)  # inductor adds minutes, not coverage
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)

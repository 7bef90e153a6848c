"""Backend registry: registration, forced/env/automatic choice, refusals, dispatch."""
from __future__ import annotations

import pytest
import torch

from megamed import flags
from megamed.ops import backends
from megamed.ops import (BackendUnavailable, available_backends, can_run, choose_backend, neighborhood_attention,
                         patch_merge, register_backend, unregister_backend)
from megamed.ops import reference as R
from megamed.ops.backends import parse_backend_env


@pytest.fixture
def dummies(monkeypatch):
    """patch_merge with only reference plus two dummies above it: 'refuser' (always says no)
    and 'counter' (runs the reference and counts calls). Real backends (cpp, ...) are hidden
    for the test so the expected choices do not depend on what this machine has built."""
    monkeypatch.delenv(flags.BACKEND_ENV, raising=False)
    reference = backends.get_backend("patch_merge", "reference")
    monkeypatch.setitem(backends._REGISTRY, "patch_merge", {"reference": reference})
    calls = []

    def counter_fn(x, weight, bias, *, factor):
        calls.append(factor)
        return R.patch_merge(x, weight, bias, factor)

    register_backend("patch_merge", "refuser", can_run=lambda x, weight, bias, *, factor: "dummy says no",
                     fn=counter_fn, priority=200)
    register_backend("patch_merge", "counter", can_run=lambda x, weight, bias, *, factor:
                     None if factor == 2 else "only factor 2", fn=counter_fn, priority=100)
    yield calls


def _merge_args(f=2):
    return torch.randn(1, 2 * f, 2 * f, 3), torch.randn(4, 3 * f * f)


def test_reference_always_registered():
    for op in ("neighborhood_attention", "attention", "patch_merge", "patch_split"):
        assert "reference" in available_backends(op)


def test_available_sorted_by_priority(dummies):
    names = available_backends("patch_merge")
    assert names.index("refuser") < names.index("counter") < names.index("reference")


def test_automatic_choice_skips_refusers_and_calls_the_chosen_fn(dummies):
    x, w = _merge_args(2)
    assert choose_backend("patch_merge", x, w, None, factor=2) == "counter"
    out = patch_merge(x, w)
    assert dummies == [2]  # the public function really called the chosen backend
    torch.testing.assert_close(out, R.patch_merge(x, w, None, 2))
    # for factor 3 both dummies refuse: the highest runnable one is reference
    x3, w3 = _merge_args(3)
    assert choose_backend("patch_merge", x3, w3, None, factor=3) == "reference"
    patch_merge(x3, w3, factor=3)
    assert dummies == [2]


def test_forced_refusing_backend_raises_with_reason(dummies):
    x, w = _merge_args()
    with pytest.raises(BackendUnavailable, match="dummy says no"):
        patch_merge(x, w, backend="refuser")
    with pytest.raises(BackendUnavailable, match="only factor 2"):
        patch_merge(*_merge_args(3), factor=3, backend="counter")
    assert issubclass(BackendUnavailable, RuntimeError)
    assert can_run("patch_merge", "refuser", x, w, None, factor=2) == "dummy says no"
    assert can_run("patch_merge", "counter", x, w, None, factor=2) is None


def test_explicit_reference_wins_over_priority(dummies):
    x, w = _merge_args()
    patch_merge(x, w, backend="reference")
    assert dummies == []


def test_unknown_backend_lists_known_ones(dummies):
    x, w = _merge_args()
    with pytest.raises(ValueError, match="known: .*counter.*reference"):
        patch_merge(x, w, backend="nope")
    with pytest.raises(ValueError, match="op must be one of"):
        choose_backend("conv", x)


def test_env_flag_single_and_per_op(dummies, monkeypatch):
    x, w = _merge_args()
    monkeypatch.setenv(flags.BACKEND_ENV, "reference")
    assert choose_backend("patch_merge", x, w, None, factor=2) == "reference"
    patch_merge(x, w)
    assert dummies == []
    monkeypatch.setenv(flags.BACKEND_ENV, "attention=reference, patch_merge=refuser")
    with pytest.raises(BackendUnavailable, match="MEGAMED_BACKEND.*dummy says no"):
        patch_merge(x, w)
    assert choose_backend("patch_merge", x, w, None, factor=2, backend="reference") == "reference"  # arg wins
    monkeypatch.setenv(flags.BACKEND_ENV, "Reference,patch_merge=counter")
    assert choose_backend("patch_merge", x, w, None, factor=2) == "counter"
    q = torch.randn(1, 3, 3, 1, 2)
    assert choose_backend("neighborhood_attention", q, q, q, 3, dilation=1, scale=1.0) == "reference"
    monkeypatch.setenv(flags.BACKEND_ENV, "patch_split=nope")
    with pytest.raises(ValueError, match="MEGAMED_BACKEND=patch_split=nope .*known: .*reference"):
        choose_backend("patch_split", x, w, None, factor=2, skip=None, lerp=None)
    monkeypatch.setenv(flags.BACKEND_ENV, "counter")  # only patch_merge has it: others must say so
    assert choose_backend("patch_merge", x, w, None, factor=2) == "counter"
    with pytest.raises(ValueError, match="per-op form"):
        choose_backend("attention", q, q, q, key_padding_mask=None, scale=1.0)


def test_parse_backend_env():
    assert parse_backend_env(None) == {}
    assert parse_backend_env("  ") == {}
    assert parse_backend_env("cpp") == {"*": "cpp"}
    assert parse_backend_env("patch_merge=cpp, attention = reference") == {"patch_merge": "cpp",
                                                                          "attention": "reference"}
    assert parse_backend_env("cpp,attention=reference") == {"*": "cpp", "attention": "reference"}
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        parse_backend_env("conv=cpp")
    with pytest.raises(ValueError, match="empty backend"):
        parse_backend_env("attention=")
    with pytest.raises(ValueError, match="two default"):
        parse_backend_env("cpp,triton")


def test_register_validates():
    ok = lambda *a, **k: None  # noqa: E731
    with pytest.raises(ValueError, match="op must be one of"):
        register_backend("conv", "x", can_run=ok, fn=ok, priority=1)
    with pytest.raises(ValueError, match="name"):
        register_backend("attention", "Bad Name", can_run=ok, fn=ok, priority=1)
    with pytest.raises(ValueError, match="bwd="):
        register_backend("neighborhood_attention", "nobwd", can_run=ok, fn=ok, priority=1)
    with pytest.raises(ValueError, match="reference"):
        unregister_backend("attention", "reference")
    register_backend("attention", "tmp", can_run=ok, fn=ok, priority=-1)
    assert available_backends("attention")[-1] == "tmp"  # below reference
    unregister_backend("attention", "tmp")
    assert "tmp" not in available_backends("attention")


def test_neighborhood_attention_backend_fwd_and_bwd_dispatch(monkeypatch):
    """A registered NA backend serves both custom ops; its backward gets the forward's lse."""
    monkeypatch.delenv(flags.BACKEND_ENV, raising=False)
    seen = []

    def fwd(q, k, v, kernel_size, *, dilation, scale):
        seen.append("fwd")
        return R.na2d_forward(q, k, v, kernel_size, dilation, scale)

    def bwd(grad_out, q, k, v, out, lse, kernel_size, *, dilation, scale):
        seen.append(("bwd", lse.dtype, tuple(lse.shape)))
        return R.na2d_backward(grad_out, q, k, v, out, lse, kernel_size, dilation, scale)

    register_backend("neighborhood_attention", "spy", can_run=lambda q, k, v, ks, *, dilation, scale:
                     None if q.dtype == torch.float64 else "fp64 only", fn=fwd, bwd=bwd, priority=50)
    try:
        q, k, v = (torch.randn(1, 4, 5, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
        neighborhood_attention(q, k, v, 3).sum().backward()
        assert seen == ["fwd", ("bwd", torch.float32, (1, 4, 5, 2))]
        neighborhood_attention(q.detach().float(), k.detach().float(), v.detach().float(), 3)  # refused: reference
        assert len(seen) == 2
    finally:
        unregister_backend("neighborhood_attention", "spy")


def test_cuda_fallback_to_reference_warns_once_per_op_with_reasons(dummies, monkeypatch, caplog):
    """The CUDA branch, exercised on CPU by making the registry see a CUDA tensor."""
    from types import SimpleNamespace

    monkeypatch.setattr(backends, "_first_tensor", lambda args, kwargs: SimpleNamespace(is_cuda=True))
    monkeypatch.setattr(backends, "_WARNED_SLOW_CUDA", set())
    x3, w3 = _merge_args(3)
    with caplog.at_level("WARNING", logger="megamed.ops"):
        assert choose_backend("patch_merge", x3, w3, None, factor=3) == "reference"
        assert choose_backend("patch_merge", x3, w3, None, factor=3) == "reference"
        q = torch.randn(1, 2, 1, 4)
        assert choose_backend("attention", q, q, q, key_padding_mask=None, scale=0.5) == "reference"  # SDPA: no warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "patch_merge" in warnings[0] and "dummy says no" in warnings[0] and "only factor 2" in warnings[0]


def test_torch_compile_fullgraph_all_ops(monkeypatch):
    monkeypatch.delenv(flags.BACKEND_ENV, raising=False)
    from megamed.ops import attention, patch_split

    def f(x, wm, ws, lerp, ctx, mask):
        h = patch_merge(x, wm)                                        # [1, 3, 4, 8]
        q = h.unflatten(-1, (2, 4))                                   # [1, 3, 4, heads=2, 4]
        h = neighborhood_attention(q, q, q, 3).flatten(-2)            # [1, 3, 4, 8]
        t = h.flatten(1, 2).unflatten(-1, (2, 4))                     # [1, 12, 2, 4]
        h = h + attention(t, ctx, ctx, key_padding_mask=mask).flatten(-2).view_as(h)
        return patch_split(h, ws, skip=x, lerp=lerp)                  # [1, 6, 8, 2]

    args = (torch.randn(1, 6, 8, 2), torch.randn(8, 8), torch.randn(8, 8), torch.full((2,), 0.3),
            torch.randn(1, 5, 2, 4), torch.tensor([[True, True, True, False, False]]))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), f(*args))

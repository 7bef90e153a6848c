"""Memory planning: ZeRO formulas against hand computation, activation measurement against an
independent walk of the autograd graph, the scaling fit, checkpointing, messages, bad input."""
import os

import pytest
import torch

from megamed.models import load_model_config, make_model
from megamed.train import plan as P
from megamed.train.plan import GIB, ZeroOption, model_state_bytes


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return make_model(load_model_config("tiny"))


@pytest.fixture(scope="module")
def tiny_fits(tiny):
    return P.activation_models(tiny, progress=False)


# ---- model states ---------------------------------------------------------------------------

@pytest.mark.parametrize("option,dtype,gpu,cpu", [
    # Ψ = 1000, largest layer L = 100, N = 4; bf16: 2 + 2 + 12 bytes per parameter
    (ZeroOption(0), "bf16", 16000, 0),
    (ZeroOption(1), "bf16", 4000 + 12000 / 4, 0),
    (ZeroOption(2), "bf16", 2000 + 14000 / 4, 0),
    (ZeroOption(3), "bf16", 16000 / 4 + 4 * 100, 0),
    (ZeroOption(1, True), "bf16", 4000, 12000),
    (ZeroOption(2, True), "bf16", 2000 + 2000 / 4, 12000),
    (ZeroOption(3, True), "bf16", 4000 / 4 + 400, 12000),
    (ZeroOption(3, True, True), "bf16", 400, 16000),
    # fp32 Adam: 4 + 4 + 8
    (ZeroOption(1), "fp32", 8000 + 8000 / 4, 0),
    (ZeroOption(3), "fp32", 16000 / 4 + 8 * 100, 0),
])
def test_zero_formulas(option, dtype, gpu, cpu):
    assert model_state_bytes(1000, 100, 4, option, dtype) == pytest.approx((gpu, cpu))


def test_one_gpu_partitions_nothing():
    s0 = model_state_bytes(1000, 100, 1, ZeroOption(0))[0]
    assert [model_state_bytes(1000, 100, 1, ZeroOption(s))[0] for s in (1, 2)] == [s0, s0]
    assert model_state_bytes(1000, 100, 1, ZeroOption(3))[0] == s0 + 400
    assert model_state_bytes(1000, 100, 1, ZeroOption(2, True))[0] < s0


def test_largest_layer():
    m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Sequential(torch.nn.Linear(7, 2, bias=False)))
    assert P.largest_layer_params(m) == 3 * 5 + 5


# ---- activations ----------------------------------------------------------------------------

def _graph_saved_bytes(out: torch.Tensor, params) -> int:
    """Independent reference: walk the autograd graph from `out` and read every node's saved
    tensors (_saved_* attributes of built-in nodes, saved_tensors of custom Functions)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen, stack, storages = set(), [out.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found = []
        for name in dir(node):
            if name.startswith("_saved_"):
                v = getattr(node, name)
                found += [v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)] \
                    if isinstance(v, (tuple, list)) else []
        if hasattr(node, "saved_tensors"):
            found += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        for t in found:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_ptrs:
                storages[ptr] = t.untyped_storage().nbytes()
        stack += [n for n, _ in node.next_functions]
    return sum(storages.values())


def test_measurement_matches_graph_walk(tiny):
    torch.manual_seed(1)
    x = torch.randn(1, 1, 24, 40)
    ids = torch.randint(0, tiny.config.text.vocab_size, (1, tiny.config.text.max_length))
    out = tiny(x, torch.tensor([0.3]), text_ids=ids)
    ref = _graph_saved_bytes(out, tiny.parameters())
    got = P.measure_activations(tiny, 24, 40, 1)
    assert got["total"] == ref and got["layers"] == 3
    assert got["total"] > 0


def test_checkpointed_parts_match_a_real_checkpointed_run(tiny):
    got = P.measure_activations(tiny, 32, 24, 2)
    assert got["checkpointed"] == got["outside"] + got["layer_inputs"] + got["largest_layer"]
    assert 0 < got["checkpointed"] < got["total"]
    # with real checkpointing, autograd saves what lies outside the layers plus the checkpoints'
    # inputs (x, theta, cond, context of each layer: saved to recompute from)
    saved = {}
    params = {p.untyped_storage().data_ptr() for p in tiny.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    tiny.set_gradient_checkpointing(True)
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 1, 32, 24)
        ids = torch.randint(0, tiny.config.text.vocab_size, (2, tiny.config.text.max_length))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tiny(x, torch.randn(2), text_ids=ids)
    finally:
        tiny.set_gradient_checkpointing(False)
    assert sum(saved.values()) == got["outside"] + got["layer_inputs"]


def test_fit_solves_exactly():
    c, a, b = 1000.0, 50.0, 3.0
    f = lambda B, p: c + B * (a + b * p)  # noqa: E731
    assert P.fit_activations(f(1, 64), f(2, 64), f(1, 100), 64, 100) == pytest.approx((c, a, b))
    with pytest.raises(ValueError, match="p1"):
        P.fit_activations(1, 2, 3, 64, 64)


def test_extrapolation_error_small_and_monotone(tiny, tiny_fits):
    assert tiny_fits.keys() == set(P.cpu_backends(tiny)) and "reference" in tiny_fits
    fit = tiny_fits["reference"]
    assert fit["sizes"] == [24, 32]
    for kind in ("total", "checkpointed"):
        # extrapolate 24², 32² -> 64 x 48 at batch 3: within 3% of a direct measurement
        pred = P.predict(fit[kind], 64, 48, 3)
        assert pred == pytest.approx(P.measure_activations(tiny, 64, 48, 3)[kind], rel=0.03)
        # monotone in batch and resolution
        assert P.predict(fit[kind], 64, 64, 1) < P.predict(fit[kind], 64, 64, 2) < P.predict(fit[kind], 64, 64, 5)
        assert P.predict(fit[kind], 64, 64, 2) < P.predict(fit[kind], 64, 96, 2) < P.predict(fit[kind], 128, 96, 2)
    assert P.predict(fit["checkpointed"], 256, 256, 4) < P.predict(fit["total"], 256, 256, 4)


def test_backend_is_forced_and_restored(tiny, monkeypatch):
    from megamed.ops.backends import BackendUnavailable
    monkeypatch.setenv("MEGAMED_BACKEND", "attention=reference")
    with P.forced_backend(P.NA_OP, "tiled"):
        assert os.environ["MEGAMED_BACKEND"] == "neighborhood_attention=tiled"
    assert os.environ["MEGAMED_BACKEND"] == "attention=reference"
    with pytest.raises((ValueError, BackendUnavailable)):
        P.measure_activations(tiny, 24, 24, 1, backend="nonexistent")


# ---- the plan -------------------------------------------------------------------------------

def test_plan_rows_and_one_gpu_note(tiny_fits):
    cfg = load_model_config("tiny")
    plan = P.plan_memory(cfg, 64, 64, 2, gpus=1, grad_checkpointing=None, _fits=tiny_fits)
    psi = plan["params"]
    assert psi == sum(p.numel() for p in make_model(cfg, device="meta").parameters())
    rows = {(r["option"], r["grad_checkpointing"]): r for r in plan["rows"]}
    # megamed's NA custom op saves the same tensors whichever backend runs it: one merged row
    assert {r["backend"] for r in plan["rows"]} == {"/".join(tiny_fits)}
    assert rows["stage 0", False]["states_gib"] == pytest.approx(16 * psi / GIB)
    assert rows["stage 3+optimizer+param offload", True]["cpu_gib"] == pytest.approx(16 * psi / GIB)
    r = rows["stage 0", False]
    assert r["total_gib"] == pytest.approx(r["states_gib"] + r["activations_gib"] + plan["overhead_gib"])
    text = P.format_plan(plan, gpu_memory=1.0)
    assert "1 GPU: ZeRO stages 1-3 partition nothing" in text and "only offload" in text
    assert "fits in 1 GiB" in text
    two = P.plan_memory(cfg, 64, 64, 2, gpus=2, _fits=tiny_fits)
    assert not any("partition nothing" in n for n in two["notes"])
    assert {r["grad_checkpointing"] for r in two["rows"]} == {False}


def test_fitting_picks_by_memory(tiny_fits):
    plan = P.plan_memory(load_model_config("tiny"), 64, 64, 2, _fits=tiny_fits, overhead_gib=0.0)
    totals = sorted(r["total_gib"] for r in plan["rows"])
    ok = P.fitting(plan, totals[2])
    assert len(ok) >= 3 and all(r["total_gib"] <= totals[2] for r in ok)
    assert P.fitting(plan, totals[0] / 2) == []
    with pytest.raises(ValueError, match="gpu_memory"):
        P.fitting(plan, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=60), "height"), (dict(width=0), "width"), (dict(batch=0), "batch"), (dict(gpus=0), "gpus"),
    (dict(dtype="fp16"), "dtype"), (dict(grad_checkpointing="yes"), "grad_checkpointing"),
    (dict(backend="cuda_magic"), "backend"),
])
def test_bad_input(kwargs, match, tiny_fits):
    args = dict(height=64, width=64, batch=1) | kwargs
    with pytest.raises(ValueError, match=match):
        P.plan_memory(load_model_config("tiny"), args.pop("height"), args.pop("width"), args.pop("batch"),
                      _fits=tiny_fits, **args)
    with pytest.raises(ValueError, match="model_cfg"):
        P.plan_memory({"widths": [1]}, 64, 64, 1)


def test_cli_main_prints_plan(capsys, monkeypatch, tiny_fits):
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--grad-checkpointing", action="store_const", const=True)
    P.add_arguments(parser)
    real = P.plan_memory
    monkeypatch.setattr(P, "plan_memory", lambda *a, **k: real(*a, **k, _fits=tiny_fits))
    args = parser.parse_args(["--config", "tiny", "--size", "64", "--batch", "2", "--plan", "--gpu-memory", "8",
                              "--gpus", "2", "--grad-checkpointing"])
    assert P.main(args) == 0
    out = capsys.readouterr().out
    assert "64x64, batch 2 per GPU, 2 GPU(s)" in out and "fits in 8 GiB" in out and "partition nothing" not in out
    with pytest.raises(ValueError, match="--config"):
        P.main(parser.parse_args(["--plan"]))


@pytest.mark.slow
def test_large_1024_at_1024_on_24_gib():
    """~20 s, 4 GB RAM: measures large-1024 (1.0B params) at 128²/192² in bf16 on CPU."""
    plan = P.plan_memory(load_model_config("large-1024"), 1024, 1024, 2, backend="tiled", grad_checkpointing=None,
                         progress=False)
    rows = {(r["option"], r["grad_checkpointing"]): r for r in plan["rows"]}
    # model states alone: 16 B x 1.0B params = 14.9 GiB at stage 0, whatever the stage on one GPU
    assert rows["stage 0", False]["states_gib"] == pytest.approx(16 * 1002232856 / GIB)
    # batch 2 without checkpointing: stage 0 does not fit 24 GiB (at batch 1 it fits, narrowly:
    # 14.9 + 7.4 activations + 1 overhead = 23.3 GiB by these numbers)...
    assert rows["stage 0", False]["total_gib"] > 24
    # ...while stage 3 with offload does, with room to spare
    assert rows["stage 3+optimizer offload", True]["total_gib"] < 24
    assert rows["stage 3+optimizer+param offload", True]["total_gib"] < rows["stage 3+optimizer offload", True]["total_gib"]


def test_measures_under_no_grad_too(tiny):
    with torch.no_grad():
        assert P.measure_activations(tiny, 24, 24, 1)["total"] == P.measure_activations(tiny, 24, 24, 1)["total"] > 0
    with pytest.raises(ValueError, match="batch"):
        P.measure_activations(tiny, 24, 24, 0)
    with pytest.raises(ValueError, match="width"):
        P.measure_activations(tiny, 24, 20, 1)

"""`megamed train --plan`: per-GPU memory of each ZeRO stage, with and without offload.

    plan = plan_memory(load_model_config("large-1024"), 1024, 1024, batch=1, gpus=1)
    print(format_plan(plan, gpu_memory=24))

Two parts, added per GPU (plus a fixed `overhead_gib` for the CUDA context, cuBLAS workspace
and allocator slack):

1. MODEL STATES, from the ZeRO paper's formulas (Rajbhandari et al. 2020, section 3). With
   Ψ parameters, N GPUs, and mixed-precision Adam, each parameter costs 16 bytes: 2 (bf16
   param) + 2 (bf16 grad) + 12 (fp32 master copy, Adam m and v). Per GPU:
       stage 0   16Ψ                  (plain data parallel: everything replicated)
       stage 1   4Ψ + 12Ψ/N           (optimizer states partitioned)
       stage 2   2Ψ + 14Ψ/N           (+ gradients partitioned)
       stage 3   16Ψ/N + 4·L          (+ parameters partitioned; L = params of the largest
                                       layer, gathered whole with its gradient: DeepSpeed's
                                       "largest layer" term, 2 B param + 2 B grad)
   Optimizer offload (ZeRO-Offload) moves the 12Ψ optimizer bytes to CPU RAM (the fp32 step
   runs there); parameter offload (stage 3 only, ZeRO-Infinity) moves the bf16 params and
   grads too, leaving 4·L on the GPU. CPU RAM is reported for the whole node (all N ranks).
   With dtype="fp32" (no mixed precision: 4 B param, 4 B grad, 8 B Adam m, v) the same
   16 bytes split 4/4/8 instead of 2/2/12.
   On ONE GPU, stages 1-3 have nobody to partition with: they cost what stage 0 costs (stage
   3 a little more); only offload saves memory. format_plan says so.

2. ACTIVATIONS, measured: a real forward on CPU at two small resolutions and two batch sizes,
   counting the bytes of every tensor autograd saves for backward
   (torch.autograd.graph.saved_tensors_hooks), each storage once, parameters excluded. They
   are fitted to
       bytes(B, P) = c + B · (a + b · P)          P = height · width pixels
   (c: per-step constants such as RoPE tables; a: per-image work independent of the
   resolution, e.g. the text encoder and mapping network; b: everything that runs per token:
   linears, neighborhood attention, norms, patch ops). Global attention on the two lowest-
   resolution levels would be quadratic in tokens, but fused SDPA (flash on CPU and CUDA)
   saves only q, k, v, out and the logsumexp, so it is linear too. Measured error of the
   extrapolation for large-1024 from 128²/192² (batch 1, 2): 0.0% at 256² and 512², 1.0% at
   320² batch 2 without checkpointing; +2-3% (over) with checkpointing, whose "largest layer"
   term is not exactly linear. tests/test_plan.py checks tiny to 3%.
   Every CPU neighborhood-attention backend is measured separately (forced through
   MEGAMED_BACKEND). In megamed they save the same tensors (the custom op keeps q, k, v, out,
   lse whichever backend runs; reference and tiled measure identically without
   checkpointing): rows whose fits are identical are merged into one, e.g. "tiled/reference".

   Gradient checkpointing (each transformer layer recomputed in backward) is derived from the
   same run: saved tensors are attributed to the transformer layer that saved them, and
       checkpointed = (saved outside layers) + (each layer's inputs) + (largest one layer)
   since autograd then saves the outside tensors and each checkpoint's inputs (x, theta, cond,
   context), and backward recomputes one layer at a time (tests check the first two terms
   against a real checkpointed run).

Not modelled: the CUDA caching allocator's fragmentation, temporaries that live only inside
one op, gradients of activations alive during backward, DeepSpeed's communication buckets and
its bf16 optimizer's fp32 gradient accumulation buffer (4Ψ more unless disabled), and, for
megamed's own trainer (fp32 params + autocast), the bf16 weight copies autocast caches per
step (2Ψ). Measure on the GPU before trusting a fit within ~10%.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megamed import flags

# torch is imported inside the functions: the CLI imports this module for its flags at startup
if TYPE_CHECKING:
    import torch

GIB = 2**30
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}   # plan dtype -> torch dtype name
# bytes per parameter: (param, grad, optimizer) for mixed-precision Adam vs plain fp32 Adam
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
NA_OP = "neighborhood_attention"


# ---------------------------------------------------------------------------------------------
# model states: the ZeRO formulas
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZeroOption:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def name(self) -> str:
        off = ("+optimizer+param offload" if self.offload_param else
               "+optimizer offload" if self.offload_optimizer else "")
        return f"stage {self.stage}{off}"


# DeepSpeed: offload needs stage >= 1 (optimizer) or stage 3 (params)
OPTIONS = (ZeroOption(0), ZeroOption(1), ZeroOption(2), ZeroOption(3),
           ZeroOption(1, True), ZeroOption(2, True), ZeroOption(3, True), ZeroOption(3, True, True))


def model_state_bytes(params: int, largest_layer: int, gpus: int, option: ZeroOption,
                      dtype: str = "bf16") -> tuple[float, float]:
    """(GPU bytes per rank, CPU bytes for the node) of params + grads + optimizer states."""
    if params < 0 or largest_layer < 0:
        raise ValueError(f"params and largest_layer must be >= 0, got {params}, {largest_layer}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if dtype not in STATE_BYTES:
        raise ValueError(f"dtype must be one of {list(STATE_BYTES)}, got {dtype!r}")
    p, g, k = STATE_BYTES[dtype]
    psi, n, s = params, gpus, option.stage
    # what each rank holds of the three states: partitioned from the stage that partitions it
    param_b = p * psi / n if s >= 3 else p * psi
    grad_b = g * psi / n if s >= 2 else g * psi
    opt_b = k * psi / n if s >= 1 else k * psi
    live = (p + g) * largest_layer if s >= 3 else 0   # the gathered layer and its gradient
    cpu = 0.0
    if option.offload_optimizer:
        cpu += k * psi            # all ranks' partitions together
        opt_b = 0.0
    if option.offload_param:
        cpu += (p + g) * psi
        param_b = grad_b = 0.0
    return param_b + grad_b + opt_b + live, cpu


def largest_layer_params(model: "torch.nn.Module") -> int:
    """Parameters of the largest module, counting only its own (DeepSpeed's definition)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


# ---------------------------------------------------------------------------------------------
# activations: saved-tensor bytes, measured
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def forced_backend(op: str, name: "str | None"):
    """Force backend `name` for `op` through MEGAMED_BACKEND (read at call time), then restore."""
    if name is None:
        yield
        return
    old = os.environ.get(flags.BACKEND_ENV)
    os.environ[flags.BACKEND_ENV] = f"{op}={name}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(flags.BACKEND_ENV, None)
        else:
            os.environ[flags.BACKEND_ENV] = old


def _storage_key(t: "torch.Tensor") -> int:
    return t.untyped_storage().data_ptr()


def measure_activations(model, height: int, width: int, batch: int = 1, *, backend: "str | None" = None,
                        seed: int = 0) -> dict:
    """One forward of `model` on a random batch [batch, C, height, width] (with a random prompt
    if the model has text); returns bytes autograd saved for backward:
        {"total": all saved storages, each once, parameters excluded,
         "checkpointed": what per-layer gradient checkpointing keeps at its peak, the sum of
         "outside": saved outside any transformer layer (all checkpointing lets autograd save),
         "layer_inputs": the layers' tensor arguments x, theta, cond, context (each checkpoint
                         keeps them to recompute from), less those already counted outside,
         "largest_layer": the most one layer saves (alive while it is recomputed in backward),
         "layers": number of transformer layers seen}
    Runs on the model's device and dtype; backend forces the neighborhood-attention backend."""
    import torch

    from megamed.models.layers import TransformerLayer

    for name, v in (("height", height), ("width", width), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    model.check_size(height, width)
    cfg = model.config
    p0 = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, height, width, generator=gen).to(p0.device, p0.dtype)
    c_noise = torch.randn(batch, generator=gen).to(p0.device)
    text = {}
    if cfg.text.enabled:
        text["text_ids"] = torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.max_length),
                                         generator=gen).to(p0.device)

    # Bookkeeping per storage (views of one buffer count once): its bytes, whether anything
    # outside the transformer layers saved it, which layers saved it, and the layers' inputs.
    param_keys = {_storage_key(p) for p in model.parameters()}
    nbytes: dict[int, int] = {}
    outside_keys: set[int] = set()
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    layer_keys: list[set[int]] = [set() for _ in layers]
    input_keys: dict[int, int] = {}            # x, theta, cond, context of every layer -> bytes
    current: list = [None]                     # index of the layer running now, None outside
    keep: list = []              # hold every saved tensor: a freed address reused would dedupe wrongly

    def pack(t: "torch.Tensor"):
        keep.append(t)
        key = _storage_key(t)
        if key not in param_keys:
            nbytes.setdefault(key, t.untyped_storage().nbytes())
            (outside_keys if current[0] is None else layer_keys[current[0]]).add(key)
        return t

    def pre(i):
        def hook(module, args):
            current[0] = i
            for a in args:
                if isinstance(a, torch.Tensor):
                    input_keys[_storage_key(a)] = a.untyped_storage().nbytes()
        return hook

    def post(module, args, out):
        current[0] = None

    handles = [m.register_forward_pre_hook(pre(i)) for i, m in enumerate(layers)]
    handles += [m.register_forward_hook(post) for m in layers]
    was_ckpt = [lvl.gradient_checkpointing for lvl in model.levels()]
    model.set_gradient_checkpointing(False)   # measure everything; checkpointing is derived below
    try:
        with forced_backend(NA_OP, backend), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, c_noise, **text)
    finally:
        for h in handles:
            h.remove()
        for lvl, c in zip(model.levels(), was_ckpt):
            lvl.gradient_checkpointing = c

    # With checkpointing, autograd saves what code outside the layers saves, plus each
    # checkpoint's arguments (to recompute from); backward then recomputes one layer at a time,
    # re-saving what that layer saved (less what is alive anyway).
    outside = sum(nbytes[k] for k in outside_keys)
    inputs = sum(b for k, b in input_keys.items() if k not in outside_keys)
    per_layer = [sum(nbytes[k] for k in keys if k not in outside_keys and k not in input_keys) for keys in layer_keys]
    largest = max(per_layer, default=0)
    return {"total": sum(nbytes.values()), "checkpointed": outside + inputs + largest,
            "outside": outside, "layer_inputs": inputs, "largest_layer": largest, "layers": len(layers)}


def fit_activations(m11: float, m21: float, m12: float, p1: int, p2: int) -> tuple[float, float, float]:
    """Solve bytes(B, P) = c + B·(a + b·P) from bytes at (B=1, P=p1), (B=2, P=p1), (B=1, P=p2)."""
    if p1 == p2:
        raise ValueError(f"p1 and p2 must differ, got {p1}")
    b = (m12 - m11) / (p2 - p1)
    per_image = m21 - m11                     # a + b·p1
    return 2 * m11 - m21, per_image - b * p1, b


def smallest_sizes(model, count: int = 2) -> list[int]:
    """The `count` smallest square resolutions the model accepts."""
    m, out, s = model.config.size_multiple, [], model.config.size_multiple
    while len(out) < count:
        try:
            model.check_size(s, s)
            out.append(s)
        except ValueError:
            pass
        s += m
    return out


def cpu_backends(model) -> list[str]:
    """Neighborhood-attention backends to measure: those that run on CPU and that automatic choice
    would not refuse (the Triton interpreter runs on CPU but is a testing tool, far too slow)."""
    import torch

    from megamed.ops.backends import _REGISTRY, available_backends

    if "neighborhood" not in model.config.attention:
        return [None]
    heads, d = 2, model.config.d_head
    q = torch.zeros(1, 8, 8, heads, d)
    out = []
    for name in available_backends(NA_OP):
        b = _REGISTRY[NA_OP][name]
        reason = b.can_run(q, q, q, 7, dilation=1, scale=d ** -0.5)
        if reason is None and "auto_refuse" in b.extra:
            reason = b.extra["auto_refuse"](q, q, q, 7, dilation=1, scale=d ** -0.5)
        if reason is None:
            out.append(name)
    return out


def activation_models(model, *, backends=None, progress: bool = True) -> dict:
    """{backend: {"plain": (c, a, b), "checkpointed": (c, a, b), "sizes": [s1, s2]}}: the fitted
    activation model for each backend, from three measured forwards each."""
    from tqdm.auto import tqdm

    s1, s2 = smallest_sizes(model, 2)
    backends = cpu_backends(model) if backends is None else list(backends)
    runs = [(bk, b, s) for bk in backends for (b, s) in ((1, s1), (2, s1), (1, s2))]
    meas = {}
    for bk, b, s in tqdm(runs, desc="measuring activations", disable=not progress, leave=False):
        meas[bk, b, s] = measure_activations(model, s, s, b, backend=bk)
    out = {}
    for bk in backends:
        out[bk] = {kind: fit_activations(meas[bk, 1, s1][kind], meas[bk, 2, s1][kind], meas[bk, 1, s2][kind],
                                         s1 * s1, s2 * s2)
                   for kind in ("total", "checkpointed")}
        out[bk]["sizes"] = [s1, s2]
    return out


def predict(fit: tuple[float, float, float], height: int, width: int, batch: int) -> float:
    c, a, b = fit
    return max(c + batch * (a + b * height * width), 0.0)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------

def plan_memory(model_cfg, height: int, width: int, batch: int, *, gpus: int = 1, grad_checkpointing=False,
                backend: "str | None" = None, dtype: str = "bf16", overhead_gib: float = 1.0,
                progress: bool = True, _fits: "dict | None" = None) -> dict:
    """Per-GPU memory of every ZeRO option for training `model_cfg` at height x width, `batch`
    images per GPU. grad_checkpointing: False, True, or None for both. backend: one
    neighborhood-attention backend, or None for every CPU backend. Returns
        {"params", "largest_layer", "gpus", ..., "rows": [{"option", "stage", "offload_optimizer",
         "offload_param", "backend", "grad_checkpointing", "states_gib", "activations_gib",
         "total_gib", "cpu_gib"}, ...], "notes": [...]}"""
    import torch

    from megamed.models import ModelConfig, make_model

    if not isinstance(model_cfg, ModelConfig):
        raise ValueError(f"model_cfg: expected a ModelConfig, got {type(model_cfg).__name__}")
    for name, v in (("height", height), ("width", width), ("batch", batch), ("gpus", gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if grad_checkpointing not in (True, False, None):
        raise ValueError(f"grad_checkpointing must be True, False or None (both), got {grad_checkpointing!r}")

    meta = make_model(model_cfg, device="meta")
    meta.check_size(height, width)  # ValueError naming height/width
    params = sum(p.numel() for p in meta.parameters())
    largest = largest_layer_params(meta)
    if backend is not None and backend not in cpu_backends(meta) and "neighborhood" in model_cfg.attention:
        raise ValueError(f"backend must be one of the CPU neighborhood-attention backends "
                         f"{cpu_backends(meta)}, got {backend!r}")

    if _fits is None:   # (tests pass measured fits to share them between calls)
        torch.manual_seed(0)
        model = make_model(model_cfg, dtype=getattr(torch, DTYPES[dtype]))
        _fits = activation_models(model, backends=None if backend is None else [backend], progress=progress)
        del model
    # backends whose measured fits are identical (megamed's neighborhood-attention custom op saves
    # q, k, v, out, lse whichever backend runs it) share one row, named "tiled/reference"
    groups: dict = {}
    for bk in (list(_fits) if backend is None else [backend]):
        key = (tuple(_fits[bk]["total"]), tuple(_fits[bk]["checkpointed"]))
        groups.setdefault(key, []).append(bk)
    backends = [names[0] for names in groups.values()]
    label = {names[0]: "/".join(str(n) for n in names) for names in groups.values()}
    ckpts = [False, True] if grad_checkpointing is None else [bool(grad_checkpointing)]

    rows = []
    for opt in OPTIONS:
        gpu_b, cpu_b = model_state_bytes(params, largest, gpus, opt, dtype)
        for bk in backends:
            for ck in ckpts:
                act = predict(_fits[bk]["checkpointed" if ck else "total"], height, width, batch)
                rows.append({"option": opt.name, "stage": opt.stage, "offload_optimizer": opt.offload_optimizer,
                             "offload_param": opt.offload_param, "backend": label[bk], "grad_checkpointing": ck,
                             "states_gib": gpu_b / GIB, "activations_gib": act / GIB,
                             "total_gib": (gpu_b + act) / GIB + overhead_gib, "cpu_gib": cpu_b / GIB})
    notes = []
    if gpus == 1:
        notes.append("1 GPU: ZeRO stages 1-3 partition nothing (there is no other rank to hold the "
                     "other parts), so they need as much GPU memory as stage 0 (stage 3 slightly more); "
                     "only offload to CPU saves GPU memory.")
    notes.append(f"activations: fitted c + B*(a + b*H*W) from forwards at {_fits[backends[0]]['sizes']}² "
                 f"(batch 1 and 2) on CPU in {dtype}; includes {overhead_gib:g} GiB fixed overhead "
                 "(CUDA context, workspaces).")
    return {"params": params, "largest_layer": largest, "gpus": gpus, "height": height, "width": width,
            "batch": batch, "dtype": dtype, "overhead_gib": overhead_gib, "rows": rows, "notes": notes}


def fitting(plan: dict, gpu_memory: float) -> list[dict]:
    """Rows of `plan` whose total fits in gpu_memory GiB, smallest first."""
    if not gpu_memory > 0:
        raise ValueError(f"gpu_memory must be > 0 GiB, got {gpu_memory!r}")
    return sorted((r for r in plan["rows"] if r["total_gib"] <= gpu_memory), key=lambda r: r["total_gib"])


def format_plan(plan: dict, gpu_memory: "float | None" = None) -> str:
    """A table of the plan's rows (GiB per GPU), with a 'fits' column when gpu_memory is given."""
    lines = [f"memory plan: {plan['params'] / 1e6:.1f}M params (largest layer {plan['largest_layer'] / 1e6:.1f}M), "
             f"{plan['height']}x{plan['width']}, batch {plan['batch']} per GPU, {plan['gpus']} GPU(s), {plan['dtype']}",
             f"{'option':<32} {'backend':<17} {'ckpt':<5} {'states':>8} {'activ.':>8} {'total':>8} {'CPU RAM':>8}"
             + ("  fits" if gpu_memory is not None else "")]
    for r in plan["rows"]:
        fit = ("  yes" if r["total_gib"] <= gpu_memory else "  no") if gpu_memory is not None else ""
        lines.append(f"{r['option']:<32} {str(r['backend']):<17} {'yes' if r['grad_checkpointing'] else 'no':<5} "
                     f"{r['states_gib']:>8.2f} {r['activations_gib']:>8.2f} {r['total_gib']:>8.2f} "
                     f"{r['cpu_gib']:>8.2f}{fit}")
    lines += [f"note: {n}" for n in plan["notes"]]
    if gpu_memory is not None:
        ok = fitting(plan, gpu_memory)
        lines.append(f"fits in {gpu_memory:g} GiB: " + (
            f"{len(ok)} option(s); least offload: " + _least_offload(ok) if ok else "nothing; lower batch or "
            "resolution, or add GPUs"))
    return "\n".join(lines)


def _least_offload(rows: list[dict]) -> str:
    # prefer no offload, then lower stage, then no checkpointing (fastest first)
    r = min(rows, key=lambda r: (r["offload_param"], r["offload_optimizer"], r["grad_checkpointing"], r["stage"]))
    return f"{r['option']} ({r['backend']}, checkpointing {'on' if r['grad_checkpointing'] else 'off'})"


# ---------------------------------------------------------------------------------------------
# command line: `megamed train --plan` (wired in megamed/cli/train_cmd.py)
# ---------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    """The flags `main` reads besides train's --config, --size, --batch, --grad-checkpointing."""
    parser.add_argument("--plan", action="store_true",
                        help="print per-GPU memory of each ZeRO stage / offload option and exit (trains nothing)")
    parser.add_argument("--gpu-memory", type=float, help="with --plan: GiB per GPU to fit into (e.g. 24)")
    parser.add_argument("--gpus", type=int, default=1, help="with --plan: number of GPUs (default 1)")
    parser.add_argument("--plan-dtype", choices=sorted(DTYPES), default="bf16",
                        help="with --plan: bf16 mixed precision (default) or fp32")


def main(args) -> int:
    """Print the plan for args.config at args.size (default: the model's default_resolution) and
    args.batch (default 8, train's default); both checkpointing settings unless
    --grad-checkpointing is given."""
    from megamed.models import load_model_config

    if not getattr(args, "config", None):
        raise ValueError("--plan needs --config (a model config name or JSON path)")
    cfg = load_model_config(args.config)
    size = getattr(args, "size", None) or cfg.default_resolution
    batch = getattr(args, "batch", None) or 8
    plan = plan_memory(cfg, size, size, batch, gpus=getattr(args, "gpus", 1) or 1,
                       grad_checkpointing=True if getattr(args, "grad_checkpointing", None) else None,
                       dtype=getattr(args, "plan_dtype", "bf16"), progress=not getattr(args, "no_progress", False))
    print(format_plan(plan, getattr(args, "gpu_memory", None)))
    return 0

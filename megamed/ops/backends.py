"""Backend registry for the four megamed ops.

Every op ("neighborhood_attention", "attention", "patch_merge", "patch_split") has one or
more named implementations ("backends"). A backend registers

    can_run(*args, **kwargs) -> str | None   None if it can run these arguments, else why not
    fn(*args, **kwargs)                      the implementation (same arguments as the op)
    priority: int                            higher wins when choosing automatically

can_run and fn are called like the public function, tensors positional and options by
keyword, with `backend` dropped and defaults resolved (scale is a float):

    neighborhood_attention: (q, k, v, kernel_size, *, dilation, scale) -> (out, lse)
                            plus bwd=(grad_out, q, k, v, out, lse, kernel_size, *, dilation, scale)
                            -> (dq, dk, dv); see megamed.ops.natten for the lse layout
    attention:              (q, k, v, *, key_padding_mask, scale) -> out
    patch_merge:            (x, weight, bias, *, factor) -> out
    patch_split:            (x, weight, bias, *, factor, skip, lerp) -> out
Arguments are validated before a backend sees them; inputs may be strided views.

`reference` (plain PyTorch, priority 0) always exists for every op. Other modules
(megamed.ops._cpp, later triton/cuda) register more through `register_backend`.

How a call picks its backend (`choose_backend`):
  1. an explicit `backend=` argument,
  2. else the env flag MEGAMED_BACKEND: either one name for all ops ("reference") or a
     per-op list ("patch_merge=cpp,attention=reference"; a bare name in the list is the
     default for the ops not named). It is read when the op is called (when traced, under
     torch.compile: set it before compiling),
  3. else the highest-priority backend whose can_run says None.
A forced backend (1 or 2) that cannot run raises BackendUnavailable with its reason, and a
forced name the op does not have raises ValueError (so MEGAMED_BACKEND=cpp fails on
attention, which has no cpp backend: use the per-op form). Forcing is for benchmarks and
tests, where a silent fallback would lie about what ran.
Automatic choice never silently uses the slow path on CUDA tensors: if every fused backend
refuses, one warning per op lists each refusal, then `reference` serves. (Not for
attention, whose reference is SDPA, itself fused on CUDA.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megamed import flags

log = logging.getLogger("megamed.ops")

OPS = ("neighborhood_attention", "attention", "patch_merge", "patch_split")
REFERENCE = "reference"


class BackendUnavailable(RuntimeError):
    """A backend was forced (argument or MEGAMED_BACKEND) but its can_run refused."""


@dataclass
class Backend:
    name: str
    can_run: Callable[..., "str | None"]
    fn: Callable
    priority: int
    # Extra entry points some ops need, e.g. {"bwd": ...} for neighborhood attention,
    # whose custom op calls fn (forward -> (out, lse)) and bwd separately.
    extra: dict[str, Callable] = field(default_factory=dict)


# op -> name -> Backend
_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_WARNED_SLOW_CUDA: set[str] = set()
# Ops whose reference is itself fused on CUDA (attention = SDPA, which dispatches to flash /
# memory-efficient kernels), so falling back to it is not "the slow path" worth a warning.
_REFERENCE_FAST_ON_CUDA = {"attention"}


def _check_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")


def register_backend(op: str, name: str, *, can_run: Callable[..., "str | None"], fn: Callable,
                     priority: int, **extra: Callable) -> None:
    """Register (or replace) backend `name` for `op`. `extra` holds additional entry points
    (neighborhood_attention backends must pass `bwd=`, see megamed.ops.natten) and optionally
    `auto_refuse(*args, **kwargs) -> str | None`: a reason to skip the backend in AUTOMATIC
    choice only, while forcing it still works (e.g. the Triton interpreter on CPU: correct, but
    a testing tool thousands of times slower than the reference)."""
    _check_op(op)
    if not isinstance(name, str) or not name or name != name.strip().lower() or any(c in name for c in ",="):
        raise ValueError(f"name must be a non-empty lowercase string without ',' or '=', got {name!r}")
    if not callable(can_run) or not callable(fn):
        raise ValueError(f"can_run and fn must be callable (backend {name!r} of {op})")
    if op == "neighborhood_attention" and not callable(extra.get("bwd")):
        raise ValueError(f"neighborhood_attention backend {name!r} needs bwd= (the backward entry point)")
    _REGISTRY[op][name] = Backend(name, can_run, fn, int(priority), dict(extra))


def unregister_backend(op: str, name: str) -> None:
    """Remove a backend (for tests). `reference` cannot be removed."""
    _check_op(op)
    if name == REFERENCE:
        raise ValueError("the reference backend cannot be unregistered")
    _REGISTRY[op].pop(name, None)


def get_backend(op: str, name: str) -> Backend:
    _check_op(op)
    try:
        return _REGISTRY[op][name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} for {op}; known: {available_backends(op)}") from None


def available_backends(op: str) -> list[str]:
    """Registered backend names for `op`, highest priority first."""
    _check_op(op)
    return [b.name for b in sorted(_REGISTRY[op].values(), key=lambda b: -b.priority)]


def can_run(op: str, name: str, *args: Any, **kwargs: Any) -> "str | None":
    """None if backend `name` can run `op` on these arguments, else the reason it cannot."""
    return get_backend(op, name).can_run(*args, **kwargs)


def parse_backend_env(value: "str | None") -> dict[str, str]:
    """Parse a MEGAMED_BACKEND value into {op: name}; key "*" is the default for every op.

    "reference"                       -> {"*": "reference"}
    "patch_merge=cpp,attention=sdpa"  -> {"patch_merge": "cpp", "attention": "sdpa"}
    "cpp,attention=reference"         -> {"*": "cpp", "attention": "reference"}
    """
    out: dict[str, str] = {}
    for part in (value or "").split(","):
        part = part.strip().lower()
        if not part:
            continue
        if "=" in part:
            op, _, name = (s.strip() for s in part.partition("="))
            if op not in OPS:
                raise ValueError(f"{flags.BACKEND_ENV}: unknown op {op!r} in {value!r}; ops: {list(OPS)}")
            if not name:
                raise ValueError(f"{flags.BACKEND_ENV}: empty backend name for {op} in {value!r}")
            out[op] = name
        else:
            if "*" in out:
                raise ValueError(f"{flags.BACKEND_ENV}: two default backends in {value!r}")
            out["*"] = part
    return out


def env_backend(op: str) -> "str | None":
    """The backend MEGAMED_BACKEND forces for `op`, or None."""
    forced = parse_backend_env(flags.forced_backend())
    return forced.get(op, forced.get("*"))


def _first_tensor(args: tuple, kwargs: dict) -> "torch.Tensor | None":
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def choose_backend(op: str, *args: Any, backend: "str | None" = None, **kwargs: Any) -> str:
    """Name of the backend that will run `op(*args, **kwargs)` (see the module docstring)."""
    _check_op(op)
    forced, source = (backend, "backend=") if backend is not None else (env_backend(op), flags.BACKEND_ENV)
    if forced is not None:
        if forced not in _REGISTRY[op] and source == flags.BACKEND_ENV:
            raise ValueError(f"{flags.BACKEND_ENV}={flags.forced_backend()} forces backend {forced!r} for {op}, "
                             f"which has no such backend (known: {available_backends(op)}); use the per-op "
                             f"form, e.g. {flags.BACKEND_ENV}=patch_merge={forced},patch_split={forced}")
        reason = get_backend(op, forced).can_run(*args, **kwargs)  # ValueError if unknown
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {forced!r} (forced by {source}) cannot run: {reason}")
        return forced

    refusals = []
    for b in sorted(_REGISTRY[op].values(), key=lambda b: -b.priority):
        if b.name == REFERENCE:
            continue
        reason = b.can_run(*args, **kwargs)
        if reason is None and "auto_refuse" in b.extra:
            reason = b.extra["auto_refuse"](*args, **kwargs)
        if reason is None:
            return b.name
        refusals.append(f"{b.name}: {reason}")
    t = _first_tensor(args, kwargs)
    # (skipped while torch.compile traces: a logging call there would break the graph;
    # the eager warm-up call or first uncompiled call reports it)
    if (t is not None and t.is_cuda and op not in _WARNED_SLOW_CUDA and op not in _REFERENCE_FAST_ON_CUDA
            and not torch.compiler.is_compiling()):
        _WARNED_SLOW_CUDA.add(op)
        log.warning("megamed: %s on CUDA tensors is using the slow reference backend; refusals: %s",
                    op, "; ".join(refusals) or "no fused backend registered")
    return REFERENCE

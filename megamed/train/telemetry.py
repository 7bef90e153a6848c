"""GPU telemetry through NVML (package nvidia-ml-py, imported as `pynvml`).

    tel = GpuTelemetry(every=50)
    if tel.due(step):
        samples = tel.sample()                       # [{"index": 0, "mem_used_mib": ..., ...}, ...]
        bar.set_postfix_str(tel.format_short(samples))
        row.update(tel.as_row(samples))              # {"gpu0_mem_used_mib": ..., ...}

Why NVML and not torch.cuda.memory_allocated: NVML sees the whole device (other processes,
the CUDA context, fragmentation in the caching allocator), plus utilisation, power and
temperature, which torch does not report at all.

Telemetry must never stop a training run, so every failure degrades instead of raising:
  - no pynvml, or no NVIDIA driver (NVMLError_LibraryNotFound, DriverNotLoaded, ...):
    the whole thing switches off with ONE log line; sample() then returns [].
  - a query that raises NVMLError (NotSupported on MIG slices for utilisation/power, or a
    GPU that stopped answering): only that field of that GPU switches off, with one log
    line; it reads None from then on (an empty cell in the CSV, left out of the bar).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# sample field -> unit shown in format_short; the order is the order of the row and the bar
FIELDS = ("mem_used_mib", "mem_total_mib", "util_pct", "power_w", "temp_c")


def _query(nvml, handle, field: str) -> float:
    """One NVML query for `field` on one device handle, converted to the field's unit."""
    if field == "mem_used_mib":
        return nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20        # bytes -> MiB
    if field == "mem_total_mib":
        return nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20
    if field == "util_pct":
        return float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)    # % of the last sample period
    if field == "power_w":
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0            # mW -> W
    if field == "temp_c":
        return float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    raise ValueError(f"field must be one of {FIELDS}, got {field!r}")


class GpuTelemetry:
    """Per-GPU memory used/total (MiB), utilisation (%), power (W), temperature (C) every
    `every` steps. Construction initialises NVML once; see the module docstring for how it
    switches itself (or single fields) off."""

    def __init__(self, every: int = 50):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (steps between samples), got {every!r}")
        self.every = every
        self.enabled = False
        self._nvml: Any = None
        self._handles: list = []
        self._off: set[tuple[int, str]] = set()   # (gpu index, field) pairs switched off
        try:
            import pynvml
        except ImportError:
            log.info("GPU telemetry off: pynvml is not installed (pip install nvidia-ml-py)")
            return
        try:
            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as e:
            # NVMLError_LibraryNotFound (no driver), DriverNotLoaded, NoPermission, ...: all mean
            # "no telemetry on this machine", and none should stop training.
            log.info("GPU telemetry off: NVML unavailable (%s: %s)", type(e).__name__, e)
            return
        if not self._handles:
            log.info("GPU telemetry off: NVML found no GPU")
            return
        self._nvml = pynvml
        self.enabled = True

    @property
    def gpu_count(self) -> int:
        return len(self._handles) if self.enabled else 0

    def due(self, step: int) -> bool:
        """True when step is a multiple of `every` and telemetry is on."""
        return self.enabled and step % self.every == 0

    def sample(self) -> list[dict]:
        """One dict per GPU: {"index", *FIELDS}; a switched-off field is None. [] when off."""
        if not self.enabled:
            return []
        nvml, out = self._nvml, []
        for i, handle in enumerate(self._handles):
            s: dict = {"index": i}
            for field in FIELDS:
                if (i, field) in self._off:
                    s[field] = None
                    continue
                try:
                    s[field] = _query(nvml, handle, field)
                except nvml.NVMLError as e:
                    # NotSupported = a MIG slice or a board without the sensor; anything else =
                    # a GPU that stopped answering. Either way: stop asking, say so once.
                    self._off.add((i, field))
                    why = "not supported (MIG?)" if isinstance(e, nvml.NVMLError_NotSupported) else str(e)
                    log.info("GPU telemetry: gpu%d %s off: %s", i, field, why)
                    s[field] = None
            out.append(s)
        return out

    def close(self) -> None:
        """Release NVML (idempotent)."""
        if self.enabled:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self.enabled = False

    # formatting needs no NVML: the module functions below, also reachable from an instance
    @staticmethod
    def format_short(samples: list[dict]) -> str:
        return format_short(samples)

    @staticmethod
    def as_row(samples: list[dict]) -> dict:
        return as_row(samples)


def format_short(samples: list[dict]) -> str:
    """Compact progress-bar postfix, e.g. "gpu0 12.3/80.0G 97% 350W 65C | gpu1 ..." ('' if none).
    Missing (None) fields are left out."""
    parts = []
    for s in samples:
        bits = [f"gpu{s['index']}"]
        used, total = s.get("mem_used_mib"), s.get("mem_total_mib")
        if used is not None:
            bits.append(f"{used / 1024:.1f}/{total / 1024:.1f}G" if total is not None else f"{used / 1024:.1f}G")
        for field, fmt in (("util_pct", "{:.0f}%"), ("power_w", "{:.0f}W"), ("temp_c", "{:.0f}C")):
            if s.get(field) is not None:
                bits.append(fmt.format(s[field]))
        parts.append(" ".join(bits))
    return " | ".join(parts)


def as_row(samples: list[dict]) -> dict:
    """Flat metrics-CSV columns: {"gpu0_mem_used_mib": 1234.0, "gpu0_power_w": None, ...}."""
    return {f"gpu{s['index']}_{field}": s.get(field) for s in samples for field in FIELDS}

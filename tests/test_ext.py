"""The compiled extension megamed._C: what it reports, what it registers, and that megamed still
imports and falls back cleanly when it is disabled, missing, or built for another torch.
The build checks (nvcc, CUDA glue, wheel contents) are `slow`: `make test` runs nvcc_check.sh itself.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import megamed
import megamed.ops
from megamed import _ext, flags
from megamed.ops import BackendUnavailable, _cpp, choose_backend

ROOT = Path(__file__).resolve().parents[1]
loaded = pytest.mark.skipif(not megamed.extension_status()["loaded"],
                            reason=f"megamed._C not loaded: {megamed.extension_status()['reason']}")


def _small_merge_args():
    return torch.randn(1, 4, 4, 3), torch.randn(5, 12), None


@loaded
def test_extension_reports_its_build():
    from megamed import _C
    assert _C.torch_version == torch.__version__  # built against the torch we run with
    assert _C.with_cuda is (torch.version.cuda is not None)
    status = megamed.extension_status()
    assert status["reason"] == "ok" and status["torch_version"] == torch.__version__
    assert status["cuda"] is _C.with_cuda


@loaded
def test_ops_registered_with_schemas_and_kernels():
    assert str(torch.ops.megamed.patch_merge.default._schema) == (
        "megamed::patch_merge(Tensor x, Tensor weight, Tensor? bias, int factor) -> Tensor")
    assert str(torch.ops.megamed.patch_split.default._schema) == (
        "megamed::patch_split(Tensor x, Tensor weight, Tensor? bias, int factor, Tensor? skip, Tensor? lerp) -> Tensor")
    for op in ("megamed::patch_merge", "megamed::patch_split"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") is (torch.version.cuda is not None)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")  # from megamed/ops/_cpp.py


@loaded
def test_backends_registered_and_refuse_with_reasons():
    x, w, b = _small_merge_args()
    assert choose_backend("patch_merge", x, w, b, factor=2) == "cpp"
    assert _cpp.cpp_can_run(x, w, b, factor=2) is None
    assert "dtype torch.int64" in _cpp.cpp_can_run(x.long(), w.long(), None, factor=2)
    assert "meta" in _cpp.cpp_can_run(x.to("meta"), w.to("meta"), None, factor=2)
    # cuda refuses on this CPU tensor (and, with a CPU torch, because _C has no CUDA).
    reason = _cpp.cuda_can_run(x, w, b, factor=2)
    assert reason is not None and ("without CUDA" in reason or "CUDA tensors" in reason)
    with pytest.raises(BackendUnavailable, match="cuda"):
        megamed.ops.patch_merge(x, w, b, backend="cuda")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


_FALLBACK_PROBE = """
import json, torch, megamed, megamed.ops
from megamed.ops import _cpp, choose_backend, patch_merge, BackendUnavailable
x, w = torch.randn(1, 4, 4, 3), torch.randn(5, 12)
try:
    patch_merge(x, w, backend="cpp")
    forced = None
except BackendUnavailable as e:
    forced = str(e)
print(json.dumps({"status": {k: v for k, v in megamed.extension_status().items() if k != "module"},
                  "reason": _cpp.cpp_can_run(x, w, None, factor=2),
                  "chosen": choose_backend("patch_merge", x, w, None, factor=2),
                  "forced": forced,
                  "out": list(patch_merge(x, w).shape)}))
"""


def test_disabled_by_env_falls_back_to_reference():
    r = _run_python(_FALLBACK_PROBE, **{flags.NO_EXT_ENV: "1"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["status"]["loaded"] is False and flags.NO_EXT_ENV in got["status"]["reason"]
    assert "megamed._C is not loaded" in got["reason"] and flags.NO_EXT_ENV in got["reason"]
    assert got["chosen"] == "reference" and got["out"] == [1, 2, 2, 5]
    assert "cannot run" in got["forced"] and flags.NO_EXT_ENV in got["forced"]


def test_missing_extension_logs_one_line_and_falls_back():
    # sys.modules[name] = None makes `from megamed import _C` raise ImportError, as if it were absent.
    code = "import sys; sys.modules['megamed._C'] = None\n" + _FALLBACK_PROBE
    r = _run_python(code, **{flags.NO_EXT_ENV: "0"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["status"]["loaded"] is False and "not importable" in got["status"]["reason"]
    assert got["chosen"] == "reference" and "not importable" in got["reason"]
    lines = [line for line in r.stderr.splitlines() if "compiled extension unavailable" in line]
    assert len(lines) == 1, r.stderr


@loaded
def test_version_mismatch_is_refused(monkeypatch, caplog):
    from megamed import _C
    monkeypatch.setattr(_C, "torch_version", "1.0.0+other")
    monkeypatch.setattr(_ext, "_STATUS", {"loaded": False, "reason": "not attempted"})
    with caplog.at_level(logging.WARNING, logger="megamed"):
        _ext._load()
    status = _ext.extension_status()
    assert status["loaded"] is False and "built for torch 1.0.0+other" in status["reason"]
    assert _ext.extension() is None
    assert sum("built for torch 1.0.0+other" in r.getMessage() for r in caplog.records) == 1
    x, w, b = _small_merge_args()
    assert "built for torch 1.0.0+other" in _cpp.cpp_can_run(x, w, b, factor=2)
    assert choose_backend("patch_merge", x, w, b, factor=2) == "reference"


def test_kernels_dir_is_framework_free():
    """kernels/cuda must compile with plain nvcc (scripts/nvcc_check.sh): no torch/ATen/pybind11."""
    sources = sorted((ROOT / "kernels" / "cuda").glob("*.cu*"))
    assert sources, "no CUDA sources under kernels/cuda"
    for path in sources:
        text = path.read_text()
        for banned in ("#include <torch", "#include <ATen", "#include <c10", "pybind11"):
            assert banned not in text, f"{path.name} includes {banned}"


@pytest.mark.slow
def test_nvcc_compiles_kernels():
    r = subprocess.run(["bash", "scripts/nvcc_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    if "SKIPPED" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert "kernels/cuda/patch.cu" in r.stdout


@pytest.mark.slow
def test_cuda_glue_compiles_against_torch_headers():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no host C++ compiler")
    r = subprocess.run(["bash", "csrc/cuda/check_glue.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PY": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    if "SKIPPED" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert "patch_cuda.cpp OK" in r.stdout


@pytest.mark.slow
def test_wheel_ships_extension_and_kernel_sources(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("megamed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("megamed/_C.") and n.endswith(".so") for n in names), names
    for src in ("megamed/kernels/cuda/patch.cu", "megamed/kernels/cuda/patch.cuh", "megamed/ops/_cpp.py"):
        assert src in names

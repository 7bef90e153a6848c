"""benchmarks/bench_model_step.py runs end to end on CPU (tiny model): the GPU script's step must not
be the first place its code runs."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_step_benchmark_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_model_step.py"), "--out", str(tmp_path),
                        "--configs", "tiny", "--size", "32", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "model_step.jsonl").read_text().splitlines()]
    assert {(x["mode"], x["step"]) for x in rows} == {(m, s) for m in ("reference", "fused") for s in ("train", "sample")}
    for x in rows:
        assert x["ms"] > 0 and "error" not in x
        if x["mode"] == "reference":   # forcing reference really reached every op
            assert "neighborhood_attention=reference" in x["backends"] and "patch_merge=reference" in x["backends"]
        else:
            assert "neighborhood_attention=reference" not in x["backends"]
    assert "speed-up" in (tmp_path / "model_step.md").read_text()

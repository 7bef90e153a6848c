"""benchmarks/rerender.py: a subset of an example set cast again at another size is the same patients
(same rows, same findings, the image the same after resampling), resumes, and refuses bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamed.data.example import ExampleConfig, generate
from megamed.data.layout import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def rerender(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/rerender.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_rerender_subset_at_another_size(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    generate(src, ExampleConfig(count=12, seed=4, bodies=10, size=48, ct_factor=4, render_px=48), progress=False)
    rows = {r["Path"]: r for r in read_metadata(src)}
    test = [p for p, r in rows.items() if r["split"] == "test"]
    train = [p for p, r in rows.items() if r["split"] == "train"]
    assert test and len(train) >= 3

    r = rerender(src, out, "--size", 96, "--take", "test", "--take", "train:2")
    assert r.returncode == 0, r.stderr[-2000:]
    got = read_metadata(out)
    assert [g["Path"] for g in got] == sorted(test) + sorted(train)[:2]     # the first N of each split, in order
    for g in got:
        want = rows[g["Path"]]
        # every cell but the regions is the source row's; regions are the same boxes to a pixel or two
        assert {k: v for k, v in g.items() if k != "regions"} == {k: v for k, v in want.items() if k != "regions"}
        a, b = json.loads(g["regions"]), json.loads(want["regions"])
        assert a.keys() == b.keys()
        for name in a:
            assert np.allclose(a[name], b[name], atol=3 / 48), (name, a[name], b[name])
        big = np.asarray(Image.open(out / g["Path"]), dtype=np.float64)
        small = np.asarray(Image.open(src / g["Path"]), dtype=np.float64)
        assert big.shape == (96, 96)
        down = torch.nn.functional.avg_pool2d(torch.from_numpy(big)[None, None], 2)[0, 0].numpy()
        assert np.corrcoef(down.ravel(), small.ravel())[0, 1] > 0.98          # the same radiograph, finer
    meta = json.loads((out / "example.json").read_text())
    assert meta["size"] == 96 and meta["count"] == 12 and meta["take"] == ["test:all", "train:2"]

    # resume: nothing left to render, and the metadata stays
    before = (out / "metadata.csv").read_bytes()
    r = rerender(src, out, "--size", 96, "--take", "test", "--take", "train:2")
    assert r.returncode == 0 and "0 to render" in r.stderr and (out / "metadata.csv").read_bytes() == before


@pytest.mark.parametrize("take", ["holdout", "train:0", "train:x"])
def test_rerender_rejects_bad_take(tmp_path, take):
    r = rerender(tmp_path, tmp_path / "out", "--size", 64, "--take", take)
    assert r.returncode == 2 and "--take" in r.stderr


def test_rerender_refuses_a_set_of_another_findings_version(tmp_path):
    src = tmp_path / "src"
    generate(src, ExampleConfig(count=2, seed=4, bodies=10, size=40, ct_factor=4, render_px=40), progress=False)
    meta = json.loads((src / "example.json").read_text())
    (src / "example.json").write_text(json.dumps(dict(meta, findings_version=meta["findings_version"] - 1)))
    r = rerender(src, tmp_path / "out", "--size", 64, "--take", "train")
    assert r.returncode == 1 and "findings version" in r.stderr and not (tmp_path / "out").exists()

"""benchmarks/enrich.py: a copy of an example set with extra training images that each carry a chosen
finding; val and test untouched, DATA's rows and images unchanged, resumable, bad input refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megamed.data.example import ExampleConfig, generate, plan
from megamed.data.layout import read_metadata

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(seed=4, bodies=10, size=40, ct_factor=4, render_px=40)


def enrich(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/enrich.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("enrich") / "src"
    generate(d, ExampleConfig(count=6, **CFG), progress=False)
    return d


def test_enrich_adds_training_images_with_the_finding(src, tmp_path):
    out = tmp_path / "out"
    r = enrich(src, out, "--finding", "Lung Lesion", "--severity", "0.1:0.4", "--extra", 10)
    assert r.returncode == 0, r.stderr[-2000:]
    base, got = read_metadata(src), read_metadata(out)
    assert got[:len(base)] == base                                   # DATA's rows first, unchanged
    for row in base:
        assert (out / row["Path"]).read_bytes() == (src / row["Path"]).read_bytes()
    grown = {it["index"]: it for it in plan(ExampleConfig(count=16, **CFG))}
    new = got[len(base):]
    want = [i for i in range(6, 16) if grown[i]["split"] == "train"]
    assert [int(Path(r["Path"]).stem) for r in new] == want and new
    for row in new:
        it = grown[int(Path(row["Path"]).stem)]
        f, regions = json.loads(row["findings"]), json.loads(row["regions"])
        assert row["split"] == "train" and row["Lung Lesion"] == "1.0"
        assert 0.1 <= f["Lung Lesion"]["severity"] <= 0.4 and f["Lung Lesion"]["side"] in ("left", "right")
        # the plan's other findings stay; the lesion is drawn and shows up in the image's regions
        assert {k: v for k, v in f.items() if k != "Lung Lesion"} == {
            k: v for k, v in it["findings"].items() if k != "Lung Lesion"}
        assert "Lung Lesion" in regions and (out / row["Path"]).is_file()
    assert not (out / "example.json").exists()
    assert json.loads((out / "enrich.json").read_text())["finding"] == "Lung Lesion"

    # resume: nothing left to render, the metadata the same; other settings for the same OUT refused
    before = (out / "metadata.csv").read_bytes()
    r = enrich(src, out, "--finding", "Lung Lesion", "--severity", "0.1:0.4", "--extra", 10)
    assert r.returncode == 0 and "0 to render" in r.stderr and (out / "metadata.csv").read_bytes() == before
    r = enrich(src, out, "--finding", "Lung Lesion", "--severity", "0.1:0.5", "--extra", 10)
    assert r.returncode == 1 and "other settings" in r.stderr


@pytest.mark.parametrize("args, message", [
    (("--finding", "Nodule", "--extra", 4), "--finding"),
    (("--finding", "Lung Lesion", "--severity", "0.4:0.1", "--extra", 4), "--severity"),
    (("--finding", "Lung Lesion", "--severity", "0:0.4", "--extra", 4), "--severity"),
    (("--finding", "Lung Lesion", "--extra", 0), "--extra"),
])
def test_enrich_rejects_bad_arguments(src, tmp_path, args, message):
    r = enrich(src, tmp_path / "out", *args)
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "out").exists()


def test_enrich_refuses_to_write_into_data(src):
    r = enrich(src, src, "--finding", "Lung Lesion", "--extra", 4)
    assert r.returncode == 1 and "another folder" in r.stderr

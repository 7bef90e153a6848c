"""`megamed sample` / `megamed generate`: PNG provenance, determinism, batch independence, resume.

One tiny model trained for a single step at 32x32 is shared by the module (samples from a
barely trained model are noise-like, but every property tested here is exact).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import megamed
from megamed.cli import main
from megamed.data import layout
from megamed.data.images import read_image, read_png_text

from test_train import make_dataset, tiny_setup

SAMPLE = ["--steps", "3", "--size", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from megamed.train import train

    data = make_dataset(tmp_path_factory.mktemp("data"), n=4)
    run = tmp_path_factory.mktemp("run")
    train(run, *tiny_setup(data, max_steps=1, save_every=1), progress=False)
    return run


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_sample_cli_writes_16bit_pngs_with_provenance(run_dir, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "prompts.txt").write_text("\n  Normal chest X-ray with no significant findings \n\n")
    rc = main(["sample", "--model", str(run_dir), "--prompt", "Chest X-ray showing cardiomegaly",
               "--prompts-file", str(tmp_path / "prompts.txt"), "--n", "2", "--seed", "7",
               "--guidance", "2.5", "--negative-prompt", "Chest X-ray showing edema", "--grid", "--out", str(out),
               *SAMPLE])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png"]
    with Image.open(out / "000000.png") as im:
        assert im.mode.startswith("I;16") and im.size == (32, 32)
    expected = ["Chest X-ray showing cardiomegaly"] * 2 + ["Normal chest X-ray with no significant findings"] * 2
    for i, prompt in enumerate(expected):
        text = read_png_text(out / f"{i:06d}.png")
        assert text["synthetic"] == "true" and text["prompt"] == prompt
        assert text["seed"] == str(7 + i) and text["sampler"] == "dpmpp-2m" and text["steps"] == "3"
        assert text["guidance"] == "2.5" and text["negative_prompt"] == "Chest X-ray showing edema"
        assert text["model_hash"] == sha16(run_dir / "model" / "model.safetensors")
        assert text["megamed_version"] == megamed.__version__
    grid = read_image(out / "grid.png")
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2)  # 2 prompts x 2 images, 2 px padding
    # the grid holds the same pixels as the single images (16-bit round trip is exact)
    assert np.array_equal(grid[2:34, 2:34], read_image(out / "000000.png"))
    assert np.array_equal(grid[36:68, 36:68], read_image(out / "000003.png"))


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler-ancestral"])
def test_sample_same_seed_same_bytes_and_batch_independent(run_dir, tmp_path, sampler):
    prompts = ["--prompt", "Chest X-ray showing pleural effusion", "--n", "2", "--sampler", sampler]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["sample", "--model", str(run_dir / "model"), *prompts, "--batch", "2", "--out", str(a), *SAMPLE]) == 0
    assert main(["sample", "--model", str(run_dir), *prompts, "--batch", "1", "--out", str(c), *SAMPLE]) == 0
    stochastic = sampler == "euler-ancestral"  # sampled one by one whatever --batch says
    if not stochastic:
        assert main(["sample", "--model", str(run_dir), *prompts, "--batch", "2", "--out", str(b), *SAMPLE]) == 0
    for name in ("000000.png", "000001.png"):
        # same seed -> same bytes
        assert (a / name).read_bytes() == ((c if stochastic else b) / name).read_bytes()
        # batch 1 vs 2: the same image (CPU matmuls of another batch size may differ in the last bit)
        diff = np.abs(read_image(a / name) - read_image(c / name)).max()
        assert diff <= 2 / 65535, diff
    assert not np.array_equal(read_image(a / "000000.png"), read_image(a / "000001.png"))  # seeds differ
    assert read_png_text(a / "000000.png")["eta"] == ("1.0" if stochastic else "")


def test_sample_bad_input_is_a_clear_error(run_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o"), *SAMPLE]) == 2
    assert "model" in capsys.readouterr().err
    assert main(["sample", "--model", str(run_dir), "--prompt", "x", "--sampler", "nope",
                 "--out", str(tmp_path / "o"), *SAMPLE]) == 2
    assert "sampler" in capsys.readouterr().err
    assert main(["sample", "--model", str(run_dir), "--prompt", "x", "--out", str(tmp_path / "o"),
                 "--steps", "3", "--size", "30", "--device", "cpu"]) == 2
    assert "multiple" in capsys.readouterr().err
    assert main(["sample", "--model", str(run_dir), "--out", str(tmp_path / "o"), *SAMPLE]) == 2
    assert "--prompt" in capsys.readouterr().err


def write_labels(path: Path) -> list[dict]:
    rows = []
    for i, finding in enumerate([None, "Cardiomegaly", "Edema", "Pneumothorax", "Pleural Effusion"]):
        row = {"Path": f"src/{i}.jpg", "Sex": "Female" if i % 2 else "", "Age": str(40 + i),
               "Frontal/Lateral": "Frontal", "AP/PA": "AP"}
        row.update({k: "" for k in layout.OBSERVATIONS})
        row["No Finding" if finding is None else finding] = "1.0"
        row["Edema"] = row["Edema"] or ("-1.0" if i == 4 else "")
        row["split"] = "val" if i == 1 else ""
        row["prompt"] = "Chest X-ray showing fracture" if i == 3 else ""
        rows.append(row)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def test_generate_resumes_without_lost_or_duplicate_images(run_dir, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    src = write_labels(labels)
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["generate", "--model", str(run_dir), "--labels", str(labels), "--batch", "2", "--seed", "5", *SAMPLE]
    assert main([*args, "--out", str(full)]) == 0
    assert main([*args, "--out", str(part), "--stop-after", "3"]) == 0  # as if killed after 3 images
    assert sorted(p.name for p in (part / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    assert len(layout.read_metadata(part)) == 3  # metadata lists only finished images
    (part / "images" / ".000003.png.4242.tmp").write_bytes(b"half a png")  # a write killed mid-way
    capsys.readouterr()
    assert main([*args, "--out", str(part)]) == 0
    assert "2 new, 3 already there" in capsys.readouterr().out

    rows = layout.read_metadata(part)
    assert [r["Path"] for r in rows] == [f"images/{i:06d}.png" for i in range(5)]
    assert (part / "metadata.csv").read_bytes() == (full / "metadata.csv").read_bytes()
    for r in rows:
        assert (part / r["Path"]).read_bytes() == (full / r["Path"]).read_bytes()
    assert sorted(p.name for p in (part / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]

    # labels, split, demographics copied; prompt from the labels (view included) or the prompt column
    assert rows[1]["Cardiomegaly"] == "1.0" and rows[4]["Edema"] == "-1.0" and rows[0]["No Finding"] == "1.0"
    assert [r["split"] for r in rows] == ["train", "val", "train", "train", "train"]
    assert rows[0]["Sex"] == "Unknown" and rows[1]["Sex"] == "Female" and rows[2]["Age"] == "42"
    assert rows[0]["prompt"] == "Normal AP chest X-ray with no significant findings"
    assert rows[1]["prompt"] == "AP chest X-ray showing cardiomegaly"
    assert rows[3]["prompt"] == "Chest X-ray showing fracture"
    params = json.loads(rows[2]["params"])
    assert params["seed"] == 7 and params["steps"] == 3 and params["source_path"] == src[2]["Path"]
    assert read_png_text(part / "images" / "000002.png")["prompt"] == rows[2]["prompt"]
    # the output is a data set megamed can train on
    from megamed.data.loaders import MegamedDataset

    ds = MegamedDataset(part, split=None, size=32)
    assert len(ds) == 5 and [ds.rows[i]["prompt"] for i in range(5)] == [r["prompt"] for r in rows]

    # an existing image made with other settings is never silently mixed in
    assert main(["generate", "--model", str(run_dir), "--labels", str(labels), "--seed", "6", *SAMPLE,
                 "--out", str(part)]) == 2
    assert "different settings" in capsys.readouterr().err


def test_generate_rejects_bad_labels(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Cardiomegaly\na.png,2.0\n")
    assert main(["generate", "--model", str(run_dir), "--labels", str(bad), "--out", str(tmp_path / "o"), *SAMPLE]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:2:" in err and "Cardiomegaly" in err  # file, line and column named
    assert not (tmp_path / "o" / "metadata.csv").exists()
    (tmp_path / "nolabels.csv").write_text("foo,bar\n1,2\n")
    assert main(["generate", "--model", str(run_dir), "--labels", str(tmp_path / "nolabels.csv"),
                 "--out", str(tmp_path / "o"), *SAMPLE]) == 2
    assert "observation columns" in capsys.readouterr().err

"""`megamed data example`: plan, splits, CSV round trip, determinism, resume, bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from megamed.data import example
from megamed.data.example import ExampleConfig, body_splits, generate, make_row, plan
from megamed.data.layout import CHEXPERT_COLUMNS, OBSERVATIONS, read_metadata

SMALL = dict(size=40, ct_factor=4, render_px=40)


def test_splits_are_disjoint_by_body():
    cfg = ExampleConfig(count=60, bodies=20, seed=3)
    items = plan(cfg)
    seeds = {s: {it["body_seed"] for it in items if it["split"] == s} for s in ("train", "val", "test")}
    assert seeds["train"] and seeds["val"] and seeds["test"]
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    assert len(seeds["train"]) == 16 and len(seeds["val"]) == 2 and len(seeds["test"]) == 2
    assert 0 not in set().union(*seeds.values())          # seed 0 = the undeformed CT, not a body
    assert body_splits(1, 0) == ["train"]


def test_plan_mix_and_determinism():
    items = plan(ExampleConfig(count=400, seed=1))
    assert items == plan(ExampleConfig(count=400, seed=1))
    normal = np.mean([not it["findings"] for it in items])
    assert 0.18 < normal < 0.32
    sizes = [len(it["findings"]) for it in items if it["findings"]]
    assert set(sizes) == {1, 2, 3}
    sev = [f["severity"] for it in items for f in it["findings"].values()]
    assert 0.1 <= min(sev) and max(sev) <= 1.0
    views = [it["geometry"]["view"] for it in items]
    assert 0.45 < views.count("PA") / len(views) < 0.75
    assert plan(ExampleConfig(count=5, seed=2)) != plan(ExampleConfig(count=5, seed=1))


def test_row_labels_and_prompt():
    it = {"index": 7, "body": 1, "body_seed": 99, "split": "val",
          "findings": {"Support Devices": {"severity": 0.5, "side": "none"}},
          "geometry": {"view": "AP"}, "exposure": {}}
    row = make_row(it)
    assert row["Path"] == "images/000007.png" and row["AP/PA"] == "AP" and row["Frontal/Lateral"] == "Frontal"
    assert row["No Finding"] == "1.0" and row["Support Devices"] == "1.0" and row["Cardiomegaly"] == "0.0"
    assert row["Sex"] == row["Age"] == "Unknown"
    assert "support devices" in row["prompt"].lower()
    it["findings"] = {}
    assert "normal" in make_row(it)["prompt"].lower()


def test_generate_round_trip_determinism_and_resume(tmp_path, monkeypatch):
    cfg = ExampleConfig(count=3, seed=5, bodies=2, **SMALL)
    a, b = tmp_path / "a", tmp_path / "b"
    assert generate(a, cfg, progress=False) == 3
    rows = read_metadata(a)
    planned = plan(cfg)
    assert [r["Path"] for r in rows] == [f"images/{i:06d}.png" for i in range(3)]
    for r, it in zip(rows, planned):
        assert json.loads(r["findings"]) == it["findings"]
        assert json.loads(r["params"])["geometry"] == it["geometry"]
        assert r["split"] == it["split"]
        assert all(r[o] in ("0.0", "1.0") for o in OBSERVATIONS)
        assert list(r)[: len(CHEXPERT_COLUMNS)] == CHEXPERT_COLUMNS
        with Image.open(a / r["Path"]) as im:
            assert im.mode in ("I;16", "I") and im.size == (40, 40)
            px = np.asarray(im)
            assert px.max() > 20000 and px.std() > 1000       # a real 16-bit radiograph, not a flat image

    # same seed -> same bytes
    generate(b, cfg, progress=False)
    for i in range(3):
        assert (a / f"images/{i:06d}.png").read_bytes() == (b / f"images/{i:06d}.png").read_bytes()
    assert (a / "metadata.csv").read_bytes() == (b / "metadata.csv").read_bytes()

    # resume: only missing or broken images are rendered again, and they come back identical
    calls = []
    real = example.render_item
    monkeypatch.setattr(example, "render_item",
                        lambda *a, **k: (calls.append(a[0]["index"]) if k.get("image", True) else None) or real(*a, **k))
    assert generate(a, cfg, progress=False) == 0 and calls == []
    original = (a / "images/000001.png").read_bytes()
    (a / "images/000001.png").unlink()
    (a / "images/000002.png").write_bytes(original[:100])   # truncated by a crash
    (a / "images/000000.png.part").write_bytes(b"junk")      # a crash mid-write leaves only .part
    assert generate(a, cfg, progress=False) == 2 and sorted(calls) == [1, 2]
    assert (a / "images/000001.png").read_bytes() == original
    assert len(read_metadata(a)) == 3

    # resuming into the folder with settings that change the plan is refused (old PNGs would be
    # kept under the new plan's labels); the worker count does not matter
    with pytest.raises(ValueError, match="seed: 5 -> 6"):
        generate(a, ExampleConfig(count=3, seed=6, bodies=2, **SMALL), progress=False)
    assert generate(a, ExampleConfig(count=3, seed=5, bodies=2, workers=2, **SMALL), progress=False) == 0

    # a larger --count grows the set: only the new item is rendered, and the folder is then
    # byte-identical to one made at that count from scratch; it may not shrink
    calls.clear()
    grown = ExampleConfig(count=4, seed=5, bodies=2, **SMALL)
    assert generate(a, grown, progress=False) == 1 and calls == [3]
    fresh = tmp_path / "fresh"
    generate(fresh, grown, progress=False)
    for name in ["metadata.csv", "example.json"] + [f"images/{i:06d}.png" for i in range(4)]:
        assert (a / name).read_bytes() == (fresh / name).read_bytes(), name
    with pytest.raises(ValueError, match=r"count: 4 -> 3\); --count may only grow"):
        generate(a, cfg, progress=False)
    # with the default --bodies the body count follows --count, so growing would move items
    # to other bodies: refused by that setting
    d = tmp_path / "d"
    generate(d, ExampleConfig(count=3, seed=5, **SMALL), progress=False)
    with pytest.raises(ValueError, match="n_bodies: 10 -> 11"):
        generate(d, ExampleConfig(count=55, seed=5, **SMALL), progress=False)
    # a folder rendered by another version of the findings is refused, never mixed
    claim = json.loads((d / "example.json").read_text())
    (d / "example.json").write_text(json.dumps({k: v for k, v in claim.items() if k != "findings_version"}))
    with pytest.raises(ValueError, match=f"findings_version: None -> {claim['findings_version']}"):
        generate(d, ExampleConfig(count=3, seed=5, **SMALL), progress=False)


def test_regions_locate_each_finding_and_resume_without_rendering(tmp_path, monkeypatch):
    """regions: a box per finding, in [0, 1], holding where the image changed because of it
    (independent check: the same item rendered without its findings, pixel difference); a set
    whose metadata.csv predates the column gets its regions without re-rendering any image."""
    from megamed.data.layout import write_metadata

    cfg = ExampleConfig(count=12, seed=4, bodies=2, size=64, ct_factor=4, render_px=64)
    out = tmp_path / "a"
    generate(out, cfg, progress=False)
    rows, items = read_metadata(out), plan(cfg)
    checked = 0
    example._init_worker(cfg.ct_factor)
    for r, it in zip(rows, items):
        regions = json.loads(r["regions"])
        assert set(regions) == set(it["findings"])
        for box in regions.values():
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        if len(it["findings"]) == 1 and "Support Devices" not in it["findings"]:
            (name, box), = regions.items()
            with_f = example.render_item(it, cfg.size, cfg.render_px, cfg.seed)[0].astype(np.float64)
            without = example.render_item(dict(it, findings={}), cfg.size, cfg.render_px, cfg.seed)[0].astype(np.float64)
            diff = np.abs(with_f - without)
            ys, xs = np.nonzero(diff >= np.quantile(diff, 0.995))       # the most changed pixels
            x0, y0, x1, y1 = (np.array(box) * cfg.size)
            inside = (xs >= x0 - 2) & (xs < x1 + 2) & (ys >= y0 - 2) & (ys < y1 + 2)
            assert inside.mean() > 0.8, (name, box)
            checked += 1
    assert checked >= 2

    # a set written before the regions column existed: regions computed, no image rendered again
    before = (out / "metadata.csv").read_bytes()
    write_metadata(out, [{k: v for k, v in r.items() if k != "regions"} for r in rows],
                   [c for c in list(rows[0]) if c != "regions"])
    calls = []
    real = example.render_item
    monkeypatch.setattr(example, "render_item", lambda *a, **k: calls.append(k.get("image", True)) or real(*a, **k))
    assert generate(out, cfg, progress=False) == 0
    assert calls and not any(calls)                              # regions-only work, no render
    assert (out / "metadata.csv").read_bytes() == before


def test_different_seed_different_images(tmp_path):
    generate(tmp_path / "a", ExampleConfig(count=1, seed=1, **SMALL), progress=False)
    generate(tmp_path / "b", ExampleConfig(count=1, seed=2, **SMALL), progress=False)
    assert (tmp_path / "a/images/000000.png").read_bytes() != (tmp_path / "b/images/000000.png").read_bytes()


@pytest.mark.slow
def test_parallel_workers_match_serial(tmp_path):
    cfg = dict(count=4, seed=9, bodies=2, **SMALL)
    generate(tmp_path / "s", ExampleConfig(workers=1, **cfg), progress=False)
    generate(tmp_path / "p", ExampleConfig(workers=2, **cfg), progress=False)
    for i in range(4):
        assert (tmp_path / f"s/images/{i:06d}.png").read_bytes() == (tmp_path / f"p/images/{i:06d}.png").read_bytes()


@pytest.mark.parametrize("kw, word", [(dict(size=31), "size"), (dict(count=0), "count"), (dict(workers=0), "workers"),
                                      (dict(bodies=0), "bodies")])
def test_bad_config(kw, word):
    with pytest.raises(ValueError, match=word):
        ExampleConfig(**kw)


def test_cli_rejects_bad_size_and_count(tmp_path, capsys):
    """The CLI turns the ValueError into one line on stderr naming the argument, exit code 2."""
    from megamed.cli import main

    assert main(["data", "example", "--out", str(tmp_path), "--size", "16"]) == 2
    assert "size must be an integer >= 32" in capsys.readouterr().err
    assert main(["data", "example", "--out", str(tmp_path), "--count", "0"]) == 2
    assert "count must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "metadata.csv").exists()


def test_render_item_leave_out_keeps_everything_else():
    """leave_out=all findings gives the image of the body without findings (same noise draw),
    bit for bit; leaving out nothing is the plain render; an unknown name is refused."""
    cfg = ExampleConfig(count=12, seed=4, bodies=2, size=64, ct_factor=4, render_px=64)
    example._init_worker(cfg.ct_factor)
    it = next(it for it in plan(cfg) if len(it["findings"]) >= 2)
    args = (cfg.size, cfg.render_px, cfg.seed)
    full = example.render_item(it, *args)[0]
    assert np.array_equal(example.render_item(it, *args, leave_out=())[0], full)
    bare = example.render_item(it, *args, leave_out=tuple(it["findings"]))[0]
    assert np.array_equal(bare, example.render_item(dict(it, findings={}), *args)[0])
    one = next(iter(it["findings"]))
    part = example.render_item(it, *args, leave_out=(one,))[0]
    assert not np.array_equal(part, full) and not np.array_equal(part, bare)
    with pytest.raises(ValueError, match="not among"):
        example.render_item(it, *args, leave_out=("Edema",))


def test_read_config_replans_a_set_and_refuses_another_findings_version(tmp_path):
    cfg = ExampleConfig(count=3, seed=5, bodies=2, **SMALL)
    generate(tmp_path, cfg, progress=False)
    assert example.read_config(tmp_path) == cfg
    assert plan(example.read_config(tmp_path, size=64)) == plan(cfg)          # the plan does not depend on size
    meta = json.loads((tmp_path / "example.json").read_text())
    (tmp_path / "example.json").write_text(json.dumps(dict(meta, findings_version=meta["findings_version"] + 1)))
    with pytest.raises(ValueError, match="findings version"):
        example.read_config(tmp_path)
    with pytest.raises(ValueError, match="no example.json"):
        example.read_config(tmp_path / "nothing")

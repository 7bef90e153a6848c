"""`megamed eval augment`: the paired bootstrap against direct computation and known gains, subset
choice, and the experiment end to end on a tiny data set with a random-weight tiny generator
(outputs, table rows, resume skipping finished cells and images, bad input)."""
import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from megamed.data.images import write_png16
from megamed.data.layout import OBSERVATIONS, write_metadata
from megamed.eval.augment import (bootstrap_indices, bootstrap_weights, choose_subset, config_for,
                                  label_prompt_sets, labels_to_augment, paired_gain, weighted_auroc, weighted_f1)
from megamed.eval.metrics import auroc, f1

CARD, EFF, NORMAL = OBSERVATIONS.index("Cardiomegaly"), OBSERVATIONS.index("Pleural Effusion"), 0


# ---- the bootstrap ----------------------------------------------------------------------------

def test_weighted_metrics_equal_metrics_on_each_resample():
    rng = np.random.default_rng(0)
    n = 37
    s = np.round(rng.normal(size=n), 1)                        # rounded: many ties
    y = (rng.random(n) < 0.4).astype(float)
    y[[3, 10]] = np.nan                                        # unknown labels are dropped
    idx = bootstrap_indices(n, 50, seed=4)
    w = bootstrap_weights(n, 50, seed=4)
    assert (w.sum(1) == n).all()
    got_a = weighted_auroc(s, y, w)
    got_f = weighted_f1((s > 0).astype(float), y, w)
    for b in range(50):
        want_a = auroc(s[idx[b]], y[idx[b]])
        assert got_a[b] == pytest.approx(want_a, abs=1e-12) or (math.isnan(want_a) and math.isnan(got_a[b]))
        assert got_f[b] == pytest.approx(f1((s[idx[b]] > 0).astype(float), y[idx[b]]), abs=1e-12)
    assert weighted_auroc(s, y, np.ones((1, n)))[0] == pytest.approx(auroc(s, y))
    assert math.isnan(weighted_auroc(s, np.zeros(n), np.ones((1, n)))[0])      # one class only


def test_paired_gain_equals_a_direct_loop():
    rng = np.random.default_rng(1)
    S, n, C = 2, 40, 3
    y = (rng.random((n, C)) < 0.35).astype(float)
    a, b = rng.random((S, n, C)), rng.random((S, n, C))
    a += 0.3 * y                                               # "with" separates the classes better
    g = paired_gain(a, b, y, replicates=64, seed=7)
    idx = bootstrap_indices(n, 64, seed=7)                     # the same resamples, looped with metrics.auroc
    direct = []
    for k in idx:
        per = [[auroc(a[s, k, c], y[k, c]) - auroc(b[s, k, c], y[k, c]) for c in range(C)] for s in range(S)]
        direct.append(np.nanmean(np.mean(per, axis=0)))
    np.testing.assert_allclose(g["auroc"]["replicates"], direct, atol=1e-12)
    point = np.mean([[auroc(a[s, :, c], y[:, c]) - auroc(b[s, :, c], y[:, c]) for c in range(C)] for s in range(S)], 0)
    np.testing.assert_allclose(g["auroc"]["per_label"]["gain"], point, atol=1e-12)
    lo, hi = np.percentile(direct, [2.5, 97.5])
    assert g["auroc"]["mean"]["lo"] == pytest.approx(lo) and g["auroc"]["mean"]["hi"] == pytest.approx(hi)
    same = paired_gain(a, a, y, replicates=32)                 # identical arms: exactly zero, zero width
    assert same["auroc"]["mean"] == {"gain": 0.0, "lo": 0.0, "hi": 0.0} and same["f1"]["mean"]["hi"] == 0.0
    with pytest.raises(ValueError, match=r"\[S, N, C\]"):
        paired_gain(a, b[:1], y)


def test_ci_covers_the_true_gain_and_zero():
    """Two scorers with known population AUROCs: over 40 simulated test sets the 95% CI of the
    gain covers the true gain (and, for equally good scorers, zero) in about 95% of them.
    score = b + e + d y with b, e ~ N(0, 1): b is shared by both arms (image difficulty, what
    pairing exploits), so the population AUROC is Phi(d / 2)."""
    rng = np.random.default_rng(2)
    n, d0, d1 = 300, 0.5, 1.2
    true_gain = norm.cdf(d1 / 2) - norm.cdf(d0 / 2)                              # 0.127
    cover, cover0, widths = [], [], []
    for t in range(40):
        y = (rng.random(n) < 0.3).astype(float)
        base = rng.normal(size=n)
        without = base + rng.normal(size=n) + d0 * y
        with_ = base + rng.normal(size=n) + d1 * y
        same = base + rng.normal(size=n) + d0 * y                                  # as good as "without"
        g = paired_gain(with_[None, :, None], without[None, :, None], y[:, None], replicates=300, seed=t)
        g0 = paired_gain(same[None, :, None], without[None, :, None], y[:, None], replicates=300, seed=t)
        cover.append(g["auroc"]["mean"]["lo"] <= true_gain <= g["auroc"]["mean"]["hi"])
        cover0.append(g0["auroc"]["mean"]["lo"] <= 0 <= g0["auroc"]["mean"]["hi"])
        widths.append(g["auroc"]["mean"]["hi"] - g["auroc"]["mean"]["lo"])
    assert np.mean(cover) >= 0.85, np.mean(cover)
    assert np.mean(cover0) >= 0.85, np.mean(cover0)
    assert 0.02 < np.median(widths) < 0.3


# ---- subsets and prompts -----------------------------------------------------------------------

def _labels(rows):
    y = np.zeros((len(rows), len(OBSERVATIONS)))
    for i, r in enumerate(rows):
        for c in r:
            y[i, c] = 1
    return y


def test_subsets_nest_and_per_class_reaches_n():
    rng = np.random.default_rng(3)
    rows = [[NORMAL]] * 40 + [[CARD, 1]] * 8 + [[EFF]] * 20 + [[EFF, CARD, 1]] * 2
    y = _labels([rows[i] for i in rng.permutation(len(rows))])
    small = choose_subset(y, {"kind": "fraction", "value": 0.1}, 5, [0, 1, CARD, EFF])
    big = choose_subset(y, {"kind": "fraction", "value": 0.5}, 5, [0, 1, CARD, EFF])
    assert len(small) == 7 and len(big) == 35 and set(small) <= set(big)
    assert not np.array_equal(small, choose_subset(y, {"kind": "fraction", "value": 0.1}, 6, [0, 1, CARD, EFF]))
    assert len(choose_subset(y, {"kind": "fraction", "value": 0.001}, 0, [0])) == 1
    sub = choose_subset(y, {"kind": "per_class", "value": 5}, 0, [0, CARD, EFF])
    counts = y[sub].sum(0)
    assert counts[CARD] >= 5 and counts[EFF] >= 5 and counts[NORMAL] == 5
    sub = choose_subset(y, {"kind": "per_class", "value": 50}, 0, [CARD])          # fewer than asked: all
    assert y[sub, CARD].sum() == 10
    # labels to augment: fewest positives in the subset first (ties: by name); m = 0 means all
    counts = np.zeros(len(OBSERVATIONS))
    counts[[NORMAL, 1, CARD, EFF]] = 9, 3, 3, 5
    assert labels_to_augment(counts, [NORMAL, 1, CARD, EFF], 2) == [CARD, 1]
    assert labels_to_augment(counts, [NORMAL, 1, CARD, EFF], 0) == [CARD, 1, EFF, NORMAL]
    # prompt label sets: the smallest positive set, most frequent among equals
    sets = label_prompt_sets(y, [0, 1, CARD, EFF])
    assert sets[CARD] == ("Enlarged Cardiomediastinum", "Cardiomegaly") == sets[1]
    assert sets[EFF] == ("Pleural Effusion",) and sets[0] == ("No Finding",)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        config_for("cpu", reference="r", model="m", fractions=(0.1, 1.5))
    with pytest.raises(ValueError, match="fractions"):
        config_for("cpu", reference="r", model="m", fractions=(0.0,))
    with pytest.raises(ValueError, match="per_class"):
        config_for("cpu", reference="r", model="m", per_class=(0,))
    with pytest.raises(ValueError, match="seeds: repeated"):
        config_for("cpu", reference="r", model="m", seeds=(1, 1))
    with pytest.raises(ValueError, match="--model"):
        config_for("cpu", reference="r")
    with pytest.raises(ValueError, match="profile"):
        config_for("tpu", reference="r", model="m")
    gpu = config_for("gpu", reference="r", model="m", fractions=(0.5,))     # explicit fractions win
    assert gpu.per_class == () and gpu.fractions == (0.5,) and gpu.size == 512 and gpu.classifier.growth == 32
    assert gpu.classifier.blocks == (6, 12, 24, 16) and config_for("cpu", reference="r", model="m").size == 64


# ---- end to end ------------------------------------------------------------------------------

def make_reference(root, size=32, seed=0):
    """Cardiomegaly = bright central blob (always with Enlarged Cardiomediastinum, as in the example
    set), Pleural Effusion = bright bottom band; train 24 / val 8 / test 10, PA/AP views in prompts."""
    from megamed.text.prompts import prompt_from_labels

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    rows = []
    splits = ["train"] * 24 + ["val"] * 8 + ["test"] * 10
    for i, split in enumerate(splits):
        img = 0.2 + 0.05 * rng.normal(size=(size, size))
        labels = dict.fromkeys(OBSERVATIONS, 0.0)
        kind = i % 3 if split != "train" else int(rng.integers(0, 3))
        if kind == 1:
            img += 0.6 * (xx ** 2 + yy ** 2 < 0.3)
            labels["Cardiomegaly"] = labels["Enlarged Cardiomediastinum"] = 1.0
        elif kind == 2:
            img += 0.5 * (yy > 0.5)
            labels["Pleural Effusion"] = 1.0
        labels["No Finding"] = 1.0 if kind == 0 else 0.0
        view = "PA" if i % 2 else "AP"
        write_png16(root / "images" / f"{i:03d}.png", np.clip(img, 0, 1))
        rows.append({"Path": f"images/{i:03d}.png", "Sex": "Unknown", "Age": "Unknown", "Frontal/Lateral": "Frontal",
                     "AP/PA": view, **{k: f"{v:.1f}" for k, v in labels.items()}, "split": split,
                     "prompt": prompt_from_labels(labels, view=view), "findings": "", "params": {}})
    write_metadata(root / "metadata.csv", rows)
    return root


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    import torch

    from megamed.diffusion import DiffusionConfig
    from megamed.models import load_model_config, make_model
    from megamed.models.io import save_pretrained
    from megamed.text.tokenizer import build_template_tokenizer
    from megamed.utils.dataclass_json import to_dict

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gen")
    save_pretrained(make_model(load_model_config("tiny")), out, tokenizer=build_template_tokenizer(),
                    extra={"diffusion": to_dict(DiffusionConfig()), "step": 0})
    return out


ARGS = ["--fractions", "0.5,1", "--seeds", "0,1", "--generated-per-class", "2", "--size", "32", "--epochs", "2",
        "--growth", "8", "--init-features", "16",
        "--patience", "2", "--batch-size", "8", "--epoch-items", "8", "--gen-steps", "2", "--bootstrap", "100",
        "--no-progress"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_generator):
    """One CLI run on the tiny reference: (reference, out dir, command, augment.json)."""
    from megamed.cli import main

    root = tmp_path_factory.mktemp("augment")
    ref = make_reference(root / "ref")
    out = root / "out"
    cmd = ["eval", "augment", "--reference", str(ref), "--model", str(tiny_generator), "--out", str(out), *ARGS]
    assert main(cmd) == 0
    return ref, out, cmd, json.loads((out / "augment.json").read_text())


def test_augment_outputs_and_table(first_run):
    ref, out, cmd, r = first_run
    for name in ("augment.json", "augment.md", "augment_mean.png", "augment_gain.png"):
        assert (out / name).stat().st_size > 200, name
    # 3 classes -> 3 prompts (Cardiomegaly and Enlarged Cardiomediastinum share theirs) x 2 images
    pools = sorted(p.name for p in (out / "generated").iterdir())
    assert pools == ["enlarged-cardiomediastinum+cardiomegaly", "no-finding", "pleural-effusion"]
    meta = (out / "generated" / "pleural-effusion" / "metadata.csv").read_text()
    assert "chest X-ray showing pleural effusion" in meta and meta.count("images/") == 2
    assert [s["name"] for s in r["subsets"]] == ["f0.5", "f1"]
    s1 = r["subsets"][1]
    assert s1["n_real"] == [24, 24] and s1["n_generated"] == 6 and r["subsets"][0]["n_real"] == [12, 12]
    assert r["counts"] == {"train": 24, "val": 8, "test": 10,
                           "train_positives": r["counts"]["train_positives"],
                           "test_positives": {"No Finding": 3, "Enlarged Cardiomediastinum": 3, "Cardiomegaly": 3,
                                              "Pleural Effusion": 4}}
    assert r["resolution"] == {"classifier": 32, "generated": 32,
                               "reference_source": "resized from the data set's images"}
    assert r["wall_time_s"]["cells_run_now"] == 8 and r["wall_time_s"]["this_run"] > 0
    # the table: one row per subset, the per-label tables list every scored label
    md = (out / "augment.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 50% |") or line.startswith("| 100% |")]
    assert len(rows) == 2 and rows[1].startswith("| 100% | 24 | 6 |")
    assert md.count("| Pleural Effusion |") == 2 and "32² px" in md and "wall time" in md
    # the numbers in the table are the per-seed AUROCs recomputed from the saved test predictions
    labels = np.load(out / "cells/f1/seed0/with/test_pred.npz")["labels"]
    per_seed = []
    for s in (0, 1):
        p = {arm: np.load(out / f"cells/f1/seed{s}/{arm}/test_pred.npz")["probs"] for arm in ("with", "without")}
        per_seed.append(np.mean([auroc(p["with"][:, c], labels[:, c]) - auroc(p["without"][:, c], labels[:, c])
                                 for c in (NORMAL, 1, CARD, EFF)]))
    assert s1["gain"]["mean_auroc"]["per_seed"] == pytest.approx(per_seed)
    lo, hi = s1["gain"]["mean_auroc"]["ci"]
    assert lo <= hi


def test_augment_resumes_after_a_crash(first_run, monkeypatch, capsys):
    """Only the unfinished cell (no cell.json) is trained again, no image is sampled again, and
    the numbers come out the same (training is seeded)."""
    import megamed.eval.augment as augment
    import megamed.generate as generate
    from megamed.cli import main
    from megamed.eval.classifier import train_classifier

    ref, out, cmd, r = first_run
    (out / "cells/f0.5/seed1/with/cell.json").unlink()
    (out / "cells/f0.5/seed1/with/classifier.json").unlink()     # killed before the classifier was saved
    calls = []
    monkeypatch.setattr(augment, "train_classifier", lambda *a, **k: calls.append(a[1]) or train_classifier(*a, **k))

    def boom(*a, **k):
        raise AssertionError("a finished image was sampled again")
    monkeypatch.setattr(generate, "sample_images", boom)
    capsys.readouterr()
    assert main(cmd) == 0
    got = capsys.readouterr()
    assert "1 cells trained, 7 already done" in got.out
    assert "epoch 1" not in got.err and "val:" not in got.err              # --no-progress reaches the classifier
    assert [p.relative_to(out).as_posix() for p in calls] == ["cells/f0.5/seed1/with"]
    again = json.loads((out / "augment.json").read_text())["subsets"]
    for a, b in zip(again, json.loads(json.dumps(r["subsets"]))):
        for arm in ("with", "without"):
            assert a[arm].pop("seconds") > 0 and b[arm].pop("seconds") > 0       # the rest is identical
        assert a == b

    # other settings in the same --out: refused, naming what differs
    assert main([*cmd, "--lr", "0.01"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err


def test_augment_with_images_generated_earlier(first_run, tmp_path):
    """--generated, no --model: only the pleural-effusion pool is given, so the other labels get
    none, and the report says so."""
    from megamed.cli import main

    ref, out, cmd, r = first_run
    assert main(["eval", "augment", "--reference", str(ref), "--generated", str(out / "generated/pleural-effusion"),
                 "--out", str(tmp_path / "o"), *ARGS, "--fractions", "1", "--seeds", "0"]) == 0
    r3 = json.loads((tmp_path / "o" / "augment.json").read_text())
    assert r3["subsets"][0]["n_generated"] == 2 and not (tmp_path / "o" / "generated").exists()
    assert r3["subsets"][0]["generated_found"] == {"Pleural Effusion": 2, "Enlarged Cardiomediastinum": 0,
                                                   "Cardiomegaly": 0, "No Finding": 0}
    assert "Fewer generated images than asked" in (tmp_path / "o" / "augment.md").read_text()


def test_augment_bad_input(tmp_path, tiny_generator, capsys):
    from megamed.cli import main

    ref = make_reference(tmp_path / "ref")
    base = ["eval", "augment", "--reference", str(ref), "--out", str(tmp_path / "o"), *ARGS]
    assert main([*base, "--model", str(tmp_path / "nope")]) == 2
    assert "model" in capsys.readouterr().err
    assert main([*base, "--model", str(tiny_generator), "--fractions", "0.5,2"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    # a reference without a test split
    meta = (ref / "metadata.csv").read_text().replace(",test,", ",val,")
    (ref / "metadata.csv").write_text(meta)
    assert main([*base, "--model", str(tiny_generator)]) == 2
    assert "no 'test' split" in capsys.readouterr().err
    assert main([*base, "--generated", str(tmp_path)]) == 2
    assert "metadata.csv" in capsys.readouterr().err

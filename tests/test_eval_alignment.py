"""`megamed eval alignment`: the balanced prompt plan, the scores against scikit-learn on made-up
judge outputs, the judge's provenance check, and the command end to end on tiny random models
(files, shapes of the numbers, resume, bad input)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megamed.cli import main
from megamed.data.layout import OBSERVATIONS
from megamed.eval.alignment import NORMAL, AlignmentConfig, check_judge, prompt_plan, score_alignment
from megamed.eval.classifier import FINDING_NAMES, SIDES, ClassifierConfig, DenseNetClassifier, save_classifier

from test_train import make_dataset, tiny_setup


# ---- the plan -------------------------------------------------------------------------------

def test_plan_is_balanced_and_prompts_say_what_is_planned():
    from megamed.text.prompts import parse_prompt_details

    plan = prompt_plan(6, "PA", "detail")
    names = [it["finding"] for it in plan]
    assert len(plan) == 6 * (len(FINDING_NAMES) + 1)
    assert all(names.count(n) == 6 for n in (NORMAL,) + FINDING_NAMES)
    assert [it["index"] for it in plan] == list(range(len(plan)))
    for it in plan:
        labels, findings, view = parse_prompt_details(it["prompt"])     # the template inverse
        assert view == "PA"
        if it["finding"] == NORMAL:
            assert labels["No Finding"] == 1.0 and it["bin"] is None
            continue
        assert labels[it["finding"]] == 1.0 and it["labels"][it["finding"]] == 1.0
        said = findings.get(it["finding"], {})
        assert said.get("severity") == it["severity"]                       # bin centre <-> severity word
        assert (said.get("side") or "none") == it["side"]
    by = {n: [it for it in plan if it["finding"] == n] for n in FINDING_NAMES}
    # graded findings cover every bin twice in 6 prompts; lateral ones use both sides in each bin
    assert sorted(it["bin"] for it in by["Pneumothorax"]) == [0, 0, 1, 1, 2, 2]
    assert {(it["bin"], it["side"]) for it in by["Pneumothorax"]} == {(b, s) for b in range(3) for s in ("left", "right")}
    assert {it["side"] for it in by["Pleural Effusion"]} == {"left", "right", "bilateral"}
    assert all(it["side"] == "none" and it["bin"] is not None for it in by["Cardiomegaly"])
    assert all(it["bin"] is None for it in by["Support Devices"] + by["Fracture"])     # no severity word
    assert {it["side"] for it in by["Fracture"]} == {"left", "right"}
    # seeds pair up across findings: prompt j of each finding has seed offset j
    assert [it["j"] for it in by["Atelectasis"]] == list(range(6))
    plain = prompt_plan(2, "", "plain")
    assert plain[2]["prompt"] == "Chest X-ray showing lung opacity, atelectasis"   # CheXpert column order
    assert all(it["severity"] is None and it["side"] == "none" for it in plain)
    with pytest.raises(ValueError, match="wording"):
        prompt_plan(2, "PA", "fancy")
    with pytest.raises(ValueError, match="per_finding"):
        AlignmentConfig(per_finding=0)


# ---- the numbers ----------------------------------------------------------------------------

def test_scores_match_sklearn_on_made_up_judge_outputs():
    from scipy.stats import spearmanr
    from sklearn.metrics import f1_score, roc_auc_score

    plan = prompt_plan(6, "PA", "detail")
    rng = np.random.default_rng(0)
    n, names = len(plan), np.array([it["finding"] for it in plan])
    probs = rng.uniform(0, 1, (n, len(OBSERVATIONS)))
    sev = rng.uniform(0, 1, (n, len(FINDING_NAMES)))
    side = rng.integers(0, len(SIDES), (n, len(FINDING_NAMES)))
    r = score_alignment(plan, probs, sev, side, FINDING_NAMES, threshold=0.5)
    assert set(r["per_finding"]) == set(FINDING_NAMES)
    for name in ("Lung Opacity", "Pneumothorax", "Cardiomegaly"):
        k, j = OBSERVATIONS.index(name), FINDING_NAMES.index(name)
        pos = names == name
        # negatives: prompts whose labels lack the observation (consolidation/lesion/atelectasis imply opacity)
        neg = np.array([it["labels"][name] == 0.0 for it in plan])
        if name == "Lung Opacity":
            assert neg.sum() == n - 6 * 4
        keep = pos | neg
        d = r["per_finding"][name]
        assert d["auroc"] == pytest.approx(roc_auc_score(pos[keep], probs[keep, k]))
        norm = pos | (names == NORMAL)
        assert d["auroc_vs_normal"] == pytest.approx(roc_auc_score(pos[norm], probs[norm, k]))
        assert d["hit_rate"] == pytest.approx((probs[pos, k] >= 0.5).mean())
        assert d["unasked_rate"] == pytest.approx((probs[neg, k] >= 0.5).mean())
        assert d["f1"] == pytest.approx(f1_score(pos[keep], probs[keep, k] >= 0.5))
        assert d["balanced_accuracy"] == pytest.approx((d["hit_rate"] + 1 - d["unasked_rate"]) / 2)
        want = np.array([it["severity"] for it in plan if it["finding"] == name])
        assert d["severity"]["spearman"] == pytest.approx(spearmanr(want, sev[pos, j]).statistic)
        assert d["severity"]["mae"] == pytest.approx(np.abs(want - sev[pos, j]).mean())
    sides_said = [SIDES.index(it["side"]) for it in plan if it["finding"] == "Pneumothorax"]
    pos = names == "Pneumothorax"
    assert r["per_finding"]["Pneumothorax"]["side"]["accuracy"] == pytest.approx(
        (side[pos, FINDING_NAMES.index("Pneumothorax")] == sides_said).mean())
    assert r["per_finding"]["Cardiomegaly"]["side"] is None          # midline: no side word
    assert r["per_finding"]["Fracture"]["severity"] is None          # no severity word
    nine = [OBSERVATIONS.index(x) for x in FINDING_NAMES]
    assert r["normal"]["clean_rate"] == pytest.approx((probs[names == NORMAL][:, nine] < 0.5).all(1).mean())


def test_a_perfect_judge_scores_perfectly_and_a_judge_without_heads_skips_agreement():
    plan = prompt_plan(3, "PA", "detail")
    probs = np.zeros((len(plan), len(OBSERVATIONS)))
    sev = np.zeros((len(plan), len(FINDING_NAMES)))
    side = np.full((len(plan), len(FINDING_NAMES)), SIDES.index("none"))
    for i, it in enumerate(plan):
        for obs, v in it["labels"].items():
            probs[i, OBSERVATIONS.index(obs)] = 0.9 if v == 1.0 else 0.1
        if it["finding"] != NORMAL:
            j = FINDING_NAMES.index(it["finding"])
            sev[i, j] = it["severity"] if it["severity"] is not None else 0.5
            side[i, j] = SIDES.index(it["side"])
    r = score_alignment(plan, probs, sev, side, FINDING_NAMES)
    s = r["summary"]
    assert s["mean_auroc"] == 1.0 and s["mean_unasked_rate"] == 0.0 and s["mean_hit_rate"] == 1.0
    assert s["mean_severity_spearman"] == pytest.approx(1.0) and s["mean_side_accuracy"] == 1.0
    assert r["per_finding"]["Atelectasis"]["severity"]["bin_accuracy"] == 1.0
    assert r["normal"]["clean_rate"] == 1.0
    r = score_alignment(plan, probs, None, None, ())
    assert r["summary"]["mean_severity_spearman"] is None and r["per_finding"]["Atelectasis"]["side"] is None
    with pytest.raises(ValueError, match="probs"):
        score_alignment(plan, probs[:, :5], None, None, ())


def test_contrastive_scores_on_a_stub_model():
    """A stub whose similarity is 1 between an image and prompts of its own finding, 0 otherwise:
    matched 1, mismatched 0, retrieval perfect; a second stub that ignores the image: chance."""
    from megamed.eval.alignment import contrastive_scores
    from megamed.text.prompts import parse_prompt

    plan = prompt_plan(2, "PA", "detail")
    names = [NORMAL, *FINDING_NAMES]

    def finding_of(prompt):                  # the single finding a plan/plain prompt names
        labels = parse_prompt(prompt)
        hits = [n for n in FINDING_NAMES if labels[n] == 1.0
                and not (n == "Lung Opacity" and any(labels[m] == 1.0 for m in FINDING_NAMES if m != n))]
        return hits[0] if hits else NORMAL

    class Stub:
        def similarity(self, images, prompts):          # images carry their finding index in pixel [0,0,0]
            own = images[:, 0, 0, 0].long()
            return torch.stack([torch.tensor([float(names.index(finding_of(p)) == int(o)) for p in prompts])
                                for o in own])

    images = torch.zeros(len(plan), 1, 4, 4)
    images[:, 0, 0, 0] = torch.tensor([float(names.index(it["finding"])) for it in plan])
    k = contrastive_scores(Stub(), images, plan, "PA", batch_size=7)
    assert k["matched"] == 1.0 and k["mismatched"] == 0.0 and k["gap"] == 1.0 and k["top1_retrieval"] == 1.0
    assert set(k["per_finding"]) == set(names) and k["per_finding"]["Atelectasis"]["top1"] == 1.0

    class Blind(Stub):
        def similarity(self, images, prompts):
            return torch.zeros(len(images), len(prompts))
    k = contrastive_scores(Blind(), images, plan, "PA")
    assert k["gap"] == 0.0 and k["top1_retrieval"] == pytest.approx(0.1)   # argmax of ties: the first prompt


# ---- the judge's provenance -----------------------------------------------------------------

def save_judge(path, size=32, pool="avg", **extra):
    torch.manual_seed(0)
    meta = {"train": {"data": "", "size": size, "shuffle_labels": False},
            "data_provenance": {"train_rows": 10, "val_rows": 2, "generated_rows": 0, "shuffled_labels": False}}
    meta.update(extra)
    return save_classifier(DenseNetClassifier(ClassifierConfig.tiny(pool=pool)), path, meta)


def tiny_generator_and_judge(root):
    """(run dir, judge dir): a tiny diffusion model trained 1 step on 4 images, a random tiny judge."""
    from megamed.train import train

    data = make_dataset(root / "data", n=4)
    train(root / "run", *tiny_setup(data, max_steps=1, save_every=1), progress=False)
    return root / "run", save_judge(root / "judge")


def test_judge_check_refuses_generated_and_shuffled_judges(tmp_path):
    assert check_judge(save_judge(tmp_path / "ok"))["status"] == "ok"
    bad = save_judge(tmp_path / "gen", data_provenance={"train_rows": 10, "generated_rows": 3})
    with pytest.raises(ValueError, match="3 generated image"):
        check_judge(bad)
    ctl = save_judge(tmp_path / "ctl", train={"size": 32, "shuffle_labels": True})
    with pytest.raises(ValueError, match="shuffle-labels"):
        check_judge(ctl)
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        check_judge(tmp_path / "nowhere")
    # no provenance recorded: look at the data it names ...
    from megamed.data.layout import read_metadata, write_metadata
    data = make_dataset(tmp_path / "data", n=3)
    rows = read_metadata(data)
    rows[1]["params"] = json.dumps({"megamed_generate": True, "seed": 1})
    write_metadata(data, rows)
    old = save_judge(tmp_path / "old", data_provenance=None, train={"data": str(data), "size": 32})
    with pytest.raises(ValueError, match="holds 1 generated"):
        check_judge(old)
    # ... or warn that it cannot be verified
    gone = save_judge(tmp_path / "gone", data_provenance=None, train={"data": str(tmp_path / "gone_data")})
    with pytest.warns(UserWarning, match="reference images only"):
        assert check_judge(gone)["status"] == "unverified"


# ---- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny diffusion model (1 training step), a random tiny judge, a random tiny alignment model."""
    from megamed.models.align import AlignConfig, AlignModel, save_align
    from megamed.models.config import TextEncoderConfig
    from megamed.text.tokenizer import build_template_tokenizer

    root = tmp_path_factory.mktemp("models")
    run, judge = tiny_generator_and_judge(root)
    torch.manual_seed(0)
    cfg = AlignConfig(image_size=32, widths=(8, 16), embed_dim=16,
                      text=TextEncoderConfig(width=16, vocab_size=1024, max_length=32, depth=1, d_head=8, d_ff=32))
    align = save_align(AlignModel(cfg, build_template_tokenizer()).eval(), root / "align")
    return {"run": run, "judge": judge, "align": align}


ARGS = ["--per-finding", "2", "--steps", "2", "--size", "32", "--device", "cpu", "--no-progress", "--batch-size", "10"]


def test_alignment_command_end_to_end_and_resume(models, tmp_path, capsys):
    out = tmp_path / "al"
    rc = main(["eval", "alignment", "--model", str(models["run"]), "--judge", str(models["judge"]), "--out", str(out),
               "--align", str(models["align"]), *ARGS])
    assert rc == 0
    r = json.loads((out / "alignment.json").read_text())
    n = 2 * (len(FINDING_NAMES) + 1)
    assert r["n_images"] == n and r["generated"] == n and r["skipped"] == 0 and r["size"] == 32
    assert r["judge_check"] == "ok" and r["judge_size"] == 32 and len(r["model_hash"]) == 16 and r["notes"] == []
    assert set(r["per_finding"]) == set(FINDING_NAMES)
    for name, d in r["per_finding"].items():
        assert d["n_prompted"] == 2 and d["n_unprompted"] >= 2
        for key in ("auroc", "auroc_vs_normal", "hit_rate", "unasked_rate", "balanced_accuracy", "f1"):
            assert 0.0 <= d[key] <= 1.0, (name, key)
        assert (out / d["grid"]).is_file()
    sv = r["per_finding"]["Pneumothorax"]["severity"]
    assert sv["n"] == 2 and sv["spearman"] is None                  # needs >= 3 prompts: reported as null
    assert 0 <= sv["mae"] <= 1 and 0 <= sv["bin_accuracy"] <= 1
    assert 0 <= r["per_finding"]["Pneumothorax"]["side"]["accuracy"] <= 1
    assert (out / r["normal"]["grid"]).is_file() and len(list((out / "grids").glob("*.png"))) == 10
    k = r["contrastive"]
    assert -1 <= k["mismatched"] <= 1 and -1 <= k["matched"] <= 1 and 0 <= k["top1_retrieval"] <= 1
    assert k["chance_top1"] == pytest.approx(0.1) and set(k["per_finding"]) == {NORMAL, *FINDING_NAMES}
    md = (out / "alignment.md").read_text()
    assert "| Pneumothorax |" in md and "Contrastive image-text score" in md
    lines = (out / "predictions.csv").read_text().splitlines()
    assert len(lines) == n + 1 and "p(Pneumothorax)" in lines[0] and "Pneumothorax side" in lines[0]
    meta = (out / "generated" / "metadata.csv").read_text().splitlines()
    assert len(meta) == n + 1                                  # a megamed-layout data set of the images
    first = (out / "generated" / "images" / "000003.png").read_bytes()

    # rerun: everything is kept; a lost image is redrawn identically (its seed is its seed offset)
    (out / "generated" / "images" / "000003.png").unlink()
    assert main(["eval", "alignment", "--model", str(models["run"]), "--judge", str(models["judge"]),
                 "--out", str(out), *ARGS]) == 0
    r2 = json.loads((out / "alignment.json").read_text())
    assert r2["generated"] == 1 and r2["skipped"] == n - 1 and r2["contrastive"] is None
    assert (out / "generated" / "images" / "000003.png").read_bytes() == first
    assert r2["per_finding"]["Atelectasis"]["auroc"] == r["per_finding"]["Atelectasis"]["auroc"]
    # other settings into the same folder: refused, not mixed
    capsys.readouterr()
    assert main(["eval", "alignment", "--model", str(models["run"]), "--judge", str(models["judge"]),
                 "--out", str(out), *ARGS, "--guidance", "1.5"]) == 2
    assert "different settings" in capsys.readouterr().err
    # a judge trained at another size still works on the same images (resized), with a note
    judge64 = save_judge(tmp_path / "judge64", size=64)
    with pytest.warns(UserWarning, match="trained at 64 px"):
        assert main(["eval", "alignment", "--model", str(models["run"]), "--judge", str(judge64),
                     "--out", str(out), *ARGS]) == 0
    r3 = json.loads((out / "alignment.json").read_text())
    assert r3["skipped"] == n and r3["judge_size"] == 64 and "trained at 64 px" in r3["notes"][0]
    assert "Note: the judge was trained at 64 px" in (out / "alignment.md").read_text()


def test_alignment_bad_input(models, tmp_path, capsys):
    base = ["eval", "alignment", "--model", str(models["run"]), "--out", str(tmp_path / "x"), *ARGS]
    assert main(base + ["--judge", str(tmp_path / "missing")]) == 2
    assert "classifier.json" in capsys.readouterr().err
    gen = save_judge(tmp_path / "gen", data_provenance={"train_rows": 4, "generated_rows": 4})
    assert main(base + ["--judge", str(gen)]) == 2
    assert "generated image" in capsys.readouterr().err
    assert not (tmp_path / "x" / "generated").exists()        # refused before any sampling
    assert main(base + ["--judge", str(models["judge"]), "--align", str(tmp_path / "noalign")]) == 2
    assert "alignment model" in capsys.readouterr().err
    assert main(["eval", "alignment", "--model", str(tmp_path), "--judge", str(models["judge"]),
                 "--out", str(tmp_path / "y"), *ARGS]) == 2
    assert "model" in capsys.readouterr().err

"""The judge classifier: torchvision-compatible names and sizes, weight loading, masked losses,
finding targets, balanced sampling, and a tiny end-to-end train -> save -> load -> predict."""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamed.data.images import write_png16
from megamed.data.layout import OBSERVATIONS, write_metadata
from megamed.data.loaders import MegamedDataset
from megamed.eval.classifier import (FINDING_NAMES, SIDES, ClassifierConfig, DenseNetClassifier, TrainConfig,
                                     balanced_weights, classifier_loss, finding_targets, load_classifier, load_densenet_weights,
                                     masked_bce, train_classifier)


# ---- architecture ---------------------------------------------------------------------------

def test_densenet121_matches_torchvision_names_and_sizes():
    # torchvision.models.densenet121() (3 channels, 1000 classes) has 7,978,856 parameters and these
    # keys/shapes; that published count is the independent reference (torchvision is not installed)
    m = DenseNetClassifier(ClassifierConfig(in_channels=3, num_classes=1000, findings=()))
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == 7_978_856
    assert m.cfg.feature_dim == 1024
    expect = {"features.conv0.weight": (64, 3, 7, 7),
              "features.denseblock1.denselayer1.norm1.weight": (64,),
              "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
              "features.denseblock1.denselayer1.conv2.weight": (32, 128, 3, 3),
              "features.transition1.conv.weight": (128, 256, 1, 1),
              "features.denseblock3.denselayer24.norm2.running_var": (128,),
              "features.transition3.norm.weight": (1024,),
              "features.denseblock4.denselayer16.conv2.weight": (32, 128, 3, 3),
              "features.norm5.weight": (1024,), "classifier.weight": (1000, 1024), "classifier.bias": (1000,)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("severity", "side")) for k in sd)


@pytest.mark.parametrize("hw", [(32, 32), (45, 61), (64, 40)])
def test_any_input_size_and_heads(hw):
    cfg = ClassifierConfig.tiny()
    m = DenseNetClassifier(cfg).eval()
    out = m(torch.randn(3, 1, *hw))
    assert out["logits"].shape == (3, 14) and out["features"].shape == (3, cfg.feature_dim)
    assert out["severity"].shape == (3, len(FINDING_NAMES)) and out["side"].shape == (3, len(FINDING_NAMES), 4)
    assert ((out["severity"] > 0) & (out["severity"] < 1)).all()


def test_bad_input_and_config():
    m = DenseNetClassifier(ClassifierConfig.tiny())
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        m(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 32"):
        m(torch.randn(2, 1, 16, 40))
    with pytest.raises(ValueError, match="growth"):
        ClassifierConfig(growth=0)
    with pytest.raises(ValueError, match="blocks"):
        ClassifierConfig(blocks=(2, 0))
    with pytest.raises(ValueError, match="size"):
        TrainConfig(size=16)


def test_finding_names_match_the_simulator():
    from megamed.data.findings import FINDINGS, SIDES as SIM_SIDES
    assert FINDING_NAMES == tuple(sorted(FINDINGS)) and SIDES == SIM_SIDES


# ---- weights --------------------------------------------------------------------------------

def test_three_channel_weights_load_by_summing_conv0():
    torch.manual_seed(0)
    rgb = DenseNetClassifier(ClassifierConfig.tiny(in_channels=3, num_classes=18, findings=())).eval()
    for mod in rgb.modules():                                  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    # torchxrayvision-style checkpoint: old "norm.1" key spelling, 18 classes
    sd = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in rgb.state_dict().items()}
    gray = DenseNetClassifier(ClassifierConfig.tiny()).eval()
    skipped = load_densenet_weights(gray, sd)
    assert "classifier.weight" in skipped and "severity_head.weight" in skipped   # 18 != 14 classes; no heads
    assert not [k for k in skipped if k.startswith("features.")]
    x = torch.rand(2, 1, 40, 40) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gray.embed(x), rgb.embed(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not have"):
        load_densenet_weights(gray, {**sd, "features.denseblock9.x.weight": torch.zeros(1)})


def test_save_load_round_trip_and_feature_extractor(tmp_path):
    from megamed.eval.classifier import save_classifier
    from megamed.eval.features import get_extractor
    m = DenseNetClassifier(ClassifierConfig.tiny(input_scale=2.0)).eval()
    save_classifier(m, tmp_path / "clf", {"note": "x"})
    back = load_classifier(tmp_path / "clf")
    x = torch.randn(2, 1, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(back(x)["logits"], m(x)["logits"])
        ext = get_extractor(tmp_path / "clf")
        torch.testing.assert_close(ext(x), m.embed(x))
    assert len(ext.sha256) == 64 and ext.name == "classifier:clf"
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        load_classifier(tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_densenet121_weight_files_as_extractors(tmp_path):
    """A full-size 3-channel, 18-class DenseNet-121 (torchxrayvision's shape) saved as .safetensors
    and as a torch.save'd .pth: both load as 1-channel extractors giving the RGB model's features."""
    from safetensors.torch import save_file

    from megamed.eval.features import file_sha256, get_extractor
    torch.manual_seed(0)
    rgb = DenseNetClassifier(ClassifierConfig(in_channels=3, num_classes=18, findings=())).eval()
    sd = {k: v.contiguous() for k, v in rgb.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        want = rgb.embed(x.expand(-1, 3, -1, -1))
    for name in ("w.safetensors", "w.pth"):
        ext = get_extractor(tmp_path / name)
        torch.testing.assert_close(ext(x), want, rtol=1e-4, atol=1e-5)
        assert ext.sha256 == file_sha256(tmp_path / name) and "densenet121" in ext.name


# ---- targets and losses ---------------------------------------------------------------------

def test_masked_bce_ignores_nan_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.0, -3.0]])
    labels = torch.tensor([[1.0, math.nan, 0.0], [math.nan, 1.0, 1.0]])
    known = [(0, 0), (0, 2), (1, 1), (1, 2)]
    ref = sum(-(labels[i, j] * math.log(torch.sigmoid(logits[i, j])) + (1 - labels[i, j]) *
                math.log(1 - torch.sigmoid(logits[i, j]))) for i, j in known) / len(known)
    assert float(masked_bce(logits, labels)) == pytest.approx(float(ref), rel=1e-6)
    assert float(masked_bce(logits, torch.full_like(labels, math.nan))) == 0.0


def test_finding_targets():
    sev, side = finding_targets('{"Pleural Effusion": {"severity": 0.7, "side": "left"}}')
    i = FINDING_NAMES.index("Pleural Effusion")
    assert sev[i] == pytest.approx(0.7) and side[i] == SIDES.index("left")
    assert sev.sum() == pytest.approx(0.7) and (side >= 0).sum() == 1       # absent findings: severity 0
    sev, side = finding_targets("")                                           # CheXpert rows: unknown
    assert torch.isnan(sev).all() and (side == -1).all()
    with pytest.raises(ValueError, match="unknown finding"):
        finding_targets({"Dragon": {"severity": 1, "side": "left"}})
    with pytest.raises(ValueError, match="side"):
        finding_targets({"Fracture": {"severity": 1, "side": "up"}})


def test_balanced_weights_equalise_classes():
    labels = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 0], [np.nan, 0]], dtype=float)
    w = balanced_weights(labels)
    np.testing.assert_allclose(w.sum(), 1.0)
    assert w[:3].sum() == pytest.approx(w[3]) == pytest.approx(w[4:].sum())   # each group equally likely


# ---- end to end -----------------------------------------------------------------------------

def make_dataset(root, n_train=32, n_val=12, size=32, seed=0):
    """Cardiomegaly = a bright central blob (severity = its size); Pleural Effusion = a bright band at
    the bottom of the left or right half; an uncertain Edema cell on every 4th row."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    rows = []
    for i in range(n_train + n_val):
        img = 0.2 + 0.05 * rng.normal(size=(size, size))
        labels = dict.fromkeys(OBSERVATIONS, "0.0")
        findings, regions = {}, {}
        if rng.random() < 0.5:
            s = float(rng.uniform(0.3, 1.0))
            r = 0.2 + 0.4 * s
            img += 0.6 * (xx ** 2 + yy ** 2 < r ** 2)
            labels["Cardiomegaly"] = "1.0"
            findings["Cardiomegaly"] = {"severity": round(s, 3), "side": "none"}
            regions["Cardiomegaly"] = [0.5 - r / 2, 0.5 - r / 2, 0.5 + r / 2, 0.5 + r / 2]
        if rng.random() < 0.5:
            side = str(rng.choice(["left", "right"]))
            img += 0.5 * ((yy > 0.5) & ((xx > 0) if side == "left" else (xx < 0)))
            labels["Pleural Effusion"] = "1.0"
            findings["Pleural Effusion"] = {"severity": 0.5, "side": side}
            regions["Pleural Effusion"] = [0.5, 0.75, 1.0, 1.0] if side == "left" else [0.0, 0.75, 0.5, 1.0]
        labels["No Finding"] = "0.0" if findings else "1.0"
        labels["Edema"] = "-1.0" if i % 4 == 0 else "0.0"
        write_png16(root / "images" / f"{i:03d}.png", np.clip(img, 0, 1))
        rows.append({"Path": f"images/{i:03d}.png", "Sex": "Unknown", "Age": "Unknown", "Frontal/Lateral": "Frontal",
                     "AP/PA": "PA", **labels, "split": "train" if i < n_train else "val", "prompt": "",
                     "findings": findings, "params": {}, "regions": regions})
    write_metadata(root / "metadata.csv", rows)
    return root


def test_train_save_predict_end_to_end(tmp_path):
    data = make_dataset(tmp_path / "data")
    cfg = TrainConfig(data=str(data), size=32, epochs=6, patience=6, batch_size=8, lr=3e-3, balanced=True,
                      uncertain="ones", model=ClassifierConfig.tiny())
    result = train_classifier(cfg, tmp_path / "clf")
    hist = result["history"]
    assert 1 <= len(hist) <= 6 and result["best_val_auroc"] == max(h["val_auroc"] for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    saved = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert saved["train"]["uncertain"] == "ones" and saved["model"]["growth"] == 8

    # predict through the command: best weights reproduce the best val AUROC; severity/side columns
    from megamed.cli import main
    assert main(["eval", "classifier", "predict", "--checkpoint", str(tmp_path / "clf"), "--data", str(data),
                 "--split", "val", "--size", "32", "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    r = json.loads((tmp_path / "pred" / "classifier.json").read_text())
    assert r["n"] == 12
    assert r["mean_auroc"] == pytest.approx(result["best_val_auroc"], abs=1e-6)
    assert r["auroc"]["Cardiomegaly"] > 0.8                   # the bright blob is easy to see
    # severity/side scored only where the finding is present: 12 val rows, about half with each finding
    from megamed.eval.classifier import finding_scores
    n_card = sum('"Cardiomegaly"' in line for line in (data / "metadata.csv").read_text().splitlines() if ",val," in line)
    assert r["findings"]["Cardiomegaly"]["n"] == n_card > 0 and r["findings"]["Fracture"]["n"] == 0
    assert 0 <= r["findings"]["Cardiomegaly"]["severity_mae"] < 1
    fake = {"severity": np.array([[0.5], [0.2], [0.9]]), "severity_true": np.array([[0.7], [np.nan], [0.0]]),
            "side": np.array([[0], [1], [2]]), "side_true": np.array([[0], [-1], [1]])}
    got = finding_scores(fake, ("X",))["X"]
    assert got["n"] == 2 and got["severity_mae"] == pytest.approx((0.2 + 0.9) / 2) and got["side_accuracy"] == 0.5
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and rows[0]["Pleural Effusion side"] in SIDES
    assert 0 < float(rows[0]["Cardiomegaly severity"]) < 1


def test_uncertain_policy_reaches_the_labels(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=0)
    e = OBSERVATIONS.index("Edema")
    assert MegamedDataset(data, "train", 32, uncertain="ones")[0]["labels"][e] == 1.0
    assert math.isnan(MegamedDataset(data, "train", 32, uncertain="ignore")[0]["labels"][e])


# ---- pooling, learning-rate schedule, resume ----------------------------------------------------

def test_pools_read_the_same_state_dict_and_differ_as_defined():
    torch.manual_seed(0)
    nets = {p: DenseNetClassifier(ClassifierConfig.tiny(pool=p)).eval() for p in ("avg", "max", "avgmax")}
    sd = nets["avg"].state_dict()
    for net in nets.values():
        net.load_state_dict(sd)                               # no pool has parameters: one state dict fits all
    x = torch.randn(2, 1, 45, 61)
    h = torch.relu(nets["avg"].features(x))                  # independent: pool the feature map by hand
    assert torch.allclose(nets["avg"].embed(x), h.flatten(2).mean(-1), atol=1e-6)
    assert torch.allclose(nets["max"].embed(x), h.flatten(2).max(-1).values, atol=1e-6)
    avgmax = 0.5 * (h.flatten(2).mean(-1) + h.flatten(2).max(-1).values)
    assert torch.allclose(nets["avgmax"].embed(x), avgmax, atol=1e-6)
    with pytest.raises(ValueError, match="pool"):
        ClassifierConfig(pool="gem")
    # lse: each label's logit is a log-sum-exp over cells of the classifier read at every cell
    from megamed.eval.classifier import LSE_R
    lse = DenseNetClassifier(ClassifierConfig.tiny(pool="lse")).eval()
    lse.load_state_dict(sd)
    torch.nn.init.normal_(lse.classifier.weight)
    torch.nn.init.normal_(lse.classifier.bias)
    out = lse(x)
    W, b = lse.classifier.weight.double(), lse.classifier.bias.double()
    hd = h.double().flatten(2)                                # [B, C, cells]
    for i in range(2):
        z = W @ hd[i]                                         # [14, cells]
        want = torch.log(torch.exp(LSE_R * z).mean(-1)) / LSE_R + b
        assert torch.allclose(out["logits"][i].double(), want, atol=1e-4)
    assert torch.allclose(out["features"], nets["avgmax"].embed(x), atol=1e-6)
    # its per-cell logits are the same classifier read at each cell, on the feature map's grid
    cells = out["cell_logits"].double()                      # [B, 14, h, w]
    assert cells.shape == (2, 14, *h.shape[-2:])
    assert torch.allclose(cells.flatten(2), torch.einsum("kc,bcn->bkn", W, hd) + b[:, None], atol=1e-4)


def test_cosine_schedule_endpoints():
    from megamed.eval.classifier import lr_at
    cos = TrainConfig(lr=1e-2, schedule="cosine")
    lrs = [lr_at(cos, s, 101) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-4) and lrs[50] == pytest.approx(0.505e-2)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(TrainConfig(lr=1e-2), 77, 101) == 1e-2
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_training_resumes_after_a_crash_to_the_same_weights(tmp_path, monkeypatch):
    """A run killed during epoch 3 and rerun gives bit-identical weights and history to one that
    never stopped; a rerun of a finished folder trains nothing; other settings are refused."""
    import megamed.eval.classifier as C
    from safetensors.torch import load_file

    data = make_dataset(tmp_path / "data", n_train=24, n_val=10)
    cfg = TrainConfig(data=str(data), size=32, epochs=4, patience=4, batch_size=8, lr=3e-3, balanced=True,
                      schedule="cosine", augment=True, model=ClassifierConfig.tiny(pool="max"))
    whole = train_classifier(cfg, tmp_path / "whole")

    real_predict, calls = C.predict, []

    def dying_predict(*a, **kw):                              # the 3rd epoch's validation never finishes
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_predict(*a, **kw)

    monkeypatch.setattr(C, "predict", dying_predict)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg, tmp_path / "crash")
    monkeypatch.setattr(C, "predict", real_predict)
    assert (tmp_path / "crash" / C.STATE_NAME).is_file() and not (tmp_path / "crash" / C.CONFIG_NAME).exists()
    with pytest.raises(ValueError, match="lr: 0.003 -> 0.001"):
        train_classifier(TrainConfig(**{**cfg.__dict__, "lr": 1e-3}), tmp_path / "crash")
    resumed = train_classifier(cfg, tmp_path / "crash")
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]     # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"]) and resumed["best_epoch"] == whole["best_epoch"]
    a, b = load_file(str(tmp_path / "whole" / C.WEIGHTS_NAME)), load_file(str(tmp_path / "crash" / C.WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "crash" / C.STATE_NAME).exists()

    # killed after the last epoch's state but before the classifier was written (early stop with
    # patience 1, or the last epoch): the rerun trains nothing more and saves the same weights
    short = TrainConfig(**{**cfg.__dict__, "patience": 1, "epochs": 6})
    ref = train_classifier(short, tmp_path / "short")
    real_save = C.save_classifier
    monkeypatch.setattr(C, "save_classifier", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        train_classifier(short, tmp_path / "short2")
    monkeypatch.setattr(C, "save_classifier", real_save)
    def no_predict(*a, **kw):
        raise AssertionError("an epoch ran again")
    monkeypatch.setattr(C, "predict", no_predict)
    again = train_classifier(short, tmp_path / "short2")
    assert strip(again["history"]) == strip(ref["history"])
    c, d = load_file(str(tmp_path / "short" / C.WEIGHTS_NAME)), load_file(str(tmp_path / "short2" / C.WEIGHTS_NAME))
    assert all(torch.equal(c[k], d[k]) for k in c)
    monkeypatch.setattr(C, "predict", real_predict)

    # finished: the same command returns the saved result without training; other settings refused
    monkeypatch.setattr(C, "predict", dying_predict)
    assert train_classifier(cfg, tmp_path / "crash") == resumed
    with pytest.raises(FileExistsError, match="epochs"):
        train_classifier(TrainConfig(**{**cfg.__dict__, "epochs": 5}), tmp_path / "crash")
    # a folder written before a setting existed counts as that setting's default
    meta_path = tmp_path / "crash" / C.CONFIG_NAME
    meta = json.loads(meta_path.read_text())
    del meta["train"]["localize"]
    meta_path.write_text(json.dumps(meta))
    assert train_classifier(cfg, tmp_path / "crash") == resumed


def test_fine_tune_from_local_weights(tmp_path, monkeypatch):
    """--init starts training from a classifier folder or a torchvision-named .pth (18 classes,
    3 channels: its classifier starts random, conv0 is summed over RGB). A misfit architecture and
    a pickled model are refused before any image is cached. The provenance keeps the file's hash
    and the generated images the starting classifier had seen."""
    import megamed.eval.classifier as C
    from megamed.utils.hashing import file_sha256

    data = make_dataset(tmp_path / "data", n_train=16, n_val=8)
    base = TrainConfig(data=str(data), size=32, epochs=1, patience=1, batch_size=8, lr=3e-3, model=ClassifierConfig.tiny())
    train_classifier(base, tmp_path / "a")
    a = load_classifier(tmp_path / "a").state_dict()
    # lr 1e-12: one epoch moves no weight by more than ~1e-11, so what is trained is where it started
    still = TrainConfig(**{**base.__dict__, "lr": 1e-12})
    weights = lambda sd: {k: v for k, v in sd.items() if v.ndim > 1}          # noqa: E731  (convs, linears)
    train_classifier(TrainConfig(**{**still.__dict__, "init": str(tmp_path / "a")}), tmp_path / "b")
    b = load_classifier(tmp_path / "b").state_dict()
    for k, v in weights(a).items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-9)
    train_classifier(still, tmp_path / "scratch")                            # the same run without --init
    assert not torch.allclose(load_classifier(tmp_path / "scratch").state_dict()["features.conv0.weight"],
                              a["features.conv0.weight"])
    prov = json.loads((tmp_path / "b" / C.CONFIG_NAME).read_text())["data_provenance"]
    assert prov["init"]["sha256"] == file_sha256(tmp_path / "a" / C.WEIGHTS_NAME) and prov["init"]["fresh"] == []
    assert prov["generated_rows"] == 0

    # torchxrayvision's shape: 3 channels, 18 classes, no severity/side heads, saved as a state dict
    torch.manual_seed(1)
    rgb = DenseNetClassifier(ClassifierConfig(growth=8, blocks=(2, 2, 2, 2), init_features=16, in_channels=3,
                                              num_classes=18, findings=()))
    torch.save(rgb.state_dict(), tmp_path / "xrv.pth")
    from megamed.cli import main
    assert main(["eval", "classifier", "train", "--data", str(data), "--out", str(tmp_path / "c"), "--size", "32",
                 "--epochs", "1", "--lr", "1e-12", "--growth", "8", "--blocks", "2,2,2,2", "--init-features", "16",
                 "--input-scale", "2", "--init", str(tmp_path / "xrv.pth"), "--no-progress"]) == 0
    assert load_classifier(tmp_path / "c").cfg.input_scale == 2
    c = load_classifier(tmp_path / "c").state_dict()
    torch.testing.assert_close(c["features.conv0.weight"], rgb.state_dict()["features.conv0.weight"].sum(1, keepdim=True),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(c["features.denseblock2.denselayer1.conv2.weight"],
                               rgb.state_dict()["features.denseblock2.denselayer1.conv2.weight"], rtol=0, atol=1e-9)
    fresh = json.loads((tmp_path / "c" / C.CONFIG_NAME).read_text())["data_provenance"]["init"]["fresh"]
    assert "classifier.weight" in fresh and "severity_head.weight" in fresh
    assert not [k for k in fresh if k.startswith("features.")]

    # refused before the images are cached: another architecture, a pickled model, no file
    monkeypatch.setattr(C, "CachedImages", lambda *a, **k: (_ for _ in ()).throw(AssertionError("images cached")))
    wide = TrainConfig(**{**still.__dict__, "cache_images": True, "init": str(tmp_path / "xrv.pth"),
                          "model": ClassifierConfig(growth=4, blocks=(2, 2, 2, 2), init_features=16)})
    with pytest.raises(ValueError, match="different DenseNet.*growth"):
        train_classifier(wide, tmp_path / "d")
    torch.save(rgb, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"not a plain state dict.*state_dict\(\)"):
        train_classifier(TrainConfig(**{**wide.__dict__, "init": str(tmp_path / "pickled.pt")}), tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        train_classifier(TrainConfig(**{**wide.__dict__, "init": str(tmp_path / "nothing.pt")}), tmp_path / "d")
    scaled = TrainConfig(**{**wide.__dict__, "init": str(tmp_path / "a"), "model": ClassifierConfig.tiny(input_scale=4.0)})
    with pytest.raises(ValueError, match="input_scale 1.0, this run has 4.0"):
        train_classifier(scaled, tmp_path / "d")
    assert not (tmp_path / "d").exists()

    # fine-tuned from a classifier that had seen generated images: so has this one
    meta = json.loads((tmp_path / "a" / C.CONFIG_NAME).read_text())
    meta["data_provenance"]["generated_rows"] = 5
    (tmp_path / "a" / C.CONFIG_NAME).write_text(json.dumps(meta))
    monkeypatch.undo()
    train_classifier(TrainConfig(**{**still.__dict__, "init": str(tmp_path / "a")}), tmp_path / "e")
    assert json.loads((tmp_path / "e" / C.CONFIG_NAME).read_text())["data_provenance"]["generated_rows"] == 5


def test_augment_batch_moves_a_dot_as_drawn_and_is_reproducible():
    from megamed.eval.classifier import augment_batch
    x = torch.full((3, 1, 41, 53), -1.0)
    x[:, :, 20, 26] = 1.0                                     # one bright pixel at the centre
    same = augment_batch(x, torch.Generator().manual_seed(0), shift=0, scale=0, degrees=0, contrast=0, brightness=0)
    assert torch.allclose(same, x, atol=1e-5)                 # zero jitter is the identity
    # a pure shift of s (fraction of the side) moves the dot by s * side pixels, against the grid's sign
    g = torch.Generator().manual_seed(3)
    y = augment_batch(x, g, shift=0.1, scale=0, degrees=0, contrast=0, brightness=0)
    g = torch.Generator().manual_seed(3)
    torch.rand(6, generator=g, dtype=torch.float64)          # augment_batch draws angle and zoom first
    sx = -0.2 + 0.4 * torch.rand(3, generator=g, dtype=torch.float64)    # then the x shifts
    for i in range(3):
        w = (y[i, 0] + 1).clamp(min=0)
        cx = float((w.sum(0) * torch.arange(53)).sum() / w.sum())
        assert cx == pytest.approx(26 - sx[i].item() / 2 * 53, abs=0.05)
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape


def test_region_targets_and_cell_grid():
    from megamed.eval.classifier import cell_targets, region_targets

    boxes = region_targets('{"Lung Lesion": [0.30, 0.55, 0.36, 0.60], "Cardiomegaly": [0.3, 0.4, 0.8, 0.9], '
                           '"Fracture": []}')
    assert boxes.shape == (14, 4)
    assert torch.isnan(boxes[OBSERVATIONS.index("Fracture")]).all()          # changed no pixel: unknown
    assert torch.isnan(boxes[OBSERVATIONS.index("Lung Opacity")]).all()      # implied only: unknown
    assert torch.isnan(region_targets("")).all()
    t = cell_targets(boxes[[OBSERVATIONS.index("Lung Lesion"), OBSERVATIONS.index("Cardiomegaly")]].double(), 8, 8)
    # by hand: cell (i, j) spans [j/8, (j+1)/8) x [i/8, (i+1)/8); the nodule sits in row 4, column 2
    want = torch.zeros(8, 8, dtype=torch.float64)
    want[4, 2] = 1
    assert torch.equal(t[0], want)
    want = torch.zeros(8, 8, dtype=torch.float64)
    want[3:8, 2:7] = 1                                       # y 0.4..0.9 -> rows 3..7, x 0.3..0.8 -> cols 2..6
    assert torch.equal(t[1], want)
    for bad, word in [('{"Lung Lesion": [0.5, 0.5, 0.4, 0.6]}', "x0 < x1"), ('{"Nodule": [0, 0, 1, 1]}', "unknown"),
                      ('[1, 2]', "JSON object")]:
        with pytest.raises(ValueError, match=word):
            region_targets(bad)


def test_localization_loss_is_balanced_bce_over_cells():
    from megamed.eval.classifier import localization_loss

    torch.manual_seed(0)
    z = torch.randn(2, 14, 4, 4, dtype=torch.float64)
    boxes = torch.full((2, 14, 4), float("nan"), dtype=torch.float64)
    assert localization_loss(z, boxes) is None
    boxes[0, 4] = torch.tensor([0.0, 0.0, 0.25, 0.25])        # one cell: (0, 0)
    boxes[1, 2] = torch.tensor([0.0, 0.0, 1.0, 1.0])          # every cell: no negatives
    inside0 = F.softplus(-z[0, 4, 0, 0])                      # BCE with target 1, by hand
    outside0 = (F.softplus(z[0, 4]).sum() - F.softplus(z[0, 4, 0, 0])) / 15
    whole1 = F.softplus(-z[1, 2]).mean()
    want = ((inside0 + outside0) / 2 + whole1) / 2
    assert torch.allclose(localization_loss(z, boxes), want)
    # a cell logit that agrees with its box lowers the loss; one that disagrees raises it
    z2 = z.clone()
    z2[0, 4, 0, 0] += 3
    assert localization_loss(z2, boxes) < localization_loss(z, boxes)
    # in classifier_loss: only with localize > 0 and a model that gives cell logits
    out = {"logits": torch.zeros(2, 14, dtype=torch.float64), "cell_logits": z}
    batch = {"labels": torch.zeros(2, 14, dtype=torch.float64), "boxes": boxes}
    base, parts = classifier_loss(out, batch)
    assert "localize" not in parts
    loss, parts = classifier_loss(out, batch, localize=0.5)
    assert torch.allclose(loss, base + 0.5 * want) and parts["localize"] == pytest.approx(float(want))


def test_localize_needs_lse_and_no_augment():
    with pytest.raises(ValueError, match="pool 'lse'"):
        TrainConfig(localize=1.0, model=ClassifierConfig.tiny(pool="avgmax"))
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(localize=1.0, augment=True, model=ClassifierConfig.tiny(pool="lse"))
    with pytest.raises(ValueError, match="localize"):
        TrainConfig(localize=-1.0)


def test_localize_trains_and_predict_reports_the_pointing_game(tmp_path):
    """An lse judge trained with --localize points at the findings: its top cell for a label lies in
    that finding's box far above chance (without --localize, seed 1 of this toy pointed at the
    blob in 1 of 5 val images); predict writes the table and the figure."""
    from megamed.cli import main

    data = make_dataset(tmp_path / "data", n_train=48, n_val=16, size=64)
    assert main(["eval", "classifier", "train", "--data", str(data), "--out", str(tmp_path / "clf"), "--size", "64",
                 "--epochs", "8", "--patience", "8", "--growth", "8", "--blocks", "2,2,2", "--init-features", "16",
                 "--batch-size", "8", "--lr", "3e-3", "--pool", "lse", "--localize", "1", "--no-progress"]) == 0
    assert main(["eval", "classifier", "predict", "--checkpoint", str(tmp_path / "clf"), "--data", str(data),
                 "--split", "val", "--size", "64", "--out", str(tmp_path / "pred")]) == 0
    r = json.loads((tmp_path / "pred" / "classifier.json").read_text())
    eff = r["localization"]["Pleural Effusion"]
    assert eff["n"] > 3 and eff["chance"] == pytest.approx(0.25 * 0.5, abs=0.07)    # a quarter-height half band
    assert eff["hit_rate"] >= 0.9 and r["localization"]["Cardiomegaly"]["hit_rate"] >= 0.9
    assert r["localization"]["Fracture"]["n"] == 0
    assert (tmp_path / "pred" / "localization.png").stat().st_size > 5000
    assert "Pointing game" in (tmp_path / "pred" / "classifier.md").read_text()


def test_pointing_game_by_hand():
    from megamed.eval.localization import pointing_game

    boxes = np.full((3, 14, 4), np.nan)
    k = OBSERVATIONS.index("Lung Lesion")
    boxes[0, k] = [0.0, 0.0, 0.5, 0.5]        # top-left quarter of a 2 x 2 grid: cell 0
    boxes[1, k] = [0.5, 0.5, 1.0, 1.0]        # bottom-right: cell 3
    argmax = np.zeros((3, 14), dtype=np.int64)
    argmax[1, k] = 2                          # bottom-left: a miss
    got = pointing_game(argmax, (2, 2), boxes)
    assert got["Lung Lesion"] == {"n": 2, "hit_rate": 0.5, "chance": 0.25, "fixed": 0.5}
    assert got["Cardiomegaly"] == {"n": 0, "hit_rate": None, "chance": None, "fixed": None}
    boxes[1, k] = [0.0, 0.0, 1.0, 0.5]        # the top row: cells 0 and 1 -> cell 0 is in both boxes
    assert pointing_game(argmax, (2, 2), boxes)["Lung Lesion"]["fixed"] == 1.0

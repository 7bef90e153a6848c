"""Data sets: CheXpert-like, megamed layout and plain folders, on tiny files written in tmp_path."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from megamed.data.images import write_png16
from megamed.data.layout import CHEXPERT_COLUMNS, OBSERVATIONS, write_metadata
from megamed.data.loaders import (CheXpertDataset, FolderDataset, MegamedDataset, center_crop_resize, detect_kind,
                                  open_dataset)

EDEMA = OBSERVATIONS.index("Edema")
EFFUSION = OBSERVATIONS.index("Pleural Effusion")
N_PATIENTS = 12


def _jpeg(path, h=24, w=20, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8)).save(path, quality=95)


def _write_csv(path, rows, columns=CHEXPERT_COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(r if isinstance(r, list) else [r.get(c, "") for c in columns])


def _chexpert_root(tmp_path):
    """train.csv (small-prefix paths): patients 1..12, two studies, frontal (AP/PA alternating) +
    lateral; Edema uncertain for odd patients; valid.csv (full-size prefix): 2 patients."""
    root = tmp_path / "chexpert"
    rows = []
    for p in range(1, N_PATIENTS + 1):
        for study in (1, 2):
            frontal_view = "AP" if p % 2 else "PA"
            for view, fl, appa in (("view1_frontal", "Frontal", frontal_view), ("view2_lateral", "Lateral", "")):
                rel = f"train/patient{p:05d}/study{study}/{view}.jpg"
                _jpeg(root / rel, value=10 * p)
                row = {"Path": "CheXpert-v1.0-small/" + rel, "Sex": "Female", "Age": "60",
                       "Frontal/Lateral": fl, "AP/PA": appa, "Edema": "-1.0" if p % 2 else "0.0",
                       "Pleural Effusion": "1.0" if study == 2 else ""}
                rows.append(row)
    _write_csv(root / "train.csv", rows)
    vrows = []
    for p in (64541, 64542):
        rel = f"valid/patient{p}/study1/view1_frontal.jpg"
        _jpeg(root / rel)
        vrows.append({"Path": "CheXpert-v1.0/" + rel, "Frontal/Lateral": "Frontal", "AP/PA": "PA",
                      "No Finding": "1.0"})
    _write_csv(root / "valid.csv", vrows)
    return root


@pytest.fixture
def cx(tmp_path):
    return _chexpert_root(tmp_path)


def test_chexpert_items_prefixes_and_frontal_filter(cx):
    ds = CheXpertDataset(cx, "train", 16, test_fraction=0.25)
    item = ds[0]
    assert set(item) == {"image", "prompt", "labels", "index", "path"}
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["labels"].shape == (14,) and item["index"] == 0
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["path"] == str(cx / ds.rows[0]["Path"].removeprefix("CheXpert-v1.0-small/"))
    assert all(r["Frontal/Lateral"] == "Frontal" for r in ds.rows)
    assert len(CheXpertDataset(cx, "train", 8, frontal_only=False, test_fraction=0.25)) == 2 * len(ds)
    val = CheXpertDataset(cx, "val", 8)                    # valid.csv, "CheXpert-v1.0/" prefix stripped
    assert [r["patient"] for r in val.rows] == ["64541", "64542"]
    assert val[1]["path"] == str(cx / "valid/patient64542/study1/view1_frontal.jpg")
    assert val[0]["prompt"] == "Normal chest X-ray with no significant findings"
    assert len(CheXpertDataset(cx, None, 8)) == N_PATIENTS * 2 + 2
    ap = CheXpertDataset(cx, None, 8, view="AP")
    assert len(ap) > 0 and all(r["AP/PA"] == "AP" for r in ap.rows)


def test_image_values_and_size_tuple(cx):
    ds = CheXpertDataset(cx, "val", (12, 7))
    img = ds[0]["image"]
    assert img.shape == (1, 12, 7)
    assert torch.allclose(img, torch.full_like(img, 128 / 255 * 2 - 1), atol=3 / 255)   # flat gray survives


@pytest.mark.parametrize("policy,edema_odd", [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan),
                                              ({"Edema": "ones"}, 1.0), ({"Cardiomegaly": "zeros"}, math.nan)])
def test_uncertain_policies(cx, policy, edema_odd):
    ds = CheXpertDataset(cx, None, 8, uncertain=policy)
    for i, row in enumerate(ds.rows):
        odd = int(row["patient"]) % 2 == 1 and row["patient"] != "64541"
        lab = ds[i]["labels"] if i < 3 else torch.tensor(row["labels"])
        want = edema_odd if odd else (0.0 if "train" in row["Path"] else math.nan)
        assert (math.isnan(want) and math.isnan(lab[EDEMA])) or lab[EDEMA] == want, (row, lab)
        # blank effusion is NaN (not negative), positive is 1
        assert (lab[EFFUSION] == 1.0) if "study2" in row["Path"] else math.isnan(lab[EFFUSION])
        # the prompt follows the policy: U-Ones names the uncertain finding, the others do not
        assert ("edema" in row["prompt"]) == (odd and edema_odd == 1.0)


def test_patient_split_is_disjoint_and_seeded(cx):
    kw = dict(frontal_only=False, test_fraction=0.25)
    train, test = CheXpertDataset(cx, "train", 8, **kw), CheXpertDataset(cx, "test", 8, **kw)
    tr, te = {r["patient"] for r in train.rows}, {r["patient"] for r in test.rows}
    assert not tr & te
    assert tr | te == {f"{p:05d}" for p in range(1, N_PATIENTS + 1)}
    assert len(te) == round(0.25 * N_PATIENTS)
    assert len(train) + len(test) == N_PATIENTS * 4      # every image on one side
    # filters do not move patients across the split
    for view in ("AP", "PA"):
        try:
            assert {r["patient"] for r in CheXpertDataset(cx, "train", 8, view=view, **kw).rows} <= tr
            assert {r["patient"] for r in CheXpertDataset(cx, "test", 8, view=view, **kw).rows} <= te
        except ValueError as e:                          # a side may hold no patient with that view
            assert "no usable rows" in str(e)
    again = {r["patient"] for r in CheXpertDataset(cx, "test", 8, **kw).rows}
    other = {r["patient"] for r in CheXpertDataset(cx, "test", 8, seed=1, **kw).rows}
    assert again == te and other != te


def test_missing_image_names_file_and_line(cx):
    (cx / "train/patient00002/study1/view1_frontal.jpg").unlink()
    # train.csv line 1 is the header; patient 2 study 1 frontal is data row 5 -> line 6
    with pytest.raises(FileNotFoundError, match=r"train\.csv:6: image .*patient00002.*view1_frontal\.jpg not found"):
        CheXpertDataset(cx, None, 8)
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        ds = CheXpertDataset(cx, None, 8, skip_bad=True)
    assert len(ds) == N_PATIENTS * 2 + 2 - 1
    assert ds.skipped[0][0] == 6 and "not found" in ds.skipped[0][1]


def test_malformed_rows_name_line_and_column(cx):
    with open(cx / "train.csv") as f:
        lines = f.read().splitlines()
    cells = lines[2].split(",")
    cells[CHEXPERT_COLUMNS.index("Edema")] = "maybe"
    lines[2] = ",".join(cells)                           # line 3: bad label text
    lines[4] = ",".join(lines[4].split(",")[:6])         # line 5: a short row
    (cx / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.csv:3: .*Edema.*'maybe'"):
        CheXpertDataset(cx, "train", 8, frontal_only=False, test_fraction=0.0)
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        ds = CheXpertDataset(cx, "train", 8, frontal_only=False, test_fraction=0.0, skip_bad=True)
    assert [line for line, _ in ds.skipped] == [3, 5]
    assert "missing column" in ds.skipped[1][1] and "Cardiomegaly" in ds.skipped[1][1]
    assert len(ds) == N_PATIENTS * 4 - 2


def test_missing_column_and_bad_arguments(cx, tmp_path):
    _write_csv(cx / "valid.csv", [], columns=[c for c in CHEXPERT_COLUMNS if c != "Edema"])
    with pytest.raises(ValueError, match=r"valid\.csv: missing column\(s\) \['Edema'\]"):
        CheXpertDataset(cx, "val", 8)
    for kw, match in [(dict(split="training"), "split"), (dict(split="train", view="LL"), "view"),
                      (dict(split="train", uncertain="maybe"), "uncertain"),
                      (dict(split="train", uncertain={"Oedema": "ones"}), "Oedema"),
                      (dict(split="train", uncertain={"Edema": "half"}), "Edema"),
                      (dict(split="train", size=0), "size"), (dict(split="train", size=(8, 8, 8)), "size"),
                      (dict(split="train", test_fraction=1.0), "test_fraction")]:
        with pytest.raises(ValueError, match=match):
            CheXpertDataset(cx, **kw)
    with pytest.raises(FileNotFoundError, match="train.csv"):
        CheXpertDataset(tmp_path / "empty", "train", 8)


def test_undecodable_image_at_access(cx):
    bad = cx / "valid/patient64541/study1/view1_frontal.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = CheXpertDataset(cx, "val", 8)                   # existence is checked, decoding is not (cheap)
    with pytest.raises(ValueError, match=r"line 2: .*patient64541.*view1_frontal\.jpg"):
        ds[0]
    ds = CheXpertDataset(cx, "val", 8, skip_bad=True)
    with pytest.warns(UserWarning, match="undecodable"):
        item = ds[0]
    assert item["index"] == 1 and ds.skipped[0][0] == 2  # the next good item is served, the skip recorded
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        items = list(iter(ds))
    assert [it["index"] for it in items] == [1]


def test_center_crop_then_resize():
    img = torch.zeros(20, 40)                            # wide: 10 columns each side must be cropped
    img[:, :10] = 1.0
    img[:, 30:] = 1.0
    out = center_crop_resize(img, (10, 10))
    assert out.shape == (10, 10) and out.max() == 0.0
    tall = torch.rand(30, 10)
    assert torch.equal(center_crop_resize(tall, (10, 10)), tall[10:20])       # exact size: pixels untouched
    # same aspect (no crop): antialiased downsampling matches PIL's triangle-filter bilinear resize
    # (an independent implementation)
    x = torch.rand(65, 45, generator=torch.Generator().manual_seed(0))
    ref = np.asarray(Image.fromarray(x.numpy(), mode="F").resize((9, 13), Image.BILINEAR))
    assert torch.allclose(center_crop_resize(x, (13, 9)), torch.from_numpy(ref.copy()), atol=1e-4)


def _megamed_root(tmp_path):
    root = tmp_path / "mm"
    rng = np.random.default_rng(0)
    rows = []
    for i, (split, prompt, labels) in enumerate([
            ("train", "PA chest X-ray showing small left pleural effusion", {"Pleural Effusion": "1.0"}),
            ("train", "", {"Cardiomegaly": "1.0", "Edema": "0.0"}),
            ("val", "", {})]):
        write_png16(root / "images" / f"{i:06d}.png", rng.integers(0, 65536, (9, 9)) / 65535.0)
        rows.append({"Path": f"images/{i:06d}.png", "Sex": "Unknown", "Age": "Unknown", "split": split,
                     "prompt": prompt, **labels})
    write_metadata(root, rows)
    return root


def test_megamed_layout(tmp_path):
    root = _megamed_root(tmp_path)
    ds = MegamedDataset(root, "train", size=9)
    assert len(ds) == 2 and len(MegamedDataset(root, size=9)) == 3
    assert ds[0]["prompt"] == "PA chest X-ray showing small left pleural effusion"
    assert ds[1]["prompt"] == "Chest X-ray showing cardiomegaly"           # empty cell -> prompt_from_labels
    lab = ds[1]["labels"]
    assert lab[OBSERVATIONS.index("Cardiomegaly")] == 1 and lab[EDEMA] == 0 and torch.isnan(lab[0])
    from megamed.data.images import read_image
    ref = torch.from_numpy(read_image(root / "images/000000.png")) * 2 - 1
    assert torch.equal(ds[0]["image"][0], ref)                            # same size: exact pixels
    assert MegamedDataset(root, "val", 4)[0]["prompt"] == "Normal chest X-ray with no significant findings"
    (root / "images/000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata\.csv:3: image .*000001\.png not found"):
        MegamedDataset(root, "train")
    with pytest.raises(ValueError, match="no usable rows"):
        MegamedDataset(root, "test")
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        MegamedDataset(tmp_path)


def test_folder_dataset_and_open_dataset(tmp_path, cx):
    folder = tmp_path / "plain"
    _jpeg(folder / "a.jpg", 10, 10, 200)
    Image.fromarray(np.full((10, 10), 50, np.uint8)).save(folder / "b.png")
    (folder / "a.txt").write_text("Chest X-ray showing edema\n")
    ds = FolderDataset(folder, size=4)
    assert [r["path"] for r in ds.rows] == ["a.jpg", "b.png"] and [r["prompt"] for r in ds.rows] == \
        ["Chest X-ray showing edema", ""]
    assert torch.isnan(ds[0]["labels"]).all() and ds[1]["image"].shape == (1, 4, 4)
    _write_csv(folder / "captions.csv", [["b.png", "a caption", "1.0"], ["a.jpg", "", "0.0"]],
               columns=["file", "text", "Edema"])
    ds = FolderDataset(folder, folder / "captions.csv", image_col="file", prompt_col="text", size=4)
    assert [r["prompt"] for r in ds.rows] == ["a caption", "Normal chest X-ray with no significant findings"]
    assert ds[0]["labels"][EDEMA] == 1.0
    with pytest.raises(ValueError, match="image column 'path'"):
        FolderDataset(folder, folder / "captions.csv")
    assert detect_kind(folder) == "folder" and detect_kind(cx) == "chexpert"
    mm = _megamed_root(tmp_path)
    assert detect_kind(mm) == "megamed"
    assert isinstance(open_dataset(mm, size=4), MegamedDataset)
    assert isinstance(open_dataset(cx, size=4), CheXpertDataset)
    assert isinstance(open_dataset(cx, kind="chexpert", split="val", size=4), CheXpertDataset)
    assert isinstance(open_dataset(folder, size=4), FolderDataset)
    with pytest.raises(ValueError, match="kind"):
        open_dataset(folder, kind="dicom")
    batch = next(iter(torch.utils.data.DataLoader(open_dataset(mm, size=8), batch_size=2)))
    assert batch["image"].shape == (2, 1, 8, 8) and batch["labels"].shape == (2, 14) and len(batch["prompt"]) == 2

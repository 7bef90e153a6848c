"""`megamed quickstart --fast` end to end on tmp_path, with a freshly initialised tiny model saved
as the stand-in "pretrained" directory (a test fixture: the shipped checkpoint is not needed)."""
import json
import math
import re
from pathlib import Path

import pytest

from megamed.quickstart import (FAST, QuickstartConfig, measurement_verdict, reference_rows, run,
                                shipped_model_dir, single_finding_prompts)


@pytest.fixture(scope="module")
def fake_pretrained(tmp_path_factory):
    import torch

    from megamed.diffusion import DiffusionConfig
    from megamed.models import load_model_config, make_model
    from megamed.models.io import save_pretrained
    from megamed.text.tokenizer import build_template_tokenizer
    from megamed.utils.dataclass_json import to_dict

    torch.manual_seed(0)
    model = make_model(load_model_config("tiny"))
    out = tmp_path_factory.mktemp("pretrained")
    save_pretrained(model, out, tokenizer=build_template_tokenizer(), half=True,
                    extra={"diffusion": to_dict(DiffusionConfig()), "step": 0})
    return out


@pytest.fixture(scope="module")
def quickstart_run(fake_pretrained, tmp_path_factory):
    """One CLI run, shared by the assertions below (the run is the expensive part)."""
    import contextlib
    import io

    from megamed.cli import main

    out = tmp_path_factory.mktemp("qs") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["quickstart", "--out", str(out), "--fast", "--pretrained", str(fake_pretrained)])
    return out, rc, buf.getvalue()


def test_cli_run_prints_a_line_per_stage(quickstart_run):
    out, rc, stdout = quickstart_run
    assert rc == 0, stdout
    for i, name in enumerate(["data", "sample", "measure", "train", "report"], 1):
        assert re.search(rf"^\[{i}/5\] {name}\s+\d+\.\d s ", stdout, re.M), stdout
    assert "report.html" in stdout.splitlines()[-1]


def test_report_references_existing_pngs(quickstart_run):
    out = quickstart_run[0]
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    # 3 prompts (normal, cardiomegaly, lung lesion for data seed 30) x (generated, reference) + loss
    assert len(srcs) == 7, srcs
    for src in srcs:
        assert not Path(src).is_absolute() and (out / src).is_file(), src
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for prompt in ["Normal PA chest X-ray with no significant findings",
                   "PA chest X-ray showing enlarged cardiomediastinum, cardiomegaly"]:
        assert prompt in html


def test_measurement_table_and_summary(quickstart_run):
    out = quickstart_run[0]
    html = (out / "report.html").read_text()
    assert "mean CTR" in html and "cardiothoracic ratio" in html.lower()
    s = json.loads((out / "summary.json").read_text())
    m = s["measure"]
    assert set(m["generated"]) == {"No Finding", "Cardiomegaly"}
    assert m["generated"]["Cardiomegaly"]["n"] == FAST["measure_n"]
    # the example set's normal and cardiomegaly-only images (different poses, at 32 px: no
    # effect size is asserted here, test_measure does that at 96-128 px) are measured
    ref = m["example_set"]
    assert ref["No Finding"]["n"] == 2 and ref["Cardiomegaly"]["n"] == 1
    assert ref["No Finding"]["measured"] >= 1 and ref["Cardiomegaly"]["measured"] == 1
    assert set(s["stages"]) == {"data", "sample", "measure", "train", "report"}
    assert s["data"]["images"] == FAST["count"]


def test_loss_falls_and_csv_is_logged(quickstart_run):
    out = quickstart_run[0]
    t = json.loads((out / "summary.json").read_text())["train"]
    assert t["steps"] == FAST["train_steps"]
    assert t["loss_last_quarter"] < t["loss_first_quarter"], t
    rows = (out / t["metrics_csv"]).read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) - 1 == t["logged"]


def test_rerun_skips_rendered_images(quickstart_run):
    from megamed.quickstart import stage_data

    out = quickstart_run[0]
    cfg = QuickstartConfig(**FAST)
    r = stage_data(out, cfg)
    assert r == {"images": FAST["count"], "rendered": 0, "skipped": FAST["count"]}


def test_prompts_and_reference_rows():
    rows = [
        {"Path": "images/0.png", "AP/PA": "AP", "findings": "{}"},
        {"Path": "images/1.png", "AP/PA": "PA", "findings": '{"Cardiomegaly": {"severity": 1, "side": "none"}, '
                                                            '"Fracture": {"severity": 1, "side": "left"}}'},
        {"Path": "images/2.png", "AP/PA": "AP", "findings": '{"Cardiomegaly": {"severity": 0.5, "side": "none"}}'},
        {"Path": "images/3.png", "AP/PA": "PA", "findings": "{}"},
    ]
    prompts = single_finding_prompts(rows)
    assert prompts == {"No Finding": "Normal PA chest X-ray with no significant findings",
                       "Cardiomegaly": "PA chest X-ray showing enlarged cardiomediastinum, cardiomegaly",
                       "Fracture": "PA chest X-ray showing fracture"}
    # fewest findings first, then PA first
    assert [r["Path"] for r in reference_rows(rows, "Cardiomegaly", 5)] == ["images/2.png", "images/1.png"]
    assert [r["Path"] for r in reference_rows(rows, "No Finding", 1)] == ["images/3.png"]
    assert reference_rows(rows, "Pneumothorax", 3) == []


def test_verdict_is_honest_both_ways():
    base = {"generated": {"No Finding": {"n": 4, "measured": 4}, "Cardiomegaly": {"n": 4, "measured": 3}},
            "example_set": {"No Finding": {"mean": 0.45}, "Cardiomegaly": {"mean": 0.7}}}
    up = measurement_verdict({**base, "paired": {"pairs": 3, "mean_difference": 0.1, "cardiomegaly_larger": 3}})
    down = measurement_verdict({**base, "paired": {"pairs": 3, "mean_difference": -0.02, "cardiomegaly_larger": 1}})
    none = measurement_verdict({**base, "paired": {"pairs": 0, "mean_difference": math.nan, "cardiomegaly_larger": 0}})
    assert "wider with the cardiomegaly prompt" in up and "+0.100" in up and "7/8" in up
    assert "do NOT show" in down
    assert "could not be measured" in none


def test_bad_config_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="count"):
        QuickstartConfig(count=0)
    with pytest.raises(ValueError, match="data_size"):
        QuickstartConfig(data_size=16)
    with pytest.raises(ValueError, match="train_steps"):
        QuickstartConfig(train_steps=-3)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        run(tmp_path / "out", QuickstartConfig(pretrained=str(tmp_path / "nowhere")))
    assert not (tmp_path / "out").exists()   # nothing written before the checkpoint is found


def test_shipped_checkpoint_is_located_in_the_package():
    import megamed

    assert shipped_model_dir() == Path(megamed.__file__).resolve().parent / "pretrained" / "small"

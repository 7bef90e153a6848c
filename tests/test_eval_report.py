"""`megamed eval report`: one HTML page from whatever evaluation outputs exist (tiny models end to
end: alignment, classifier predict, fidelity, memorisation, plus an augment.md), "not run" for the
rest, images embedded or linked, reference grids per finding, and bad input."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from megamed.cli import main
from megamed.eval.report import find_results, md_to_html

from test_eval_alignment import save_judge, tiny_generator_and_judge
from test_eval_classifier import make_dataset as make_example_like


def test_md_to_html_tables_lists_headings_and_escaping():
    md = "# Title <x>\n\nSome `code` and [a link](grids/a.png).\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n- one\n- two\n"
    h = md_to_html(md)
    assert "<h3>Title &lt;x&gt;</h3>" in h
    assert "<code>code</code>" in h and "a link" in h and "grids/a.png" not in h
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>&lt;2&gt;</td></tr></table>" in h
    assert "<ul><li>one</li><li>two</li></ul>" in h


def test_empty_results_say_not_run(tmp_path):
    (tmp_path / "res").mkdir()
    assert main(["eval", "report", str(tmp_path / "res"), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert html.count("<b>not run</b>") == 5 and "No results found" in html
    for how in ("megamed eval alignment", "megamed eval fidelity", "megamed eval augment"):
        assert how in html


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every eval command on tiny random models, into one results folder."""
    root = tmp_path_factory.mktemp("eval")
    run, judge = tiny_generator_and_judge(root)
    ref = make_example_like(root / "ref", n_train=10, n_val=6)         # has findings JSON, like the example set
    res = root / "results"
    common = ["--size", "32"]
    assert main(["eval", "alignment", "--model", str(run), "--judge", str(judge), "--out", str(res / "alignment"),
                 "--per-finding", "1", "--steps", "2", "--device", "cpu", "--no-progress", *common]) == 0
    lse_judge = save_judge(root / "judge_lse", pool="lse")           # predict draws localization.png for it
    assert main(["eval", "classifier", "predict", "--checkpoint", str(lse_judge), "--data", str(ref), "--split", "val",
                 "--out", str(res / "judge"), *common]) == 0
    gen = res / "alignment" / "generated"
    assert main(["eval", "fidelity", "--reference", str(ref), "--generated", str(gen), "--out", str(res / "fidelity"),
                 "--kid-subsets", "5", "--kid-subset-size", "4", *common]) == 0
    assert main(["eval", "memorisation", "--reference", str(ref), "--generated", str(gen),
                 "--out", str(res / "memorisation"), "--pairs", "2", *common]) == 0
    aug = res / "augment"                      # what `megamed eval augment` leaves (another command)
    aug.mkdir()
    (aug / "augment.md").write_text("# Augmentation\n\n| fraction | gain |\n|---|---|\n| 10% | +0.01 |\n")
    (aug / "augment.json").write_text(json.dumps({"rows": []}))
    (aug / "auroc.png").write_bytes((res / "memorisation" / "memorisation_pairs.png").read_bytes())
    return {"res": res, "ref": ref}


def test_report_assembles_every_part_inline(results, tmp_path):
    res, ref = results["res"], results["ref"]
    found = find_results(res)
    assert {k: len(v) for k, v in found.items()} == {"alignment": 1, "fidelity": 1, "memorisation": 1,
                                                    "classifier": 1, "augment": 1}
    out = tmp_path / "report.html"
    assert main(["eval", "report", str(res), "--out", str(out), "--reference", str(ref), "--n-reference", "3"]) == 0
    html = out.read_text()
    assert "not run" not in html.replace("Contrastive image-text score: not run", "")
    for title in ("Prompt alignment", "Fidelity and diversity", "Memorisation", "The judge on reference data",
                  "Augmentation experiment"):
        assert f"<h2>{title}</h2>" in html
    assert "FID" in html and "AUROC per severity bin" in html and "Pointing game" in html
    assert 'alt="localization.png"' in html and "| 10% |" not in html and "+0.01" in html
    # grids per prompt: 10 generated grids, reference grids where the reference set has the finding
    assert html.count('alt="generated ') == 10
    assert 'alt="reference Cardiomegaly"' in html and 'alt="reference No Finding"' in html
    assert html.count("(none in the reference set)") == 7               # only cardiomegaly/effusion are simulated
    # everything inline: no file references, and the embedded PNGs decode
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "report_files").exists()


def test_report_links_images_relative(results, tmp_path):
    out = tmp_path / "sub" / "report.html"
    assert main(["eval", "report", str(results["res"]), "--out", str(out), "--reference", str(results["ref"]),
                 "--link-images"]) == 0
    srcs = re.findall(r'src="([^"]+)"', out.read_text())
    assert srcs and not any(s.startswith("data:") for s in srcs)
    assert all((out.parent / s).resolve().is_file() for s in srcs)       # relative to the HTML file
    assert any("report_files/reference_cardiomegaly.png" in s for s in srcs)


def test_report_bad_input(results, tmp_path, capsys):
    assert main(["eval", "report", str(tmp_path / "none"), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["eval", "report", str(results["res"]), "--out", str(tmp_path / "r.txt")]) == 2
    assert ".html" in capsys.readouterr().err
    assert main(["eval", "report", str(results["res"]), "--out", str(tmp_path / "r.html"),
                 "--reference", str(tmp_path)]) == 2
    assert "metadata.csv" in capsys.readouterr().err
    bad = tmp_path / "badres"
    bad.mkdir()
    (bad / "alignment.json").write_text("{not json")
    assert main(["eval", "report", str(bad), "--out", str(tmp_path / "r.html")]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    assert Path(tmp_path / "r.html").exists() is False

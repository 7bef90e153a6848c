"""Prompts (wording, order, detail, inverse), tokenizers, IU reports, CheXpert labels, text CLI."""
from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megamed.data.layout import OBSERVATIONS
from megamed.text.prompts import (FINDING_PROMPTS, FINDINGS, NORMAL_PROMPT, parse_prompt, parse_prompt_details,
                                  prompt_from_labels)

# ---- prompts --------------------------------------------------------------------------------


def test_megamed_wording_and_column_order():
    # CheXpert's column order puts Cardiomegaly before Pleural Effusion, whatever the dict order
    assert prompt_from_labels({"Pleural Effusion": 1.0, "Cardiomegaly": 1.0}) == \
        "Chest X-ray showing cardiomegaly, pleural effusion"
    assert prompt_from_labels({"Support Devices": 1, "Edema": 1.0, "Lung Opacity": 1}) == \
        "Chest X-ray showing lung opacity, edema, support devices"
    assert prompt_from_labels({}) == NORMAL_PROMPT == "Normal chest X-ray with no significant findings"
    assert prompt_from_labels({"No Finding": 1.0, "Edema": 0.0}) == NORMAL_PROMPT
    assert prompt_from_labels({"Edema": 1.0}, view="PA") == "PA chest X-ray showing edema"
    assert prompt_from_labels({}, view="ap") == "Normal AP chest X-ray with no significant findings"
    assert prompt_from_labels({"Edema": 1.0}, view="lateral") == "Lateral chest X-ray showing edema"
    assert prompt_from_labels({}, view="Lateral") == "Normal lateral chest X-ray with no significant findings"


def test_uncertain_blank_and_csv_cells():
    # -1 (uncertain), blank, None, NaN are not positive; CSV text cells are parsed
    labels = {"Edema": -1.0, "Cardiomegaly": None, "Atelectasis": math.nan, "Pneumonia": "", "Fracture": "1.0"}
    assert prompt_from_labels(labels) == "Chest X-ray showing fracture"
    row = {"Path": "images/000001.png", "Sex": "Unknown", "split": "train", "prompt": "", "Pneumothorax": "1.0"}
    assert prompt_from_labels(row) == "Chest X-ray showing pneumothorax"      # a metadata row works as is


def test_detail_severity_words_and_sides():
    f = lambda name, sev, side=None: prompt_from_labels(  # noqa: E731
        {name: 1.0}, {name: {"severity": sev, "side": side}}, detail=True)
    assert f("Cardiomegaly", 0.0) == "Chest X-ray showing mild cardiomegaly"
    assert f("Cardiomegaly", 0.3999) == "Chest X-ray showing mild cardiomegaly"
    assert f("Cardiomegaly", 0.4) == "Chest X-ray showing moderate cardiomegaly"
    assert f("Cardiomegaly", 0.6999) == "Chest X-ray showing moderate cardiomegaly"
    assert f("Cardiomegaly", 0.7) == "Chest X-ray showing severe cardiomegaly"
    assert f("Pleural Effusion", 0.2, "left") == "Chest X-ray showing small left pleural effusion"
    assert f("Pneumothorax", 0.9, "right") == "Chest X-ray showing large right pneumothorax"
    assert f("Cardiomegaly", 0.5, "left") == "Chest X-ray showing moderate cardiomegaly"  # midline: no side
    assert f("Support Devices", 0.9, None) == "Chest X-ray showing support devices"
    assert f("Support Devices", 0.9, "none") == "Chest X-ray showing support devices"  # findings.py's midline side
    assert f("Edema", None, "bilateral") == "Chest X-ray showing bilateral edema"
    both = prompt_from_labels({"Pleural Effusion": 1, "Cardiomegaly": 1},
                              {"Pleural Effusion": {"severity": 0.1, "side": "left"},
                               "Cardiomegaly": {"severity": 0.5, "side": None}}, view="PA", detail=True)
    assert both == "PA chest X-ray showing moderate cardiomegaly, small left pleural effusion"
    # without detail=True the findings dict does not change the wording
    assert prompt_from_labels({"Edema": 1}, {"Edema": {"severity": 0.9, "side": "left"}}) == \
        "Chest X-ray showing edema"


@pytest.mark.parametrize("labels,findings,kw,match", [
    ({"Cardiomegally": 1.0}, None, {}, "unknown observation 'Cardiomegally'"),
    ({"Edema": 2.0}, None, {}, r"labels\['Edema'\]"),
    ({"Edema": "yes"}, None, {}, r"labels\['Edema'\]"),
    ({"Edema": 1.0}, None, {"view": "oblique"}, "view"),
    ({"Edema": 1.0}, {"Edema": {"severity": 1.5}}, {"detail": True}, "outside"),
    ({"Edema": 1.0}, {"Edema": {"side": "up"}}, {"detail": True}, "side"),
    ({"Edema": 1.0}, {"Edema": {"size": 1}}, {"detail": True}, "unknown key 'size'"),
    ({"Edema": 1.0}, {"Oedema": {}}, {"detail": True}, "unknown observation 'Oedema'"),
    ([("Edema", 1.0)], None, {}, "dict"),
])
def test_prompt_bad_input(labels, findings, kw, match):
    with pytest.raises(ValueError, match=match):
        prompt_from_labels(labels, findings, **kw)


def test_finding_prompts_are_canonical():
    assert list(FINDING_PROMPTS) == OBSERVATIONS
    for name, text in FINDING_PROMPTS.items():
        assert text == prompt_from_labels({name: 1.0})
        parsed = parse_prompt(text)
        assert [n for n, v in parsed.items() if v == 1.0] == [name]


def test_parse_prompt_inverts_every_label_set():
    for k in range(len(FINDINGS) + 1):
        for combo in itertools.combinations(FINDINGS, k):
            labels = parse_prompt(prompt_from_labels(dict.fromkeys(combo, 1.0)))
            assert set(labels) == set(OBSERVATIONS)
            expected = {n: float(n in combo) for n in FINDINGS}
            expected["No Finding"] = float(k == 0)
            assert labels == expected


def test_parse_prompt_inverts_detail_and_view():
    rng = np.random.default_rng(0)
    for _ in range(300):
        combo = [n for n in FINDINGS if rng.random() < 0.25]
        sides = [None, "left", "right", "bilateral"]
        findings = {n: {"severity": None if rng.random() < 0.2 else float(rng.random()),
                        "side": sides[rng.integers(4)]} for n in combo}
        view = [None, "AP", "PA", "lateral"][rng.integers(4)]
        text = prompt_from_labels(dict.fromkeys(combo, 1.0), findings, view=view, detail=True)
        labels, got_findings, got_view = parse_prompt_details(text)
        assert [n for n in FINDINGS if labels[n] == 1.0] == combo
        assert got_view == view
        # the parsed detail regenerates the identical prompt (severity words and sides survive)
        assert prompt_from_labels(labels, got_findings, view=got_view, detail=True) == text


def test_parse_prompt_rejects_other_text():
    assert parse_prompt("  chest x-ray showing Edema. ")["Edema"] == 1.0   # case/space/period tolerant
    for text in ["A photo of a cat", "Chest X-ray showing dragons", "Chest X-ray showing ", ""]:
        with pytest.raises(ValueError, match="text"):
            parse_prompt(text)
    with pytest.raises(ValueError):
        parse_prompt(None)


# ---- tokenizers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template_tok():
    from megamed.text.tokenizer import build_template_tokenizer
    return build_template_tokenizer()


def test_template_tokenizer_is_deterministic(template_tok):
    from megamed.text.tokenizer import build_template_tokenizer
    again = build_template_tokenizer()
    assert template_tok.tokenizer.get_vocab() == again.tokenizer.get_vocab()
    assert template_tok.tokenizer.to_str() == again.tokenizer.to_str()        # same merges too
    assert 259 < template_tok.vocab_size <= 1024
    assert (template_tok.pad_id, template_tok.bos_id, template_tok.eos_id) == (0, 1, 2)
    smaller = build_template_tokenizer(300)
    assert smaller.vocab_size == 300


def test_encode_decode_round_trip_and_mask(template_tok):
    tok = template_tok
    texts = list(FINDING_PROMPTS.values()) + [
        "PA chest X-ray showing moderate cardiomegaly, small left pleural effusion",
        "Free text the templates never saw: 3 cm nodule, Ünïcödé ∑", "", " x "]
    ids, mask = tok.encode(texts, max_length=77)
    assert ids.shape == mask.shape == (len(texts), 77) and ids.dtype == torch.long and mask.dtype == torch.bool
    raw = tok.tokenizer.encode_batch(texts, add_special_tokens=False)   # the wrapped tokenizer, no specials
    for b, text in enumerate(texts):
        n = len(raw[b].ids) + 2
        assert mask[b].tolist() == [True] * n + [False] * (77 - n)        # mask covers BOS..EOS exactly
        assert ids[b, 0] == tok.bos_id and ids[b, n - 1] == tok.eos_id
        assert ids[b, 1:n - 1].tolist() == raw[b].ids
        assert (ids[b, n:] == tok.pad_id).all()
        assert tok.decode(ids[b]) == text                                 # byte-level: exact round trip
    # template prompts compress well: a whole finding phrase is a few tokens
    assert mask[0].sum() < len(texts[0]) / 3


def test_truncation_keeps_eos(template_tok):
    text = prompt_from_labels(dict.fromkeys(FINDINGS, 1.0))
    ids, mask = template_tok.encode([text, "Normal"], max_length=6)
    assert mask[0].all() and ids[0, -1] == template_tok.eos_id and ids[0, 0] == template_tok.bos_id
    assert text.startswith(template_tok.decode(ids[0]))
    assert ids.shape == (2, 6)
    for bad in [lambda: template_tok.encode("a string", 8), lambda: template_tok.encode(["a"], 1),
                lambda: template_tok.encode([None], 8), lambda: template_tok.decode([1, 10 ** 6, 2]),
                lambda: template_tok.decode(torch.zeros(2, 3, dtype=torch.long))]:
        with pytest.raises(ValueError):
            bad()


def test_save_load(template_tok, tmp_path):
    from megamed.text.tokenizer import PromptTokenizer
    path = template_tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json" and path.is_file()
    back = PromptTokenizer.load(tmp_path / "tok")
    texts = ["Chest X-ray showing edema", "anything at all"]
    a, b = template_tok.encode(texts, 20), back.encode(texts, 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and back.vocab_size == template_tok.vocab_size
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        PromptTokenizer.load(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad"):
        PromptTokenizer.load(tmp_path / "bad")


def test_report_tokenizer_refuses_the_checkout(tmp_path):
    from megamed.text.tokenizer import inside_git_checkout, train_report_tokenizer
    repo_dir = Path(__file__).resolve().parent / "_should_not_exist"
    assert inside_git_checkout(repo_dir) is not None
    assert inside_git_checkout(tmp_path) is None
    with pytest.raises(ValueError, match="git checkout"):
        train_report_tokenizer(out_dir=repo_dir)
    assert not repo_dir.exists()


@pytest.mark.slow
def test_report_tokenizer_trains_into_cache(tmp_path, monkeypatch):
    from megamed.data.fetch import TORCHXRAYVISION, fetch
    from megamed.text.tokenizer import PromptTokenizer, train_report_tokenizer
    sources = fetch(TORCHXRAYVISION)
    monkeypatch.setenv("MEGAMED_CACHE", str(tmp_path))
    monkeypatch.setattr("megamed.data.fetch.fetch", lambda wheel: sources)
    tok = train_report_tokenizer(vocab_size=4096, progress=False)
    assert (tmp_path / "tokenizers" / "reports-bpe" / "tokenizer.json").is_file()
    assert PromptTokenizer.load(tmp_path / "tokenizers" / "reports-bpe").vocab_size == tok.vocab_size == 4096
    text = "There is no focal consolidation. Mild cardiomegaly."
    ids, mask = tok.encode([text], 32)
    assert tok.decode(ids[0]) == text and mask.sum() < 16


# ---- IU reports -----------------------------------------------------------------------------

def test_iu_reports():
    from megamed.text.reports import N_REPORTS, load_iu_reports, parse_report_xml, report_text
    reports = load_iu_reports(progress=False)
    assert len(reports) == N_REPORTS == 3955
    assert len({r["id"] for r in reports}) == 3955 and reports[0]["id"] == 1
    first = reports[0]
    assert first["uid"] == "CXR1" and first["findings"].startswith("The cardiac silhouette and mediastinum")
    assert first["impression"] == "Normal chest x-XXXX." and first["mesh"] == ["normal"]
    assert len(first["images"]) == 2
    with_text = sum(bool(report_text(r)) for r in reports)
    assert 3900 < with_text < 3955                       # a few reports have neither section
    with pytest.raises(ValueError, match="bad.xml"):
        parse_report_xml(b"<eCitation><unclosed>", "bad.xml")


# ---- CheXpert labels, statistics, sampler ---------------------------------------------------

def _rows(spec: list[tuple[tuple[str, ...], int, str]]) -> list[dict]:
    rows = []
    for positives, count, frontal in spec:
        for _ in range(count):
            row = {n: (1.0 if n in positives else 0.0) for n in OBSERVATIONS}
            row["No Finding"] = 1.0 if not positives else None
            row["Frontal/Lateral"] = frontal
            rows.append(row)
    return rows


def test_chexpert_labels_file():
    from megamed.text.labels import N_CHEXPERT_ROWS, label_statistics, load_chexpert_labels
    rows = load_chexpert_labels(progress=False)
    assert len(rows) == N_CHEXPERT_ROWS
    assert rows[0]["Path"].startswith("CheXpert-v1.0-small/train/patient00001/")
    assert all(rows[0][n] in (1.0, 0.0, -1.0, None) for n in OBSERVATIONS)
    sub = rows[:3000]
    stats = label_statistics(sub)
    arr = np.array([[np.nan if r[n] is None else r[n] for n in OBSERVATIONS] for r in sub])   # [N, 14]
    np.testing.assert_allclose([stats["prevalence"][n] for n in OBSERVATIONS], (arr == 1).mean(0))
    assert [stats["count"][n]["blank"] for n in OBSERVATIONS] == np.isnan(arr).sum(0).tolist()
    assert [stats["count"][n]["uncertain"] for n in OBSERVATIONS] == (arr == -1).sum(0).tolist()
    pos = (arr == 1).astype(int)
    co = pos.T @ pos
    assert [[stats["cooccurrence"][a][b] for b in OBSERVATIONS] for a in OBSERVATIONS] == co.tolist()


def test_label_statistics_bad_rows():
    from megamed.text.labels import label_statistics
    with pytest.raises(ValueError, match="empty"):
        label_statistics([])
    with pytest.raises(ValueError, match=r"rows\[1\].*Edema"):
        label_statistics([{"Edema": "1.0"}, {"Edema": "maybe"}])


def test_sampler_matches_empirical_distribution():
    from megamed.text.labels import LabelSampler
    rows = _rows([((), 50, "Frontal"), (("Cardiomegaly", "Pleural Effusion"), 30, "Frontal"),
                  (("Pneumothorax",), 20, "Frontal"), (("Fracture",), 500, "Lateral")])
    s = LabelSampler.from_rows(rows)
    assert len(s) == 3                                      # lateral-only combination excluded
    assert len(LabelSampler.from_rows(rows, frontal_only=False)) == 4
    draws = s.sample(20000, seed=1)
    freq = Counter(prompt_from_labels(d) for d in draws)
    assert abs(freq[NORMAL_PROMPT] / 20000 - 0.5) < 0.02
    assert abs(freq["Chest X-ray showing cardiomegaly, pleural effusion"] / 20000 - 0.3) < 0.02
    assert abs(freq["Chest X-ray showing pneumothorax"] / 20000 - 0.2) < 0.02
    assert all(d["No Finding"] == float(prompt_from_labels(d) == NORMAL_PROMPT) for d in draws[:200])
    assert s.sample(50, seed=3) == s.sample(50, generator=np.random.default_rng(3))   # seed == generator
    assert s.sample(50, seed=3) != s.sample(50, seed=4)
    flat = Counter(prompt_from_labels(d) for d in s.sample(30000, seed=2, temperature=0.0))
    assert all(abs(v / 30000 - 1 / 3) < 0.02 for v in flat.values())
    withp = s.sample_with("Pleural Effusion", 20, seed=0)
    assert all(d["Pleural Effusion"] == 1.0 and d["Cardiomegaly"] == 1.0 for d in withp)
    bal = s.balanced(5, seed=0)
    assert len(bal) == 5 * 4                                # normal, cardiomegaly, effusion, pneumothorax
    for bad in [lambda: s.sample(-1), lambda: s.sample(2, seed=1, generator=np.random.default_rng()),
                lambda: s.sample(2, temperature=-1), lambda: s.sample_with("Edema", 3),
                lambda: s.sample_with("Oedema", 3), lambda: LabelSampler([("Dragons",)], [1]),
                lambda: LabelSampler([()], [0]), lambda: LabelSampler.from_rows(rows, min_count=10 ** 6)]:
        with pytest.raises(ValueError):
            bad()


# ---- CLI ------------------------------------------------------------------------------------

def test_text_cli(tmp_path, capsys):
    from megamed.cli import main
    from megamed.data.layout import write_metadata
    rows = [{"Path": "a.png", "Cardiomegaly": "1.0", "Pleural Effusion": "1.0", "AP/PA": "PA",
             "findings": {"Pleural Effusion": {"severity": 0.1, "side": "left"}}},
            {"Path": "b.png", "Edema": "-1.0"}]
    write_metadata(tmp_path / "labels.csv", rows)
    assert main(["text", "prompts", "--labels", str(tmp_path / "labels.csv")]) == 0
    assert capsys.readouterr().out.splitlines() == ["Chest X-ray showing cardiomegaly, pleural effusion", NORMAL_PROMPT]
    assert main(["text", "prompts", "--labels", str(tmp_path / "labels.csv"), "--view", "--detail"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "PA chest X-ray showing cardiomegaly, small left pleural effusion"
    write_metadata(tmp_path / "bad.csv", [{"Path": "a.png", "Edema": "yes"}])
    assert main(["text", "prompts", "--labels", str(tmp_path / "bad.csv")]) == 1
    assert "bad.csv:2" in capsys.readouterr().err
    assert main(["text", "tokenizer", "--kind", "templates", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    inside = Path(__file__).resolve().parent / "_tok_should_not_exist"
    assert main(["text", "tokenizer", "--kind", "reports", "--out", str(inside)]) == 2
    assert "CC BY-NC-ND" in capsys.readouterr().err and not inside.exists()

"""Prompts from CheXpert-style labels, and back.

One deterministic wording, used everywhere (training captions, generation, evaluation):

    no positive finding       -> "Normal chest X-ray with no significant findings"
    positives (column order)  -> "Chest X-ray showing cardiomegaly, pleural effusion"
    with a view               -> "PA chest X-ray showing cardiomegaly" / "Normal PA chest X-ray with ..."
                                 ("Lateral chest X-ray showing ..." for the lateral view)
    detail=True + findings    -> "Chest X-ray showing mild cardiomegaly, small left pleural effusion"

Findings are listed in CheXpert's column order (`layout.OBSERVATIONS`) so one label set has
exactly one prompt, and `parse_prompt` can invert it. Only value 1.0 is positive: uncertain
(-1.0) labels are left out here; mapping them (U-Ones/U-Zeros) is the data loader's job.
The templates are our own wording: no third-party text is embedded.
"""
from __future__ import annotations

import math
import re

from megamed.data.layout import COLUMNS, OBSERVATIONS

FINDINGS = OBSERVATIONS[1:]  # the 13 observations a prompt can name ("No Finding" is the normal prompt)
VIEWS = ("AP", "PA", "lateral")
SIDES = ("left", "right", "bilateral")
NORMAL_PROMPT = "Normal chest X-ray with no significant findings"
FINDING_PROMPTS: dict[str, str] = {"No Finding": NORMAL_PROMPT}
FINDING_PROMPTS.update({name: f"Chest X-ray showing {name.lower()}" for name in FINDINGS})

# Severity thresholds: mild < 0.4 <= moderate < 0.7 <= severe. Findings that radiologists
# describe by size (effusion, pneumothorax, lesion) get size words instead, same thresholds.
SEVERITY_THRESHOLDS = (0.4, 0.7)
_GRADE = ("mild", "moderate", "severe")
_SIZE = ("small", "moderate", "large")
# finding -> (severity words or None, takes a side). Heart/mediastinum are midline; devices and
# fractures get no severity word; a side given for a midline finding is ignored (documented).
_TEMPLATE = {
    "Enlarged Cardiomediastinum": (_GRADE, False),
    "Cardiomegaly": (_GRADE, False),
    "Lung Opacity": (_GRADE, True),
    "Lung Lesion": (_SIZE, True),
    "Edema": (_GRADE, True),
    "Consolidation": (_GRADE, True),
    "Pneumonia": (_GRADE, True),
    "Atelectasis": (_GRADE, True),
    "Pneumothorax": (_SIZE, True),
    "Pleural Effusion": (_SIZE, True),
    "Pleural Other": (_GRADE, True),
    "Fracture": (None, True),
    "Support Devices": (None, False),
}
assert list(_TEMPLATE) == FINDINGS
_OTHER_COLUMNS = set(COLUMNS) - set(OBSERVATIONS)  # CSV columns a label dict may carry along


def label_value(name: str, value) -> float | None:
    """CheXpert label cell -> 1.0 / 0.0 / -1.0 / None. Accepts numbers, None/NaN and CSV text."""
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"labels[{name!r}]: {value!r} is not a label (expected 1.0, 0.0, -1.0 or blank)") from None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"labels[{name!r}]: {value!r} is not a label (expected 1.0, 0.0, -1.0 or blank)") from None
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"labels[{name!r}]: {value!r} is not a label (expected 1.0, 0.0, -1.0 or blank)")
    return value


def positive_findings(labels: dict) -> list[str]:
    """Names with value 1.0, in CheXpert column order. Unknown keys are an error (typo guard);
    other metadata columns (Path, Sex, prompt, ...) are ignored so a CSV row can be passed as is."""
    if not isinstance(labels, dict):
        raise ValueError(f"labels: expected a dict of observation -> value, got {type(labels).__name__}")
    unknown = [k for k in labels if k not in OBSERVATIONS and k not in _OTHER_COLUMNS]
    if unknown:
        raise ValueError(f"labels: unknown observation {unknown[0]!r}; known: {', '.join(OBSERVATIONS)}")
    return [name for name in FINDINGS if name in labels and label_value(name, labels[name]) == 1.0]


def severity_word(name: str, severity: float) -> str | None:
    """'mild'/'moderate'/'severe' (or 'small'/'moderate'/'large') for a severity in [0, 1]."""
    words = _TEMPLATE[name][0]
    if words is None:
        return None
    severity = float(severity)
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"findings[{name!r}]['severity']: {severity} is outside [0, 1]")
    return words[sum(severity >= t for t in SEVERITY_THRESHOLDS)]


def _phrase(name: str, detail: dict | None) -> str:
    """'small left pleural effusion': [severity] [side] finding."""
    words = []
    if detail:
        if not isinstance(detail, dict):
            raise ValueError(f"findings[{name!r}]: expected a dict with 'severity'/'side', got {detail!r}")
        bad = set(detail) - {"severity", "side"}
        if bad:
            raise ValueError(f"findings[{name!r}]: unknown key {sorted(bad)[0]!r} (expected 'severity', 'side')")
        if detail.get("severity") is not None:
            word = severity_word(name, detail["severity"])
            if word:
                words.append(word)
        side = detail.get("side")
        side = None if side in ("", "none") else side   # megamed.data.findings writes "none" for midline
        if side is not None and side not in SIDES:
            raise ValueError(f"findings[{name!r}]['side']: {side!r} is not one of {SIDES} or None")
        if side is not None and _TEMPLATE[name][1]:
            words.append(side)
    return " ".join(words + [name.lower()])


def _norm_view(view: str | None) -> str | None:
    if view is None or view == "":
        return None
    for v in VIEWS:
        if str(view).strip().lower() == v.lower():
            return v
    raise ValueError(f"view: {view!r} is not one of {VIEWS} or None")


def prompt_from_labels(labels: dict[str, float | None], findings: dict | None = None, *,
                       view: str | None = None, detail: bool = False) -> str:
    """The MegaMed prompt for one image's labels (see the module docstring for the wording).

    labels: {observation: 1.0 | 0.0 | -1.0 | None}; only 1.0 counts as present.
    findings: {observation: {"severity": float in [0, 1] | None, "side": "left"|"right"|"bilateral"|"none"|None}},
        used only with detail=True and only for positive observations.
    view: "AP", "PA", "lateral" or None (no view word).
    """
    names = positive_findings(labels)
    view = _norm_view(view)
    if findings is not None and not isinstance(findings, dict):
        raise ValueError(f"findings: expected a dict or None, got {type(findings).__name__}")
    findings = findings or {}
    unknown = [k for k in findings if k not in FINDINGS]
    if unknown:
        raise ValueError(f"findings: unknown observation {unknown[0]!r}; known: {', '.join(FINDINGS)}")
    if not names:
        return f"Normal {view} chest X-ray with no significant findings" if view else NORMAL_PROMPT
    items = ", ".join(_phrase(n, findings.get(n) if detail else None) for n in names)
    if view:
        return f"{view[0].upper()}{view[1:]} chest X-ray showing {items}"  # "Lateral chest X-ray ..."
    return f"Chest X-ray showing {items}"


# ---- inverse -------------------------------------------------------------------------------
_VIEW_RE = "|".join(VIEWS)
_NORMAL_RE = re.compile(rf"^normal (?:({_VIEW_RE}) )?chest x-ray with no significant findings$", re.I)
_SHOWING_RE = re.compile(rf"^(?:({_VIEW_RE}) )?chest x-ray showing (.+)$", re.I)
_BY_LOWER = {n.lower(): n for n in FINDINGS}
_SEVERITY_WORDS = {w: i for words in (_GRADE, _SIZE) for i, w in enumerate(words)}
# A parsed severity word is reported as the middle of its bin (0.2 / 0.55 / 0.85), which maps
# back to the same word: prompt_from_labels(parse) == prompt.
_BIN_CENTRE = (0.2, 0.55, 0.85)


def parse_prompt_details(text: str) -> tuple[dict[str, float], dict[str, dict], str | None]:
    """(labels, findings, view) from a prompt our templates made. labels has all 14 observations
    (1.0 present / 0.0 absent; "No Finding" is 1.0 only for the normal prompt)."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    clean = " ".join(text.strip().rstrip(".").split())
    labels = {name: 0.0 for name in OBSERVATIONS}
    m = _NORMAL_RE.match(clean)
    if m:
        labels["No Finding"] = 1.0
        return labels, {}, _norm_view(m.group(1))
    m = _SHOWING_RE.match(clean)
    if not m:
        raise ValueError(f"text: {text!r} is not a megamed template prompt")
    findings = {}
    for item in m.group(2).split(","):
        words = item.strip().lower().split()
        detail = {}
        if words and words[0] in _SEVERITY_WORDS and " ".join(words) not in _BY_LOWER:
            detail["severity"] = _BIN_CENTRE[_SEVERITY_WORDS[words.pop(0)]]
        if words and words[0] in SIDES:
            detail["side"] = words.pop(0)
        name = _BY_LOWER.get(" ".join(words))
        if name is None:
            raise ValueError(f"text: {item.strip()!r} in {text!r} is not a known finding phrase")
        labels[name] = 1.0
        if detail:
            findings[name] = {"severity": detail.get("severity"), "side": detail.get("side")}
    return labels, findings, _norm_view(m.group(1))


def parse_prompt(text: str) -> dict[str, float]:
    """Labels (all 14 observations, 1.0/0.0) from a prompt made by `prompt_from_labels`.
    Raises ValueError for text that is not one of our templates."""
    return parse_prompt_details(text)[0]

"""Classification metrics for the judge classifier: AUROC and F1, per label and averaged.

Implemented here (numpy only) so evaluation does not depend on scikit-learn at run time; the
tests check them against scikit-learn. Labels follow the data sets' convention: 1 positive,
0 negative, NaN = blank / ignored (U-Ignore), and a NaN label drops that (item, label) pair.

    auroc(scores [N], labels [N])              -> float (NaN when one class is missing)
    f1(pred [N] bool/0-1, labels [N])          -> float (0.0 when there is nothing to find or predict)
    per_label(fn, scores [N, C], labels [N, C]) -> [C] floats, NaN-masked per column
"""
from __future__ import annotations

import math

import numpy as np


def _pair(scores, labels, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """1-D float64 scores and labels of equal length with NaN-labelled items dropped."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{name}/labels: expected 1-D arrays, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"{name}/labels: lengths differ ({len(s)} vs {len(y)})")
    keep = ~np.isnan(y)
    s, y = s[keep], y[keep]
    if not np.isfinite(s).all():
        raise ValueError(f"{name}: contains NaN or inf where the label is known")
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"labels: expected 0, 1 or NaN, got {y[bad][0]!r}")
    return s, y


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties sharing their average rank (what Mann-Whitney U needs)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]                       # exclusive
    avg = (starts + ends + 1) / 2.0                         # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counting 1/2 (Mann-Whitney U / (n_pos * n_neg)). NaN when either class is absent."""
    s, y = _pair(scores, labels)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0     # U statistic of the positives
    return float(u / (n_pos * n_neg))


def f1(pred, labels) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) of 0/1 predictions. 0.0 when TP + FP + FN = 0 (no positives
    anywhere), which is scikit-learn's zero_division=0 convention."""
    p, y = _pair(pred, labels, "pred")
    if not np.isin(p, (0.0, 1.0)).all():
        raise ValueError("pred: expected 0/1 (or bool) predictions; threshold scores first")
    tp = float(((p == 1) & (y == 1)).sum())
    fp = float(((p == 1) & (y == 0)).sum())
    fn = float(((p == 0) & (y == 1)).sum())
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def per_label(fn, scores, labels) -> np.ndarray:
    """fn applied to each column of [N, C] scores/labels -> [C] (NaN labels masked per column)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores/labels: expected equal [N, C] shapes, got {s.shape} and {y.shape}")
    return np.array([fn(s[:, c], y[:, c]) for c in range(s.shape[1])])


def mean_auroc(scores, labels) -> float:
    """Mean AUROC over the labels where both classes occur (NaN if none): the early-stopping score."""
    per = per_label(auroc, scores, labels)
    per = per[~np.isnan(per)]
    return float(per.mean()) if len(per) else math.nan


__all__ = ["auroc", "f1", "per_label", "mean_auroc"]

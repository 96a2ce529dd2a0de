"""Clustering metrics for unsupervised training: cluster accuracy (Hungarian matching), NMI, ARI (numpy only).

With no labels the class index a model predicts is an arbitrary cluster name, so accuracy is taken under the best
one-to-one map of clusters to classes (``scipy.optimize.linear_sum_assignment`` on the contingency table). NMI uses
the arithmetic-mean normalisation (sklearn's default); ARI is Hubert & Arabie's adjusted Rand index.
"""

from __future__ import annotations

from typing import Dict

import numpy as np


def contingency(labels, clusters) -> np.ndarray:
    """Counts of (true class, cluster) pairs, (num classes, num clusters), over the values present."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1:
        raise ValueError(f"labels and clusters must be 1-D of equal length, got {labels.shape} and {clusters.shape}")
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    table = np.zeros((li.max() + 1 if len(li) else 0, ci.max() + 1 if len(ci) else 0), dtype=np.int64)
    np.add.at(table, (li, ci), 1)
    return table


def cluster_accuracy(labels, clusters) -> float:
    """Fraction correct under the best one-to-one cluster -> class map (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    table = contingency(labels, clusters)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / max(1, table.sum()))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels, clusters) -> float:
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()
    h_labels, h_clusters = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_labels == 0 and h_clusters == 0:
        return 1.0  # both a single group: identical partitions
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    return mi / (0.5 * (h_labels + h_clusters)) if h_labels + h_clusters > 0 else 0.0


def adjusted_rand_index(labels, clusters) -> float:
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index, a, b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = a * b / (n * (n - 1) / 2) if n > 1 else 0.0
    maximum = 0.5 * (a + b)
    if maximum == expected:
        return 1.0  # both partitions trivial (all in one group, or all singletons): they agree
    return float((index - expected) / (maximum - expected))


def clustering_report(labels, clusters) -> Dict[str, float]:
    return {
        "cluster_acc": cluster_accuracy(labels, clusters),
        "nmi": normalized_mutual_info(labels, clusters),
        "ari": adjusted_rand_index(labels, clusters),
    }


def predict_test(model, data, batch_size: int = 1000) -> np.ndarray:
    """The model's predicted class (= cluster id when trained without labels) for every test image."""
    import torch

    was_training = model.training
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(data.test_labels), batch_size):
            logits, _ = model(data.normalize(data.test_images[i : i + batch_size]))
            preds.append(logits.argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds).numpy()

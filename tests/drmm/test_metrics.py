"""Clustering metrics (drmm/metrics.py): perfect and permuted clusterings score 1, random ones about 0."""

import numpy as np
import pytest

from drmm.metrics import adjusted_rand_index, cluster_accuracy, clustering_report, normalized_mutual_info


def test_perfect_and_permuted_clusterings_score_one():
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 10, 2000)
    perm = rng.permutation(10)
    for clusters in (labels, perm[labels], perm[labels] + 100):  # cluster names are arbitrary
        r = clustering_report(labels, clusters)
        assert r["cluster_acc"] == pytest.approx(1.0) and r["nmi"] == pytest.approx(1.0)
        assert r["ari"] == pytest.approx(1.0)


def test_random_clustering_scores_about_zero():
    rng = np.random.RandomState(1)
    labels, clusters = rng.randint(0, 10, 5000), rng.randint(0, 10, 5000)
    assert abs(adjusted_rand_index(labels, clusters)) < 0.01
    assert normalized_mutual_info(labels, clusters) < 0.01
    assert 0.1 <= cluster_accuracy(labels, clusters) < 0.13  # chance level plus what matching can pick


def test_hand_computed_values():
    labels, clusters = [0, 0, 1, 1], [0, 0, 1, 2]
    # H(L) = ln 2, H(C) = 1.5 ln 2, MI = ln 2 (every cluster is pure) -> NMI = 1 / 1.25
    assert normalized_mutual_info(labels, clusters) == pytest.approx(0.8)
    assert adjusted_rand_index(labels, clusters) == pytest.approx(4 / 7)  # sklearn's documented 0.5714...
    assert cluster_accuracy(labels, clusters) == pytest.approx(0.75)
    # one mistake out of 6 under the best matching
    assert cluster_accuracy([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="equal length"):
        cluster_accuracy([0, 1], [0])

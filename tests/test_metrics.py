"""Clustering metrics of the evaluation (gmwae_fast/train/metrics.py): the Hungarian map, NMI and ARI against
hand-computed values, brute force over permutations, and their invariances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gmwae_fast.train.metrics import (
    _assignment,
    ari,
    contingency,
    hungarian_accuracy,
    hungarian_map,
    nmi,
    protocol_accuracy,
)


def test_assignment_is_optimal_against_every_permutation():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 6):
        for _ in range(20):
            cost = rng.integers(0, 20, size=(n, n)).astype(float)
            col = _assignment(cost)
            assert sorted(col.tolist()) == list(range(n))
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert cost[np.arange(n), col].sum() == best


def test_hungarian_accuracy_is_the_best_one_to_one_map_and_bounds_the_greedy_one():
    rng = np.random.default_rng(1)
    for _ in range(30):
        labels = rng.integers(0, 4, size=60)
        probs = rng.dirichlet(np.ones(4) * 0.3, size=60)
        pred = probs.argmax(1)
        N = contingency(labels, pred, 4, 4)
        brute = max(sum(N[c, p[c]] for c in range(4)) for p in itertools.permutations(range(4))) / 60
        assert hungarian_accuracy(labels, pred, 4, 4) == pytest.approx(brute)
        assert hungarian_accuracy(labels, pred, 4, 4) >= protocol_accuracy(probs, labels, 4)[0] - 1e-12


def test_more_modes_than_classes():
    labels = np.array([0, 0, 1, 1, 1])
    pred = np.array([3, 3, 7, 7, 2])  # 10 modes, two classes: one mode per class
    assert hungarian_accuracy(labels, pred, 2, 10) == pytest.approx(4 / 5)


@pytest.mark.parametrize(
    "labels,pred,want_ari,want_nmi",
    [
        ([0, 0, 1, 1], [1, 1, 0, 0], 1.0, 1.0),  # the same partition, other names
        ([0, 0, 1, 1], [0, 1, 0, 1], -0.5, 0.0),  # independent halves
        ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2], 0.24242424242424243, 0.5158037429793889),
    ],
)
def test_ari_and_nmi_hand_computed(labels, pred, want_ari, want_nmi):
    # the third case by hand: contingency [[2, 1, 0], [0, 1, 2]], sum C(n_ij, 2) = 2, rows 6, columns 3, total 15:
    # ARI = (2 - 6*3/15) / ((6+3)/2 - 6*3/15) = 0.8 / 3.3; NMI = I / ((H(L)+H(P))/2) with I = (2/3) ln 2,
    # H(L) = ln 2, H(P) = ln 3
    assert ari(labels, pred) == pytest.approx(want_ari, abs=1e-12)
    assert nmi(labels, pred) == pytest.approx(want_nmi, abs=1e-12)


def test_ari_and_nmi_are_invariant_to_renaming_and_symmetric():
    rng = np.random.default_rng(2)
    labels, pred = rng.integers(0, 5, size=200), rng.integers(0, 7, size=200)
    renamed = rng.permutation(7)[pred]
    assert ari(labels, renamed) == pytest.approx(ari(labels, pred))
    assert nmi(labels, renamed) == pytest.approx(nmi(labels, pred))
    assert ari(pred, labels) == pytest.approx(ari(labels, pred))
    assert nmi(pred, labels) == pytest.approx(nmi(labels, pred))
    assert abs(ari(labels, pred)) < 0.05 and nmi(labels, pred) < 0.05  # independent draws


def test_hungarian_map_gives_the_hungarian_accuracy_and_handles_fewer_modes():
    rng = np.random.default_rng(5)
    labels, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    N = contingency(labels, pred, 4, 4)
    col = hungarian_map(N)
    assert sorted(col.tolist()) == [0, 1, 2, 3]
    assert N[np.arange(4), col].sum() / 200 == pytest.approx(hungarian_accuracy(labels, pred, 4, 4))
    # 3 classes, 2 modes: one class gets no mode (an index >= n_modes), the others the best pair
    labels, pred = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 1])
    col = hungarian_map(contingency(labels, pred, 3, 2))
    assert col[0] == 0 and col[1] == 1 and col[2] >= 2
    assert hungarian_accuracy(labels, pred, 3, 2) == pytest.approx(4 / 5)

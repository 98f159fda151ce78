"""The AUROC of the DAMM sampling benchmark (``benchmarks.damm_sampling.auroc``, MONAI's ``compute_roc_auc``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.damm_sampling import auroc


def _pairwise(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of 4 pairs ordered
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
        ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),
        ([0.5, 0.5], [1, 0], 0.5),  # a tie counts one half
        ([1.0, 2.0, 2.0, 3.0], [0, 1, 0, 1], 0.875),  # pairs: 1, 0.5, 1, 1 of 4
        ([3.0, 3.0, 3.0, 3.0, 3.0], [1, 0, 0, 1, 0], 0.5),  # all tied
    ],
)
def test_auroc_hand_computed(scores: list[float], labels: list[int], expected: float) -> None:
    assert auroc(scores, labels) == pytest.approx(expected)


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        scores = np.round(rng.random(n), 1)  # many ties
        labels = rng.random(n) < 0.4
        labels[0], labels[1] = True, False
        assert auroc(scores, labels) == pytest.approx(_pairwise(scores, labels))
        # flipping the labels mirrors the AUROC
        assert auroc(scores, ~labels) == pytest.approx(1.0 - auroc(scores, labels))
        # invariant to a monotone transform of the scores
        assert auroc(np.exp(3 * scores), labels) == pytest.approx(auroc(scores, labels))


def test_auroc_single_class_is_nan() -> None:
    assert math.isnan(auroc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(auroc([0.1, 0.2, 0.3], [False, False, False]))


@pytest.mark.parametrize(("scores", "labels"), [([0.1, 0.2], [1, 0, 1]), ([0.1, float("nan")], [1, 0])])
def test_auroc_bad_input(scores: list[float], labels: list[int]) -> None:
    with pytest.raises(ValueError, match="auroc"):
        auroc(scores, labels)

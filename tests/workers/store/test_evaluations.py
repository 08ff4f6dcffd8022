"""What a confusion matrix says per class (the numbers `/v1/checkpoints/{ref}/evaluation`
answers)."""

from __future__ import annotations

import pytest

from workers.store.evaluations import per_class


def test_per_class_scores_from_a_matrix() -> None:
    matrix = [[8, 2, 0], [1, 9, 0], [0, 5, 5]]
    a, b, c = per_class(matrix, ["a", "b", "c"])
    assert (a.precision, a.recall, a.support) == (8 / 9, 8 / 10, 10)
    assert b.precision == pytest.approx(9 / 16) and b.recall == pytest.approx(0.9)
    assert c.f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert a.accuracy == pytest.approx((8 + 19) / 30)  # a against the rest
    assert a.model_dump(by_alias=True)["class"] == "a"

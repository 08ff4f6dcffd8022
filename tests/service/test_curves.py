"""The plots' epoch axes: whole epochs only, however few there are."""

from __future__ import annotations

import pytest

from service.api.plots import comparison_figure, render_comparison


@pytest.mark.parametrize(
    ("epochs", "ticks"),
    [([1], [1]), ([1, 2], [1, 2]), ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), (list(range(1, 31)), None)],
)
def test_the_comparison_ticks_whole_epochs(epochs: list[int], ticks: list[int] | None) -> None:
    series = [(name, [(e, 0.1 * i + 0.01 * e) for e in epochs]) for i, name in enumerate("ab")]
    ax = comparison_figure(series, "val_acc").axes[0]
    low, high = ax.get_xlim()
    shown = [t for t in ax.get_xticks() if low <= t <= high]
    assert all(float(t).is_integer() for t in shown), shown
    if ticks is not None:
        assert shown == ticks
    assert render_comparison(series, "val_acc", "png").startswith(b"\x89PNG")

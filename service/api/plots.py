"""Plots: a job's curves as d2l draws them, several jobs' curves compared, a confusion matrix.

Matplotlib's object API on the Agg canvas (no pyplot state), so it is safe in a thread pool.
Each plot is one route with its format in the path (`curves.{format:plot}`): the `plot`
convertor matches `png` and `svg` only, so any other ending is no route at all (a 404).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Path, Response
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from starlette.convertors import Convertor, register_url_convertor

from workers.store.jobs import EpochMetrics

CurveFormat = Literal["png", "svg"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "svg": "image/svg+xml"}


class _PlotFormat(Convertor[str]):
    """The `plot` path convertor: a plot's file ending."""

    regex = "png|svg"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("plot", _PlotFormat())

#: A plot route's format, the path's `{format:plot}`.
PlotFormat = Annotated[CurveFormat, Path(description="The image format: png or svg.")]
#: A plot route's 200 in OpenAPI.
PLOT_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A PNG or an SVG image, as the path's ending says.",
        "content": {media_type: {} for media_type in MEDIA_TYPES.values()},
    }
}


def plot_response(body: bytes, fmt: CurveFormat) -> Response:
    """A rendered plot, never cached (its data changes while a job runs)."""
    return Response(body, media_type=MEDIA_TYPES[fmt], headers={"Cache-Control": "no-store"})


# d2l.plot's default formats: solid, magenta dashed, green dash-dot
_SERIES = (
    ("train loss", "train_loss", "-", "C0"),
    ("val loss", "val_loss", "--", "m"),
    ("val acc", "val_acc", "-.", "g"),
)


def render_curves(
    metrics: Sequence[EpochMetrics],
    fmt: CurveFormat,
    *,
    epochs: int | None = None,
    title: str | None = None,
) -> bytes:
    """Plot the metrics and return the image; an empty axes frame when there are none yet."""
    fig = Figure(figsize=(5.0, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [m.epoch for m in metrics]
    for label, field, style, color in _SERIES:
        ys = [float(getattr(m, field)) for m in metrics]
        ax.plot(xs, ys, style, label=label, color=color, marker="o" if len(xs) == 1 else None)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    first = min(xs, default=1)  # after a parent's epochs, with continue_epochs
    last = max([*xs, epochs or 0, 1])
    ax.set_xlim(first, max(last, first + 1))
    if not metrics:
        ax.set_ylim(0, 1)
        ax.text(
            0.5,
            0.5,
            "no finished epoch yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.5",
        )
    ax.grid(True)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return _save(fig, fmt)


def _save(fig: Figure, fmt: CurveFormat) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()


#: Line styles cycled with the colours, so lines stay apart in print and for colour-blind eyes.
_STYLES = ("-", "--", "-.", ":")


def render_comparison(
    series: Sequence[tuple[str, Sequence[tuple[int, float]]]],
    metric: str,
    fmt: CurveFormat,
    *,
    title: str | None = None,
) -> bytes:
    """One metric of several jobs against epoch, one line each, labelled in a legend."""
    return _save(comparison_figure(series, metric, title=title), fmt)


def comparison_figure(
    series: Sequence[tuple[str, Sequence[tuple[int, float]]]],
    metric: str,
    *,
    title: str | None = None,
) -> Figure:
    """The figure `render_comparison` draws."""
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(series):
        xs = [e for e, _ in points]
        ys = [v for _, v in points]
        ax.plot(
            xs,
            ys,
            _STYLES[(i // 10) % len(_STYLES)],
            color=f"C{i % 10}",
            label=label,
            marker="o" if len(xs) <= 12 else None,
            markersize=3,
        )
    ax.set_xlabel("epoch")
    # whole epochs only, even for one (MaxNLocator's default wants two ticks and would
    # fall back to 0.5, 0.6, ... around a single epoch)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    epochs = [e for _, points in series for e, _ in points]
    if epochs and min(epochs) == max(epochs):  # one epoch each: a point, not a stretched axis
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.set_ylabel(metric.replace("_", " "))
    if not any(points for _, points in series):
        ax.text(
            0.5,
            0.5,
            "no finished epoch yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.5",
        )
    ax.grid(True)
    if series:
        ax.legend(loc="best", fontsize="small", ncols=2 if len(series) > 8 else 1)
    if title:
        ax.set_title(title)
    return fig


def render_confusion(
    matrix: Sequence[Sequence[int]],
    classes: Sequence[str],
    fmt: CurveFormat,
    *,
    title: str | None = None,
) -> bytes:
    """A labelled heatmap of a confusion matrix: true class down, predicted across, counts in
    the cells, shaded by each row's share so every class reads on the same scale."""
    fig = Figure(figsize=(7.2, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = len(classes)
    totals = [max(sum(row), 1) for row in matrix]
    shares = [[cell / totals[i] for cell in row] for i, row in enumerate(matrix)]
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(matrix[i][j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shares[i][j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if title:
        ax.set_title(title)
    return _save(fig, fmt)

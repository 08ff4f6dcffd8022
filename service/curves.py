"""Training curves as d2l plots them: train loss, val loss and val acc against epoch.

Matplotlib's object API on the Agg canvas (no pyplot state), so it is safe in a thread pool.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from workers.jobs import EpochMetrics

CurveFormat = Literal["png", "svg"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "svg": "image/svg+xml"}

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
    last = max([*xs, epochs or 0, 1])
    ax.set_xlim(1, max(last, 2))
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()

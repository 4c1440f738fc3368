"""Per-structure box/strip plots of Dice and HD95 (matplotlib, PNG bytes)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["metric_plots_png"]


def metric_plots_png(
    rows: Sequence[dict[str, Any]],
    *,
    structures: Sequence[tuple[str, str]],
    metrics: Sequence[tuple[str, str]] = (("dice", "Dice"), ("hd95_mm", "HD95 (mm)")),
    dpi: int = 80,
    seed: int = 0,
) -> bytes:
    """One horizontal box plot per structure and metric (3 or more values), every case drawn as a dot.

    Undefined values (both empty) are left out; infinite distances (one side empty) are drawn as
    red crosses at the right edge and counted in the structure's tick label.

    Args:
        rows: Rows of :func:`~medseg.evaluate.metrics.evaluate_case`.
        structures: ``(kind, name)`` in display order (top to bottom).
        metrics: ``(row column, axis title)`` pairs, one panel each.
        dpi: Figure resolution.
        seed: Seed of the vertical jitter of the dots.

    Returns:
        The PNG file content.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    n = max(len(structures), 1)
    fig = Figure(figsize=(12.0, 1.2 + 0.32 * n), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    positions = np.arange(n)[::-1]
    for ax, (column, title) in zip(axes, metrics, strict=True):
        finite_all: list[float] = []
        data, n_inf = [], []
        for kind, name in structures:
            values = np.asarray(
                [float(r[column]) for r in rows if r.get("kind", "class") == kind and r["name"] == name], dtype=float
            )
            data.append(values[np.isfinite(values)])
            n_inf.append(int(np.count_nonzero(np.isinf(values))))
            finite_all += data[-1].tolist()
        upper = max(finite_all) if finite_all else 1.0
        if column in ("dice", "nsd", "iou"):
            upper = 1.0
        with_values = [i for i, d in enumerate(data) if d.size >= 3]  # a box needs a few values; dots always
        if with_values:
            ax.boxplot(
                [data[i] for i in with_values],
                positions=positions[with_values],
                orientation="horizontal",
                widths=0.6,
                showfliers=False,
                patch_artist=True,
                boxprops={"facecolor": "#dbe7f3", "edgecolor": "#4a6a8a"},
                medianprops={"color": "#c0392b"},
            )
        for i, values in enumerate(data):
            jitter = rng.uniform(-0.18, 0.18, size=values.size)
            ax.scatter(values, positions[i] + jitter, s=9, color="#2c3e50", alpha=0.7, zorder=3)
            if n_inf[i]:
                right = upper * 1.04 if upper > 0 else 1.0
                ax.scatter(
                    [right] * n_inf[i], positions[i] + rng.uniform(-0.18, 0.18, n_inf[i]), marker="x", color="red"
                )
        ax.set_title(title + ("  (x = one side empty)" if any(n_inf) else ""), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        if column in ("dice", "nsd", "iou"):
            ax.set_xlim(-0.02, 1.06 if not any(n_inf) else 1.1)
        elif not math.isfinite(upper) or upper <= 0:
            ax.set_xlim(0, 1)
    axes[0].set_yticks(positions)
    axes[0].set_yticklabels([f"{name}" + (" (region)" if kind == "region" else "") for kind, name in structures])
    axes[0].set_ylim(-0.7, n - 0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()

"""Figures for the model card. matplotlib is optional (``pip install hf-recon-prune[report]``) and imported lazily.

The figure is drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), never through ``pyplot``, so saving a
model neither needs a display nor changes the backend or the open figures of the caller's session.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

# (report key, label, colour, line style): calibration and held-out samples, before and after reconstruction.
_SERIES = (
    ("calibration", "before", "calibration, before reconstruction", "tab:blue", "--"),
    ("calibration", "after", "calibration, after reconstruction", "tab:blue", "-"),
    ("heldout", "before", "held-out, before reconstruction", "tab:orange", "--"),
    ("heldout", "after", "held-out, after reconstruction", "tab:orange", "-"),
)


def _positive(value: Any) -> Optional[float]:
    """The value as a float when a log axis can show it, else None (missing, zero, negative or not finite)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def reconstruction_error_series(report: Any) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``{(split, "before"|"after"): [(block index, error), ...]}`` with only the points a log axis can show."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for split, when, *_ in _SERIES:
        points = []
        for block in getattr(report, "blocks", []) or []:
            value = _positive((getattr(block, f"error_{when}", None) or {}).get(split))
            if value is not None:
                points.append((int(block.index), value))
        if points:
            series[(split, when)] = points
    return series


def plot_reconstruction_errors(report: Any, path: Union[str, os.PathLike]) -> Optional[str]:
    """Plot the per-block reconstruction error (log scale) before/after reconstruction, calibration vs held-out.

    Returns the path written, or None when the report has no error to show (nothing is written then). Raises
    ImportError when matplotlib is not installed; ``save_pruned_model`` turns that into a warning.

    Dashed lines are the error once the masks (and LR) are applied, solid lines after block-wise reconstruction.
    A solid held-out line above its dashed one while the calibration line falls is the overfitting the paper warns
    about. Blocks whose reconstruction was reverted (non-finite loss) are marked with a cross.
    """
    series = reconstruction_error_series(report)
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_blocks = len(report.blocks)
    fig = Figure(figsize=(min(4.0 + 0.25 * num_blocks, 14.0), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for split, when, label, colour, style in _SERIES:
        points = series.get((split, when))
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, linestyle=style, color=colour, marker="o", markersize=3, linewidth=1.5, label=label)
    reverted = [b.index for b in report.blocks if getattr(b, "reverted", False)]
    if reverted:
        # Mark them on the calibration "after" curve when it has a point there, else at the top of the axis.
        after = dict(series.get(("calibration", "after"), []))
        top = max(v for points in series.values() for _, v in points)
        ax.plot(reverted, [after.get(i, top) for i in reverted], linestyle="none", marker="x", color="black",
                markersize=7, label="reconstruction reverted")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("reconstruction error (MSE to dense output)")
    ax.set_title("Reconstruction error per block")
    if num_blocks <= 40:
        ax.set_xticks(range(num_blocks))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, format="png")
    return out

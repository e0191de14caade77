"""Text of the model card: markdown table cells, percentages and numbers."""

from __future__ import annotations

import math
from typing import Any, Optional


def _cell(text: Any) -> str:
    """Text for one markdown table cell: pipes escaped, on one line."""
    return " ".join(str(text).replace("|", "\\|").split())


def _percent(fraction: float, digits: Optional[int] = None) -> str:
    value = 100.0 * float(fraction)
    return f"{value:.{digits}f}%" if digits is not None else f"{value:g}%"


def _finite(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt_number(value: Any) -> str:
    if value is None:
        return "–"
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return str(value)

"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from typing import Optional

import torch

from .base import Criterion
from .masks import row_mask
from .statistics import InputStatistics


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * column_norms.to(weight.device, torch.float32).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]]) -> torch.Tensor:
    return row_mask(wanda_scores(weight, column_norms), sparsity, nm)


class WandaCriterion(Criterion):
    """Wanda (absolute weight times the norm of its input activation)"""

    statistics = "norms"
    label = "Wanda"

    def scores(self, weight: torch.Tensor, statistics: Optional[InputStatistics]) -> torch.Tensor:
        return wanda_scores(weight, statistics.column_norms)

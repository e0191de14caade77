"""Magnitude pruning: drop the smallest |W| in each output row."""

from __future__ import annotations

from typing import Optional

import torch

from .base import Criterion
from .masks import row_mask
from .statistics import InputStatistics


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]]) -> torch.Tensor:
    return row_mask(MagnitudeCriterion().scores(weight, None), sparsity, nm)


class MagnitudeCriterion(Criterion):
    """magnitude (the weights of smallest absolute value in each output row are pruned)"""

    def scores(self, weight: torch.Tensor, statistics: Optional[InputStatistics]) -> torch.Tensor:
        return weight.detach().abs().float()

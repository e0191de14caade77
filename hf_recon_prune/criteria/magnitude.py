"""Magnitude pruning: drop the smallest |W| in each output row."""

from __future__ import annotations

from typing import Optional

import torch

from .masks import row_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]]) -> torch.Tensor:
    return row_mask(weight.detach().abs().float(), sparsity, nm)

"""Turning importance scores into masks, unstructured or N:M.

Rounding rule (documented for users and asserted in tests): in every *group* exactly ``floor(sparsity * group_size)``
weights with the lowest scores are pruned. A group is one output row for magnitude and Wanda (Wanda compares within
an output row; magnitude does the same so that every layer reaches the target exactly), and one lazy column block
``[out_features, block_size]`` for SparseGPT. N:M keeps the N highest-scoring of every M consecutive input weights.
Masks are boolean with ``True`` = kept.
"""

from __future__ import annotations

from typing import Optional

import torch


def check_nm_shape(in_features: int, nm: Optional[tuple[int, int]], layer_name: str = "layer") -> None:
    if nm is not None and in_features % nm[1] != 0:
        raise ValueError(
            f"{layer_name}: in_features={in_features} is not a multiple of M={nm[1]} for the N:M pattern "
            f"'{nm[0]}:{nm[1]}'; exclude this layer (PruningConfig.exclude_modules) or use an M that divides it."
        )


def prune_lowest(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep-mask over the last dim of ``scores`` pruning exactly ``num_pruned`` lowest entries of every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if num_pruned > 0:
        idx = torch.topk(scores, num_pruned, dim=-1, largest=False).indices
        keep.scatter_(-1, idx, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the n largest scores in every group of m consecutive columns."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    keep = prune_lowest(grouped, m - n)
    return keep.reshape(rows, cols)


def row_mask(scores: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]]) -> torch.Tensor:
    """Mask for magnitude/Wanda: N:M groups, or ``floor(sparsity * in_features)`` pruned per output row."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return prune_lowest(scores, int(sparsity * scores.shape[1]))

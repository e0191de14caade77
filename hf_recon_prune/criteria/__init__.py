"""Pruning criteria: which weights go (masks) and, with LR, how the kept weights compensate.

``prune_linear`` is the single entry point the engine uses; each criterion lives in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .existing_zeros import prune_linear_keeping_zeros as _keeping_zeros
from .magnitude import magnitude_mask
from .masks import check_nm_shape, nm_mask, prune_lowest, row_mask
from .sparsegpt import (
    HessianFactor, HessianFactors, SparseGPTResult, factor_hessian, inverse_hessian_cholesky, sparsegpt_prune,
)
from .statistics import InputStatistics, StatisticsRecorder
from .wanda import wanda_mask, wanda_scores

__all__ = [
    "InputStatistics", "StatisticsRecorder", "LayerPruneResult", "prune_linear", "needs_hessian", "needs_statistics",
    "magnitude_mask", "wanda_mask", "wanda_scores", "sparsegpt_prune", "inverse_hessian_cholesky", "row_mask",
    "nm_mask", "prune_lowest", "check_nm_shape", "SparseGPTResult", "prune_linear_keeping_zeros", "HessianFactor",
    "HessianFactors", "factor_hessian",
]


def needs_statistics(method: str, layer_wise_reconstruction: bool) -> bool:
    return method != "magnitude" or layer_wise_reconstruction


def needs_hessian(method: str, layer_wise_reconstruction: bool) -> bool:
    return method == "sparsegpt" or layer_wise_reconstruction


@dataclass
class LayerPruneResult:
    keep_mask: torch.Tensor
    dampening: Optional[float] = None


@torch.no_grad()
def prune_linear(
    layer: nn.Linear,
    method: str,
    sparsity: float,
    nm: Optional[tuple[int, int]],
    stats: Optional[InputStatistics],
    layer_wise_reconstruction: bool,
    block_size: int = 128,
    dampening: float = 0.01,
    name: str = "layer",
    factor: Optional[HessianFactor] = None,
) -> LayerPruneResult:
    """Choose the layer's mask with ``method`` and write the pruned (and, with LR, updated) weight in place.

    ``factor``: the layer's factored Hessian (``HessianFactors.for_layer``), used instead of ``stats.hessian``."""
    weight = layer.weight
    check_nm_shape(weight.shape[1], nm, name)
    if method == "magnitude":
        keep = magnitude_mask(weight, sparsity, nm)
    elif method == "wanda":
        keep = wanda_mask(weight, stats.column_norms, sparsity, nm)
    elif method == "sparsegpt":
        result = sparsegpt_prune(weight, None if factor else stats.hessian, sparsity, nm, block_size, dampening,
                                 factor=factor)
        if layer_wise_reconstruction:
            weight.copy_(result.weight.to(weight.dtype))
        else:
            weight.mul_(result.keep_mask)
        return LayerPruneResult(result.keep_mask, result.dampening)
    else:
        raise ValueError(f"unknown pruning method {method!r}; allowed: 'magnitude', 'wanda', 'sparsegpt'")

    if layer_wise_reconstruction:
        result = sparsegpt_prune(weight, None if factor else stats.hessian, sparsity, nm, block_size, dampening,
                                 fixed_keep_mask=keep, factor=factor)
        weight.copy_(result.weight.to(weight.dtype))
        return LayerPruneResult(keep, result.dampening)
    weight.mul_(keep)
    return LayerPruneResult(keep)


def prune_linear_keeping_zeros(layer: nn.Linear, existing: torch.Tensor, method: str, sparsity: float,
                               nm: Optional[tuple[int, int]], stats: Optional[InputStatistics],
                               layer_wise_reconstruction: bool, block_size: int = 128, dampening: float = 0.01,
                               name: str = "layer", factor: Optional[HessianFactor] = None) -> LayerPruneResult:
    """``prune_linear`` for a layer whose zeros (``existing``) stay zero and count toward the sparsity
    (``PruningConfig.keep_existing_zeros``); see ``existing_zeros.py``."""
    keep, used_dampening = _keeping_zeros(layer, existing, method, sparsity, nm, stats, layer_wise_reconstruction,
                                          block_size, dampening, name, factor)
    return LayerPruneResult(keep, used_dampening)

"""Pruning a layer that already has zeros which must stay zero and count toward the sparsity."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .masks import check_nm_shape, nm_mask, prune_lowest
from .sparsegpt import HessianFactor, factor_hessian, sparsegpt_prune
from .statistics import InputStatistics
from .wanda import wanda_scores


@torch.no_grad()
def prune_linear_keeping_zeros(
    layer: nn.Linear,
    existing: torch.Tensor,
    method: str,
    sparsity: float,
    nm: Optional[tuple[int, int]],
    stats: Optional[InputStatistics],
    layer_wise_reconstruction: bool,
    block_size: int = 128,
    dampening: float = 0.01,
    name: str = "layer",
    factor: Optional[HessianFactor] = None,
) -> tuple[torch.Tensor, Optional[float]]:
    """Like ``prune_linear``, for a layer whose zeros (``existing``) must stay zero and count toward the sparsity.

    The criterion's scores are taken on the weights as they are, with every existing zero scored lowest, so each
    group (an output row for magnitude and Wanda, a lazy column block for SparseGPT, N:M groups) prunes its existing
    zeros first and only the rest by score; a group with more zeros than the target keeps all of them. For SparseGPT
    the mask is therefore chosen from the OBS saliency ``w^2 / [H^-1]_jj^2`` of the weights before the update (in the
    usual solver, later column blocks see weights already updated by earlier ones). The OBS update (LR) then runs with
    that mask fixed, so the existing zeros are never revived. Returns (keep mask, dampening used or None).
    """
    weight = layer.weight
    check_nm_shape(weight.shape[1], nm, name)
    used_dampening = None
    w = weight.detach().float()
    if method == "magnitude":
        scores = w.abs()
    elif method == "wanda":
        scores = wanda_scores(weight, stats.column_norms)
    elif method == "sparsegpt":
        factor = factor or factor_hessian(stats.hessian, dampening, consume=True, device=w.device)
        used_dampening = factor.dampening
        diagonal = torch.diagonal(factor.inverse_cholesky)
        scores = (w.square() / diagonal.square().unsqueeze(0)).masked_fill(factor.dead, 0.0)
    else:
        raise ValueError(f"unknown pruning method {method!r}; allowed: 'magnitude', 'wanda', 'sparsegpt'")
    scores = scores.masked_fill(existing, -1.0)  # every other score is >= 0
    if nm is not None:
        keep = nm_mask(scores, *nm)
    elif method == "sparsegpt":
        keep = torch.ones_like(scores, dtype=torch.bool)
        for start in range(0, scores.shape[1], block_size):
            group = scores[:, start:start + block_size]
            keep[:, start:start + group.shape[1]] = prune_lowest(
                group.reshape(1, -1), int(sparsity * group.numel())).reshape(group.shape)
    else:
        keep = prune_lowest(scores, int(sparsity * scores.shape[1]))
    keep &= ~existing
    if layer_wise_reconstruction:
        factor = factor or factor_hessian(stats.hessian, dampening, consume=True, device=w.device)
        result = sparsegpt_prune(weight, None, sparsity, nm, block_size, dampening, fixed_keep_mask=keep, factor=factor)
        weight.copy_(result.weight.to(weight.dtype))
        used_dampening = result.dampening
    else:
        weight.mul_(keep)
    return keep, used_dampening

"""SparseGPT as a criterion: the solver (``sparsegpt.py``) chooses the mask while it updates the kept weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Criterion, LayerPruneResult, PruneRequest, apply_mask
from .masks import check_nm_shape, nm_mask, prune_lowest
from .sparsegpt import factor_hessian, sparsegpt_prune


class SparseGPTCriterion(Criterion):
    """SparseGPT (OBS saliency from the inverse Hessian of the layer inputs)"""

    statistics = "hessian"
    label = "SparseGPT"
    unstructured_group = "every block of {block_size} input columns, over all its rows (rows differ)"

    def validate(self, config: Any) -> None:
        nm = config.nm
        if nm is not None and config.sparsegpt_block_size % nm[1]:
            # N:M groups are chosen inside the solver's column blocks: a group must not straddle two blocks
            raise ValueError(
                f"PruningConfig.sparsegpt_block_size={config.sparsegpt_block_size!r} is not allowed; allowed: a "
                f"multiple of M={nm[1]} with pattern={config.pattern!r} and method={config.method!r}."
            )

    @torch.no_grad()
    def prune(self, layer: nn.Linear, request: PruneRequest) -> LayerPruneResult:
        weight = layer.weight
        check_nm_shape(weight.shape[1], request.nm, request.name)
        if request.keep_zeros is not None:
            return self._prune_keeping_zeros(layer, request)
        hessian = None if request.factor else request.statistics.hessian
        result = sparsegpt_prune(weight, hessian, request.sparsity, request.nm, request.block_size, request.dampening,
                                 factor=request.factor)
        if request.layer_wise_reconstruction:
            weight.copy_(result.weight.to(weight.dtype))
        else:
            weight.mul_(result.keep_mask)
        return LayerPruneResult(result.keep_mask, result.dampening)

    def _prune_keeping_zeros(self, layer: nn.Linear, request: PruneRequest) -> LayerPruneResult:
        """The mask from the saliency of the weights before the update, every existing zero scored lowest, so each
        lazy column block (or N:M group) prunes its existing zeros first; LR then runs with that mask fixed, so
        no existing zero is revived. (In the usual solver later column blocks see weights already updated.)"""
        weight = layer.weight
        factor = request.factor or factor_hessian(request.statistics.hessian, request.dampening, consume=True,
                                                  device=weight.device)
        scores = self._saliency(weight, factor).masked_fill(request.keep_zeros, -1.0)  # saliencies are >= 0
        if request.nm is not None:
            keep = nm_mask(scores, *request.nm)
        else:
            keep = torch.ones_like(scores, dtype=torch.bool)
            for start in range(0, scores.shape[1], request.block_size):
                group = scores[:, start:start + request.block_size]
                keep[:, start:start + group.shape[1]] = prune_lowest(
                    group.reshape(1, -1), int(request.sparsity * group.numel())).reshape(group.shape)
        keep &= ~request.keep_zeros
        if not request.layer_wise_reconstruction:
            weight.mul_(keep)
            return LayerPruneResult(keep, factor.dampening)
        solved = PruneRequest(**{**request.__dict__, "factor": factor})
        return apply_mask(layer, keep, solved)

    @staticmethod
    def _saliency(weight: torch.Tensor, factor) -> torch.Tensor:
        diagonal = torch.diagonal(factor.inverse_cholesky)
        return (weight.detach().float().square() / diagonal.square().unsqueeze(0)).masked_fill(factor.dead, 0.0)

"""What every pruning criterion is: a small base class, and the request the engine hands it for one linear layer.

A criterion of the simple kind only scores weights (``scores``: higher means keep); the base class turns the scores
into unstructured or N:M masks, keeps a layer's existing zeros when asked, and runs the layer-wise reconstruction
(LR, SparseGPT's weight update with the mask fixed) when the run uses it. A solver kind (SparseGPT) overrides
``prune`` itself. Criteria are looked up by name in ``methods.py``, the one table of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .masks import check_nm_shape, row_mask
from .sparsegpt import HessianFactor, sparsegpt_prune
from .statistics import InputStatistics

#: What a criterion reads of a layer's inputs: nothing, their per-column norms (Wanda), or their Hessian X^T X.
STATISTICS = ("none", "norms", "hessian")


@dataclass
class LayerPruneResult:
    keep_mask: torch.Tensor
    dampening: Optional[float] = None  # the Hessian dampening the solver ended up using (None: no solve ran)


@dataclass
class PruneRequest:
    """Everything a criterion needs to prune one linear layer."""

    sparsity: float
    nm: Optional[tuple[int, int]]
    statistics: Optional[InputStatistics]
    layer_wise_reconstruction: bool
    block_size: int = 128
    dampening: float = 0.01
    name: str = "layer"
    factor: Optional[HessianFactor] = None  # the layer's factored Hessian (shared by layers reading one input)
    keep_zeros: Optional[torch.Tensor] = None  # zeros that must stay zero and count (keep_existing_zeros)


class Criterion:
    """A pruning criterion. Subclass it (or give ``register_criterion`` a class with a ``scores`` method).

    Attributes:
        statistics: what ``scores`` reads of the layer's inputs: ``"none"`` (``statistics`` is then None unless
            LR needs a Hessian), ``"norms"`` (``statistics.column_norms``, the L2 norm of each input feature over
            the calibration tokens) or ``"hessian"`` (``statistics.hessian``, ``X^T X / tokens``).
        label: the short name the model card uses (default: the registered name).
        description: one line the model card says about the criterion (default: the first line of the docstring).
        unstructured_group: where an unstructured mask prunes the same fraction, for the model card (``{block_size}``
            stands for ``PruningConfig.sparsegpt_block_size``); scores-based criteria compare within a row.
    """

    statistics: str = "none"
    label: Optional[str] = None
    description: Optional[str] = None
    unstructured_group: str = "every output row"
    name: str = ""  # set by register_criterion

    def validate(self, config: Any) -> None:
        """Raise ValueError naming the field when ``config`` (a PruningConfig) is not valid for this criterion."""

    def scores(self, weight: torch.Tensor, statistics: Optional[InputStatistics]) -> torch.Tensor:
        """A tensor of ``weight``'s shape; the highest scores are kept (per output row, or per N:M group)."""
        raise NotImplementedError(f"criterion {self.name!r} defines neither scores() nor prune()")

    def needs_statistics(self, layer_wise_reconstruction: bool) -> bool:
        return self.statistics != "none" or layer_wise_reconstruction

    def needs_hessian(self, layer_wise_reconstruction: bool) -> bool:
        return self.statistics == "hessian" or layer_wise_reconstruction

    @torch.no_grad()
    def prune(self, layer: nn.Linear, request: PruneRequest) -> LayerPruneResult:
        """Mask ``layer`` by its scores and write the pruned (with LR, updated) weight in place."""
        weight = layer.weight
        check_nm_shape(weight.shape[1], request.nm, request.name)
        scores = self.scores(weight, request.statistics)
        if tuple(scores.shape) != tuple(weight.shape):
            raise ValueError(f"criterion {self.name!r} returned scores of shape {tuple(scores.shape)} for "
                             f"{request.name} whose weight is {tuple(weight.shape)}; scores() must match the weight")
        scores = scores.detach().to(weight.device, torch.float32)
        if request.keep_zeros is not None:  # existing zeros are pruned first, so they stay zero and count
            scores = scores.masked_fill(request.keep_zeros, float("-inf"))
        keep = row_mask(scores, request.sparsity, request.nm)
        if request.keep_zeros is not None:
            keep &= ~request.keep_zeros
        return apply_mask(layer, keep, request)


def apply_mask(layer: nn.Linear, keep: torch.Tensor, request: PruneRequest) -> LayerPruneResult:
    """Zero the pruned weights; with LR, SparseGPT's update of the kept ones for this fixed mask."""
    weight = layer.weight
    if not request.layer_wise_reconstruction:
        weight.mul_(keep)
        return LayerPruneResult(keep)
    hessian = None if request.factor else request.statistics.hessian
    result = sparsegpt_prune(weight, hessian, request.sparsity, request.nm, request.block_size, request.dampening,
                             fixed_keep_mask=keep, factor=request.factor)
    weight.copy_(result.weight.to(weight.dtype))
    return LayerPruneResult(keep, result.dampening)

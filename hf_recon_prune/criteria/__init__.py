"""Pruning criteria: which weights go (masks) and, with LR, how the kept weights compensate.

One file per criterion (``magnitude.py``, ``wanda.py``, ``sparsegpt_criterion.py`` over the solver in
``sparsegpt.py``), each a ``Criterion`` (``base.py``); the engine finds them by name in ``methods.py``.
"""

from __future__ import annotations

from .base import STATISTICS, Criterion, LayerPruneResult, PruneRequest, apply_mask
from .magnitude import MagnitudeCriterion, magnitude_mask
from .masks import check_nm_shape, nm_mask, prune_lowest, row_mask
from .sparsegpt import (
    HessianFactor, HessianFactors, SparseGPTResult, factor_hessian, inverse_hessian_cholesky, sparsegpt_prune,
)
from .sparsegpt_criterion import SparseGPTCriterion
from .statistics import InputStatistics, StatisticsRecorder
from .wanda import WandaCriterion, wanda_mask, wanda_scores

__all__ = [
    "Criterion", "PruneRequest", "LayerPruneResult", "STATISTICS", "apply_mask", "MagnitudeCriterion",
    "WandaCriterion", "SparseGPTCriterion", "InputStatistics", "StatisticsRecorder", "magnitude_mask", "wanda_mask",
    "wanda_scores", "sparsegpt_prune", "inverse_hessian_cholesky", "row_mask", "nm_mask", "prune_lowest",
    "check_nm_shape", "SparseGPTResult", "HessianFactor", "HessianFactors", "factor_hessian",
]

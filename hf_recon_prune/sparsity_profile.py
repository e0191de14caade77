"""Non-uniform sparsity: OWL's outlier-weighted ratios per block, and per-module overrides.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity"): a block with more *outliers* keeps more weights. A
block's outlier ratio is the fraction of its Wanda scores ``|W_ij| * ||X_j||`` (over all its prunable weights at
once) above ``M`` times their mean. With ratios ``r_b`` the densities are

    d_b = 2 * lambda * (r_b - min r) / (max r - min r),   shifted so that mean_b d_b = 1 - sparsity,

and block ``b`` is pruned to ``1 - d_b``, so the mean over blocks is the target sparsity (``lambda`` bounds how far a
block moves from it: ``+-lambda``). The statistics come from one dense pass over all blocks before pruning starts
(:func:`owl_outlier_ratios`), as in the authors' code.

``sparsity_overrides`` ({regex: sparsity}) then set the sparsity of the weights whose name inside a block matches,
the first matching pattern winning; a block's other weights keep the block's sparsity.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

__all__ = ["owl_sparsities", "outlier_ratio", "owl_outlier_ratios", "weight_sparsity"]


def owl_sparsities(outlier_ratios: Sequence[float], sparsity: float, lambda_: float) -> list[float]:
    """Each block's sparsity from its outlier ratio (see the module docstring); the mean is ``sparsity``."""
    ratios = [float(r) for r in outlier_ratios]
    if not ratios:
        return []
    low, high = min(ratios), max(ratios)
    if high == low:
        return [sparsity] * len(ratios)
    densities = [2.0 * lambda_ * (r - low) / (high - low) for r in ratios]
    shift = (1.0 - sparsity) - sum(densities) / len(densities)
    return [1.0 - (d + shift) for d in densities]


def outlier_ratio(scores: Iterable[torch.Tensor], threshold: float) -> float:
    """The fraction of all ``scores`` (one tensor per weight of a block) above ``threshold`` times their mean."""
    flat = [s.detach().float().reshape(-1) for s in scores]
    if not flat:
        return 0.0
    total = sum(int(s.numel()) for s in flat)
    mean = sum(float(s.sum()) for s in flat) / max(total, 1)
    above = sum(int((s > threshold * mean).sum()) for s in flat)
    return above / max(total, 1)


@torch.no_grad()
def owl_outlier_ratios(blocks: Sequence[torch.nn.Module], weights_of, statistics_of, inputs: torch.Tensor,
                       forward, threshold: float) -> list[float]:
    """The outlier ratio of every block on the dense model: ``weights_of(block)`` gives its prunable weights,
    ``statistics_of(index, weights, inputs)`` records their input norms on ``inputs`` (the block's dense input),
    and ``forward(index, inputs)`` returns the block's output (the next block's dense input)."""
    ratios = []
    for index, block in enumerate(blocks):
        weights = weights_of(block)
        if not weights:
            ratios.append(0.0)
            inputs = forward(index, inputs)
            continue
        stats = statistics_of(index, weights, inputs)
        scores = []
        for weight in weights.values():
            for unit in weight.units:
                norms = stats[unit.name].column_norms.to(unit.weight.device)
                scores.append(unit.weight.abs().float() * norms.unsqueeze(0))
        ratios.append(outlier_ratio(scores, threshold))
        inputs = forward(index, inputs)
    return ratios


def weight_sparsity(name: str, block_sparsity: float, overrides: Optional[Mapping[str, float]]) -> float:
    """The sparsity of the weight ``name`` (inside its block): the first matching override, else the block's."""
    for pattern, value in (overrides or {}).items():
        if re.search(pattern, name):
            return float(value)
    return block_sparsity


def describe(config: Any) -> Optional[str]:
    """One line for the card and the report on a non-uniform profile, or None for uniform sparsity."""
    parts = []
    if getattr(config, "sparsity_profile", None) == "owl":
        parts.append(f"OWL (outlier threshold M={config.owl_threshold:g}, lambda={config.owl_lambda:g}): each "
                     "block's sparsity from its outliers, the mean over blocks kept at the target")
    if getattr(config, "sparsity_overrides", None):
        parts.append("overrides " + ", ".join(f"{p!r}: {v:g}" for p, v in config.sparsity_overrides.items())
                     + ": the weights they name take that sparsity instead of their block's, so the mean moves")
    return "; ".join(parts) or None

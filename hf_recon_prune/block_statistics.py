"""The statistics pass of one block: what every matrix unit of its prunable weights reads of its inputs.

Linears and ``Conv1D`` layers are hooked by ``criteria.statistics.StatisticsRecorder`` (layers reading one input
share one set of statistics); fused experts modules by ``experts.ExpertsRecorder`` (statistics per expert, from the
tokens routed to it). :class:`BlockStatistics` puts both behind one mapping, ``stats[unit name]``, which is what
``HessianFactors`` and the criteria read.
"""

from __future__ import annotations

from typing import Optional

import torch

from .criteria.statistics import InputStatistics, StatisticsRecorder
from .experts import ExpertsRecorder, fused_experts_layout
from .prunable import PrunableWeight

__all__ = ["BlockStatistics"]


class BlockStatistics:
    """Hooks on a block's prunable weights while its calibration rows flow through it (see the module docstring).

    ``all_token_experts``: {experts module name: expert indices} to record from every token entering the module
    (the fallback for experts that too few tokens reach); only those experts are recorded then.
    """

    def __init__(self, weights: dict[str, PrunableWeight], hessian: bool,
                 all_token_experts: Optional[dict[str, list[int]]] = None):
        self._module_units: dict[str, str] = {}  # unit -> the layer whose statistics it reads
        modules = {w.name: w.module for w in weights.values() if w.kind != "experts"}
        sizes = {w.name: w.units[0].in_features for w in weights.values() if w.kind != "experts"}
        self.modules = StatisticsRecorder(modules, hessian, sizes) if modules and all_token_experts is None else None
        self.experts: dict[str, ExpertsRecorder] = {}
        for weight in weights.values():
            if weight.kind == "experts" and weight.experts_module not in self.experts:
                if all_token_experts is not None and weight.experts_module not in all_token_experts:
                    continue
                roles = tuple(role for role, name in (("in", "up"), ("mid", "down"))
                              if _has_role(weights, weight.experts_module, name))
                layout = fused_experts_layout(weight.module)
                self.experts[weight.experts_module] = ExpertsRecorder(
                    weight.experts_module, weight.module, layout, hessian, roles,
                    None if all_token_experts is None else all_token_experts[weight.experts_module])
        self._expert_units: dict[str, tuple[str, str, int]] = {}  # unit -> (experts module, role, expert)
        for weight in weights.values():
            for unit in weight.units:
                if weight.kind == "experts":
                    recorder = self.experts.get(weight.experts_module)
                    role = unit.statistics.rsplit(".", 1)[1]
                    if recorder is not None and (recorder.all_token_experts is None
                                                 or unit.expert in recorder.all_token_experts):
                        self._expert_units[unit.name] = (weight.experts_module, role, unit.expert)
                elif self.modules is not None:
                    self._module_units[unit.name] = unit.statistics

    @property
    def stats(self) -> dict[str, InputStatistics]:
        """Unit name -> its statistics. Looked up on each access: which layers share statistics is only decided
        by the first batch (``StatisticsRecorder``)."""
        stats = {unit: self.modules.stats[layer] for unit, layer in self._module_units.items()}
        stats.update({unit: self.experts[module].stats[role][expert]
                      for unit, (module, role, expert) in self._expert_units.items()})
        return stats

    def adopt(self, other: "BlockStatistics") -> None:
        """Take ``other``'s statistics (an all-token pass of some experts) in place of this pass's for those
        experts; the routing counts stay this pass's."""
        for module, role, expert in other._expert_units.values():
            self.experts[module].stats[role][expert] = other.experts[module].stats[role][expert]

    def unique_stats(self) -> list[InputStatistics]:
        """Each InputStatistics once, in an order every process agrees on (data-parallel runs reduce them)."""
        unique = {id(s): s for s in self.stats.values()}
        return list(unique.values())

    def token_counts(self) -> dict[str, torch.Tensor]:
        """Tokens routed to each expert in this pass (this process), by experts module."""
        return {name: recorder.token_counts for name, recorder in self.experts.items()}

    def remove(self) -> None:
        if self.modules is not None:
            self.modules.remove()
        for recorder in self.experts.values():
            recorder.remove()


def _has_role(weights: dict[str, PrunableWeight], experts_module: str, which: str) -> bool:
    layout = None
    for weight in weights.values():
        if weight.experts_module == experts_module:
            layout = layout or fused_experts_layout(weight.module)
            if (which == "up") == (weight.param_name == layout.up_name):
                return True
    return False

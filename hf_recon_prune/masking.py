"""Choosing a block's masks: its statistics pass, each weight pruned matrix by matrix, and what the report counts.

:class:`MaskSelection` is the part of ``engine.BlockEngine`` that turns one block's calibration inputs into
keep-masks (with the LR update): a statistics pass over its prunable weights (``block_statistics.py``; a second one
for experts too few tokens reach), then every ``MatrixUnit`` of every ``PrunableWeight`` pruned as one linear layer
by the run's criterion, the unit masks assembled into the weight's mask. After the block is final,
``_count_parameters`` records its sparsity the way the report and the card give it. The engine mixes it in; it reads
the engine's ``state``, ``config``, ``layout``, ``model`` and ``_warn``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .block_statistics import BlockStatistics
from .criteria import HessianFactors, LayerPruneResult, PruneRequest
from .experts import experts_needing_fallback
from .methods import prune_linear
from .propagation import RestartPass
from .prunable import MatrixUnit, PrunableWeight, prunable_weights, unprunable_parameters
from .report import BlockReport, timed_stage as _timed
from .sparsity_profile import owl_outlier_ratios, owl_sparsities, weight_sparsity

__all__ = ["MaskSelection"]


class MaskSelection:
    """Mask selection for ``engine.BlockEngine`` (see the module docstring)."""

    @torch.no_grad()
    def allocate_sparsity(self) -> None:
        """With ``sparsity_profile="owl"``: every block's target sparsity from a dense pass over all blocks before
        any is pruned (``sparsity_profile.py``), recorded in the report (which a resumed run restores)."""
        state, cfg, blocks = self.state, self.config, self.layout.blocks
        if cfg.sparsity_profile != "owl":
            return
        first = state.streams["calibration"].sparse[0][state.statistics_rows]

        def statistics_of(index, weights, inputs):
            stats = self._statistics_pass(index, lambda: BlockStatistics(weights, hessian=False), inputs).stats
            if state.data_parallel is not None:
                unique = list({id(s): s for s in stats.values()}.values())
                state.data_parallel.all_reduce_([s.squared_norms for s in unique])
            return stats

        def forward(index, inputs):
            output, _ = state.forward([blocks[index]], [state.kwargs[index]], inputs, block=index)
            self.placement.offload(blocks[index])
            return output

        def weights_of(block):
            return self.prunable_weights(self.placement.onload(block))

        ratios = owl_outlier_ratios(blocks, weights_of, statistics_of, first, forward, cfg.owl_threshold)
        for block_report, ratio, sparsity in zip(state.report.blocks, ratios,
                                                 owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda)):
            block_report.outlier_ratio, block_report.target_sparsity = ratio, sparsity

    def _choose_masks(self, index: int, calibration_inputs: torch.Tensor) -> dict[Any, torch.Tensor]:
        """Statistics of the block's weight inputs, then each weight's mask (and LR update), keyed by
        ``PrunableWeight.key``."""
        state = self.state
        block_report, lr = state.report.blocks[index], state.plan.layer_wise
        weights = self.prunable_weights(self.layout.blocks[index])
        recorder = None
        if state.criterion.needs_statistics(lr) and weights:
            with _timed(block_report, "statistics"):
                recorder = self._record_statistics(index, weights, calibration_inputs[state.statistics_rows])
        stats = recorder.stats if recorder is not None else {}
        factors = None
        if recorder is not None and state.criterion.needs_hessian(lr):
            factors = HessianFactors(stats, self.config.sparsegpt_dampening)
        masks: dict[Any, torch.Tensor] = {}
        with _timed(block_report, "masks_lr"):
            for weight in weights.values():
                masks[weight.key] = self._prune_weight(index, weight, stats, factors)
            if state.data_parallel is not None:
                state.data_parallel.broadcast_([t for key, mask in masks.items() for t in (key.weight.data, mask)])
        return masks

    def _prune_weight(self, index: int, weight: PrunableWeight, stats: dict[str, Any],
                      factors: Optional[HessianFactors]) -> torch.Tensor:
        """Each matrix of ``weight`` pruned as one linear layer; the keep-mask of the whole parameter."""
        block_report = self.state.report.blocks[index]
        keep = None if weight.is_whole else torch.ones_like(weight.weight, dtype=torch.bool)
        for unit in weight.units:
            layer = weight.module if weight.is_whole else unit
            result = self._prune_layer(index, unit.name, layer, stats.get(unit.name),
                                       factors.for_layer(unit.name) if factors else None)
            if result.dampening is not None:
                block_report.dampening[unit.name] = result.dampening
            if keep is None:
                keep = result.keep_mask
            else:
                unit.select(keep).copy_(result.keep_mask)
        return keep

    def _record_statistics(self, index: int, weights: dict[str, PrunableWeight], rows: torch.Tensor
                           ) -> BlockStatistics:
        """One pass over the statistics rows; a second one for experts too few tokens reach (``moe_min_tokens``)."""
        state = self.state
        hessian = state.criterion.needs_hessian(state.plan.layer_wise)
        recorder = self._statistics_pass(index, lambda: BlockStatistics(weights, hessian), rows)
        counts = recorder.token_counts()
        if state.data_parallel is not None and counts:
            state.data_parallel.all_reduce_(list(counts.values()))
        block_report = state.report.blocks[index]
        fallback, minimum = {}, self.config.moe_min_tokens
        for name, routed in counts.items():
            block_report.expert_tokens[name] = [int(n) for n in routed.tolist()]
            threshold = recorder.experts[name].stats["in"][0].in_features if minimum is None else minimum
            needing = experts_needing_fallback(routed, threshold)
            if needing:
                fallback[name] = needing
        if fallback:
            block_report.expert_fallback = fallback
            self._warn(f"block {index}: experts {fallback} were routed fewer calibration tokens than "
                       f"moe_min_tokens ({'their input features' if minimum is None else minimum}); their "
                       "statistics come from every token entering their experts module", index)
            recorder.adopt(self._statistics_pass(index, lambda: BlockStatistics(weights, hessian, fallback), rows))
        if state.data_parallel is not None:
            stats = recorder.unique_stats()
            totals = state.data_parallel.sum_floats(float(s.num_tokens) for s in stats)
            for statistics, count in zip(stats, totals):
                statistics.num_tokens = int(count)
            state.data_parallel.all_reduce_([t for s in stats for t in s.accumulators()])
        return recorder

    def _statistics_pass(self, index: int, make_recorder: Callable[[], BlockStatistics], rows: torch.Tensor
                         ) -> BlockStatistics:
        state, block = self.state, self.layout.blocks[index]
        while True:  # out of memory part-way: the hooks hold part of a batch, so start the pass again
            recorder = make_recorder()
            try:
                state.forward([block], [state.kwargs[index]], rows, keep_output=False, block=index,
                              restart_on_oom=True)
                return recorder
            except RestartPass:
                continue
            finally:
                recorder.remove()

    def _prune_layer(self, index: int, name: str, layer: Union[nn.Linear, MatrixUnit], stats, factor
                     ) -> LayerPruneResult:
        """Mask (and LR-update) one linear layer or matrix unit; with ``keep_existing_zeros`` its zeros stay and
        count."""
        cfg = self.config
        existing = layer.weight == 0
        zeros = int(existing.sum())
        self.state.existing_zeros[0] += zeros
        self.state.existing_zeros[1] += existing.numel()
        sparsity = self._target_sparsity(self.state.report.blocks[index], name)
        request = PruneRequest(
            sparsity, cfg.nm, stats, self.state.plan.layer_wise, cfg.sparsegpt_block_size, cfg.sparsegpt_dampening,
            name=f"block {index} {name}", factor=factor, keep_zeros=existing if cfg.keep_existing_zeros and zeros else None,
        )
        return prune_linear(layer, cfg.method, request)

    def _target_sparsity(self, block_report: BlockReport, name: str) -> float:
        """The sparsity weight ``name`` of the block is pruned to: the block's (OWL) or the config's, unless an
        override names it."""
        block_sparsity = block_report.target_sparsity
        return weight_sparsity(name, self.config.sparsity if block_sparsity is None else block_sparsity,
                               self.config.sparsity_overrides)

    def _count_parameters(self, block: nn.Module, block_report: BlockReport) -> None:
        """The block's sparsity as the report and the card give it: per weight, and over what was eligible. A weight
        an override sets to sparsity 0 was left dense on purpose, so it counts as dense, not as eligible."""
        weights = self.prunable_weights(block)
        left = unprunable_parameters(block, weights)
        sizes = {name: block.get_parameter(name).numel() for name in left}
        sparsity, zeros_total, eligible = {}, 0, 0
        for name, weight in weights.items():
            zeros = int((weight.weight == 0).sum())
            sparsity[name] = zeros / max(weight.weight.numel(), 1)
            if self._target_sparsity(block_report, name) == 0.0:
                left[weight.parameter_name] = "sparsity override 0"
                sizes[weight.parameter_name] = weight.weight.numel()
                continue
            zeros_total += zeros
            eligible += weight.weight.numel()
        block_report.layer_sparsity = sparsity
        counts = {"block": sum(p.numel() for p in block.parameters()), "eligible": eligible, "pruned": zeros_total}
        block_report.left_dense = left
        for name, reason in left.items():
            key = f"dense:{reason}"
            counts[key] = counts.get(key, 0) + sizes[name]
        block_report.parameters = counts
        unsupported = sorted(name for name, reason in left.items() if reason == "unsupported")
        if unsupported:
            self._warn(f"block {block_report.index}: parameters the engine cannot prune were left dense: "
                       f"{', '.join(unsupported)}", block_report.index)

    def prunable_weights(self, block: nn.Module) -> dict[str, PrunableWeight]:
        return prunable_weights(block, self.config.include_modules, self.config.exclude_modules,
                                self.model.config.get_text_config())

    def prunable(self, block: nn.Module) -> dict[str, Any]:
        """The block's mask keys by weight name (what masks, checkpoints and BR are keyed by)."""
        return {name: weight.key for name, weight in self.prunable_weights(block).items()}

    def named_masks(self, index: int, masks: dict[Any, torch.Tensor]) -> dict[str, torch.Tensor]:
        lookup = {id(key): name for name, key in self.prunable(self.layout.blocks[index]).items()}
        return {f"{self.layout.blocks_path}.{index}.{lookup[id(key)]}": mask for key, mask in masks.items()}

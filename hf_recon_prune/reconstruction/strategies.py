"""What each ``reconstruction_mode`` trains in a window, and how it keeps the pruned weights at zero.

The trainer (``block_trainer.py``) is the same for every mode; a :class:`TrainingStrategy` supplies the parameters
that the mode trains and the steps around training that differ. :func:`training_strategy` picks one by the mode's
name from :data:`TRAINING_STRATEGIES`.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .masked_delta import MaskedDeltaHandle, attach_masked_deltas
from .masked_lora import MaskedLoraHandle, attach_masked_lora, merge_masked_lora, unload_masked_lora
from .settings import BlockTrainingSettings

__all__ = ["TrainingStrategy", "FullWeights", "MaskedLora", "TRAINING_STRATEGIES", "training_strategy",
           "REMASK_AFTER_EVERY_STEP"]

Masks = Mapping[nn.Linear, torch.Tensor]

#: Full mode re-applied every keep-mask after every optimizer step before 2026-12-05; it no longer does (off), since
#: the masked gradient already keeps pruned weights at exactly zero (see :class:`FullWeights`). On: the old way, for
#: ``benchmarks/br_step_profile.py --remask both`` and for the tests that compare the two.
REMASK_AFTER_EVERY_STEP = False


class TrainingStrategy:
    """One window's training in one mode. The trainer calls, in order: :meth:`trainable_parameters`,
    :meth:`mask_gradients` (once those require grad), the steps (re-applying :attr:`masks_to_reapply` after each),
    :meth:`finish` when training succeeded, and :meth:`close` always, before it restores the window."""

    def __init__(self, settings: BlockTrainingSettings):
        self.settings = settings

    def trainable_parameters(self, blocks: Sequence[nn.Module], kept: Masks) -> list[nn.Parameter]:
        """The parameters this mode trains (the blocks' other parameters are the trainer's business)."""
        raise NotImplementedError

    def mask_gradients(self) -> None:
        """Make the pruned entries' gradients zero, where the mode needs it."""

    @property
    def masks_to_reapply(self) -> Masks:
        """Masks to re-apply after every optimizer step (to the pruned linears' weights)."""
        return {}

    def finish(self) -> None:
        """Make the trained window plain again."""

    def close(self) -> None:
        """Remove whatever the strategy added to the blocks and has not removed yet."""


class FullWeights(TrainingStrategy):
    """``"full"``: trains the kept weights of every pruned linear in place. A hook zeroes the pruned entries of the
    gradient, which is all it takes to keep them at zero: a pruned weight starts at exactly zero, its Adam moments
    start at zero and only ever see zero gradients, so its update is ``0 / (0 + eps) = 0`` at every step (Adam here
    has no weight decay). Re-masking the weights after each step as well changes no value and cost a pass over every
    weight and mask a step (:data:`REMASK_AFTER_EVERY_STEP`)."""

    def __init__(self, settings: BlockTrainingSettings):
        super().__init__(settings)
        self._kept: Masks = {}
        self._hooks: list = []

    def trainable_parameters(self, blocks: Sequence[nn.Module], kept: Masks) -> list[nn.Parameter]:
        self._kept = kept
        return [layer.weight for layer in kept]

    def mask_gradients(self) -> None:
        for layer, keep in self._kept.items():
            self._hooks.append(layer.weight.register_hook(functools.partial(_mask_grad, keep)))

    @property
    def masks_to_reapply(self) -> Masks:
        return self._kept if REMASK_AFTER_EVERY_STEP else {}

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class MaskedLora(TrainingStrategy):
    """``"lora"``: trains masked LoRA adapters on the targeted pruned weights and merges them with the masked merge.
    Pruned ``nn.Linear`` layers get peft adapters (``masked_lora.py``); the weights peft has no layer for (fused
    experts, Conv1D) get masked low-rank deltas of the same form (``masked_delta.py``). Both apply the mask to the
    effective weight, so neither gradient hooks nor re-masking are needed; the pruned weights themselves do not
    train."""

    def __init__(self, settings: BlockTrainingSettings):
        super().__init__(settings)
        self._handle: Optional[MaskedLoraHandle] = None
        self._deltas: Optional[MaskedDeltaHandle] = None

    def trainable_parameters(self, blocks: Sequence[nn.Module], kept: Masks) -> list[nn.Parameter]:
        settings = self.settings
        linears = {key: mask for key, mask in kept.items() if isinstance(key, nn.Module)}
        self._handle = attach_masked_lora(blocks, linears, settings.lora_rank, settings.lora_alpha,
                                          settings.lora_target_modules, seed=settings.seed)
        patterns = [re.compile(p) for p in (settings.lora_target_modules or [])]
        others = [key for key in kept if not isinstance(key, nn.Module)
                  and (not patterns or any(p.search(key.name) for p in patterns))]
        self._deltas = attach_masked_deltas(kept, settings.lora_rank, settings.lora_alpha, others,
                                            seed=None if settings.seed is None else settings.seed + 1)
        return self._handle.parameters() + self._deltas.parameters()

    def finish(self) -> None:
        merge_masked_lora(self._handle)
        self._deltas.merge()

    def close(self) -> None:
        if self._handle is not None and self._handle.active:
            unload_masked_lora(self._handle)  # not merged: the trainer restores the weights
        if self._deltas is not None:
            self._deltas.unload()


#: The strategy of each ``reconstruction_mode``.
TRAINING_STRATEGIES: dict[str, type[TrainingStrategy]] = {"full": FullWeights, "lora": MaskedLora}


def training_strategy(settings: BlockTrainingSettings) -> TrainingStrategy:
    """A fresh strategy for one window in ``settings.reconstruction_mode``; ValueError for an unknown mode."""
    try:
        strategy = TRAINING_STRATEGIES[settings.reconstruction_mode]
    except KeyError:
        raise ValueError(f"unknown reconstruction_mode {settings.reconstruction_mode!r}") from None
    return strategy(settings)


def _mask_grad(keep: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # one kernel and no inverted mask (``masked_fill(~keep, 0)`` is two and allocates one); a non-finite gradient of
    # a pruned entry becomes 0 either way
    return torch.where(keep, grad, 0.0)

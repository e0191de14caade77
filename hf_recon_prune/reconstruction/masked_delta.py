"""Masked low-rank deltas for the pruned weights peft has no LoRA layer for: fused experts, Conv1D, routers.

For a weight ``W`` (one matrix, or a stack of expert matrices ``[experts, out, in]``, possibly stored transposed)
with keep-mask ``M``, the delta is one rank-``r`` product per matrix, ``B_e @ A_e`` (``A`` Kaiming-uniform, ``B``
zero, as peft initialises LoRA), and the weight the module computes with is

    M * (W + s * B @ A),        s = lora_alpha / rank

exactly the expression ``masked_lora.py`` uses for ``nn.Linear``. It is applied as a ``torch.nn.utils.parametrize``
parametrization of the parameter, so the module's own forward (whatever experts implementation it dispatches to)
sees the masked weight; merging evaluates the same expression once and writes it into the original parameter
object (``remove_parametrizations(leave_parametrized=True)``), so the merged weight is bit for bit the one training
used and keeps the mask. The module's forward runs under ``parametrize.cached()``, so an implementation that indexes
the parameter once per expert does not recompute the delta each time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["MaskedLowRankDelta", "MaskedDeltaHandle", "attach_masked_deltas"]


class MaskedLowRankDelta(nn.Module):
    """The parametrization ``W -> M * (W + s * B @ A)``, one low-rank product per matrix of ``W``."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, rank: int, alpha: float, transposed: bool,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.stacked, self.transposed, self.scale = weight.dim() == 3, transposed, alpha / rank
        count = weight.shape[0] if self.stacked else 1
        matrix = weight[0] if self.stacked else weight
        out_features, in_features = (matrix.shape[1], matrix.shape[0]) if transposed else tuple(matrix.shape)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft's lora_A
        a = torch.empty(count, rank, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(count, out_features, rank, dtype=torch.float32, device=weight.device))
        self.register_buffer("mask", mask.to(device=weight.device, dtype=torch.bool), persistent=False)

    def delta(self) -> torch.Tensor:
        delta = self.scale * (self.lora_B @ self.lora_A)
        if self.transposed:
            delta = delta.transpose(-1, -2)
        return delta if self.stacked else delta[0]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight + self.delta().to(weight.dtype)) * self.mask


@dataclass
class MaskedDeltaHandle:
    """The deltas :func:`attach_masked_deltas` registered (the blocks of a window have weights of equal names)."""

    deltas: list[tuple[Any, MaskedLowRankDelta]] = field(default_factory=list)  # (weight, its delta)
    forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)
    active: bool = True

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, delta in self.deltas for p in (delta.lora_A, delta.lora_B)]

    def merge(self) -> None:
        """Write ``M * (W + s * B @ A)`` into each original parameter and remove the parametrizations."""
        self._remove(leave_parametrized=True)

    def unload(self) -> None:
        """Remove the parametrizations, leaving the original parameters as they were."""
        self._remove(leave_parametrized=False)

    def _remove(self, leave_parametrized: bool) -> None:
        if not self.active:
            return
        for module, previous in self.forwards:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        with torch.no_grad():
            for weight, _ in self.deltas:
                if parametrize.is_parametrized(weight.module, weight.param_name):
                    parametrize.remove_parametrizations(weight.module, weight.param_name,
                                                        leave_parametrized=leave_parametrized)
        self.active = False


def _cached_forward(module: nn.Module):
    previous = module.__dict__.get("forward")

    def forward(*args, **kwargs):
        with parametrize.cached():
            return (previous or type(module).forward.__get__(module))(*args, **kwargs)

    module.forward = forward
    return previous


def attach_masked_deltas(masks: Mapping[Any, torch.Tensor], rank: int, alpha: float,
                         targets: Iterable[Any], seed: Optional[int] = None) -> MaskedDeltaHandle:
    """A masked low-rank delta on each of ``targets`` (``prunable.PrunableWeight`` keys of ``masks``)."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    handle = MaskedDeltaHandle()
    try:
        for weight in targets:
            delta = MaskedLowRankDelta(weight.weight.detach(), masks[weight], rank, alpha, weight.transposed, generator)
            if weight.module not in {m for m, _ in handle.forwards}:
                handle.forwards.append((weight.module, _cached_forward(weight.module)))
            parametrize.register_parametrization(weight.module, weight.param_name, delta, unsafe=True)
            handle.deltas.append((weight, delta))
    except BaseException:
        handle.unload()
        raise
    return handle

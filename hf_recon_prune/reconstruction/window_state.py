"""The exact revert snapshot of a window, and its float32 master weights for the duration of training."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["WindowState", "apply_masks"]


class WindowState:
    """Everything training changes on a window's blocks, saved when made, to be put back by :meth:`restore`.

    A copy of every parameter (original dtype) is kept, in pinned CPU memory when the window is on a GPU (on its
    device otherwise), so that a failed or reverted training restores the window bit-exactly.
    """

    def __init__(self, blocks: Sequence[nn.Module]):
        self.blocks = list(blocks)
        self.params = unique_parameters(self.blocks)
        self._snapshot = [_snapshot(p) for p in self.params]
        self._requires_grad = [p.requires_grad for p in self.params]
        self._grads = [p.grad for p in self.params]
        self._dtypes = [p.dtype for p in self.params]
        self._training_modes = [block.training for block in self.blocks]

    def prepare(self, kept: Mapping[nn.Linear, torch.Tensor]) -> None:
        """Nothing requires grad or holds a gradient, floating parameters are float32 (the same Parameter objects),
        the blocks are in eval mode (no dropout) and the pruned weights are exactly zero."""
        for param in self.params:
            param.requires_grad_(False)
            param.grad = None
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        for block in self.blocks:
            block.eval()
        apply_masks(kept)

    def restore(self, kept: Mapping[nn.Linear, torch.Tensor], keep_trained: bool) -> None:
        """Put back the flags, gradients and train/eval modes, and either the trained weights in their original
        dtypes (``keep_trained``) or every parameter's value at construction, bit for bit."""
        with torch.no_grad():
            for param, saved, dtype in zip(self.params, self._snapshot, self._dtypes):
                if not keep_trained:
                    param.data = saved.to(param.device)
                elif param.dtype != dtype:
                    param.data = param.data.to(dtype)
            if keep_trained:
                apply_masks(kept)  # a no-op unless a float cast could have touched zeros
        for param, flag, grad in zip(self.params, self._requires_grad, self._grads):
            param.grad = grad
            param.requires_grad_(flag)
        for block, mode in zip(self.blocks, self._training_modes):
            block.train(mode)


@torch.no_grad()
def apply_masks(kept: Mapping[nn.Linear, torch.Tensor]) -> None:
    """Set every pruned weight (False in its keep-mask) to exactly zero."""
    for layer, keep in kept.items():
        layer.weight.masked_fill_(~keep, 0)


def unique_parameters(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for block in blocks:
        for param in block.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def _snapshot(param: torch.Tensor) -> torch.Tensor:
    """A copy of ``param`` to restore it from: in pinned CPU memory when it lives on a GPU, where the window's
    memory is scarcest (restoring is rare; copying out costs milliseconds)."""
    if param.device.type == "cuda":
        copy = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
        return copy.copy_(param.detach())
    return param.detach().clone()

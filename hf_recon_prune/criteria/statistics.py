"""Per-layer input statistics gathered while calibration activations flow through a block.

The Hessian's Gram matrix is the expensive part (``2 T d_in^2`` FLOPs per layer). When the inputs are bfloat16 or
float16 on a GPU, it is accumulated with tensor cores at no loss of accuracy: every product of two 8- or 11-bit
mantissas is exact in float32 and the sums are float32, exactly as in a float32 matmul (only the summation order
differs). That uses ``torch.mm(..., out_dtype=torch.float32)`` where the installed torch has it, else a float32 matmul
with TF32 allowed for the call (TF32 holds bf16/fp16 values exactly). Float32 inputs and CPU tensors take the plain
float32 path.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE: Optional[bool] = None  # does torch.mm(..., out_dtype=) work on CUDA here? decided on first use


def gram_update_(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x^T x`` in float32 for ``x`` of shape [tokens, d] (any float dtype); see the module docstring."""
    global _MM_OUT_DTYPE
    if x.device.type == "cuda" and x.dtype in _LOW_PRECISION:
        if _MM_OUT_DTYPE is not False:
            try:
                gram.add_(torch.mm(x.T, x, out_dtype=torch.float32))
                _MM_OUT_DTYPE = True
                return
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE = False
        x32 = x.to(torch.float32)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            gram.addmm_(x32.T, x32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        return
    x32 = x.to(torch.float32)
    gram.addmm_(x32.T, x32)


#: tokens per chunk of the squared-norm sum: bounds its float32 temporaries (two [chunk, d_in] tensors)
_NORM_CHUNK_TOKENS = 2048


class InputStatistics:
    """Accumulates what the criteria need from a linear layer's inputs, over every calibration token.

    ``squared_norms[j] = sum_t x_tj^2`` (Wanda's ||X_j||^2) and, when ``hessian`` is requested, the float32 Gram matrix
    ``H = X^T X / T`` (SparseGPT's Hessian up to a constant factor, which neither the mask nor the update depends on).
    The Gram matrix is allocated at the first tokens, and :meth:`take_hessian` hands it over instead of copying it.
    """

    def __init__(self, in_features: int, device: torch.device, hessian: bool):
        self.num_tokens = 0
        self.in_features = in_features
        self.device = device
        self.squared_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._wants_hessian = hessian
        self._gram: Optional[torch.Tensor] = None

    def _gram_matrix(self) -> torch.Tensor:
        if not self._wants_hessian:
            raise RuntimeError("this InputStatistics was created without a Hessian")
        if self._gram is None:
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
        return self._gram

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        self.num_tokens += x.shape[0]
        for chunk in x.split(_NORM_CHUNK_TOKENS):
            self.squared_norms += chunk.to(torch.float32).square().sum(0)
        if self._wants_hessian:
            gram_update_(self._gram_matrix(), x)

    def accumulators(self) -> list[torch.Tensor]:
        """The tensors that add up over tokens; data-parallel runs sum them (and ``num_tokens``) over processes."""
        return [self.squared_norms] + ([self._gram_matrix()] if self._wants_hessian else [])

    @property
    def hessian(self) -> torch.Tensor:
        """``X^T X / T``, a new tensor (the statistics keep accumulating)."""
        return self._gram_matrix() / max(self.num_tokens, 1)

    def take_hessian(self) -> torch.Tensor:
        """``X^T X / T`` computed in place in the Gram matrix, which the statistics give up (no copy of d_in^2)."""
        gram = self._gram_matrix()
        self._gram = None
        self._wants_hessian = False
        return gram.div_(max(self.num_tokens, 1))

    @property
    def column_norms(self) -> torch.Tensor:
        return self.squared_norms.sqrt()


class StatisticsRecorder:
    """Forward hooks that feed each linear's inputs into its InputStatistics while ``active``.

    Layers that read the very same input tensor as the layer hooked just before them (q/k/v of an attention, gate/up
    of a gated MLP) share that layer's InputStatistics: ``stats[name]`` is then the same object for all of them, its
    Gram matrix is accumulated once, and a criterion that needs the Hessian factors it once. Which layers share is
    decided by the first batch and checked on every later one.
    """

    def __init__(self, layers: dict[str, nn.Module], hessian: bool, in_features: Optional[dict[str, int]] = None):
        in_features = in_features or {}
        self.stats = {
            name: InputStatistics(in_features.get(name) or layer.in_features, layer.weight.device, hessian)
            for name, layer in layers.items()
        }
        self.shares_input_with: dict[str, str] = {}  # follower layer -> the layer whose statistics it uses
        self.active_rows: Optional[torch.Tensor] = None  # None: every row of the batch counts
        self.active = True
        self._seen: set[str] = set()
        self._previous: Optional[tuple[str, weakref.ref]] = None  # the last hooked layer and its input
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _same_input_as_previous(self, x: torch.Tensor) -> Optional[str]:
        if self._previous is None:
            return None
        name, ref = self._previous
        return name if ref() is x else None

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.active:
                return
            x = args[0]
            previous = self._same_input_as_previous(x)
            self._previous = (name, weakref.ref(x))
            if name not in self._seen:
                self._seen.add(name)
                if previous is not None:
                    leader = self.shares_input_with.get(previous, previous)
                    self.shares_input_with[name] = leader
                    self.stats[name] = self.stats[leader]
            leader = self.shares_input_with.get(name)
            if leader is not None:
                if previous is None or self.shares_input_with.get(previous, previous) != leader:
                    raise RuntimeError(f"{name} read the same input as {leader} in the first batch but not in a "
                                       "later one; the statistics cannot be shared")
                return  # the leader has added this batch already
            if self.active_rows is not None:
                x = x[self.active_rows]
            if x.numel():
                self.stats[name].add(x.detach())

        return hook

    def unique_stats(self) -> list[InputStatistics]:
        """Each InputStatistics once (shared ones are reached from several layers)."""
        unique = {id(s): s for s in self.stats.values()}
        return list(unique.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._previous = None

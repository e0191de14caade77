"""The KV cache self-generation decodes with: transformers' dynamic cache, without its copy at every step.

transformers' ``DynamicLayer`` appends a decoding step's keys and values with ``torch.cat``, which copies the whole
cache of the layer into a new tensor at every step. At the Llama-2-7B shape with 126 rows of 1024 tokens that made a
step 2.5x slower than transformers' static cache (91.6 ms against 37.3 ms on an H200, docs/benchmarks.md). A static
cache avoids the copy, but it attends over its whole length at every step, under an explicit mask; on the
SmolLM2 shape (float32, grouped-query attention) it was slower than the dynamic cache. :class:`PreallocatedLayer`
is a ``DynamicLayer`` whose keys and values are views of buffers sized for the whole generation: an append writes
the new positions only, and everything else (the mask, the sequence length, the attention) is the dynamic cache's,
so the samples are the same.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch

try:  # transformers >= 5: caches made of layers
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the plain dynamic cache is used
    DynamicCache = DynamicLayer = None

__all__ = ["PositionedLayer", "PreallocatedLayer", "cache_argument_name", "positioned_cache", "preallocated_cache"]


if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):
        """A dynamic cache layer whose ``keys`` / ``values`` are the filled part of buffers of ``capacity`` positions
        (grown by doubling if a generation needs more). When something replaced them by other tensors (a batch
        selection, a reorder), the layer goes back to appending by ``torch.cat``, so it stays correct."""

        # Not registered as a layer type: transformers must keep building DynamicLayer for everyone else.
        _layer_type = None

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = int(capacity)
            self._key_buffer: Optional[torch.Tensor] = None
            self._value_buffer: Optional[torch.Tensor] = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if self.is_initialized and not self._views_of_buffers():
                return super().update(key_states, value_states, *args, **kwargs)
            length = self.get_seq_length() if self.is_initialized else 0
            end = length + key_states.shape[-2]
            if not self._buffers_fit(key_states, value_states, end):
                self._allocate(key_states, value_states, length, end)
            self._key_buffer[..., length:end, :].copy_(key_states)
            self._value_buffer[..., length:end, :].copy_(value_states)
            self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
            self.device, self.is_initialized = key_states.device, True
            return self.keys, self.values

        def _views_of_buffers(self) -> bool:
            return (self._key_buffer is not None and self.keys is not None and self.keys.numel() > 0
                    and self.keys.data_ptr() == self._key_buffer.data_ptr()
                    and self.keys.stride() == self._key_buffer.stride()
                    and self.values.data_ptr() == self._value_buffer.data_ptr())

        def _buffers_fit(self, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> bool:
            def fits(buffer: Optional[torch.Tensor], states: torch.Tensor) -> bool:
                return (buffer is not None and buffer.shape[:-2] == states.shape[:-2]
                        and buffer.shape[-1] == states.shape[-1] and buffer.shape[-2] >= end
                        and buffer.dtype == states.dtype and buffer.device == states.device)

            return fits(self._key_buffer, key_states) and fits(self._value_buffer, value_states)

        def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
            positions = max(self.capacity, end) if length == 0 else max(end, 2 * self._key_buffer.shape[-2])
            kept = (self.keys, self.values) if length else None

            def buffer(states: torch.Tensor) -> torch.Tensor:
                return states.new_empty((*states.shape[:-2], positions, states.shape[-1]))

            self._key_buffer, self._value_buffer = buffer(key_states), buffer(value_states)
            if kept is not None:
                self._key_buffer[..., :length, :].copy_(kept[0])
                self._value_buffer[..., :length, :].copy_(kept[1])

    class PositionedLayer(DynamicLayer):
        """A cache layer for decoding in CUDA graphs (``graphed_decoding.py``): keys and values live in zeroed buffers
        of ``positions.capacity`` positions; an update writes them at the positions ``positions.current`` (a device
        tensor) onwards and returns the first ``positions.window`` positions (a host value, fixed per captured graph),
        which attention reads under the caller's mask. Nothing depends on the position's value on the host, so a
        captured step replays at the right position."""

        _layer_type = None

        def __init__(self, positions: Any):
            super().__init__()
            self.positions = positions

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                capacity = self.positions.capacity

                def buffer(states: torch.Tensor) -> torch.Tensor:
                    # Zeros, not empty memory: masked positions get weight 0, and 0 * NaN would still be NaN.
                    return states.new_zeros((*states.shape[:-2], capacity, states.shape[-1]))

                self.keys, self.values = buffer(key_states), buffer(value_states)
                self.device, self.is_initialized = key_states.device, True
            index = self.positions.current + self.positions.offsets[:key_states.shape[-2]]
            self.keys.index_copy_(-2, index, key_states)
            self.values.index_copy_(-2, index, value_states)
            window = self.positions.window
            return self.keys[..., :window, :], self.values[..., :window, :]

        def get_seq_length(self) -> int:
            return self.positions.capacity if self.is_initialized else 0

else:  # pragma: no cover
    PreallocatedLayer = PositionedLayer = None


def preallocated_cache(model: Any, capacity: int) -> Optional[Any]:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are :class:`PreallocatedLayer` of ``capacity``
    positions, or None where generate must build its own cache (the model does not take a ``DynamicCache``, or it
    has no plain full-attention layer to replace: sliding-window and linear-attention layers are kept as they are)."""
    if PreallocatedLayer is None:
        return None
    return _cache_of(model, functools.partial(PreallocatedLayer, capacity), every_layer=False)


def positioned_cache(model: Any, positions: Any) -> Optional[Any]:
    """A ``DynamicCache`` for ``model`` made only of :class:`PositionedLayer` sharing ``positions``, or None when
    the model has any layer other than plain full attention (sliding-window, linear attention: they keep their own
    cache classes, which a captured step cannot drive)."""
    if PositionedLayer is None:
        return None
    return _cache_of(model, functools.partial(PositionedLayer, positions), every_layer=True)


def _cache_of(model: Any, make_layer: Any, every_layer: bool) -> Optional[Any]:
    """``model``'s ``DynamicCache`` with its plain ``DynamicLayer`` layers made by ``make_layer`` (all of them when
    ``every_layer``), or None where that cannot be done."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    if not layers:  # built lazily, one layer per attention layer that calls update
        if getattr(cache, "layer_class_to_replicate", None) is not DynamicLayer:
            return None
        cache.layer_class_to_replicate = make_layer
        return cache
    plain = [index for index, layer in enumerate(layers) if type(layer) is DynamicLayer]
    if not plain or (every_layer and len(plain) != len(layers)):
        return None
    for index in plain:
        layers[index] = make_layer()
    return cache


def cache_argument_name(model: Any) -> str:
    """The keyword ``model.generate`` takes a cache object by: ``cache`` since transformers renamed it,
    ``past_key_values`` before (what the model's ``forward`` names it)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"

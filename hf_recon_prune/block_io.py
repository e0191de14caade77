"""Calling one decoder block on captured inputs, independent of the model family.

transformers 5.x decoder layers return a tensor, older releases a tuple whose first item is the hidden states; the
keyword arguments the model computes once per forward (attention mask, position ids, rotary embeddings) are captured
by the engine and passed to every call.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn


def move_to(obj: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move every floating tensor in a nested structure to device (and dtype); integer/bool tensors keep their dtype."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device) if device is not None else obj
    if isinstance(obj, dict):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(move_to(v, device, dtype) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device, dtype) for v in obj]
    return obj


def call_block(block: nn.Module, hidden_states: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder block on a batch [B, L, d]; the captured kwargs have batch size 1 and broadcast over B."""
    output = block(hidden_states, **block_kwargs)
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output


def call_window(blocks: Sequence[nn.Module], hidden_states: torch.Tensor, kwargs_per_block: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Several consecutive blocks (a CR window) applied in order."""
    for block, block_kwargs in zip(blocks, kwargs_per_block):
        hidden_states = call_block(block, hidden_states, block_kwargs)
    return hidden_states


def batches(num_rows: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, num_rows, batch_size):
        yield slice(start, min(start + batch_size, num_rows))


def halved_after_out_of_memory(size: int, error: BaseException, at_one_row: str) -> int:
    """The micro-batch to retry with after ``error`` (out of memory) at ``size`` rows: half of it, with the device's
    cached blocks released; at one row there is nothing left to halve, so raise ``at_one_row`` (which should say
    what to change) chained to ``error``."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if size <= 1:
        raise torch.OutOfMemoryError(f"{at_one_row} ({error})") from error
    return size // 2

"""Capturing what the decoder blocks receive: the hidden states entering block 0 and each block's keyword arguments.

Rather than rebuilding attention masks and rotary embeddings per architecture, we let the model compute them: each
block's ``forward`` is temporarily replaced (on the instance, so accelerate hooks and attributes such as
``attention_type`` stay in place) by a recorder that returns its input unchanged. One batch-1 pass through the base
model records every block's kwargs (sliding-window and full-attention layers can receive different masks); the
calibration pass stops at block 0 and keeps only its input.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .block_io import batches


class _StopForward(Exception):
    pass


_DROPPED_KWARGS = {"past_key_values", "past_key_value", "cache", "layer_past", "output_attentions"}


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    cleaned = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
    if "use_cache" in cleaned:
        cleaned["use_cache"] = False
    return cleaned


@contextlib.contextmanager
def _replaced_forwards(blocks: Sequence[nn.Module], make_forward: Callable[[int], Callable]) -> Iterator[None]:
    saved = []
    for index, block in enumerate(blocks):
        saved.append(block.__dict__.get("forward"))
        block.forward = make_forward(index)
    try:
        yield
    finally:
        for block, previous in zip(blocks, saved):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    if args:
        return args[0], dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), kwargs


def _input_device(model: nn.Module, fallback: torch.device) -> torch.device:
    weight = model.get_input_embeddings().weight
    return fallback if weight.device.type == "meta" else weight.device


def _move_once(obj: Any, device: torch.device, moved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Like ``move_to``, but a tensor that several blocks receive (rotary embeddings, the mask) is moved once and
    shared, instead of one device copy per block (an [L, L] mask for every block of a deep model adds up)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in moved:
            moved[id(obj)] = (obj, obj.to(device))  # keeping obj alive keeps its id from being reused
        return moved[id(obj)][1]
    if isinstance(obj, dict):
        return {k: _move_once(v, device, moved) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_move_once(v, device, moved) for v in obj)
    if isinstance(obj, list):
        return [_move_once(v, device, moved) for v in obj]
    return obj


@torch.no_grad()
def capture_block_kwargs(
    base_model: nn.Module, blocks: Sequence[nn.Module], sample_ids: torch.Tensor, device: torch.device
) -> list[dict[str, Any]]:
    """Keyword arguments every block receives for a batch of one sequence of this length (broadcast over batches)."""
    records: list[Optional[dict]] = [None] * len(blocks)
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_forward(index: int):
        def record(*args, **kwargs):
            hidden, rest = _split_hidden(args, kwargs)
            records[index] = _move_once(_clean_kwargs(rest), device, moved)
            return hidden

        return record

    with _replaced_forwards(blocks, make_forward):
        base_model(input_ids=sample_ids[:1].to(_input_device(base_model, device)), use_cache=False)
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} were never called by {type(base_model).__name__}.forward")
    return records  # type: ignore[return-value]


@torch.no_grad()
def capture_first_block_inputs(
    base_model: nn.Module,
    first_block: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    out: torch.Tensor,
) -> torch.Tensor:
    """Fill ``out`` [N, L, d] with the hidden states that enter block 0 for every row of ``input_ids``, batched."""

    def make_forward(_index: int):
        def stop(*args, **kwargs):
            hidden, _ = _split_hidden(args, kwargs)
            raise _StopForward(hidden)

        return stop

    input_device = _input_device(base_model, device)
    with _replaced_forwards([first_block], make_forward):
        for rows in batches(input_ids.shape[0], batch_size):
            try:
                base_model(input_ids=input_ids[rows].to(input_device), use_cache=False)
            except _StopForward as stop:
                out[rows] = stop.args[0].to(out.device, out.dtype)
            else:
                raise RuntimeError(f"{type(base_model).__name__}.forward never reached its first decoder block")
    return out

"""Placement: which device runs a block, where the activation streams live, and moving blocks there and back."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def execution_device(requested: Optional[str]) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: Optional[str], default: torch.dtype) -> torch.dtype:
    return default if name is None else _DTYPES[name]


def module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def stream_device(location: str, device: torch.device, bytes_needed: int) -> torch.device:
    """'device' and 'cpu' are taken as said; 'auto' keeps the streams on the device when they use < 40% of its free memory."""
    if location == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if location == "device":
        return device
    free, _total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (bytes_needed * 10, 0)
    return device if bytes_needed < 0.4 * free else torch.device("cpu")


def allocate_stream(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if pin and device.type == "cpu" and torch.cuda.is_available():
        tensor = tensor.pin_memory()
    return tensor


class BlockPlacement:
    """Moves a block to the execution device for its turn and back to where it lived."""

    def __init__(self, device: torch.device):
        self.device = device
        self._home: dict[int, torch.device] = {}

    def onload(self, block: nn.Module) -> nn.Module:
        home = module_device(block)
        if home.type == "meta":
            raise NotImplementedError(
                "blocks offloaded by accelerate (meta device) are not supported yet; load the model on CPU or GPU"
            )
        self._home.setdefault(id(block), home)
        if home != self.device:
            block.to(self.device)
        return block

    def offload(self, block: nn.Module) -> None:
        home = self._home.pop(id(block), None)
        if home is not None and home != self.device:
            block.to(home)

"""Fingerprints of a pruning run: what a checkpoint must match to be resumed (``checkpoint.py`` uses them).

The configuration (execution-only fields excepted), the model's structure, the calibration token ids, and a strided
sample of every block's weights (to tell the dense blocks a run started from from modified ones).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Optional

import torch

#: PruningConfig fields that change where things live, not the result: a run may resume with other values.
EXECUTION_ONLY_FIELDS = ("checkpoint_dir", "stream_location", "stream_folder", "max_device_memory")


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def comparable_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config entries that must match for a resume (all but ``EXECUTION_ONLY_FIELDS``)."""
    return {k: v for k, v in config_dict.items() if k not in EXECUTION_ONLY_FIELDS}


def run_fingerprint(config_dict: dict[str, Any], model_info: dict[str, Any], calibration: str) -> str:
    """What a checkpoint must match: the comparable config, the model's structure, the calibration fingerprint."""
    return _digest([comparable_config(config_dict), model_info, calibration])


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 over the shapes, dtypes and bytes of CPU copies of ``tensors`` (calibration ids, masks)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, blocks: Iterable[torch.nn.Module]) -> dict[str, Any]:
    """The model's class, block count and the names, shapes and dtypes of the first block's tensors."""
    blocks = list(blocks)
    first = blocks[0] if blocks else None
    tensors = [] if first is None else [
        [name, list(t.shape), str(t.dtype)] for name, t in first.state_dict().items()
    ]
    return {"class": type(model).__name__, "num_blocks": len(blocks), "first_block": _digest(tensors)}


def block_weights_sample(block: torch.nn.Module, elements: int = 256) -> Optional[str]:
    """sha256 of a strided sample of every materialised tensor of ``block`` (None when all are offloaded to meta).

    Cheap enough to take for every block at the start of a run, and it tells a dense block from a modified one or
    from another model's block of the same shape."""
    return state_weights_sample(block.state_dict(), elements)


def state_weights_sample(state: Mapping[str, torch.Tensor], elements: int = 256) -> Optional[str]:
    """:func:`block_weights_sample` of a block whose state dict is ``state``."""
    digest = hashlib.sha256()
    seen = False
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(flat.numel() // elements, 1)][:elements].to("cpu", torch.float64).contiguous()
            digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
            digest.update(sample.numpy().tobytes())
            seen = True
    return digest.hexdigest() if seen else None

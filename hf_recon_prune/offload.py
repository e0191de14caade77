"""Placement: which device runs a block, where the activation streams live, and moving blocks there and back.

A model may arrive in one piece on a device, or dispatched by Accelerate (``device_map`` with "cpu" / "disk"
entries, an ``offload_folder``): its offloaded blocks then hold meta tensors, and an ``AlignDevicesHook`` on each
module loads the real values from the hook's ``weights_map`` for every forward and drops them afterwards. The engine
changes the weights (masks, LR, BR), so for its turn a block is taken out of that mechanism: its hooks are detached,
its tensors materialised on the execution device from the weights map; when the block is done the new values are
written back into the weights map (the CPU state dict, or a new ``.dat`` file in the offload folder registered in
the loader's index, never the original checkpoint) and the hooks are attached again, so the model runs, generates
and saves (transformers reads offloaded weights through the same maps) with the pruned weights.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------- streams
class StreamFactory:
    """Allocates the activation streams [rows, seq_len, hidden] where the run keeps them.

    ``location`` is "device", "cpu" or "disk" (already resolved from "auto"). CPU streams are pinned when the
    execution device is a GPU, so that batches copy asynchronously. Disk streams are ``torch.from_file`` memory maps
    of a file created in ``folder`` and unlinked at once: the mapping keeps the data, the kernel pages it out under
    memory pressure, and the space returns to the file system when the tensor is freed, also after a crash.
    """

    def __init__(self, location: str, device: torch.device, dtype: torch.dtype, folder: Optional[str] = None):
        self.location = location
        self.device = device
        self.dtype = dtype
        self.folder = folder
        self.pin = location == "cpu" and device.type == "cuda" and torch.cuda.is_available()
        if location == "disk":
            self.folder = folder or tempfile.gettempdir()
            os.makedirs(self.folder, exist_ok=True)

    @property
    def torch_device(self) -> torch.device:
        return self.device if self.location == "device" else torch.device("cpu")

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.location == "disk":
            return _disk_tensor(shape, self.dtype, self.folder)
        return torch.empty(shape, dtype=self.dtype, device=self.torch_device, pin_memory=self.pin)


def _disk_tensor(shape: tuple[int, ...], dtype: torch.dtype, folder: str) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    handle, path = tempfile.mkstemp(prefix="hf_recon_prune_stream_", suffix=".bin", dir=folder)
    try:
        os.ftruncate(handle, max(numel, 1) * torch.empty((), dtype=dtype).element_size())
    finally:
        os.close(handle)
    tensor = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)[:numel].view(shape)
    try:
        os.unlink(path)
    except OSError:  # e.g. Windows refuses to unlink a mapped file: remove it when the tensor goes
        weakref.finalize(tensor.untyped_storage(), _remove_quietly, path)
    return tensor


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------- blocks
@dataclass
class _OffloadedTensors:
    """The tensors of one module that an offloading AlignDevicesHook serves from its weights map."""

    module: nn.Module
    hook: Any  # the AlignDevicesHook
    names: list[str]


@dataclass
class _Onloaded:
    hooks: list[tuple[nn.Module, Any, Any]] = field(default_factory=list)  # (module, its _hf_hook, original_devices)
    offloaded: list[_OffloadedTensors] = field(default_factory=list)
    homes: dict[str, torch.device] = field(default_factory=dict)  # other tensors' devices, by name in the block


def _align_hooks(hook: Any) -> list[Any]:
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    if isinstance(hook, SequentialHook):
        return [h for inner in hook.hooks for h in _align_hooks(inner)]
    return [hook] if isinstance(hook, AlignDevicesHook) else []


class BlockPlacement:
    """Moves a block to the execution device for its turn and back to where it lived (RAM, another GPU, disk).

    Args:
        device: the execution device.
        scratch_folder: where pruned weights of disk-offloaded blocks go when their loader has no folder of its own
            (transformers reads disk-offloaded weights straight from the checkpoint's safetensors when no
            ``offload_folder`` was given; the checkpoint itself is never written).
    """

    def __init__(self, device: torch.device, scratch_folder: Optional[str] = None):
        self.device = device
        self.scratch_folder = scratch_folder
        self._state: dict[int, _Onloaded] = {}

    def onload(self, block: nn.Module) -> nn.Module:
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import named_module_tensors, set_module_tensor_to_device

        if id(block) in self._state:
            return block
        state = _Onloaded()
        for module in block.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is None:
                continue
            state.hooks.append((module, hook, [dict(getattr(h, "original_devices", {})) for h in _align_hooks(hook)]))
            for align in _align_hooks(hook):
                if align.offload:
                    names = [name for name, _ in named_module_tensors(
                        module, include_buffers=align.offload_buffers, recurse=align.place_submodules,
                        remove_non_persistent=True,
                    )]
                    state.offloaded.append(_OffloadedTensors(module, align, names))
        # Detach first: detaching an offload hook may itself restore tensors, which the loads below then replace.
        for module, _hook, _devices in state.hooks:
            remove_hook_from_module(module)
        for entry in state.offloaded:
            for name in entry.names:
                value = entry.hook.weights_map[name]
                if value.device == self.device:
                    value = value.clone()  # never train in place on a tensor the weights map (or a file map) owns
                set_module_tensor_to_device(entry.module, name, self.device, value=value, clear_cache=False)
        for name, tensor in _named_tensors(block):
            if tensor.device.type == "meta":
                raise RuntimeError(
                    f"{name} of a decoder block is on the meta device and no accelerate hook offloads it; the model "
                    "was not fully loaded (e.g. init_empty_weights without load_checkpoint_and_dispatch)."
                )
            if tensor.device != self.device:
                state.homes[name] = tensor.device
                set_module_tensor_to_device(block, name, self.device, clear_cache=False)
        self._state[id(block)] = state
        return block

    def offload(self, block: nn.Module) -> None:
        from accelerate.hooks import add_hook_to_module
        from accelerate.utils import set_module_tensor_to_device

        state = self._state.pop(id(block), None)
        if state is None:
            return
        for entry in state.offloaded:
            for name in entry.names:
                value = _get_tensor(entry.module, name).detach()
                self._write_back(entry.hook.weights_map, name, value)
                set_module_tensor_to_device(entry.module, name, "meta", clear_cache=False)
        for name, home in state.homes.items():
            set_module_tensor_to_device(block, name, home, clear_cache=False)
        for module, hook, original_devices in state.hooks:
            add_hook_to_module(module, hook)
            # init_hook re-recorded the devices it found (meta); keep the ones from the first dispatch.
            for align, devices in zip(_align_hooks(hook), original_devices):
                if devices:
                    align.original_devices = devices

    def restore_all(self, blocks: list[nn.Module]) -> None:
        """Put every block still on the execution device back where it lives (after a failure)."""
        for block in blocks:
            if id(block) in self._state:
                self.offload(block)

    def _write_back(self, weights_map: Any, name: str, value: torch.Tensor) -> None:
        from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight, save_offload_index

        key, storage = name, weights_map
        while isinstance(storage, PrefixedDataset):
            key, storage = f"{storage.prefix}{key}", storage.dataset
        cpu_value = value.to("cpu", copy=True)
        if isinstance(storage, OffloadedWeightsLoader):
            if key in storage.state_dict or key not in storage.index:
                storage.state_dict[key] = cpu_value
                return
            if storage.save_folder is None:
                storage.save_folder = self._scratch()
            offload_weight(cpu_value, key, storage.save_folder, index=storage.index)
            save_offload_index({key: storage.index[key]}, storage.save_folder)
            return
        if isinstance(storage, dict):
            storage[key] = cpu_value
            return
        raise TypeError(
            f"cannot write the pruned value of {key} back into an accelerate weights map of type "
            f"{type(storage).__name__}; load the model with a device_map whose offloaded weights live in a state dict "
            "or an offload folder"
        )

    def _scratch(self) -> str:
        if self.scratch_folder:
            os.makedirs(self.scratch_folder, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="hf_recon_prune_offload_", dir=self.scratch_folder)
        logger.warning(
            "the disk-offloaded weights are read from the checkpoint itself (no offload_folder); the pruned weights "
            "are written to %s instead, which must stay until the model is saved", folder,
        )
        return folder


def _named_tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return getattr(module, leaf)

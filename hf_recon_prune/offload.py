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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def execution_device(requested: Optional[str]) -> torch.device:
    """The device the run computes on, with its index: ``cuda`` and ``cuda:0`` must compare equal to the devices
    that tensors report, or a block dispatched on the GPU would look as if it lived elsewhere."""
    device = torch.device(requested) if requested else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return normalise_device(device)


def normalise_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current index>``; other devices as they are."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: Optional[str], default: torch.dtype) -> torch.dtype:
    return default if name is None else _DTYPES[name]


def module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- streams
#: CPU streams of a GPU run are pinned, so that copies to and from the device run asynchronously. Off, they are
#: pageable memory and every copy is synchronous (the GPU suite runs both).
PIN_CPU_STREAMS = True


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
        self.pin = PIN_CPU_STREAMS and location == "cpu" and device.type == "cuda" and torch.cuda.is_available()
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


#: Copy stream rows ahead on a side CUDA stream (StreamRows). On: LR+BR+GP on the Llama-2-7B shape with pinned CPU
#: streams took 8.56 s a block against 9.15 s without (H200, docs/benchmarks.md; ``benchmarks/stage_profile.py
#: --overlap-copies both``); ``tests/test_cuda.py`` checks both settings on CUDA.
OVERLAP_COPIES = True

Rows = Any  # a slice of rows, or a 1-D LongTensor of row indices


class StreamRows:
    """Host<->device traffic of activation-stream rows, overlapped with the computation on the device.

    When the device is a GPU and a stream lives in pinned CPU memory, ``load(rows, next_rows)`` returns ``rows`` on
    the device and at once starts copying ``next_rows`` on a side CUDA stream, so that copy runs while the device
    computes on ``rows``; ``store(out, rows, value)`` copies a result back to pinned memory on the same side stream,
    after the computation that made it. The side stream is FIFO, so a row stored and then loaded again arrives in
    order; ``finish()`` waits for every copy (before the CPU reads stored rows). Anywhere else (CPU, device-resident
    or disk streams, ``OVERLAP_COPIES = False``) these are plain copies on the current stream, and ``finish()``
    still waits for results copied asynchronously into pinned memory.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._side: Optional[torch.cuda.Stream] = None
        if device.type == "cuda" and OVERLAP_COPIES:
            self._side = torch.cuda.Stream(device)
        self._ahead: list[tuple[torch.Tensor, Rows, torch.Tensor]] = []  # (source, rows, their device copy)
        self._host_writes_pending = False

    def _overlaps(self, host: torch.Tensor) -> bool:
        return self._side is not None and host.device.type == "cpu" and host.is_pinned()

    def load(self, source: torch.Tensor, rows: Rows, next_rows: Optional[Rows] = None) -> torch.Tensor:
        """``source[rows]`` on the device; with ``next_rows``, their copy starts now (see the class docstring)."""
        if not self._overlaps(source):
            return _rows_on_device(source, rows, self.device)
        on_device = None
        kept = []
        for entry in self._ahead:
            if entry[0] is source:  # copied ahead for this source: used if they are these rows, else dropped
                if on_device is None and _same_rows(entry[1], rows):
                    on_device = entry[2]
            else:
                kept.append(entry)
        self._ahead = kept
        if on_device is None:
            on_device = self._copy_in(source, rows)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._side)
        on_device.record_stream(current)  # made on the side stream, used (and freed) on the current one
        if next_rows is not None:
            self._ahead.append((source, next_rows, self._copy_in(source, next_rows)))
        return on_device

    def store(self, out: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
        """``out[rows] = value`` (``value`` on the device, ``out`` anywhere); ``finish()`` before the CPU reads
        ``out``.

        A device-to-host copy may run asynchronously only into pinned memory, and its bytes are there only after a
        synchronisation: ``out[rows] = value.to("cpu", non_blocking=True)`` would let the CPU copy a staging buffer
        that the GPU has not filled yet. So a pinned destination is written in place by the copy engine, and a
        pageable or memory-mapped one by a blocking copy.
        """
        writes_host = value.device.type == "cuda" and out.device.type == "cpu"
        in_place = writes_host and out.is_pinned() and isinstance(rows, slice)
        if in_place and self._side is not None:
            value = value.to(out.dtype)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                out[rows].copy_(value, non_blocking=True)
            value.record_stream(self._side)
        elif in_place:
            out[rows].copy_(value.to(out.dtype), non_blocking=True)
            self._host_writes_pending = True
        else:
            out[rows] = value.to(out.device, out.dtype)

    def finish(self) -> None:
        """Wait for every copy: the rows stored so far can be read on the CPU."""
        self._ahead.clear()
        if self._side is not None:
            self._side.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        if self._host_writes_pending:  # non-blocking copies into pinned memory on the current stream
            torch.cuda.current_stream(self.device).synchronize()
            self._host_writes_pending = False

    def _copy_in(self, source: torch.Tensor, rows: Rows) -> torch.Tensor:
        if isinstance(rows, slice):
            host = source[rows]  # a view of pinned memory: copied asynchronously
        else:  # gather into pinned memory (the caching host allocator keeps it until the copy is done)
            host = torch.empty((rows.numel(), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
            torch.index_select(source, 0, rows, out=host)
        with torch.cuda.stream(self._side):
            return host.to(self.device, non_blocking=True)


def _same_rows(a: Rows, b: Rows) -> bool:
    if isinstance(a, slice) or isinstance(b, slice):
        return isinstance(a, slice) and isinstance(b, slice) and (a.start, a.stop, a.step) == (b.start, b.stop, b.step)
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))  # a handful of CPU indices


def _rows_on_device(source: torch.Tensor, rows: Rows, device: torch.device) -> torch.Tensor:
    if isinstance(rows, slice):
        return source[rows].to(device, non_blocking=True)
    if source.device == device or (device.type == "cuda" and source.device.type == "cuda"
                                   and source.device.index == device.index):
        return source.index_select(0, rows.to(source.device))
    if device.type == "cuda" and source.is_pinned():
        staging = torch.empty((rows.numel(), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
        torch.index_select(source, 0, rows, out=staging)
        return staging.to(device, non_blocking=True)
    return source.index_select(0, rows.to(source.device)).to(device)


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


# ---------------------------------------------------------------------------------------------------- staging
#: Move block weights and masks between the GPU and pageable CPU memory through two reusable pinned slots
#: (PinnedStaging). On: one Llama-2-7B block (386 MiB) on, its masks and the block off again took 128 ms on an H200
#: against 584 ms with plain copies, and a PCIe floor of 18.5 ms (benchmarks/placement_copies.py, docs/benchmarks.md).
PINNED_STAGING = True
#: Size of each of the two slots; a tensor larger than a slot crosses in pieces.
STAGING_SLOT_BYTES = 64 << 20
#: Smaller tensors (norms, biases) take a plain copy: a staged one would only add synchronisations.
STAGING_MIN_BYTES = 1 << 20


class PinnedStaging:
    """Copies between pageable CPU memory and the device through two reusable page-locked slots.

    A copy between pageable memory and a GPU runs far below the link's speed: the driver stages it in small pieces,
    and a copy into freshly allocated memory also takes every page fault in the driver's one thread. On an H200,
    386 MiB took 290 ms into fresh pageable memory, 7 ms into pinned memory, and 33 ms from pinned into fresh
    pageable memory by torch's multi-threaded copy. So each crossing here is a CPU copy into (or out of) one slot
    while the copy engine fills (or empties) the other; a slot is reused only after the event of its last device
    copy. Everything is ordered on the device's current stream, as plain copies are.

    Off (``PINNED_STAGING = False``), on a non-CUDA device, for small, non-contiguous or pinned tensors: plain
    copies. ``force=True`` runs the slot pipeline on any device, with unpinned slots off CUDA (for tests on the
    CPU).
    """

    def __init__(self, device: torch.device, slot_bytes: Optional[int] = None, force: bool = False):
        self.device = normalise_device(device)
        self.enabled = force or (PINNED_STAGING and self.device.type == "cuda")
        self.slot_bytes = slot_bytes or STAGING_SLOT_BYTES
        self.min_bytes = 0 if force else STAGING_MIN_BYTES
        self._slots: Optional[list[torch.Tensor]] = None
        self._events: list[Any] = [None, None]
        self._next = 0

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A copy of CPU tensor ``host`` on the device (its bytes are in a slot or on the device on return, so
        ``host`` may change or go at once)."""
        if not self._stages(host, torch.device("cpu")):
            return host.to(self.device)
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        source, target = _bytes(host.detach()), _bytes(out)
        for start, stop in self._pieces(source.numel()):
            slot = self._take_slot(stop - start)
            slot.copy_(source[start:stop])
            target[start:stop].copy_(slot, non_blocking=True)
            self._release_slot()
        return out

    def to_host(self, value: torch.Tensor) -> torch.Tensor:
        """A new pageable CPU tensor with the bytes of ``value`` (a copy even when ``value`` is on the CPU)."""
        if not self._stages(value, self.device):
            return value.detach().to("cpu", copy=True)
        out = torch.empty(value.shape, dtype=value.dtype, device="cpu")
        source, target = _bytes(value.detach()), _bytes(out)
        waiting: Optional[tuple[int, int, int]] = None  # (slot, start, stop) copied to the slot, not yet out of it
        for start, stop in self._pieces(source.numel()):
            slot_index = self._next
            self._take_slot(stop - start).copy_(source[start:stop], non_blocking=True)
            self._release_slot()
            if waiting is not None:  # empty the previous slot while the copy engine fills this one
                self._empty_slot(target, *waiting)
            waiting = (slot_index, start, stop)
        if waiting is not None:
            self._empty_slot(target, *waiting)
        return out

    def _stages(self, tensor: torch.Tensor, source: torch.device) -> bool:
        """Whether a copy from ``source`` (the CPU, or this device) goes through the slots."""
        return (self.enabled and normalise_device(tensor.device) == source and tensor.is_contiguous()
                and tensor.numel() * tensor.element_size() >= max(self.min_bytes, 1)
                and not (source.type == "cpu" and self.device.type == "cuda" and tensor.is_pinned()))

    def _pieces(self, total: int):
        for start in range(0, total, self.slot_bytes):
            yield start, min(start + self.slot_bytes, total)

    def _take_slot(self, nbytes: int) -> torch.Tensor:
        """The next slot (``nbytes`` of it), once the device is done with its previous contents."""
        if self._slots is None:
            pinned = self.device.type == "cuda"
            self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        event = self._events[self._next]
        if event is not None:
            event.synchronize()
        return self._slots[self._next][:nbytes]

    def _release_slot(self) -> None:
        """Mark the device copy just queued on the slot taken last, and move to the other slot."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[self._next] = event
        self._next ^= 1

    def _empty_slot(self, target: torch.Tensor, slot_index: int, start: int, stop: int) -> None:
        event = self._events[slot_index]
        if event is not None:
            event.synchronize()
        target[start:stop].copy_(self._slots[slot_index][: stop - start])


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8)


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
    loaded_tensors: list[torch.Tensor] = field(default_factory=list)  # made by the load (until the stream hand-over)


def _align_hooks(hook: Any) -> list[Any]:
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    if isinstance(hook, SequentialHook):
        return [h for inner in hook.hooks for h in _align_hooks(inner)]
    return [hook] if isinstance(hook, AlignDevicesHook) else []


#: Overlap placement with the device's work (CUDA): the next block is loaded while the current window computes, and
#: a finished block (with its masks) is written back while the next one computes, by one worker thread on a side
#: stream with pinned slots of its own. It holds up to two more blocks on the device, which the memory plan counts
#: and turns the overlap off for where they do not fit (``memory.plan_placement``).
OVERLAP_PLACEMENT = True


class _PlacementWorker:
    """The thread that moves blocks in the background: jobs run one at a time, in the order given, on a CUDA stream
    of their own (``stream``; None off CUDA, for tests on the CPU) after the event they are given, with their own
    pinned slots, so they never wait for, or share slots with, the copies of the thread that computes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.staging = PinnedStaging(device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_recon_prune_placement")

    def submit(self, job: Callable[[PinnedStaging], Any]) -> Future:
        """Run ``job(staging)`` after everything queued on the device's current stream so far; the future's result is
        ``(job's result, event after the job's device work)``."""
        after = None
        if self.stream is not None:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        return self._executor.submit(self._run, job, after)

    def _run(self, job: Callable[[PinnedStaging], Any], after: Optional[Any]) -> tuple[Any, Optional[Any]]:
        if self.stream is None:
            return job(self.staging), None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            result = job(self.staging)
            done = torch.cuda.Event()
            done.record(self.stream)
        return result, done

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class BlockPlacement:
    """Moves a block to the execution device for its turn and back to where it lived (RAM, another GPU, disk).

    Args:
        device: the execution device.
        scratch_folder: where pruned weights of disk-offloaded blocks go when their loader has no folder of its own
            (transformers reads disk-offloaded weights straight from the checkpoint's safetensors when no
            ``offload_folder`` was given; the checkpoint itself is never written).
        overlap: move blocks in the background (:data:`OVERLAP_PLACEMENT`): :meth:`prefetch` starts loading a block
            that :meth:`onload` will ask for, and ``offload(..., background=True)`` writes a finished block back
            while the caller goes on. The results are the same bytes as without; :meth:`wait_all` waits for every
            move (before the model, or the tensors handed to ``deliver``, are read). On CUDA, or anywhere with
            ``force_overlap=True`` (tests).
    """

    def __init__(self, device: torch.device, scratch_folder: Optional[str] = None, overlap: bool = False,
                 force_overlap: bool = False):
        self.device = normalise_device(device)
        self.scratch_folder = scratch_folder
        self.staging = PinnedStaging(self.device)
        self._state: dict[int, _Onloaded] = {}
        self._worker: Optional[_PlacementWorker] = None
        if force_overlap or (overlap and self.device.type == "cuda"):
            self._worker = _PlacementWorker(self.device)
        self._moving: dict[int, Future] = {}  # id(block) -> its move in the background, until someone waits for it

    @property
    def overlaps(self) -> bool:
        return self._worker is not None

    def prefetch(self, block: nn.Module) -> None:
        """Start loading ``block`` onto the device in the background (nothing without overlap, or if it is there)."""
        if self._worker is None or id(block) in self._state or id(block) in self._moving:
            return
        self._moving[id(block)] = self._worker.submit(lambda staging: self._onload(block, staging))

    def onload(self, block: nn.Module) -> nn.Module:
        self._settle(block)
        self._onload(block, self.staging)
        self._state[id(block)].loaded_tensors = []  # loaded on this stream: nothing to hand over
        return block

    def offload(self, block: nn.Module, background: bool = False,
                with_tensors: Optional[dict[str, torch.Tensor]] = None,
                deliver: Optional[Callable[[dict[str, torch.Tensor]], None]] = None) -> None:
        """Put ``block`` back where it lives. ``with_tensors`` (device tensors, such as the block's masks) are copied
        to the host on the way and handed to ``deliver``. ``background=True`` (with overlap) returns at once: the
        copies start after the device's work queued so far, so the caller may go on computing."""
        self._settle(block)
        if background and self._worker is not None:
            self._moving[id(block)] = self._worker.submit(
                lambda staging: self._offload(block, staging, with_tensors, deliver))
            return
        self._offload(block, self.staging, with_tensors, deliver)

    def wait_all(self) -> None:
        """Wait for every move in the background; the first that failed raises here."""
        errors = []
        for key in list(self._moving):
            try:
                self._settle_key(key)
            except Exception as error:  # noqa: BLE001 - the others are waited for too, then the first is raised
                errors.append(error)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Wait for every move and stop the worker thread."""
        try:
            self.wait_all()
        finally:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def restore_all(self, blocks: list[nn.Module]) -> None:
        """Put every block still on the execution device back where it lives (after a failure)."""
        try:
            self.wait_all()
        except Exception as error:  # noqa: BLE001 - the blocks are put back all the same
            logger.error("a block move in the background failed: %s", error)
        for block in blocks:
            if id(block) in self._state:
                self.offload(block)
        self.close()

    def wait(self, block: nn.Module) -> None:
        """Wait for ``block``'s move in the background, if one is under way (its error, if it failed)."""
        self._settle(block)

    def _settle(self, block: nn.Module) -> None:
        if id(block) in self._moving:
            self._settle_key(id(block))

    def _settle_key(self, key: int) -> None:
        """Wait for a move in the background; what it loaded joins the current stream's work."""
        _, done = self._moving.pop(key).result()
        if done is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        state = self._state.get(key)
        if state is not None:  # loaded on the worker's stream, used (and freed) on this one
            for tensor in state.loaded_tensors:
                tensor.record_stream(current)
            state.loaded_tensors = []

    def _onload(self, block: nn.Module, staging: PinnedStaging) -> nn.Module:
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
                elif value.device.type == "cpu":
                    value = staging.to_device(value)
                set_module_tensor_to_device(entry.module, name, self.device, value=value, clear_cache=False)
        # Tensors the hooks serve were just loaded; the others were dispatched as they are (possibly on this device).
        paths = {id(module): path for path, module in block.named_modules()}
        served = {f"{paths[id(entry.module)]}.{name}".lstrip(".") for entry in state.offloaded for name in entry.names}
        for name, tensor in _named_tensors(block):
            if name in served:
                continue
            if tensor.device.type == "meta":
                raise RuntimeError(
                    f"{name} of a decoder block is on the meta device and no accelerate hook offloads it; the model "
                    "was not fully loaded (e.g. init_empty_weights without load_checkpoint_and_dispatch)."
                )
            if tensor.device != self.device:
                state.homes[name] = tensor.device
                value = staging.to_device(tensor.detach()) if tensor.device.type == "cpu" else None
                set_module_tensor_to_device(block, name, self.device, value=value, clear_cache=False)
        moved = set(state.homes) | served
        state.loaded_tensors = [tensor for name, tensor in _named_tensors(block) if name in moved]
        self._state[id(block)] = state
        return block

    def _offload(self, block: nn.Module, staging: PinnedStaging, with_tensors: Optional[dict[str, torch.Tensor]],
                 deliver: Optional[Callable[[dict[str, torch.Tensor]], None]]) -> None:
        from accelerate.hooks import add_hook_to_module
        from accelerate.utils import set_module_tensor_to_device

        if with_tensors:
            copies = {name: staging.to_host(tensor) for name, tensor in with_tensors.items()}
            if deliver is not None:
                deliver(copies)
        state = self._state.pop(id(block), None)
        if state is None:
            return
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            for _name, tensor in _named_tensors(block):  # freed below, maybe before copies on this stream are done
                if tensor.device == self.device:
                    tensor.record_stream(current)
        for entry in state.offloaded:
            for name in entry.names:
                value = _get_tensor(entry.module, name).detach()
                self._write_back(entry.hook.weights_map, name, value, staging)
                set_module_tensor_to_device(entry.module, name, "meta", clear_cache=False)
        for name, home in state.homes.items():
            value = staging.to_host(_get_tensor(block, name)) if home.type == "cpu" else None
            set_module_tensor_to_device(block, name, home, value=value, clear_cache=False)
        for module, hook, original_devices in state.hooks:
            add_hook_to_module(module, hook)
            # init_hook re-recorded the devices it found (meta); keep the ones from the first dispatch.
            for align, devices in zip(_align_hooks(hook), original_devices):
                if devices:
                    align.original_devices = devices

    def _write_back(self, weights_map: Any, name: str, value: torch.Tensor, staging: PinnedStaging) -> None:
        from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight, save_offload_index

        key, storage = name, weights_map
        while isinstance(storage, PrefixedDataset):
            key, storage = f"{storage.prefix}{key}", storage.dataset
        cpu_value = staging.to_host(value)
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

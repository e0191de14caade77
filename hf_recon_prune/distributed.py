"""Data-parallel pruning: every process holds the whole model and a contiguous shard of the calibration rows.

What is summed over rows is summed over processes: the Hessians and Wanda norms, the squared errors of the report,
and in block reconstruction the gradients. The reconstruction follows the single-process schedule exactly: every
process draws the same permutation of all rows, each computes the part of every mini-batch that lies in its shard,
scaled so that the all-reduced gradient is the gradient of the mean over the whole mini-batch. The processes then
take identical optimizer steps, and the model equals the single-process one up to the order of float summation.
Decisions (masks, LR updates, trained weights) are broadcast from rank 0 after each step of the engine, so the
replicas stay bit-identical even where a reduction could round differently on different ranks.

The group is the one the caller initialised (``torch.distributed.init_process_group``) or, when ``accelerate
launch`` / ``torchrun`` describe one in the environment (``WORLD_SIZE`` > 1), the one ``accelerate.PartialState``
initialises: NCCL between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

_DIRECT_ELEMENTS = 1 << 20


class DataParallel:
    """Row shards and collectives of one process in a data-parallel pruning run."""

    def __init__(self, rank: int, world_size: int, local_rank: int = 0):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank

    # ------------------------------------------------------------------ setup
    @classmethod
    def resolve(cls, mode: str) -> Optional["DataParallel"]:
        """The data-parallel context for ``PruningConfig.data_parallel``, or None for a single process."""
        if mode == "off":
            return None
        if not dist.is_available():
            return None
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return None
            from accelerate import PartialState

            PartialState()  # reads RANK / WORLD_SIZE / MASTER_ADDR and initialises the group
        world_size = dist.get_world_size()
        if world_size <= 1:
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
        return cls(dist.get_rank(), world_size, local_rank)

    def device(self, requested: Optional[str]) -> torch.device:
        """This process's execution device: its own GPU (``cuda:LOCAL_RANK``) unless a device index was given."""
        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _comm_device(self, tensor_device: torch.device) -> torch.device:
        # NCCL moves only GPU tensors; gloo only CPU ones (a mixed "cuda:nccl,cpu:gloo" group takes both).
        backend = str(dist.get_backend())
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend and tensor_device.type == "cuda":
            return tensor_device
        return torch.device("cpu")

    # ------------------------------------------------------------------ rows
    def shard(self, num_rows: int) -> slice:
        """This process's contiguous rows of ``num_rows``; shards differ by at most one row (some may be empty)."""
        return slice(self.rank * num_rows // self.world_size, (self.rank + 1) * num_rows // self.world_size)

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place. Large tensors go one by one (a copy of a Hessian would cost
        as much memory as the Hessian); small ones share one collective per dtype and device."""
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for tensor in tensors:
            comm = self._comm_device(tensor.device)
            if tensor.numel() >= _DIRECT_ELEMENTS and comm == tensor.device and tensor.is_contiguous():
                dist.all_reduce(tensor)
            else:
                groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for (_dtype, device), members in groups.items():
            flat = torch.cat([t.reshape(-1) for t in members]).to(self._comm_device(device))
            dist.all_reduce(flat)
            flat = flat.to(device)
            offset = 0
            for tensor in members:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def sum_floats(self, values: Iterable[float]) -> list[float]:
        values = list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        self.all_reduce_([tensor])
        return tensor.tolist()

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` on every process with rank ``src``'s values."""
        for tensor in tensors:
            comm = self._comm_device(tensor.device)
            if comm == tensor.device and tensor.is_contiguous() and tensor.dtype != torch.bool:
                dist.broadcast(tensor, src)
            else:
                wire = torch.uint8 if tensor.dtype == torch.bool else tensor.dtype  # not every backend sends bool
                buffer = tensor.detach().to(comm, wire).contiguous()
                dist.broadcast(buffer, src)
                tensor.copy_(buffer)

    def broadcast_module_(self, modules: Iterable[nn.Module], src: int = 0) -> None:
        tensors = []
        for module in modules:
            tensors.extend(p.data for p in module.parameters())
            tensors.extend(module.buffers())
        with torch.no_grad():
            self.broadcast_(tensors, src)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


class ShardedRows:
    """How a process's shard sits in the rows of the whole calibration set, for block reconstruction."""

    def __init__(self, data_parallel: DataParallel, total_rows: int, row_slice: slice):
        self.data_parallel = data_parallel
        self.total_rows = total_rows
        self.start = row_slice.start
        self.stop = row_slice.stop

    def local(self, index: torch.Tensor) -> torch.Tensor:
        """Of the global rows ``index`` (one mini-batch), those in this shard, as positions in the shard, in order."""
        inside = (index >= self.start) & (index < self.stop)
        return index[inside] - self.start

    def reduce_gradients_(self, parameters: Sequence[nn.Parameter], extra: Sequence[torch.Tensor] = ()) -> None:
        """Sum the gradients (and ``extra`` tensors, e.g. the loss) over the processes, in place."""
        grads = []
        for param in parameters:
            if param.grad is None:  # this shard had no row in the mini-batch, or the parameter got no gradient
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        self.data_parallel.all_reduce_([*grads, *extra])

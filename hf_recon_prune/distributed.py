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
initialises, with the explicit timeout ``GROUP_TIMEOUT``: NCCL between GPUs, gloo between CPU processes.

Failures are decided together (``fail_together``): the first process whose run raises writes its error to the
group's store and tears its side of the group down, which makes every collective the others are blocked in fail at
once; each of them then raises the same ``DataParallelError``, naming the failing rank, instead of waiting for the
group's timeout. Afterwards the group is gone on every process (a collective left half-done cannot be resumed).
Steps that rank 0 runs alone (building the calibration set and self-generating, saving) do not keep the others in
a collective: they wait on the store (``broadcast_object``), for up to ``RANK0_STEP_TIMEOUT`` seconds, and see a
failure of rank 0 there.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

_DIRECT_ELEMENTS = 1 << 20


def _seconds(variable: str, default: float) -> float:
    try:
        return float(os.environ.get(variable, default))
    except ValueError:
        raise ValueError(f"{variable}={os.environ[variable]!r} is not allowed; allowed: a number of seconds") from None


#: Seconds the other processes wait for a step rank 0 runs alone (``HF_RECON_PRUNE_RANK0_TIMEOUT``; default a day:
#: self-generating thousands of samples with a large model takes hours).
RANK0_STEP_TIMEOUT = _seconds("HF_RECON_PRUNE_RANK0_TIMEOUT", 24 * 3600.0)
#: The timeout of a process group this package initialises (``HF_RECON_PRUNE_GROUP_TIMEOUT``): the longest a
#: collective may wait for a process that is still working (rank-0 steps do not count, see above).
GROUP_TIMEOUT = datetime.timedelta(seconds=_seconds("HF_RECON_PRUNE_GROUP_TIMEOUT", 2 * 3600.0))
#: Seconds the failing process waits for the others to read its error before it goes on (its store may be theirs).
FAILURE_GRACE = _seconds("HF_RECON_PRUNE_FAILURE_GRACE", 30.0)
_PREFIX = "hf_recon_prune"


class DataParallelError(RuntimeError):
    """A data-parallel run failed; every process raises this with the same message. ``rank``: the failing process
    (None when it could not be learnt), ``error_type``: the name of its exception's class."""

    def __init__(self, message: str, rank: Optional[int] = None, error_type: Optional[str] = None):
        super().__init__(message)
        self.rank = rank
        self.error_type = error_type


class _PeerFailed(RuntimeError):
    """Another process published a failure while this one waited for it on the store."""


class DataParallel:
    """Row shards and collectives of one process in a data-parallel pruning run."""

    _runs = itertools.count()  # every process resolves once per run, in the same order: store keys agree

    def __init__(self, rank: int, world_size: int, local_rank: int = 0, generation: int = 0):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.generation = generation
        self._objects = 0
        self._store_handle = None  # kept: the store outlives the group's abort, and the failure is read there

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

            PartialState(timeout=GROUP_TIMEOUT)  # reads RANK / WORLD_SIZE / MASTER_ADDR and initialises the group
        world_size = dist.get_world_size()
        if world_size <= 1:
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
        data_parallel = cls(dist.get_rank(), world_size, local_rank, next(cls._runs))
        data_parallel._store()
        return data_parallel

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

    def broadcast_object(self, obj: Any, src: int = 0, what: str = "its step") -> Any:
        """Rank ``src``'s ``obj`` on every process. The others wait on the store until ``src`` is ready (its step may
        outlast the group's timeout) and raise when a process publishes a failure meanwhile."""
        key = self._key(f"object-{self._objects}")
        self._objects += 1
        if self.rank == src:
            self._store().set(key, "ready")
        else:
            self._wait_for(key, f"rank {src} to finish {what}")
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def main_only(self, step: Callable[[], Any], what: str) -> Any:
        """Run ``step`` on rank 0 alone and return its result on every process; a failure (on any process) raises
        the same DataParallelError everywhere."""
        result = None
        try:
            if self.is_main:
                result = step()
            return self.broadcast_object(result, what=what)
        except BaseException as error:
            failure = self.fail_together(error, f"while {what}")
            if not isinstance(error, Exception):
                raise
            raise failure from error

    # ------------------------------------------------------------------ failing together
    def _store(self):
        if self._store_handle is None:
            self._store_handle = dist.distributed_c10d._get_default_store()
        return self._store_handle

    def _key(self, name: str) -> str:
        return f"{_PREFIX}/{self.generation}/{name}"

    def _wait_for(self, key: str, what: str) -> None:
        store, failure, started, pause = self._store(), self._key("failure"), time.monotonic(), 0.005
        while not store.check([key]):
            if store.check([failure]):
                raise _PeerFailed(f"rank {self.rank} was waiting for {what}")
            if time.monotonic() - started > RANK0_STEP_TIMEOUT:
                raise TimeoutError(f"waited {RANK0_STEP_TIMEOUT:g} s for {what}; raise HF_RECON_PRUNE_RANK0_TIMEOUT "
                                   "(seconds) if that step needs longer")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def finish(self) -> None:
        """Every process reached the end of the run: a collective that fails if one of them did not."""
        dist.barrier()

    def fail_together(self, error: BaseException, where: str) -> BaseException:
        """The exception every process raises for a run that failed here with ``error`` (or elsewhere, when this
        process only saw the group break): the first failure published in the store, naming its rank."""
        if isinstance(error, DataParallelError):
            return error
        store = None
        try:
            store = self._store()
            first = store.add(self._key("failures"), 1) == 1
            if first:
                message = (f"the data-parallel run failed on rank {self.rank} of {self.world_size} {where}: "
                           f"{type(error).__name__}: {error}")
                store.set(self._key("failure"), json.dumps({"rank": self.rank, "message": message,
                                                            "type": type(error).__name__}))
            else:
                store.wait([self._key("failure")], datetime.timedelta(seconds=FAILURE_GRACE))
            info = json.loads(store.get(self._key("failure")))
        except Exception as store_error:  # the store went away with the process that hosted it
            logger.debug("could not read the failure from the store: %s", store_error)
            info = {"rank": None, "type": type(error).__name__,
                    "message": f"the data-parallel run failed (another process ended; rank {self.rank} saw "
                               f"{type(error).__name__}: {error})"}
            first = False
        self._abort()
        if first:
            self._wait_until_seen(store)
        elif store is not None:
            _try(lambda: store.add(self._key("seen"), 1))
        if self.rank != info["rank"]:
            logger.error("%s", info["message"])
        return DataParallelError(info["message"], info["rank"], info["type"])

    def _wait_until_seen(self, store) -> None:
        """Keep the store (hosted by rank 0) up until the others have read the failure, for a bounded time."""
        deadline = time.monotonic() + FAILURE_GRACE
        while time.monotonic() < deadline:
            seen = _try(lambda: int(store.add(self._key("seen"), 0)))
            if seen is None or seen >= self.world_size - 1:
                return
            time.sleep(0.02)

    def _abort(self) -> None:
        """Tear this process's side of the group down: the peers' pending collectives fail instead of waiting."""
        if not dist.is_initialized():
            return
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None and _try(lambda: abort() or True):
            return
        _try(dist.destroy_process_group)

    def watch_failures(self) -> "FailureWatch":
        """A thread that aborts this process's group when another process publishes a failure (NCCL only: a rank
        blocked in a NCCL kernel sees no broken connection, gloo ones do)."""
        return FailureWatch(self)

    def barrier(self) -> None:
        dist.barrier()


def _try(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Exception:  # best effort: the group or its store may be gone already
        return None


class FailureWatch:
    """Context manager around a run: with an NCCL group, a daemon thread polls the store (its own connection) for a
    published failure and aborts the group, which releases a collective blocked on the failed process."""

    def __init__(self, data_parallel: DataParallel, interval: float = 1.0):
        self.data_parallel = data_parallel
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "FailureWatch":
        if "nccl" in str(dist.get_backend()):
            store = _try(lambda: self.data_parallel._store().clone())
            if store is not None:
                self._thread = threading.Thread(target=self._watch, args=(store,), daemon=True,
                                                name="hf-recon-prune-failure-watch")
                self._thread.start()
        return self

    def _watch(self, store) -> None:
        key = self.data_parallel._key("failure")
        while not self._stop.wait(self.interval):
            if _try(lambda: store.check([key])):
                logger.error("another process of the data-parallel run failed: aborting this process's group")
                self.data_parallel._abort()
                return

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)


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

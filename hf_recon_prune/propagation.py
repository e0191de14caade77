"""Activation streams and the batched forward passes that move them through decoder blocks.

A stream is a tensor ``[rows, seq_len, hidden]`` of what enters one block for one set of samples (calibration or
held-out). ``Streams`` keeps them by block index for the sparse model pruned so far and the dense model;
``BatchedForward`` runs blocks over every row of a stream, micro-batch by micro-batch on the execution device, with
the copies to and from the stream's home overlapped (``offload.StreamRows``), and halves the micro-batch when the
device runs out of memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .block_io import call_window, halved_after_out_of_memory
from .capture import capture_first_block_inputs
from .offload import StreamRows

logger = logging.getLogger(__name__)


class NonFiniteActivationsError(RuntimeError):
    """A finalised block produced NaN or Inf activations; the message names the block and the samples."""


class RestartPass(Exception):
    """A pass that accumulates (mask statistics) ran out of memory: run it again from the start, smaller batches."""


@dataclass
class Streams:
    """The activations entering each block, for one set of samples (calibration or held-out), keyed by block index."""

    sparse: dict[int, torch.Tensor]
    dense: dict[int, Optional[torch.Tensor]]  # None when nothing needs the dense model's activations

    def drop(self, index: int) -> None:
        self.sparse.pop(index, None)
        self.dense.pop(index, None)


class BatchedForward:
    """Forward passes over whole streams, in micro-batches of ``batch_size`` rows.

    Args:
        device: the execution device.
        batch_size: the first micro-batch size (``forward_batch_size``); halved for the rest of the run after an
            out-of-memory error.
        new_stream: allocates an output stream of a number of rows where the run keeps its streams.
        sum_floats: adds floats over the processes of a data-parallel run (None: one process).
        warn: records a warning in the run's report: ``warn(message, block index or None)``.
    """

    def __init__(self, device: torch.device, batch_size: int, new_stream: Callable[[int], torch.Tensor],
                 sum_floats: Optional[Callable] = None, warn: Optional[Callable[[str, Optional[int]], None]] = None):
        self.device = device
        self.batch_size = batch_size
        self.new_stream = new_stream
        self.sum_floats = sum_floats
        self.warn = warn

    def __call__(
        self, blocks: Sequence[nn.Module], kwargs: Sequence[dict], stream: torch.Tensor,
        reference: Optional[torch.Tensor] = None, keep_output: bool = True, *, block: int,
        split: str = "calibration", check_finite: bool = False, restart_on_oom: bool = False,
    ) -> tuple[Optional[torch.Tensor], Optional[float]]:
        """Run ``blocks`` over every row of ``stream``; optionally the MSE of the output to ``reference`` (over every
        process's rows in a data-parallel run: then every process must call with a reference).

        ``block`` (the decoder block being worked on) and ``split`` name it in messages. Out of memory in a batch
        halves the micro-batch for the rest of the run and retries the batch (``restart_on_oom``: raises
        ``RestartPass`` instead, for passes whose hooks have accumulated part of the batch already).
        ``check_finite``: raise NonFiniteActivationsError when an output holds NaN or Inf.
        """
        out = self.new_stream(stream.shape[0]) if keep_output else None
        squared_error = torch.zeros((), dtype=torch.float64, device=self.device)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        count, start, num_rows = 0, 0, stream.shape[0]
        transfers = StreamRows(self.device)
        while start < num_rows:
            rows = slice(start, min(start + self.batch_size, num_rows))
            following = slice(rows.stop, min(rows.stop + self.batch_size, num_rows)) if rows.stop < num_rows else None
            try:
                y = call_window(blocks, transfers.load(stream, rows, following), kwargs)
                if out is not None:
                    transfers.store(out, rows, y)
                batch_error = None
                if reference is not None:
                    ref = transfers.load(reference, rows, following)
                    batch_error = (y.float() - ref.float()).square().sum().double()
                if check_finite:
                    finite &= torch.isfinite(y).all()
            except torch.OutOfMemoryError as error:
                y = ref = None
                self.out_of_memory(block, error)
                if restart_on_oom:
                    raise RestartPass() from None
                continue
            if batch_error is not None:
                squared_error += batch_error
                count += y.numel()
            start = rows.stop
        transfers.finish()  # the CPU may read the output rows next (BR gathers its mini-batches there)
        if check_finite and not bool(finite):
            raise NonFiniteActivationsError(
                f"decoder block {block} produced non-finite activations (NaN or Inf) on the {split} samples; pruning "
                f"stopped at block {block}. Check that the dense model is finite on this data, or try "
                "stream_dtype='float32', a lower br_lr, or a lower sparsity."
            )
        if reference is None:
            return out, None
        total, count = float(squared_error), float(count)
        if self.sum_floats is not None:
            total, count = self.sum_floats([total, count])
        return out, (total / count if count else None)

    def out_of_memory(self, block: Optional[int], error: BaseException) -> None:
        """Halve the micro-batch after an out-of-memory error, and say so; at one row, give up clearly."""
        where = f"decoder block {block}" if block is not None else "the embedding pass"
        size = self.batch_size
        self.batch_size = halved_after_out_of_memory(size, error, (
            f"{where}: out of memory even with a forward micro-batch of one row. Lower max_device_memory or set "
            "stream_location='cpu' (or 'disk') so the streams leave the device, use stream_dtype='bfloat16', a "
            "shorter seq_len, or a device with more memory."))
        message = (f"{where}: out of memory with a forward micro-batch of {size} rows; retrying with "
                   f"{self.batch_size} (set forward_batch_size={self.batch_size} to start there)")
        logger.warning(message)
        if self.warn is not None:
            self.warn(message, block)

    def first_inputs(self, base_model: nn.Module, first_block: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The hidden states entering block 0 for every row of ``ids``, in a new stream; retried with smaller
        batches when memory runs out."""
        out = self.new_stream(ids.shape[0])
        while True:
            try:
                return capture_first_block_inputs(base_model, first_block, ids, self.batch_size, self.device, out)
            except torch.OutOfMemoryError as error:
                self.out_of_memory(None, error)

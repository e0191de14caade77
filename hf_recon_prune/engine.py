"""The block engine: walk the decoder blocks in order, choose masks, reconstruct, propagate. Nothing model-specific.

Streams (each [rows, seq_len, hidden], see ``propagation.py``):
    sparse calibration stream   S_b  input of block b in the model pruned so far
    dense calibration stream    D_b  input of block b in the dense model (GP target and the reported error's reference)
    and the same two for the held-out samples, which never reach mask statistics or the optimiser.

A *window* is the set of blocks trained together: one block, or two adjacent blocks with cross-block
reconstruction (CR), sliding by one. A block is *prepared* (masked, and LR-updated) when it first enters a window and
*finalised* (its output becomes the next sparse stream) when it leaves the last window it belongs to.

Only the blocks of the current window (and their dense copies when BR needs them) are on the execution device; the
rest stay where the model keeps them, including Accelerate's CPU/disk offload (``offload.py``). The streams live on
the device, in (pinned) CPU memory or in a memory-mapped file, as the memory plan decides (``memory.py``). Under
torch.distributed every process runs this loop on its shard of the rows (``distributed.py``). What a run holds
between windows is its ``RunState``; ``checkpoint.py`` saves and restores it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .architectures import DecoderLayout
from .capture import capture_block_kwargs
from .run_checkpoints import RunCheckpoints, restore_run
from .distributed import DataParallel, ShardedRows
from .memory import MemoryEstimate, choose_reconstruction_mode, estimate_memory, plan_placement
from .masking import MaskSelection
from .methods import get_criterion
from .offload import BlockPlacement, StreamFactory, execution_device, resolve_dtype
from .preflight import check_resources
from .propagation import BatchedForward, Streams
from .prunable import unprunable_parameters
from .reconstruction.plan import ReconstructionPlan
from .reconstruction.settings import BlockTrainingSettings
from .report import BlockReport, PruneReport, timed_stage as _timed

logger = logging.getLogger(__name__)

#: Above this fraction of zeros in the prunable layers before pruning, the note about it is a warning in the report.
ALREADY_SPARSE_WARNING = 0.01


@dataclass
class RunState:
    """What one run holds between windows (and what a checkpoint saves): set up once by ``BlockEngine.setup``."""

    config: Any
    plan: ReconstructionPlan
    criterion: Any
    device: torch.device
    data_parallel: Optional[DataParallel]
    forward: BatchedForward
    report: PruneReport
    total_rows: dict[str, int]
    statistics_rows: Union[slice, torch.Tensor]  # the calibration rows that feed mask statistics (this shard)
    sharded_rows: Optional[ShardedRows] = None
    training: Optional[BlockTrainingSettings] = None  # BR's settings, with the plan's block_wise
    kwargs: list[dict] = field(default_factory=list)  # what every block receives besides its hidden states
    streams: dict[str, Streams] = field(default_factory=dict)
    block_masks: dict[int, dict[nn.Linear, torch.Tensor]] = field(default_factory=dict)  # key kept once finalised
    dense_blocks: dict[int, nn.Module] = field(default_factory=dict)  # BR without GP: the window's dense copies
    modified: list[int] = field(default_factory=list)
    existing_zeros: list[int] = field(default_factory=lambda: [0, 0])  # zeros before pruning, their layers' size
    first_window: int = 0
    elapsed_before: float = 0.0  # seconds an interrupted run had spent before this resume


class BlockEngine(MaskSelection):
    """Runs the block loop over ``layout``'s decoder blocks for one ``prune()`` call (see the module docstring).

    ``masks`` receives every finalised block's keep-masks on the CPU, by qualified linear name; ``backups`` (with
    ``keep_backup``) a CPU copy of each block's state before it was first modified.
    """

    def __init__(self, model: nn.Module, layout: DecoderLayout, config: Any, calibration: Any, *,
                 keep_backup: bool = False, show_progress: bool = True,
                 on_block_end: Optional[Callable[[int, PruneReport], None]] = None):
        self.model, self.layout, self.config, self.calibration = model, layout, config, calibration
        self.keep_backup, self.show_progress, self.on_block_end = keep_backup, show_progress, on_block_end
        self.masks: dict[str, torch.Tensor] = {}
        self.backups: dict[int, dict[str, torch.Tensor]] = {}
        self.placement: Optional[BlockPlacement] = None
        self.checkpoints: Optional[RunCheckpoints] = None
        self.state: Optional[RunState] = None
        self._unannounced: list[int] = []  # finalised blocks whose on_block_end is still to come

    @property
    def modified(self) -> list[int]:
        return [] if self.state is None else self.state.modified

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def run(self, resume: bool = False, overwrite: bool = False) -> PruneReport:
        """Set up and run every window. In a data-parallel run a failure on any process is raised on every process
        as the same ``DataParallelError`` naming the failing rank (``DataParallel.fail_together``)."""
        started = time.perf_counter()
        data_parallel, where = DataParallel.resolve(self.config.data_parallel), "while setting up the run"
        watch = data_parallel.watch_failures() if data_parallel is not None else contextlib.nullcontext()
        try:
            with watch:
                state = self.setup(resume, overwrite, data_parallel)
                progress = self._progress(len(state.plan.windows))
                if progress is not None and state.first_window:
                    progress.update(state.first_window)
                for window_number in range(state.first_window, len(state.plan.windows)):
                    window = state.plan.windows[window_number]
                    where = (f"at decoder block(s) {list(window)} (window {window_number + 1} of "
                             f"{len(state.plan.windows)})")
                    self._run_window(window_number, started)
                    if progress is not None:
                        progress.update(1)
                        last = state.report.blocks[window[0]].error_after.get("calibration")
                        if last is not None:
                            progress.set_postfix(block=window[0], err=f"{last:.3g}")
                where = "at the end of the run"
                self.placement.close()  # every block written back, every mask delivered
                self._announce_finalised_blocks()
                if progress is not None:
                    progress.close()
                if data_parallel is not None:
                    data_parallel.finish()
        except BaseException as error:
            if data_parallel is None:
                raise
            failure = data_parallel.fail_together(error, where)
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: the others learn, this one stops
                raise
            raise failure from error
        self._note_existing_zeros()
        state.report.total_seconds = state.elapsed_before + time.perf_counter() - started
        return state.report

    def setup(self, resume: bool, overwrite: bool = False, data_parallel: Optional[DataParallel] = None) -> RunState:
        """Sharding, the memory plan, the first streams (or the checkpoint's): the state before the first window.
        ``overwrite``: a fresh run may replace a checkpoint of the same run; ``data_parallel``: the run's
        (resolved from ``config.data_parallel`` when None)."""
        cfg, blocks = self.config, self.layout.blocks
        data_parallel = data_parallel or DataParallel.resolve(cfg.data_parallel)
        if cfg.checkpoint_dir and data_parallel is not None:
            raise ValueError("PruningConfig.checkpoint_dir is not supported in a data-parallel run yet (every process "
                             "holds its own shard of the streams); run on one process or set checkpoint_dir=None")
        device = data_parallel.device(cfg.device) if data_parallel else execution_device(cfg.device)
        calibration = self._shared_calibration(data_parallel)
        plan = ReconstructionPlan.from_config(cfg, len(blocks))
        criterion = get_criterion(cfg.method)
        ids, heldout_ids = calibration.input_ids, calibration.heldout_ids
        statistics_mask = calibration.statistics_mask.bool()
        if not bool(statistics_mask.any()) and criterion.needs_statistics(plan.layer_wise):
            raise ValueError(f"method={cfg.method!r} needs calibration rows for its statistics, but none is marked")
        total_rows = {"calibration": ids.shape[0], "heldout": heldout_ids.shape[0]}
        shards = {split: data_parallel.shard(n) if data_parallel else slice(0, n) for split, n in total_rows.items()}
        local_ids = {"calibration": ids[shards["calibration"]], "heldout": heldout_ids[shards["heldout"]]}
        saved = None
        if cfg.checkpoint_dir:
            self.checkpoints, saved = RunCheckpoints.open(cfg, self.model, blocks, (ids, heldout_ids, statistics_mask),
                                                          resume, overwrite)
        estimate = self._memory_plan(local_ids, ids.shape[1], device, data_parallel)
        check_resources(estimate, cfg, blocks, device)  # host memory and disk, before any block is touched
        report = self._new_report(calibration, estimate, data_parallel)
        factory = StreamFactory(estimate.stream_location, device, stream_dtype(self.model, cfg), cfg.stream_folder)
        hidden = self.model.config.get_text_config().hidden_size
        forward = BatchedForward(device, cfg.forward_batch_size, lambda rows: factory((rows, ids.shape[1], hidden)),
                                 data_parallel.sum_floats if data_parallel else None, self._warn)
        state = self.state = RunState(
            config=cfg, plan=plan, criterion=criterion, device=device, data_parallel=data_parallel, forward=forward,
            report=report, total_rows=total_rows, statistics_rows=_statistics_rows(statistics_mask, shards),
            sharded_rows=ShardedRows(data_parallel, total_rows["calibration"], shards["calibration"])
            if data_parallel else None,
        )
        if plan.block_wise:
            state.training = replace(BlockTrainingSettings.from_config(cfg),
                                     reconstruction_mode=estimate.reconstruction_mode)
        self.placement = BlockPlacement(device, cfg.stream_folder, overlap=estimate.overlap_placement)
        if self.checkpoints is not None:
            self.checkpoints.to_host = self.placement.staging.to_host
        state.kwargs = capture_block_kwargs(self.layout.base_model, blocks, ids[:1], device)
        if saved is not None:
            state.first_window = restore_run(saved, state, self, lambda: self._first_streams(local_ids, forward))
        else:
            state.streams = self._first_streams(local_ids, forward)
            self.allocate_sparsity()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return state

    def _shared_calibration(self, data_parallel: Optional[DataParallel]) -> Any:
        """Every process must see the same rows: rank 0 builds the set (self-generation included) and shares it."""
        calibration = self.calibration() if data_parallel is None or data_parallel.is_main else None
        if data_parallel is not None:
            calibration = data_parallel.broadcast_object(calibration)
        return calibration

    def _memory_plan(self, local_ids: dict[str, torch.Tensor], seq_len: int, device: torch.device,
                     data_parallel: Optional[DataParallel]) -> MemoryEstimate:
        """The memory estimate, with ``reconstruction_mode="auto"`` resolved (the same mode on every process)."""
        cfg, text_config = self.config, self.model.config.get_text_config()

        def estimate_for(mode: str) -> MemoryEstimate:
            return estimate_memory(
                self.layout.blocks, cfg, local_ids["calibration"].shape[0], local_ids["heldout"].shape[0], seq_len,
                text_config.hidden_size, stream_dtype(self.model, cfg), device,
                attention=getattr(text_config, "_attn_implementation", None),
                num_heads=getattr(text_config, "num_attention_heads", 0) or 0,
                experts_per_token=getattr(text_config, "num_experts_per_tok", 0) or 0, reconstruction_mode=mode,
            )

        mode, why = choose_reconstruction_mode(cfg, device, estimate_for)
        if data_parallel is not None:
            mode, why = data_parallel.broadcast_object((mode, why))
        if why:
            logger.info("%s", why)
        estimate = estimate_for(mode)
        estimate.reconstruction_mode_why = why
        plan_placement(estimate, cfg, device)
        logger.info("%s", estimate.summary())
        if self.show_progress and self._is_main():
            print(estimate.summary(), file=sys.stderr)
        return estimate

    def _new_report(self, calibration: Any, estimate: MemoryEstimate, data_parallel: Optional[DataParallel]):
        report = PruneReport(
            model_name=getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__,
            family=self.layout.family, config=self.config.to_dict(),
            blocks=[BlockReport(index=i) for i in range(len(self.layout.blocks))],
            calibration=dict(getattr(calibration, "description", {}) or {}),
        )
        report.memory = {"estimate": estimate.to_dict(), "peak_device_bytes_per_window": [],
                         "data_parallel_processes": data_parallel.world_size if data_parallel else 1}
        return report

    def _first_streams(self, local_ids: dict[str, torch.Tensor], forward: BatchedForward) -> dict[str, Streams]:
        streams = {}
        for split, split_ids in local_ids.items():
            first_inputs = forward.first_inputs(self.layout.base_model, self.layout.blocks[0], split_ids)
            # Both models share the embeddings, so the dense stream starts equal to the sparse one.
            dense_first = None
            if self.state.plan.dense_stream:
                dense_first = forward.new_stream(split_ids.shape[0]).copy_(first_inputs)
            streams[split] = Streams(sparse={0: first_inputs}, dense={0: dense_first})
        return streams

    # ------------------------------------------------------------------ the loop
    def _run_window(self, window_number: int, started: float) -> None:
        state, blocks = self.state, self.layout.blocks
        window = state.plan.windows[window_number]
        for index in window:
            if index in state.block_masks:
                continue
            with _timed(state.report.blocks[index], "placement"):
                block = self.take_block(index)
                if index + 1 < len(blocks):  # every schedule takes the blocks in order: the next one loads meanwhile
                    self.placement.prefetch(blocks[index + 1])
            if self.checkpoints is not None and state.plan.dense_stream:  # a resume recomputes the streams from it
                with _timed(state.report.blocks[index], "checkpoint"):
                    self.checkpoints.save_dense_block(index, block)
            if state.plan.dense_copies:
                state.dense_blocks[index] = copy.deepcopy(block)
            state.block_masks[index] = self._prepare_block(index, window[0])
        if state.plan.block_wise:
            self._reconstruct(window)
        # A block is final after the last window that contains it: with CR, the window after the one it first
        # entered; under cr_schedule="authors" a window (0,) at the start finalises nothing.
        finalised = list(state.plan.finalised_after(window_number))
        for index in finalised:
            self._finalise_block(index)
            block_report = state.report.blocks[index]
            if self.checkpoints is not None:
                with _timed(block_report, "checkpoint"):
                    self.checkpoints.save_block(index, blocks[index], state.block_masks[index])
            with _timed(block_report, "placement"):  # with overlap, the copies run while the next block computes
                self.placement.offload(blocks[index], background=True, deliver=self.masks.update,
                                       with_tensors=self.named_masks(index, state.block_masks[index]))
            state.dense_blocks.pop(index, None)
            # The key stays (the block is done); its device masks go, or they would pile up block after block.
            state.block_masks[index] = {}
        if state.device.type == "cuda":
            state.report.memory["peak_device_bytes_per_window"].append(torch.cuda.max_memory_allocated(state.device))
            torch.cuda.reset_peak_memory_stats(state.device)
        if self.checkpoints is not None and finalised:  # a checkpoint is made after each finalised block
            with _timed(state.report.blocks[finalised[-1]], "checkpoint"):
                self.checkpoints.save_step(finalised[-1], window_number + 1, state, blocks,
                                           state.elapsed_before + time.perf_counter() - started)
        self._announce_finalised_blocks()
        self._unannounced = list(finalised)
        if not self.placement.overlaps:
            self._announce_finalised_blocks()

    def _announce_finalised_blocks(self) -> None:
        """``on_block_end`` for finalised blocks once each is back where it lives (the callback may read it there).
        With overlapped placement that is at the end of the next window, so that their write-back overlaps its work."""
        announced, self._unannounced = self._unannounced, []
        for index in announced:
            self.placement.wait(self.layout.blocks[index])
            if self.on_block_end is not None:
                self.on_block_end(index, self.state.report)

    def take_block(self, index: int, load_state: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
        """Put block ``index`` on the execution device for its turn (backed up first if asked) and note it as
        modified; ``load_state``: a checkpoint's weights for it."""
        block = self.placement.onload(self.layout.blocks[index])
        if self.keep_backup:
            self.backups[index] = {k: self.placement.staging.to_host(v) for k, v in block.state_dict().items()}
        self.state.modified.append(index)
        if load_state is not None:
            block.load_state_dict(load_state, strict=True)
        return block

    def _prepare_block(self, index: int, window_start: int) -> dict[nn.Linear, torch.Tensor]:
        """Advance the dense streams past block ``index``, choose its masks (+ LR), measure the error before BR."""
        state, blocks, kwargs = self.state, self.layout.blocks, self.state.kwargs
        block, block_report, forward = blocks[index], state.report.blocks[index], state.forward
        with _timed(block_report, "dense_forward"):
            for split, stream in state.streams.items():
                stream.dense[index + 1] = None
                if stream.dense[index] is not None:
                    stream.dense[index + 1], _ = forward([block], [kwargs[index]], stream.dense[index],
                                                         block=index, split=split)
        # The block's input in the model pruned so far; with CR the previous block of the window is masked already.
        inputs = {}
        with _timed(block_report, "propagation"):
            for split, stream in state.streams.items():
                if index == window_start:
                    inputs[split] = stream.sparse[index]
                else:
                    inputs[split], _ = forward(blocks[window_start:index], kwargs[window_start:index],
                                               stream.sparse[window_start], block=index, split=split)
        masks = self._choose_masks(index, inputs["calibration"])
        # Without BR the block is final now: its output is the next sparse stream, so keep it instead of recomputing.
        final_now = not state.plan.block_wise
        with _timed(block_report, "propagation" if final_now else "error"):
            for split, stream in state.streams.items():
                block_report.error_before[split] = None
                if state.total_rows[split] == 0:
                    continue
                output, block_report.error_before[split] = forward(
                    [block], [kwargs[index]], inputs[split], stream.dense[index + 1], keep_output=final_now,
                    block=index, split=split, check_finite=final_now,
                )
                if final_now:
                    stream.sparse[index + 1] = output
        return masks

    def _reconstruct(self, window: tuple[int, ...]) -> None:
        from .reconstruction import reconstruct_window
        from .reconstruction.execution import choose_execution

        state, blocks, report = self.state, self.layout.blocks, self.state.report
        calibration = state.streams["calibration"]
        first, last = window[0], window[-1]
        window_blocks, window_kwargs = [blocks[i] for i in window], [state.kwargs[i] for i in window]
        start = time.perf_counter()
        if state.plan.global_targets:
            targets = calibration.dense[last + 1]
        else:
            targets, _ = state.forward([state.dense_blocks[i] for i in window], window_kwargs,
                                       calibration.sparse[first], block=first)
        masks = {layer: mask for i in window for layer, mask in state.block_masks[i].items()}
        extra = {} if state.sharded_rows is None else {"sharded_rows": state.sharded_rows}
        extra["frozen"] = [block.get_parameter(name) for block in window_blocks
                           for name, why in unprunable_parameters(block, self.prunable_weights(block)).items()
                           if why == "router"]
        if choose_execution(state.training.compile_blocks, state.device, window_blocks,
                            routed=bool(extra["frozen"])) == "graphed":
            # A CUDA graph's capture (global mode) fails if another thread makes a CUDA call meanwhile: no block
            # moves in the background while this window may capture. Such windows are small, so are their moves.
            self.placement.wait_all()
        heldout = state.streams.get("heldout")
        if heldout is not None and state.total_rows.get("heldout", 0) > 0:  # what br_lr="auto" / br_keep_best judge by
            extra["heldout_inputs"] = heldout.sparse[first]
            extra["heldout_targets"] = heldout.dense[last + 1] if state.plan.global_targets else state.forward(
                [state.dense_blocks[i] for i in window], window_kwargs, heldout.sparse[first], block=first,
                split="heldout")[0]
        try:
            with torch.enable_grad():
                result = reconstruct_window(
                    window_blocks, masks, calibration.sparse[first], targets, window_kwargs,
                    state.training, state.device, show_progress=False,
                    window_name=f"blocks {window}", **extra,
                )
        except torch.OutOfMemoryError as error:  # the trainer has restored the window's weights already
            raise torch.OutOfMemoryError(
                f"block reconstruction of decoder blocks {list(window)} ran out of memory with "
                f"br_batch_size={self.config.br_batch_size} ({error}). Lower br_batch_size (this changes the "
                "optimisation), use reconstruction_mode='lora', autocast_dtype='bfloat16', stream_location='cpu', "
                "or a device with more memory."
            ) from error
        if state.data_parallel is not None:
            state.data_parallel.broadcast_module_(window_blocks)
        seconds = time.perf_counter() - start
        report.warnings.extend(f"window {window}: {note}" for note in result.notes)
        choice = None if result.choice is None else {"window": list(window), "execution": result.execution,
                                                     **result.choice.to_dict()}
        for i in window:
            block_report = report.blocks[i]
            block_report.warnings.extend(result.notes)
            block_report.train_losses.append(list(result.epoch_losses))
            if choice is not None:  # learning rate, epoch kept, early stop, revert: what and why
                block_report.br_choices.append(choice)
            block_report.add_time("reconstruction", seconds / len(window))
            if result.reverted:
                block_report.reverted = True
                block_report.warnings.append(result.warning or "non-finite loss: reverted")
        if result.reverted:
            report.warnings.append(result.warning or f"window {window}: non-finite loss, reverted")

    def _finalise_block(self, index: int) -> None:
        """The block will not change again: its output on the sparse stream becomes the next block's input."""
        state, block = self.state, self.layout.blocks[index]
        block_report = state.report.blocks[index]
        with _timed(block_report, "propagation"):
            for split, stream in state.streams.items():
                if state.total_rows[split] == 0:
                    stream.sparse.setdefault(index + 1, stream.sparse[index])
                    block_report.error_after[split] = None
                elif index + 1 in stream.sparse and not state.plan.block_wise:
                    block_report.error_after[split] = block_report.error_before[split]
                else:
                    stream.sparse[index + 1], block_report.error_after[split] = state.forward(
                        [block], [state.kwargs[index]], stream.sparse[index], stream.dense[index + 1],
                        block=index, split=split, check_finite=True,
                    )
                stream.drop(index)
        self._count_parameters(block, block_report)

    # ------------------------------------------------------------------ helpers
    def _warn(self, message: str, block: Optional[int]) -> None:
        if self.state is None:
            return
        self.state.report.warnings.append(message)
        if block is not None:
            self.state.report.blocks[block].warnings.append(message)

    def _is_main(self) -> bool:
        data_parallel = None if self.state is None else self.state.data_parallel
        return data_parallel is None or data_parallel.is_main

    def _progress(self, total: int):
        if not self.show_progress or not self._is_main():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="pruning blocks", unit="block")

    def _note_existing_zeros(self) -> None:
        report = self.state.report
        zeros, total = self.state.existing_zeros
        if not zeros or not total:
            return
        fraction = zeros / total
        if self.config.keep_existing_zeros:
            message = (f"the model already had {fraction:.2%} zeros in its pruned layers; they were kept and count "
                       "toward the sparsity (keep_existing_zeros=True)")
        else:
            message = (f"the model already had {fraction:.2%} zeros in its pruned layers; the masks did not treat "
                       "them specially, so some may have been revived (set keep_existing_zeros=True to keep them and "
                       "count them toward the sparsity)")
        if fraction >= ALREADY_SPARSE_WARNING:
            logger.warning(message)
            report.warnings.append(message)
        else:
            logger.info(message)


def stream_dtype(model: nn.Module, config: Any) -> torch.dtype:
    """The dtype of the activation streams: ``stream_dtype``, or the model's."""
    return resolve_dtype(config.stream_dtype, next(model.parameters()).dtype)


def _statistics_rows(statistics_mask: torch.Tensor, shards: dict[str, slice]) -> Union[slice, torch.Tensor]:
    rows = statistics_mask[shards["calibration"]].nonzero().squeeze(1)
    # Real rows come first, so the statistics rows are usually a prefix: a view instead of a copy.
    is_prefix = bool((rows == torch.arange(rows.numel())).all())
    return slice(0, rows.numel()) if is_prefix else rows

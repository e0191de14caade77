"""The block engine: walk the decoder blocks in order, choose masks, reconstruct, propagate. Nothing model-specific.

Streams (each [rows, seq_len, hidden]):
    sparse calibration stream   S_b  input of block b in the model pruned so far
    dense calibration stream    D_b  input of block b in the dense model (GP target and the reported error's reference)
    and the same two for the held-out samples, which never reach mask statistics or the optimiser.

A *window* is the set of blocks trained together: one block, or two adjacent blocks with cross-block
reconstruction (CR), sliding by one. A block is *prepared* (masked, and LR-updated) when it first enters a window and
*finalised* (its output becomes the next sparse stream) when it leaves the last window it belongs to.

Only the blocks of the current window (and their dense copies when BR needs them) are on the execution device; the
rest stay where the model keeps them, including Accelerate's CPU/disk offload (``offload.py``). The streams live on
the device, in (pinned) CPU memory or in a memory-mapped file, as the memory plan decides (``memory.py``). Under
torch.distributed every process runs this loop on its shard of the rows (``distributed.py``).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .architectures import prunable_linears, resolve_layout
from .block_io import batches, call_window
from .capture import capture_block_kwargs, capture_first_block_inputs
from .config import PruningConfig
from .criteria import StatisticsRecorder, needs_hessian, needs_statistics, prune_linear
from .distributed import DataParallel, ShardedRows
from .memory import estimate_memory, plan_placement
from .offload import BlockPlacement, StreamFactory, execution_device, resolve_dtype
from .report import BlockReport, PruneReport

logger = logging.getLogger(__name__)


class PruningFailedError(RuntimeError):
    """Raised when prune() fails part-way; says whether the model was restored or is partially modified."""


@contextmanager
def _timed(report: BlockReport, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        report.add_time(stage, time.perf_counter() - start)


class Pruner:
    """Prune a Hugging Face causal LM in place, block by block, following a PruningConfig.

    Args:
        model: any ``AutoModelForCausalLM`` model of a supported family (see ``architectures.py``).
        config: the PruningConfig.
        tokenizer: needed to tokenise text calibration sources and for self-generated data.
        calibration_data: an already built ``CalibrationSet`` (or a LongTensor of token ids [N, L]) instead of
            reading ``config.calibration``.
        keep_backup: keep a CPU copy of every block before it is modified so that a failure restores the model
            exactly (costs host memory equal to the model's size). Without it, a failure raises
            ``PruningFailedError`` that says which blocks were modified.
        show_progress: tqdm progress bar over the blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[PruningConfig] = None,
        tokenizer: Any = None,
        calibration_data: Any = None,
        keep_backup: bool = False,
        show_progress: bool = True,
    ):
        self.model = model
        self.config = config if config is not None else PruningConfig()
        self.tokenizer = tokenizer
        self.calibration_data = calibration_data
        self.keep_backup = keep_backup
        self.show_progress = show_progress
        self.layout = resolve_layout(model)
        self.report: Optional[PruneReport] = None
        self.masks: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ calibration
    def _calibration_set(self):
        from .calibration import CalibrationSet, build_calibration_set

        data = self.calibration_data
        if data is None:
            return build_calibration_set(self.config, self.tokenizer, self.model)
        if isinstance(data, torch.Tensor):
            return CalibrationSet(
                input_ids=data.long(),
                is_self_generated=torch.zeros(data.shape[0], dtype=torch.bool),
                heldout_ids=data.new_zeros((0, data.shape[1])).long(),
                statistics_mask=torch.ones(data.shape[0], dtype=torch.bool),
                description={"source": "user-provided token ids", "num_samples": int(data.shape[0])},
            )
        return data

    # ------------------------------------------------------------------ public
    def prune(self) -> PruneReport:
        """Run the block loop; returns (and keeps in ``self.report``) the PruneReport."""
        model, cfg = self.model, self.config
        started = time.perf_counter()
        backups: dict[int, dict[str, torch.Tensor]] = {}
        self._modified: list[int] = []
        self._placement = None
        was_training = model.training
        use_cache = getattr(model.config, "use_cache", None)
        model.eval()
        if use_cache is not None:
            model.config.use_cache = False
        try:
            report = self._run(backups)
        except BaseException as error:
            self._handle_failure(error, backups)
            raise
        finally:
            model.train(was_training)
            if use_cache is not None:
                model.config.use_cache = use_cache
        report.total_seconds = time.perf_counter() - started
        self.report = report
        return report

    def record_perplexity(self, dataset: str, split: str, seq_len: int, dense: Optional[float], pruned: float) -> None:
        """Store measured perplexities in the report (and so in the model card's model-index)."""
        self._require_report().perplexity[str(dataset)] = {
            "split": split, "seq_len": seq_len, "dense": dense, "pruned": pruned,
        }

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> str:
        """Save the pruned model (dense safetensors), tokenizer, PruningConfig in config.json, report and model card.

        In a data-parallel run every process holds the same model: rank 0 writes, the others wait for it.
        """
        from .hub import save_pruned_model

        data_parallel = getattr(self, "_data_parallel", None)
        if data_parallel is not None:
            folder = None
            if data_parallel.is_main:
                folder = save_pruned_model(self.model, save_directory, self.config, tokenizer=self.tokenizer,
                                           report=self._require_report(), **kwargs)
            return data_parallel.broadcast_object(folder)
        return save_pruned_model(self.model, save_directory, self.config, tokenizer=self.tokenizer,
                                 report=self._require_report(), **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        local_dir: Optional[str] = None,
    ) -> str:
        """Save locally (``local_dir``, default ``./<repo name>``), then upload that folder; returns the commit URL.

        The token is passed to huggingface_hub only; it is never written to a file, a log or the card.
        """
        from .hub import push_folder_to_hub

        folder = self.save_pretrained(local_dir or repo_id.split("/")[-1], repo_id=repo_id)
        return push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                  revision=revision, create_pr=create_pr)

    def _require_report(self) -> PruneReport:
        if self.report is None:
            raise RuntimeError("call Pruner.prune() before saving or pushing: the model has not been pruned yet")
        return self.report

    def _handle_failure(self, error: BaseException, backups: dict[int, dict[str, torch.Tensor]]) -> None:
        placement = getattr(self, "_placement", None)
        if placement is not None:
            try:  # the blocks of the failed window go back where they live (and under their accelerate hooks)
                placement.restore_all(list(self.layout.blocks))
            except Exception as restore_error:  # noqa: BLE001 - the original error matters more
                logger.error("could not put the blocks back after the failure: %s", restore_error)
        if not self._modified:
            return
        if self.keep_backup:
            for index, state in backups.items():
                block = self.layout.blocks[index]
                if placement is not None:
                    placement.onload(block)  # an offloaded block holds meta tensors: restore through its storage
                block.load_state_dict(state)
                if placement is not None:
                    placement.offload(block)
            logger.error("pruning failed (%s); the %d modified blocks were restored", error, len(backups))
            return
        self.model._hf_recon_prune_incomplete = True
        message = (
            f"pruning failed in the middle of the run ({type(error).__name__}: {error}); decoder blocks "
            f"{sorted(set(self._modified))} of the model were ALREADY MODIFIED in place. The model is partially "
            "pruned: reload it before using it, or pass keep_backup=True to have it restored on failure."
        )
        logger.error(message)
        if isinstance(error, Exception):
            raise PruningFailedError(message) from error

    # ------------------------------------------------------------------ engine
    @torch.no_grad()
    def _run(self, backups: dict[int, dict[str, torch.Tensor]]) -> PruneReport:
        cfg, model, layout = self.config, self.model, self.layout
        blocks = layout.blocks
        num_blocks = len(blocks)
        data_parallel = DataParallel.resolve(cfg.data_parallel)
        self._data_parallel = data_parallel
        device = data_parallel.device(cfg.device) if data_parallel else execution_device(cfg.device)
        model_dtype = next(model.parameters()).dtype
        dtype = resolve_dtype(cfg.stream_dtype, model_dtype)

        # Every process must see the same rows: rank 0 builds the set (self-generation included) and shares it.
        calibration = self._calibration_set() if data_parallel is None or data_parallel.is_main else None
        if data_parallel is not None:
            calibration = data_parallel.broadcast_object(calibration)
        ids, heldout_ids = calibration.input_ids, calibration.heldout_ids
        statistics_mask = calibration.statistics_mask.bool()
        if not bool(statistics_mask.any()) and needs_statistics(cfg.method, cfg.uses("lr")):
            raise ValueError(f"method={cfg.method!r} needs calibration rows for its statistics, but none is marked")
        self._total_rows = {"calibration": ids.shape[0], "heldout": heldout_ids.shape[0]}
        shards = {split: data_parallel.shard(n) if data_parallel else slice(0, n) for split, n in self._total_rows.items()}
        local_ids = {"calibration": ids[shards["calibration"]], "heldout": heldout_ids[shards["heldout"]]}
        statistics_rows = statistics_mask[shards["calibration"]].nonzero().squeeze(1)
        # Real rows come first, so the statistics rows are usually a prefix: a view instead of a copy.
        is_prefix = bool((statistics_rows == torch.arange(statistics_rows.numel())).all())
        stat_rows = slice(0, statistics_rows.numel()) if is_prefix else statistics_rows
        self._sharded_rows = (
            ShardedRows(data_parallel, self._total_rows["calibration"], shards["calibration"]) if data_parallel else None
        )

        text_config = model.config.get_text_config()
        hidden = text_config.hidden_size
        seq_len = ids.shape[1]
        estimate = estimate_memory(
            blocks, cfg, local_ids["calibration"].shape[0], local_ids["heldout"].shape[0], seq_len, hidden, dtype,
            device, attention=getattr(text_config, "_attn_implementation", None),
            num_heads=getattr(text_config, "num_attention_heads", 0) or 0,
        )
        plan_placement(estimate, cfg, device)
        logger.info("%s", estimate.summary())
        if self.show_progress and (data_parallel is None or data_parallel.is_main):
            print(estimate.summary(), file=sys.stderr)
        self._stream_factory = StreamFactory(estimate.stream_location, device, dtype, cfg.stream_folder)
        placement = BlockPlacement(device, cfg.stream_folder)
        self._placement = placement

        def new_stream(rows: int) -> torch.Tensor:
            return self._stream_factory((rows, seq_len, hidden))

        report = PruneReport(
            model_name=getattr(model.config, "_name_or_path", "") or type(model).__name__,
            family=layout.family,
            config=cfg.to_dict(),
            blocks=[BlockReport(index=i) for i in range(num_blocks)],
            calibration=dict(getattr(calibration, "description", {}) or {}),
        )
        report.memory = {"estimate": estimate.to_dict(), "peak_device_bytes_per_window": [],
                         "data_parallel_processes": data_parallel.world_size if data_parallel else 1}

        kwargs = capture_block_kwargs(layout.base_model, blocks, ids[:1], device)
        track_dense = cfg.track_reconstruction_error or cfg.uses("gp")
        streams = {}
        for split, split_ids in local_ids.items():
            first_inputs = capture_first_block_inputs(
                layout.base_model, blocks[0], split_ids, cfg.forward_batch_size, device, new_stream(split_ids.shape[0])
            )
            # Both models share the embeddings, so the dense stream starts equal to the sparse one.
            dense_first = None
            if track_dense:
                dense_first = new_stream(split_ids.shape[0])
                dense_first.copy_(first_inputs)
            streams[split] = _Streams(sparse={0: first_inputs}, dense={0: dense_first})

        self._device, self._new_stream = device, new_stream
        measure_peaks = device.type == "cuda"
        if measure_peaks:
            torch.cuda.reset_peak_memory_stats(device)
        windows: list[tuple[int, ...]] = [(i,) for i in range(num_blocks)]
        reconstruct_window = None
        if cfg.uses("br"):
            from .reconstruction import reconstruct_window, reconstruction_windows

            windows = reconstruction_windows(num_blocks, cross_block=cfg.uses("cr"))
        block_masks: dict[int, dict[nn.Linear, torch.Tensor]] = {}
        dense_blocks: dict[int, nn.Module] = {}
        progress = self._progress(len(windows)) if data_parallel is None or data_parallel.is_main else None

        for window_number, window in enumerate(windows):
            for index in window:
                if index in block_masks:
                    continue
                block = placement.onload(blocks[index])
                if self.keep_backup:
                    backups[index] = {k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()}
                if cfg.uses("br") and not cfg.uses("gp"):
                    dense_blocks[index] = copy.deepcopy(block)
                self._modified.append(index)
                block_masks[index] = self._prepare_block(index, window[0], blocks, kwargs, streams, stat_rows,
                                                         report.blocks[index])

            if cfg.uses("br"):
                self._reconstruct(window, blocks, kwargs, block_masks, streams["calibration"], dense_blocks, report,
                                  reconstruct_window)

            is_last = window_number == len(windows) - 1
            for index in (window if is_last else window[:1]):
                self._finalise_block(index, blocks, kwargs, streams, report.blocks[index])
                for mask_name, mask in self._named_masks(index, block_masks[index]).items():
                    self.masks[mask_name] = mask.to("cpu")
                placement.offload(blocks[index])
                dense_blocks.pop(index, None)
            if measure_peaks:
                report.memory["peak_device_bytes_per_window"].append(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            if progress is not None:
                progress.update(1)
                last = report.blocks[window[0]].error_after.get("calibration")
                if last is not None:
                    progress.set_postfix(block=window[0], err=f"{last:.3g}")
        if progress is not None:
            progress.close()
        return report

    def _named_masks(self, index: int, masks: dict[nn.Linear, torch.Tensor]) -> dict[str, torch.Tensor]:
        block = self.layout.blocks[index]
        lookup = {id(module): name for name, module in block.named_modules()}
        return {f"{self.layout.blocks_path}.{index}.{lookup[id(layer)]}": mask for layer, mask in masks.items()}

    def _progress(self, total: int):
        if not self.show_progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="pruning blocks", unit="block")

    # ------------------------------------------------------------------ steps
    def _forward(
        self, blocks: Sequence[nn.Module], kwargs: Sequence[dict], stream: torch.Tensor,
        reference: Optional[torch.Tensor] = None, keep_output: bool = True,
    ) -> tuple[Optional[torch.Tensor], Optional[float]]:
        """Run ``blocks`` over every row of ``stream``, batched; optionally the MSE of the output to ``reference``
        (over every process's rows in a data-parallel run: then every process must call with a reference)."""
        out = self._new_stream(stream.shape[0]) if keep_output else None
        squared_error = torch.zeros((), dtype=torch.float64, device=self._device)
        count = 0
        for rows in batches(stream.shape[0], self.config.forward_batch_size):
            x = stream[rows].to(self._device, non_blocking=True)
            y = call_window(blocks, x, kwargs)
            if out is not None:
                out[rows] = y.to(out.device, out.dtype, non_blocking=True)
            if reference is not None:
                ref = reference[rows].to(self._device, non_blocking=True)
                squared_error += (y.float() - ref.float()).square().sum().double()
                count += y.numel()
        if reference is None:
            return out, None
        total, count = float(squared_error), float(count)
        if self._data_parallel is not None:
            total, count = self._data_parallel.sum_floats([total, count])
        return out, (total / count if count else None)

    def _prepare_block(self, index, window_start, blocks, kwargs, streams, stat_rows, block_report):
        """Advance the dense streams past block ``index``, choose its masks (+ LR), measure the error before BR."""
        cfg = self.config
        block, block_kwargs = blocks[index], [kwargs[index]]
        with _timed(block_report, "dense_forward"):
            for stream in streams.values():
                if stream.dense[index] is not None:
                    stream.dense[index + 1], _ = self._forward([block], block_kwargs, stream.dense[index])
                else:
                    stream.dense[index + 1] = None

        # The block's input in the model pruned so far; with CR the previous block of the window is masked already.
        inputs = {}
        with _timed(block_report, "propagation"):
            for split, stream in streams.items():
                if index == window_start:
                    inputs[split] = stream.sparse[index]
                else:
                    inputs[split], _ = self._forward(blocks[window_start:index], kwargs[window_start:index],
                                                     stream.sparse[window_start])

        layers = prunable_linears(block, cfg.include_modules, cfg.exclude_modules)
        lr = cfg.uses("lr")
        recorder = None
        if needs_statistics(cfg.method, lr) and layers:
            with _timed(block_report, "statistics"):
                recorder = StatisticsRecorder(layers, hessian=needs_hessian(cfg.method, lr))
                try:
                    self._forward([block], block_kwargs, inputs["calibration"][stat_rows], keep_output=False)
                finally:
                    recorder.remove()
                if self._data_parallel is not None:
                    self._reduce_statistics(recorder)

        masks: dict[nn.Linear, torch.Tensor] = {}
        with _timed(block_report, "masks_lr"):
            for name, layer in layers.items():
                result = prune_linear(
                    layer, cfg.method, cfg.sparsity, cfg.nm, recorder.stats[name] if recorder else None, lr,
                    cfg.sparsegpt_block_size, cfg.sparsegpt_dampening, name=f"block {index} {name}",
                )
                masks[layer] = result.keep_mask
                if result.dampening is not None:
                    block_report.dampening[name] = result.dampening
            if self._data_parallel is not None:
                self._data_parallel.broadcast_([t for layer, mask in masks.items() for t in (layer.weight.data, mask)])
        del recorder

        # Without BR the block is final now: its output is the next sparse stream, so keep it instead of recomputing.
        final_now = not cfg.uses("br")
        with _timed(block_report, "propagation" if final_now else "error"):
            for split, stream in streams.items():
                if self._total_rows[split] == 0:
                    block_report.error_before[split] = None
                    continue
                output, block_report.error_before[split] = self._forward(
                    [block], block_kwargs, inputs[split], stream.dense[index + 1], keep_output=final_now
                )
                if final_now:
                    stream.sparse[index + 1] = output
        return masks

    def _reduce_statistics(self, recorder: StatisticsRecorder) -> None:
        stats = list(recorder.stats.values())
        counts = self._data_parallel.sum_floats(float(s.num_tokens) for s in stats)
        for statistics, count in zip(stats, counts):
            statistics.num_tokens = int(count)
        self._data_parallel.all_reduce_([t for s in stats for t in s.accumulators()])

    def _reconstruct(self, window, blocks, kwargs, block_masks, calibration, dense_blocks, report, reconstruct_window):
        cfg = self.config
        first, last = window[0], window[-1]
        window_blocks = [blocks[i] for i in window]
        window_kwargs = [kwargs[i] for i in window]
        start = time.perf_counter()
        if cfg.uses("gp"):
            targets = calibration.dense[last + 1]
        else:
            targets, _ = self._forward([dense_blocks[i] for i in window], window_kwargs, calibration.sparse[first])
        masks = {layer: mask for i in window for layer, mask in block_masks[i].items()}
        extra = {} if self._sharded_rows is None else {"sharded_rows": self._sharded_rows}
        with torch.enable_grad():
            result = reconstruct_window(
                window_blocks, masks, calibration.sparse[first], targets, window_kwargs, cfg, self._device,
                show_progress=False, window_name=f"blocks {window}", **extra,
            )
        if self._data_parallel is not None:
            self._data_parallel.broadcast_module_(window_blocks)
        seconds = time.perf_counter() - start
        for i in window:
            block_report = report.blocks[i]
            block_report.train_losses.append(list(result.epoch_losses))
            block_report.add_time("reconstruction", seconds / len(window))
            if result.reverted:
                block_report.reverted = True
                block_report.warnings.append(result.warning or "non-finite loss: reverted")
        if result.reverted:
            report.warnings.append(result.warning or f"window {window}: non-finite loss, reverted")

    def _finalise_block(self, index, blocks, kwargs, streams, block_report):
        """The block will not change again: its output on the sparse stream becomes the next block's input."""
        block = blocks[index]
        with _timed(block_report, "propagation"):
            for split, stream in streams.items():
                if self._total_rows[split] == 0:
                    stream.sparse.setdefault(index + 1, stream.sparse[index])
                    block_report.error_after[split] = None
                elif index + 1 in stream.sparse and not self.config.uses("br"):
                    block_report.error_after[split] = block_report.error_before[split]
                else:
                    stream.sparse[index + 1], block_report.error_after[split] = self._forward(
                        [block], [kwargs[index]], stream.sparse[index], stream.dense[index + 1]
                    )
                stream.drop(index)
        block_report.layer_sparsity = {
            name: float((layer.weight == 0).float().mean())
            for name, layer in prunable_linears(block, self.config.include_modules, self.config.exclude_modules).items()
        }


@dataclass
class _Streams:
    """The activations entering each block, for one set of samples (calibration or held-out), keyed by block index."""

    sparse: dict[int, torch.Tensor]
    dense: dict[int, Optional[torch.Tensor]]  # None when nothing needs the dense model's activations

    def drop(self, index: int) -> None:
        self.sparse.pop(index, None)
        self.dense.pop(index, None)

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
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from . import checkpoint as checkpoints
from .architectures import prunable_linears, resolve_layout
from .block_io import call_window, halved_after_out_of_memory
from .capture import capture_block_kwargs, capture_first_block_inputs
from .config import PruningConfig
from .criteria import (
    HessianFactors, LayerPruneResult, StatisticsRecorder, needs_hessian, needs_statistics, prune_linear,
    prune_linear_keeping_zeros,
)
from .distributed import DataParallel, ShardedRows
from .memory import estimate_memory, plan_placement
from .offload import BlockPlacement, StreamFactory, StreamRows, execution_device, resolve_dtype
from .report import BlockReport, PruneReport

logger = logging.getLogger(__name__)


class PruningFailedError(RuntimeError):
    """Raised when prune() fails part-way; says whether the model was restored or is partially modified."""


class NonFiniteActivationsError(RuntimeError):
    """A finalised block produced NaN or Inf activations; the message names the block and the samples."""


class _RestartPass(Exception):
    """A pass that accumulates (mask statistics) ran out of memory: run it again from the start, smaller batches."""


#: Above this fraction of zeros in the prunable layers before pruning, the note about it is a warning in the report.
ALREADY_SPARSE_WARNING = 0.01


@contextmanager
def _timed(report: BlockReport, stage: str) -> Iterator[None]:
    """Add the stage's wall time to the block's report. CUDA work is asynchronous, so the stage ends with a
    synchronisation: without it a stage's kernels would be billed to whichever later stage waits for them (the
    stages are long, so the lost overlap costs little)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
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
        on_block_end: called as ``on_block_end(index, report)`` after decoder block ``index`` is finalised (its
            weights will not change again) and, with ``config.checkpoint_dir``, after its checkpoint is on disk.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[PruningConfig] = None,
        tokenizer: Any = None,
        calibration_data: Any = None,
        keep_backup: bool = False,
        show_progress: bool = True,
        on_block_end: Optional[Callable[[int, PruneReport], None]] = None,
    ):
        self.model = model
        self.config = config if config is not None else PruningConfig()
        self.tokenizer = tokenizer
        self.calibration_data = calibration_data
        self.keep_backup = keep_backup
        self.show_progress = show_progress
        self.on_block_end = on_block_end
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
    def prune(self, resume: bool = False) -> PruneReport:
        """Run the block loop; returns (and keeps in ``self.report``) the PruneReport.

        Args:
            resume: continue from the latest complete checkpoint in ``config.checkpoint_dir`` (one is written after
                every finalised block). The model must be the same dense model the interrupted run started from,
                with the same configuration and calibration data (checked: a mismatch raises
                ``checkpoint.CheckpointError``); the result is the model an uninterrupted run produces (bit for bit
                on the CPU). Without a checkpoint in the folder the run starts from the first block.

        On a CUDA device the engine resets ``torch.cuda``'s peak-memory statistics before every window, to report
        the peak of each window in ``report.memory["peak_device_bytes_per_window"]``: read peaks from there, not from
        ``torch.cuda.max_memory_allocated()`` after the call.
        """
        model, cfg = self.model, self.config
        if resume and not cfg.checkpoint_dir:
            raise ValueError("prune(resume=True) needs PruningConfig.checkpoint_dir: the folder the interrupted run "
                             "wrote its checkpoints to")
        self._resume = resume
        self._elapsed_before = 0.0
        started = self._started = time.perf_counter()
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
        report.total_seconds = self._elapsed_before + time.perf_counter() - started
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
        if cfg.checkpoint_dir and data_parallel is not None:
            raise ValueError("PruningConfig.checkpoint_dir is not supported in a data-parallel run yet (every process "
                             "holds its own shard of the streams); run on one process or set checkpoint_dir=None")
        device = data_parallel.device(cfg.device) if data_parallel else execution_device(cfg.device)
        model_dtype = next(model.parameters()).dtype
        dtype = resolve_dtype(cfg.stream_dtype, model_dtype)
        self._batch_size = cfg.forward_batch_size
        self._existing_zeros = [0, 0]  # zeros found in the prunable layers before pruning, their size

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
        saved = self._open_checkpoint(ids, heldout_ids, statistics_mask)

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
        self._report = report
        self._device, self._new_stream = device, new_stream

        kwargs = capture_block_kwargs(layout.base_model, blocks, ids[:1], device)
        track_dense = cfg.track_reconstruction_error or cfg.uses("gp")
        windows: list[tuple[int, ...]] = [(i,) for i in range(num_blocks)]
        reconstruct_window = None
        if cfg.uses("br"):
            from .reconstruction import reconstruct_window, reconstruction_windows

            windows = reconstruction_windows(num_blocks, cross_block=cfg.uses("cr"))
        block_masks: dict[int, dict[nn.Linear, torch.Tensor]] = {}
        dense_blocks: dict[int, nn.Module] = {}
        first_window = 0
        if saved is not None:
            report, streams, first_window = self._restore(saved, block_masks, dense_blocks, backups, report)
            self._report = report
        else:
            streams = {}
            for split, split_ids in local_ids.items():
                first_inputs = self._capture_first_inputs(split_ids, device, new_stream(split_ids.shape[0]))
                # Both models share the embeddings, so the dense stream starts equal to the sparse one.
                dense_first = None
                if track_dense:
                    dense_first = new_stream(split_ids.shape[0])
                    dense_first.copy_(first_inputs)
                streams[split] = _Streams(sparse={0: first_inputs}, dense={0: dense_first})

        measure_peaks = device.type == "cuda"
        if measure_peaks:
            torch.cuda.reset_peak_memory_stats(device)
        progress = self._progress(len(windows)) if data_parallel is None or data_parallel.is_main else None
        if progress is not None and first_window:
            progress.update(first_window)

        for window_number in range(first_window, len(windows)):
            window = windows[window_number]
            for index in window:
                if index in block_masks:
                    continue
                with _timed(report.blocks[index], "placement"):
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
            finalised = list(window if is_last else window[:1])
            for index in finalised:
                self._finalise_block(index, blocks, kwargs, streams, report.blocks[index])
                with _timed(report.blocks[index], "placement"):
                    for mask_name, mask in self._named_masks(index, block_masks[index]).items():
                        self.masks[mask_name] = mask.to("cpu")
                if self._checkpoint is not None:
                    with _timed(report.blocks[index], "checkpoint"):
                        self._save_block(index, block_masks[index])
                with _timed(report.blocks[index], "placement"):
                    placement.offload(blocks[index])
                dense_blocks.pop(index, None)
                # The key stays (the block is done); its device masks go, or they would pile up block after block.
                block_masks[index] = {}
            if measure_peaks:
                report.memory["peak_device_bytes_per_window"].append(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            if self._checkpoint is not None:
                with _timed(report.blocks[finalised[-1]], "checkpoint"):
                    self._save_step(finalised[-1], window_number + 1, block_masks, dense_blocks, streams, report,
                                    self._elapsed_before + time.perf_counter() - self._started)
            if progress is not None:
                progress.update(1)
                last = report.blocks[window[0]].error_after.get("calibration")
                if last is not None:
                    progress.set_postfix(block=window[0], err=f"{last:.3g}")
            if self.on_block_end is not None:
                for index in finalised:
                    self.on_block_end(index, report)
        if progress is not None:
            progress.close()
        self._note_existing_zeros(report)
        return report

    # ------------------------------------------------------------------ checkpoints
    def _open_checkpoint(self, ids, heldout_ids, statistics_mask) -> Optional[checkpoints.Checkpoint]:
        """Set up checkpointing (``self._checkpoint``); with resume, the checkpoint to continue from (or None)."""
        cfg = self.config
        self._checkpoint = None
        if not cfg.checkpoint_dir:
            return None
        folder = cfg.checkpoint_dir
        model_info = checkpoints.model_fingerprint(self.model, self.layout.blocks)
        calibration = checkpoints.tensor_fingerprint(ids, heldout_ids, statistics_mask)
        config_dict = cfg.to_dict()
        # The weights the run starts from, block by block (a strided sample): a resume checks that the blocks it
        # takes from the model are still these.
        current_samples = [checkpoints.block_weights_sample(block) for block in self.layout.blocks]
        latest = checkpoints.latest_step(folder)
        saved = None
        if getattr(self, "_resume", False):
            if latest is None:
                logger.info("no checkpoint in %s yet: starting from the first block", folder)
            else:
                saved = checkpoints.Checkpoint(latest)
                saved.check_matches(config_dict, model_info, calibration)
                saved.check_dense_blocks(current_samples)
                logger.info("resuming from %s (after block %s)", latest, saved.manifest.get("step"))
        elif latest is not None:
            logger.warning("starting afresh: the checkpoint in %s will be replaced (pass resume=True, or --resume, "
                           "to continue it instead)", latest)
        if saved is not None:
            run_id, fingerprint = saved.manifest["run_id"], saved.manifest["fingerprint"]
            dense_samples = saved.manifest.get("dense_block_samples") or current_samples
        else:
            run_id = checkpoints.new_run_id()
            fingerprint = checkpoints.run_fingerprint(config_dict, model_info, calibration)
            dense_samples = current_samples
        self._checkpoint = {"folder": folder, "run_id": run_id, "fingerprint": fingerprint, "config": config_dict,
                            "model": model_info, "calibration": calibration, "dense_block_samples": dense_samples}
        return saved

    def _save_block(self, index: int, masks: dict[nn.Linear, torch.Tensor]) -> None:
        block = self.layout.blocks[index]
        names = {id(layer): name for name, layer in block.named_modules()}
        info = self._checkpoint
        checkpoints.save_block(info["folder"], index, block.state_dict(),
                               {names[id(layer)]: mask for layer, mask in masks.items()},
                               info["run_id"], info["fingerprint"])

    def _save_step(self, step, next_window, block_masks, dense_blocks, streams, report, elapsed) -> None:
        """Everything the next window needs that is not in the block files: pending blocks, streams, RNG, report."""
        info = self._checkpoint
        finalised = sorted(set(self._modified) - {i for i in block_masks if i > step})
        pending = sorted(i for i in block_masks if i > step)
        state: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        if self._device.type == "cuda":
            state["rng.cuda"] = torch.cuda.get_rng_state(self._device)
        for index in pending:
            block = self.layout.blocks[index]
            names = {id(layer): name for name, layer in block.named_modules()}
            state.update({f"pending.{index}.state.{k}": v for k, v in block.state_dict().items()})
            state.update({f"pending.{index}.mask.{names[id(layer)]}": m for layer, m in block_masks[index].items()})
            if index in dense_blocks:
                state.update({f"pending.{index}.dense.{k}": v for k, v in dense_blocks[index].state_dict().items()})
        tensors, layout = {}, {}
        for split, stream in streams.items():
            layout[split] = {"sparse": sorted(stream.sparse), "dense": sorted(stream.dense),
                             "dense_none": sorted(k for k, v in stream.dense.items() if v is None)}
            for kind in ("sparse", "dense"):
                for key, tensor in getattr(stream, kind).items():
                    if tensor is not None:
                        tensors[f"{split}-{kind}-{key}"] = tensor
        manifest = {
            "run_id": info["run_id"], "fingerprint": info["fingerprint"], "config": info["config"],
            "model": info["model"], "calibration": info["calibration"],
            "dense_block_samples": info["dense_block_samples"],
            "finalised": finalised, "pending": pending, "next_window": next_window, "stream_layout": layout,
            "forward_batch_size": self._batch_size, "existing_zeros": list(self._existing_zeros),
            "elapsed_seconds": elapsed,
        }
        checkpoints.save_step(info["folder"], step, manifest, report.to_dict(), state, tensors)

    def _restore(self, saved, block_masks, dense_blocks, backups, fresh_report):
        """Load a checkpoint into the model and the engine state; returns (report, streams, first window)."""
        cfg, blocks, placement = self.config, self.layout.blocks, self._placement
        manifest = saved.manifest
        report = PruneReport.from_dict(saved.report)
        report.config = fresh_report.config  # execution-only fields (e.g. checkpoint_dir) may have changed
        report.memory["estimate"] = fresh_report.memory["estimate"]
        self._batch_size = int(manifest["forward_batch_size"])
        self._existing_zeros = [int(v) for v in manifest["existing_zeros"]]
        self._elapsed_before = float(manifest.get("elapsed_seconds") or 0.0)
        if self._batch_size != cfg.forward_batch_size:
            logger.warning("the interrupted run had reduced the forward micro-batch to %d rows after running out of "
                           "memory; continuing with that size", self._batch_size)

        def load(index: int, state: dict[str, torch.Tensor]) -> nn.Module:
            block = placement.onload(blocks[index])
            if self.keep_backup:
                backups[index] = {k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()}
            self._modified.append(index)
            block.load_state_dict(state, strict=True)
            return block

        def ordered_masks(block: nn.Module, masks: dict[str, torch.Tensor], device) -> dict[nn.Linear, torch.Tensor]:
            layers = prunable_linears(block, cfg.include_modules, cfg.exclude_modules)
            if set(masks) != set(layers):
                raise checkpoints.CheckpointError(f"{saved.path}: the masks saved for a block do not match its "
                                                  f"layers ({sorted(masks)} vs {sorted(layers)})")
            return {layers[name]: masks[name].to(device) for name in layers}

        for index in manifest["finalised"]:
            state, masks = saved.block(index)
            block = load(index, state)
            for mask_name, mask in self._named_masks(index, ordered_masks(block, masks, "cpu")).items():
                self.masks[mask_name] = mask
            block_masks[index] = {}  # finished: only the key matters (see the block loop)
            placement.offload(block)
        state = saved.state()
        for index in manifest["pending"]:
            prefix = f"pending.{index}."
            part = {kind: {k[len(prefix) + len(kind) + 1:]: v for k, v in state.items()
                           if k.startswith(f"{prefix}{kind}.")} for kind in ("state", "mask", "dense")}
            block = load(index, part["state"])
            block_masks[index] = ordered_masks(block, part["mask"], self._device)
            if part["dense"]:
                dense_blocks[index] = copy.deepcopy(block)
                dense_blocks[index].load_state_dict(part["dense"], strict=True)
        streams = {}
        for split, layout in manifest["stream_layout"].items():
            parts: dict[str, dict[int, Optional[torch.Tensor]]] = {"sparse": {}, "dense": {}}
            for kind in ("sparse", "dense"):
                for key in layout[kind]:
                    if kind == "dense" and key in layout["dense_none"]:
                        parts[kind][int(key)] = None
                        continue
                    loaded = saved.stream(f"{split}-{kind}-{key}")
                    stream = self._new_stream(loaded.shape[0])
                    stream.copy_(loaded)
                    parts[kind][int(key)] = stream
            streams[split] = _Streams(sparse=parts["sparse"], dense=parts["dense"])
        torch.set_rng_state(state["rng.cpu"])
        if "rng.cuda" in state and self._device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], self._device)
        return report, streams, int(manifest["next_window"])

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
        reference: Optional[torch.Tensor] = None, keep_output: bool = True, *, block: int,
        split: str = "calibration", check_finite: bool = False, restart_on_oom: bool = False,
    ) -> tuple[Optional[torch.Tensor], Optional[float]]:
        """Run ``blocks`` over every row of ``stream``, batched; optionally the MSE of the output to ``reference``
        (over every process's rows in a data-parallel run: then every process must call with a reference).

        ``block`` (the decoder block being worked on) and ``split`` name it in messages. Out of memory in a batch
        halves the micro-batch for the rest of the run and retries the batch (``restart_on_oom``: raises
        ``_RestartPass`` instead, for passes whose hooks have accumulated part of the batch already).
        ``check_finite``: raise NonFiniteActivationsError when an output holds NaN or Inf.
        """
        out = self._new_stream(stream.shape[0]) if keep_output else None
        squared_error = torch.zeros((), dtype=torch.float64, device=self._device)
        finite = torch.ones((), dtype=torch.bool, device=self._device)
        count, start, num_rows = 0, 0, stream.shape[0]
        transfers = StreamRows(self._device)
        while start < num_rows:
            rows = slice(start, min(start + self._batch_size, num_rows))
            following = slice(rows.stop, min(rows.stop + self._batch_size, num_rows)) if rows.stop < num_rows else None
            try:
                x = transfers.load(stream, rows, following)
                y = call_window(blocks, x, kwargs)
                if out is not None:
                    transfers.store(out, rows, y)
                batch_error = None
                if reference is not None:
                    ref = transfers.load(reference, rows, following)
                    batch_error = (y.float() - ref.float()).square().sum().double()
                if check_finite:
                    finite &= torch.isfinite(y).all()
            except torch.OutOfMemoryError as error:
                x = y = ref = None
                self._out_of_memory(block, error)
                if restart_on_oom:
                    raise _RestartPass() from None
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
        if self._data_parallel is not None:
            total, count = self._data_parallel.sum_floats([total, count])
        return out, (total / count if count else None)

    def _out_of_memory(self, block: Optional[int], error: BaseException) -> None:
        """Halve the forward micro-batch after an out-of-memory error, and say so; at one row, give up clearly."""
        where = f"decoder block {block}" if block is not None else "the embedding pass"
        size = self._batch_size
        self._batch_size = halved_after_out_of_memory(size, error, (
            f"{where}: out of memory even with a forward micro-batch of one row. Lower max_device_memory or set "
            "stream_location='cpu' (or 'disk') so the streams leave the device, use stream_dtype='bfloat16', a "
            "shorter seq_len, or a device with more memory."))
        message = (f"{where}: out of memory with a forward micro-batch of {size} rows; retrying with "
                   f"{self._batch_size} (set forward_batch_size={self._batch_size} to start there)")
        logger.warning(message)
        report = getattr(self, "_report", None)
        if report is not None:
            report.warnings.append(message)
            if block is not None:
                report.blocks[block].warnings.append(message)

    def _capture_first_inputs(self, split_ids: torch.Tensor, device: torch.device, out: torch.Tensor) -> torch.Tensor:
        """The hidden states entering block 0 (``out``), retried with smaller batches when memory runs out."""
        while True:
            try:
                return capture_first_block_inputs(self.layout.base_model, self.layout.blocks[0], split_ids,
                                                  self._batch_size, device, out)
            except torch.OutOfMemoryError as error:
                self._out_of_memory(None, error)

    def _prune_layer(self, index: int, name: str, layer: nn.Linear, stats, factor) -> LayerPruneResult:
        """Mask (and LR-update) one linear layer; with ``keep_existing_zeros`` its zeros stay and count."""
        cfg = self.config
        existing = layer.weight == 0
        zeros = int(existing.sum())
        self._existing_zeros[0] += zeros
        self._existing_zeros[1] += existing.numel()
        args = (cfg.sparsegpt_block_size, cfg.sparsegpt_dampening)
        if not (cfg.keep_existing_zeros and zeros):
            return prune_linear(layer, cfg.method, cfg.sparsity, cfg.nm, stats, cfg.uses("lr"), *args,
                                name=f"block {index} {name}", factor=factor)
        return prune_linear_keeping_zeros(layer, existing, cfg.method, cfg.sparsity, cfg.nm, stats, cfg.uses("lr"), *args,
                                          name=f"block {index} {name}", factor=factor)

    def _note_existing_zeros(self, report: PruneReport) -> None:
        zeros, total = self._existing_zeros
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

    def _prepare_block(self, index, window_start, blocks, kwargs, streams, stat_rows, block_report):
        """Advance the dense streams past block ``index``, choose its masks (+ LR), measure the error before BR."""
        cfg = self.config
        block, block_kwargs = blocks[index], [kwargs[index]]
        with _timed(block_report, "dense_forward"):
            for split, stream in streams.items():
                if stream.dense[index] is not None:
                    stream.dense[index + 1], _ = self._forward([block], block_kwargs, stream.dense[index],
                                                               block=index, split=split)
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
                                                     stream.sparse[window_start], block=index, split=split)

        layers = prunable_linears(block, cfg.include_modules, cfg.exclude_modules)
        lr = cfg.uses("lr")
        recorder = None
        if needs_statistics(cfg.method, lr) and layers:
            with _timed(block_report, "statistics"):
                while True:  # out of memory part-way: the hooks hold part of a batch, so start the pass again
                    recorder = StatisticsRecorder(layers, hessian=needs_hessian(cfg.method, lr))
                    try:
                        self._forward([block], block_kwargs, inputs["calibration"][stat_rows], keep_output=False,
                                      block=index, restart_on_oom=True)
                        break
                    except _RestartPass:
                        continue
                    finally:
                        recorder.remove()
                if self._data_parallel is not None:
                    self._reduce_statistics(recorder)

        masks: dict[nn.Linear, torch.Tensor] = {}
        factors = None
        if recorder is not None and needs_hessian(cfg.method, lr):
            factors = HessianFactors(recorder.stats, cfg.sparsegpt_dampening)
        with _timed(block_report, "masks_lr"):
            for name, layer in layers.items():
                result = self._prune_layer(index, name, layer, recorder.stats[name] if recorder else None,
                                           factors.for_layer(name) if factors else None)
                masks[layer] = result.keep_mask
                if result.dampening is not None:
                    block_report.dampening[name] = result.dampening
            if self._data_parallel is not None:
                self._data_parallel.broadcast_([t for layer, mask in masks.items() for t in (layer.weight.data, mask)])
        del recorder, factors

        # Without BR the block is final now: its output is the next sparse stream, so keep it instead of recomputing.
        final_now = not cfg.uses("br")
        with _timed(block_report, "propagation" if final_now else "error"):
            for split, stream in streams.items():
                if self._total_rows[split] == 0:
                    block_report.error_before[split] = None
                    continue
                output, block_report.error_before[split] = self._forward(
                    [block], block_kwargs, inputs[split], stream.dense[index + 1], keep_output=final_now,
                    block=index, split=split, check_finite=final_now,
                )
                if final_now:
                    stream.sparse[index + 1] = output
        return masks

    def _reduce_statistics(self, recorder: StatisticsRecorder) -> None:
        stats = recorder.unique_stats()
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
            targets, _ = self._forward([dense_blocks[i] for i in window], window_kwargs, calibration.sparse[first],
                                       block=first)
        masks = {layer: mask for i in window for layer, mask in block_masks[i].items()}
        extra = {} if self._sharded_rows is None else {"sharded_rows": self._sharded_rows}
        try:
            with torch.enable_grad():
                result = reconstruct_window(
                    window_blocks, masks, calibration.sparse[first], targets, window_kwargs, cfg, self._device,
                    show_progress=False, window_name=f"blocks {window}", **extra,
                )
        except torch.OutOfMemoryError as error:  # the trainer has restored the window's weights already
            raise torch.OutOfMemoryError(
                f"block reconstruction of decoder blocks {list(window)} ran out of memory with "
                f"br_batch_size={cfg.br_batch_size} ({error}). Lower br_batch_size (this changes the optimisation), "
                "use reconstruction_mode='lora', autocast_dtype='bfloat16', stream_location='cpu', or a device with "
                "more memory."
            ) from error
        if self._data_parallel is not None:
            self._data_parallel.broadcast_module_(window_blocks)
        seconds = time.perf_counter() - start
        for note in result.notes:
            report.warnings.append(f"window {window}: {note}")
        for i in window:
            block_report = report.blocks[i]
            block_report.warnings.extend(result.notes)
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
                        [block], [kwargs[index]], stream.sparse[index], stream.dense[index + 1],
                        block=index, split=split, check_finite=True,
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

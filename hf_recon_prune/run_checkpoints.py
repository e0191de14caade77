"""A run's checkpoints: what the engine writes after every finalised block, and how a resume reads it back.

The files and their format (and the checks a resume makes before loading anything) are ``checkpoint.py``'s; this
module maps the engine's run state onto them: which blocks are final or pending, the streams, the RNG state, and
the refusal to throw away a checkpoint of the same run.

The streams are not written: every stream is a function of the calibration ids, the weights each block had when
the run took it (the dense stream) and the final weights of the blocks before it (the sparse stream), so a resume
recomputes them with the run's own batched forward, block by block, from the dense and final block files. That
costs one forward pass per stream and block on resume, where writing them cost several GiB per block at 7B.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Callable, Optional

import torch

from .checkpoint import (
    _START_AGAIN,
    MANIFEST,
    Checkpoint,
    CheckpointError,
    _check_manifest,
    _read_json,
    copy_to_host,
    latest_step,
    new_run_id,
    save_block,
    save_dense_block,
    save_step,
    save_stream,
)
from .fingerprints import block_weights_sample, model_fingerprint, run_fingerprint, tensor_fingerprint

logger = logging.getLogger(__name__)

#: Write the streams into every step (format 2) instead of recomputing them on resume (format 3). Off: a step wrote
#: 4 GiB of streams per block at 7B with GP; kept so that reading format-2 checkpoints stays tested.
SAVE_STREAMS = False


class RunCheckpoints:
    """A run's checkpoints: what the engine writes after every finalised block, and how a resume reads it back.

    The key layout of ``state.safetensors`` (``pending.<block>.state|mask|dense.<name>``, ``rng.cpu``,
    ``rng.cuda``) and of the stream files (``<split>-<sparse|dense>-<block>``) lives here alone. ``state`` is the
    engine's run state (``engine.RunState``): its streams, masks, dense copies, micro-batch size and counters.
    """

    def __init__(self, folder: str, run_id: str, fingerprint: str, config_dict: dict, model_info: dict,
                 calibration: str, dense_samples: list):
        self.folder, self.run_id, self.fingerprint = folder, run_id, fingerprint
        self.config, self.model, self.calibration, self.dense_samples = config_dict, model_info, calibration, dense_samples
        self._written: dict[str, tuple[tuple[int, int, int], tuple[str, int]]] = {}  # see _stream_files
        self._alive: list[torch.Tensor] = []
        self.stream_writes = 0  # stream files written by this process (the rest were carried over)
        self.dense_blocks: set[int] = set()  # blocks whose dense file this run wrote or a resume found
        self.recomputes_streams = not SAVE_STREAMS  # format 3; else the streams are written (format 2)
        # Copies block tensors into new CPU tensors for the files (the engine sets its pinned staging's).
        self.to_host: Callable[[torch.Tensor], torch.Tensor] = copy_to_host

    @classmethod
    def open(cls, config: Any, model: torch.nn.Module, blocks: Any, tensors: tuple, resume: bool,
             overwrite: bool = False) -> tuple["RunCheckpoints", Optional[Checkpoint]]:
        """The run's checkpoints in ``config.checkpoint_dir``; with ``resume``, also the checkpoint to continue from
        (None when the folder has none yet). ``tensors``: the calibration ids, held-out ids and statistics mask.

        A fresh run (no ``resume``) over a checkpoint of the same run (same fingerprint: configuration, model and
        calibration data) is refused unless ``overwrite``: it would throw away work that resuming keeps. A checkpoint
        of another run is replaced, with a warning."""
        folder, config_dict = config.checkpoint_dir, config.to_dict()
        model_info = model_fingerprint(model, blocks)
        calibration = tensor_fingerprint(*tensors)
        # The weights the run starts from, block by block (a strided sample): a resume checks that the blocks it
        # takes from the model are still these.
        current_samples = [block_weights_sample(block) for block in blocks]
        latest, saved = latest_step(folder), None
        if resume and latest is None:
            logger.info("no checkpoint in %s yet: starting from the first block", folder)
        elif resume:
            saved = Checkpoint(latest)
            saved.check_matches(config_dict, model_info, calibration)
            saved.check_dense_blocks(current_samples, list(blocks))
            logger.info("resuming from %s (after block %s)", latest, saved.manifest.get("step"))
        elif latest is not None:
            _refuse_fresh_start(latest, run_fingerprint(config_dict, model_info, calibration), overwrite)
        if saved is not None:
            run_id, fingerprint = saved.manifest["run_id"], saved.manifest["fingerprint"]
            dense_samples = saved.manifest.get("dense_block_samples") or current_samples
        else:
            run_id, dense_samples = new_run_id(), current_samples
            fingerprint = run_fingerprint(config_dict, model_info, calibration)
        checkpoints = cls(folder, run_id, fingerprint, config_dict, model_info, calibration, dense_samples)
        if saved is not None:
            checkpoints.dense_blocks.update(saved.manifest.get("dense_blocks") or [])
            # A run resumed from streams on disk has no dense files of its earlier blocks: it goes on writing streams.
            checkpoints.recomputes_streams = saved.recomputes_streams and not SAVE_STREAMS
        return checkpoints, saved

    def save_dense_block(self, index: int, block: torch.nn.Module) -> None:
        """The weights block ``index`` has as the run takes it, once (a resume recomputes the dense stream from
        them); only needed by runs with a dense stream."""
        if not self.recomputes_streams or index in self.dense_blocks:
            return
        save_dense_block(self.folder, index, block.state_dict(), self.run_id, self.fingerprint, self.to_host)
        self.dense_blocks.add(index)

    def save_block(self, index: int, block: torch.nn.Module, masks: dict) -> None:
        names = _mask_names(block)
        save_block(self.folder, index, block.state_dict(), {names(key): mask for key, mask in masks.items()},
                   self.run_id, self.fingerprint, self.to_host)

    def save_step(self, step: int, next_window: int, state: Any, blocks: Any, elapsed: float) -> None:
        """Everything the next window needs that is not in the block files: pending blocks, streams, RNG, report."""
        finalised = sorted(set(state.modified) - {i for i in state.block_masks if i > step})
        pending = sorted(i for i in state.block_masks if i > step)
        tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        if state.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(state.device)
        for index in pending:
            block = blocks[index]
            names = _mask_names(block)
            tensors.update({f"pending.{index}.state.{k}": v for k, v in block.state_dict().items()})
            tensors.update({f"pending.{index}.mask.{names(key)}": m for key, m in state.block_masks[index].items()})
            if index in state.dense_blocks:
                tensors.update({f"pending.{index}.dense.{k}": v for k, v in state.dense_blocks[index].state_dict().items()})
        streams, layout = {}, {}
        for split, stream in state.streams.items():
            layout[split] = {"sparse": sorted(stream.sparse), "dense": sorted(stream.dense),
                             "dense_none": sorted(k for k, v in stream.dense.items() if v is None)}
            for kind in ("sparse", "dense"):
                streams.update({f"{split}-{kind}-{key}": t for key, t in getattr(stream, kind).items() if t is not None})
        stream_files = {} if self.recomputes_streams else self._stream_files(streams)
        manifest = {
            "run_id": self.run_id, "fingerprint": self.fingerprint, "config": self.config, "model": self.model,
            "calibration": self.calibration, "dense_block_samples": self.dense_samples,
            "finalised": finalised, "pending": pending, "next_window": next_window, "stream_layout": layout,
            "forward_batch_size": state.forward.batch_size, "existing_zeros": list(state.existing_zeros),
            "elapsed_seconds": elapsed,
            "dense_blocks": sorted(i for i in self.dense_blocks if i in set(finalised) | set(pending)),
        }
        save_step(self.folder, step, manifest, state.report.to_dict(), tensors, stream_files)

    def _stream_files(self, streams: dict[str, torch.Tensor]) -> dict[str, tuple[str, int]]:
        """The file of every stream: the one written at an earlier step when the stream is the same tensor and
        nothing has written to it since (its version counter, which every in-place write through any view bumps,
        is unchanged), else a new one."""
        files = {}
        for name, tensor in streams.items():
            identity = (id(tensor), tensor.data_ptr(), tensor._version)
            earlier = self._written.get(name)
            if earlier is not None and earlier[0] == identity:
                files[name] = earlier[1]
            else:
                files[name] = save_stream(self.folder, name, tensor)
                self.stream_writes += 1
        # Tensors referenced here keep their ids; a stream dropped by the engine is forgotten with it.
        self._written = {name: ((id(t), t.data_ptr(), t._version), files[name]) for name, t in streams.items()}
        self._alive = list(streams.values())  # an id is only an identity while its tensor lives
        return files


def _refuse_fresh_start(latest: str, fingerprint: str, overwrite: bool) -> None:
    """A fresh run is about to replace ``latest``: refuse when it is a resumable checkpoint of this very run."""
    try:
        manifest = _read_json(os.path.join(latest, MANIFEST))
        if isinstance(manifest, dict):
            _check_manifest(latest, manifest)  # a damaged manifest cannot be resumed: nothing to keep
    except CheckpointError:
        manifest = None
    same_run = isinstance(manifest, dict) and manifest.get("fingerprint") == fingerprint
    if same_run and not overwrite:
        raise CheckpointError(
            f"{os.path.dirname(latest)} holds a checkpoint of this same run (same configuration, model and "
            f"calibration data, after decoder block {manifest.get('step')}); a fresh run would throw it away. Pass "
            "resume=True (--resume) to continue it, or overwrite=True (--overwrite) to start afresh and replace it."
        )
    logger.warning("starting afresh: the checkpoint in %s will be replaced%s", latest,
                   "" if same_run else " (it was made with other settings, or is damaged)")


def restore_run(saved: Checkpoint, state: Any, engine: Any, first_streams: Callable[[], dict]) -> int:
    """Load ``saved`` into the model and ``state`` (the engine's run state); returns the first window to run.

    ``engine`` supplies the model's blocks, the block placement and ``take_block(index)`` (onload a block and note
    that it is modified), ``prunable(block)``, ``named_masks(index, masks)`` and ``show_progress``;
    ``first_streams()`` makes the streams entering block 0 (from the calibration ids), from which a checkpoint of
    format 3 has its streams recomputed (module docstring).
    """
    from .report import PruneReport

    manifest = saved.manifest
    report = PruneReport.from_dict(saved.report)
    report.config = state.report.config  # execution-only fields (e.g. checkpoint_dir) may have changed
    report.memory["estimate"] = state.report.memory["estimate"]
    state.report = report
    state.forward.batch_size = int(manifest["forward_batch_size"])
    state.existing_zeros = [int(v) for v in manifest["existing_zeros"]]
    state.elapsed_before = float(manifest.get("elapsed_seconds") or 0.0)
    if state.forward.batch_size != state.config.forward_batch_size:
        logger.warning("the interrupted run had reduced the forward micro-batch to %d rows after running out of "
                       "memory; continuing with that size", state.forward.batch_size)

    def ordered_masks(block, masks: dict[str, torch.Tensor], device) -> dict:
        layers = engine.prunable(block)
        if set(masks) != set(layers):
            raise CheckpointError(f"{saved.path}: the masks saved for a block do not match its "
                                  f"layers ({sorted(masks)} vs {sorted(layers)})")
        return {layers[name]: masks[name].to(device) for name in layers}

    finalised, pending = set(manifest["finalised"]), set(manifest["pending"])
    streams = _RecomputedStreams(saved, state, first_streams()) if saved.recomputes_streams else None
    tensors = saved.state()
    covered = sorted(finalised | pending)
    progress = _restore_progress(engine, len(covered), streams is not None)
    started = time.perf_counter()
    for index in covered:
        block = engine.take_block(index)
        if streams is not None:
            streams.advance_dense(index, block)
        if index in finalised:
            block_state, masks = saved.block(index)
            block.load_state_dict(block_state, strict=True)
            engine.masks.update(engine.named_masks(index, ordered_masks(block, masks, "cpu")))
            state.block_masks[index] = {}  # finished: only the key matters (see the block loop)
            if streams is not None:
                streams.advance_sparse(index, block)
            engine.placement.offload(block)
        else:
            prefix = f"pending.{index}."
            part = {kind: {k[len(prefix) + len(kind) + 1:]: v for k, v in tensors.items()
                           if k.startswith(f"{prefix}{kind}.")} for kind in ("state", "mask", "dense")}
            block.load_state_dict(part["state"], strict=True)
            state.block_masks[index] = ordered_masks(block, part["mask"], state.device)
            if part["dense"]:
                state.dense_blocks[index] = copy.deepcopy(block)
                state.dense_blocks[index].load_state_dict(part["dense"], strict=True)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    if streams is not None:
        state.streams = streams.result()
        logger.info("recomputed the activation streams through %d blocks in %.1f s", len(covered),
                    time.perf_counter() - started)
    else:
        state.streams = _saved_streams(saved, state)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and state.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], state.device)
    return int(manifest["next_window"])


def _restore_progress(engine: Any, total: int, recomputing: bool):
    if not (getattr(engine, "show_progress", False) and recomputing and total):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="restoring the checkpoint (recomputing streams)", unit="block")


def _saved_streams(saved: Checkpoint, state: Any) -> dict:
    """The streams of a checkpoint of format 1 or 2, read from their files."""
    from .propagation import Streams

    streams = {}
    for split, layout in saved.manifest["stream_layout"].items():
        parts: dict[str, dict[int, Optional[torch.Tensor]]] = {"sparse": {}, "dense": {}}
        for kind in ("sparse", "dense"):
            for key in layout[kind]:
                if kind == "dense" and key in layout["dense_none"]:
                    parts[kind][int(key)] = None
                    continue
                loaded = saved.stream(f"{split}-{kind}-{key}")
                parts[kind][int(key)] = state.forward.new_stream(loaded.shape[0]).copy_(loaded)
        streams[split] = Streams(sparse=parts["sparse"], dense=parts["dense"])
    return streams


class _RecomputedStreams:
    """The streams a step of format 3 holds, recomputed block by block with the run's own batched forward.

    The dense stream passes through each block with the weights the block had when the run took it (its dense file),
    the sparse stream with the block's final weights, exactly as the run advanced them (``engine._prepare_block``,
    ``engine._finalise_block``); only the keys the step's ``stream_layout`` lists are kept."""

    def __init__(self, saved: Checkpoint, state: Any, first: dict):
        self.saved, self.state, self.streams = saved, state, first
        layout = saved.manifest["stream_layout"]
        if set(layout) != set(first):
            raise CheckpointError(f"{saved.path}: its streams are of the splits {sorted(layout)}, this run has "
                                  f"{sorted(first)}; {_START_AGAIN}")
        self.sparse_keys = {split: {int(k) for k in entry["sparse"]} for split, entry in layout.items()}
        self.dense_none = {split: {int(k) for k in entry["dense_none"]} for split, entry in layout.items()}
        self.dense_keys = {split: {int(k) for k in entry["dense"]} - self.dense_none[split]
                           for split, entry in layout.items()}
        self.sparse_through = max((max(keys, default=0) for keys in self.sparse_keys.values()), default=0)
        self.dense_through = max((max(keys, default=0) for keys in self.dense_keys.values()), default=0)
        self.dense_files = set(saved.manifest.get("dense_blocks") or [])

    def advance_dense(self, index: int, block: torch.nn.Module) -> None:
        """Dense streams past block ``index``, with the block's dense weights loaded into it (the caller loads its
        final or pending state next)."""
        if index >= self.dense_through:
            return
        if index not in self.dense_files:
            raise CheckpointError(f"{self.saved.path}: no dense weights were saved for block {index}, whose dense "
                                  f"stream the next window needs; {_START_AGAIN}")
        block.load_state_dict(self.saved.dense_block(index), strict=True)
        for split, stream in self.streams.items():
            if stream.dense.get(index) is not None:
                stream.dense[index + 1], _ = self.state.forward([block], [self.state.kwargs[index]],
                                                                stream.dense[index], block=index, split=split)
            if index not in self.dense_keys[split]:
                stream.dense.pop(index, None)

    def advance_sparse(self, index: int, block: torch.nn.Module) -> None:
        """Sparse streams past the final block ``index``."""
        if index >= self.sparse_through:
            return
        for split, stream in self.streams.items():
            if self.state.total_rows[split] == 0:
                stream.sparse[index + 1] = stream.sparse[index]
            else:
                stream.sparse[index + 1], _ = self.state.forward([block], [self.state.kwargs[index]],
                                                                 stream.sparse[index], block=index, split=split)
            if index not in self.sparse_keys[split]:
                stream.sparse.pop(index, None)

    def result(self) -> dict:
        """The recomputed streams, checked to be the ones the step lists."""
        for split, stream in self.streams.items():
            for key in self.dense_none[split]:
                stream.dense[key] = None
            for key in [k for k in stream.dense if k not in self.dense_keys[split] | self.dense_none[split]]:
                del stream.dense[key]
            if set(stream.sparse) != self.sparse_keys[split] or not self.dense_keys[split] <= {
                    k for k, v in stream.dense.items() if v is not None}:
                raise CheckpointError(
                    f"{self.saved.path}: the {split} streams recomputed from the block files "
                    f"(sparse {sorted(stream.sparse)}, dense {sorted(stream.dense)}) are not the ones the checkpoint "
                    f"lists (sparse {sorted(self.sparse_keys[split])}, dense {sorted(self.dense_keys[split])}); "
                    f"{_START_AGAIN}")
        return self.streams


def _mask_names(block: torch.nn.Module):
    """A mask key's name inside ``block``: a linear's module name, or a ``PrunableWeight``'s own name."""
    modules = {id(module): name for name, module in block.named_modules()}
    return lambda key: getattr(key, "name", None) if id(key) not in modules else modules[id(key)]

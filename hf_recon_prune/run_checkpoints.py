"""A run's checkpoints: what the engine writes after every finalised block, and how a resume reads it back.

The files and their format (and the checks a resume makes before loading anything) are ``checkpoint.py``'s; this
module maps the engine's run state onto them: which blocks are final or pending, the streams, the RNG state, and
the refusal to throw away a checkpoint of the same run.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Optional

import torch

from .checkpoint import (
    MANIFEST,
    Checkpoint,
    CheckpointError,
    _check_manifest,
    _read_json,
    latest_step,
    new_run_id,
    save_block,
    save_step,
    save_stream,
)
from .fingerprints import block_weights_sample, model_fingerprint, run_fingerprint, tensor_fingerprint

logger = logging.getLogger(__name__)


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
            saved.check_dense_blocks(current_samples)
            logger.info("resuming from %s (after block %s)", latest, saved.manifest.get("step"))
        elif latest is not None:
            _refuse_fresh_start(latest, run_fingerprint(config_dict, model_info, calibration), overwrite)
        if saved is not None:
            run_id, fingerprint = saved.manifest["run_id"], saved.manifest["fingerprint"]
            dense_samples = saved.manifest.get("dense_block_samples") or current_samples
        else:
            run_id, dense_samples = new_run_id(), current_samples
            fingerprint = run_fingerprint(config_dict, model_info, calibration)
        return cls(folder, run_id, fingerprint, config_dict, model_info, calibration, dense_samples), saved

    def save_block(self, index: int, block: torch.nn.Module, masks: dict) -> None:
        names = _mask_names(block)
        save_block(self.folder, index, block.state_dict(), {names(key): mask for key, mask in masks.items()},
                   self.run_id, self.fingerprint)

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
        stream_files = self._stream_files(streams)
        manifest = {
            "run_id": self.run_id, "fingerprint": self.fingerprint, "config": self.config, "model": self.model,
            "calibration": self.calibration, "dense_block_samples": self.dense_samples,
            "finalised": finalised, "pending": pending, "next_window": next_window, "stream_layout": layout,
            "forward_batch_size": state.forward.batch_size, "existing_zeros": list(state.existing_zeros),
            "elapsed_seconds": elapsed,
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


def restore_run(saved: Checkpoint, state: Any, engine: Any) -> int:
    """Load ``saved`` into the model and ``state`` (the engine's run state); returns the first window to run.

    ``engine`` supplies the model's blocks, the block placement and ``take_block(index)`` (onload a block and note
    that it is modified), ``prunable(block)`` and ``named_masks(index, masks)``.
    """
    from .propagation import Streams
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

    for index in manifest["finalised"]:
        block_state, masks = saved.block(index)
        block = engine.take_block(index, block_state)
        engine.masks.update(engine.named_masks(index, ordered_masks(block, masks, "cpu")))
        state.block_masks[index] = {}  # finished: only the key matters (see the block loop)
        engine.placement.offload(block)
    tensors = saved.state()
    for index in manifest["pending"]:
        prefix = f"pending.{index}."
        part = {kind: {k[len(prefix) + len(kind) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}{kind}.")}
                for kind in ("state", "mask", "dense")}
        block = engine.take_block(index, part["state"])
        state.block_masks[index] = ordered_masks(block, part["mask"], state.device)
        if part["dense"]:
            state.dense_blocks[index] = copy.deepcopy(block)
            state.dense_blocks[index].load_state_dict(part["dense"], strict=True)
    state.streams = {}
    for split, layout in manifest["stream_layout"].items():
        parts: dict[str, dict[int, Optional[torch.Tensor]]] = {"sparse": {}, "dense": {}}
        for kind in ("sparse", "dense"):
            for key in layout[kind]:
                if kind == "dense" and key in layout["dense_none"]:
                    parts[kind][int(key)] = None
                    continue
                loaded = saved.stream(f"{split}-{kind}-{key}")
                parts[kind][int(key)] = state.forward.new_stream(loaded.shape[0]).copy_(loaded)
        state.streams[split] = Streams(sparse=parts["sparse"], dense=parts["dense"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and state.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], state.device)
    return int(manifest["next_window"])


def _mask_names(block: torch.nn.Module):
    """A mask key's name inside ``block``: a linear's module name, or a ``PrunableWeight``'s own name."""
    modules = {id(module): name for name, module in block.named_modules()}
    return lambda key: getattr(key, "name", None) if id(key) not in modules else modules[id(key)]

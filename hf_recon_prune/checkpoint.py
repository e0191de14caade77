"""Checkpoints of a pruning run, one per finalised block, so that an interrupted run can resume.

Layout of ``PruningConfig.checkpoint_dir``::

    blocks/block-00003.safetensors   final weights (state dict) and masks of decoder block 3, written once when the
                                     block is finalised (write to a temporary name, then rename)
    step-00003/                      the latest complete checkpoint: everything after block 3 was finalised
        manifest.json                config, fingerprints, which blocks are final, what the streams hold
        report.json                  the PruneReport so far
        state.safetensors            torch RNG state; weights, masks (and dense copy) of blocks prepared but not final
        stream-<split>-<kind>-<i>.safetensors   the activation streams that enter the next window

A step folder is written under a temporary name and renamed into place, so a ``step-*`` folder either is complete or
does not exist; older step folders are deleted once the new one is in place. Everything is read back with
``safetensors`` and ``json`` only: nothing in a checkpoint is unpickled, imported or evaluated. A checkpoint carries
a fingerprint of the configuration (execution-only fields excepted), the model's structure and the calibration token
ids; resuming with anything different is refused with a message that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from typing import Any, Iterable, Optional

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
STATE = "state.safetensors"
BLOCKS = "blocks"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"

#: PruningConfig fields that change where things live, not the result: a run may resume with other values.
EXECUTION_ONLY_FIELDS = ("checkpoint_dir", "stream_location", "stream_folder", "max_device_memory")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume this run (made with other settings, or damaged)."""


# ---------------------------------------------------------------------------------------------------- fingerprints
def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def comparable_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config entries that must match for a resume (all but ``EXECUTION_ONLY_FIELDS``)."""
    return {k: v for k, v in config_dict.items() if k not in EXECUTION_ONLY_FIELDS}


def run_fingerprint(config_dict: dict[str, Any], model_info: dict[str, Any], calibration: str) -> str:
    """What a checkpoint must match: the comparable config, the model's structure, the calibration fingerprint."""
    return _digest([comparable_config(config_dict), model_info, calibration])


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 over the shapes, dtypes and bytes of CPU copies of ``tensors`` (calibration ids, masks)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, blocks: Iterable[torch.nn.Module]) -> dict[str, Any]:
    """The model's class, block count and the names, shapes and dtypes of the first block's tensors."""
    blocks = list(blocks)
    first = blocks[0] if blocks else None
    tensors = [] if first is None else [
        [name, list(t.shape), str(t.dtype)] for name, t in first.state_dict().items()
    ]
    return {"class": type(model).__name__, "num_blocks": len(blocks), "first_block": _digest(tensors)}


def block_weights_sample(block: torch.nn.Module, elements: int = 256) -> Optional[str]:
    """sha256 of a strided sample of every materialised tensor of ``block`` (None when all are offloaded to meta).

    Cheap enough to take for every block at the start of a run, and it tells a dense block from a modified one or
    from another model's block of the same shape."""
    digest = hashlib.sha256()
    seen = False
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(flat.numel() // elements, 1)][:elements].to("cpu", torch.float64).contiguous()
            digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
            digest.update(sample.numpy().tobytes())
            seen = True
    return digest.hexdigest() if seen else None


# ---------------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    save_file(cpu, path, metadata=metadata)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_json(data: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def new_run_id() -> str:
    return uuid.uuid4().hex


def block_file(folder: str, index: int) -> str:
    return os.path.join(folder, BLOCKS, f"block-{index:05d}.safetensors")


def save_block(folder: str, index: int, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
               run_id: str, fingerprint: str) -> None:
    """Write a finalised block's state dict and masks (``mask.<linear name>``) atomically."""
    path = block_file(folder, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {f"state.{name}": t for name, t in state.items()}
    tensors.update({f"mask.{name}": m for name, m in masks.items()})
    tmp = f"{path}{_TMP_PREFIX}{os.getpid()}"
    _save_tensors(tensors, tmp, metadata={"run_id": run_id, "fingerprint": fingerprint, "block": str(index)})
    os.replace(tmp, path)


def save_step(folder: str, step: int, manifest: dict[str, Any], report: dict[str, Any],
              state: dict[str, torch.Tensor], streams: dict[str, torch.Tensor]) -> str:
    """Write ``step-<step>`` (manifest, report, state, one file per stream) atomically; delete older steps."""
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"step-{step:05d}")
    tmp = os.path.join(folder, f"{_TMP_PREFIX}step-{step:05d}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    stream_files = {}
    for name, tensor in streams.items():
        file_name = f"stream-{name}.safetensors"
        _save_tensors({"stream": tensor}, os.path.join(tmp, file_name))
        stream_files[name] = file_name
    _save_tensors(state, os.path.join(tmp, STATE))
    _write_json(report, os.path.join(tmp, REPORT))
    manifest = dict(manifest, format_version=FORMAT_VERSION, step=step, streams=stream_files)
    _write_json(manifest, os.path.join(tmp, MANIFEST))  # written last: a folder with a manifest is complete
    _fsync_dir(tmp)
    if os.path.exists(final):  # a step of an earlier run with the same index: replaced by this one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    # Older steps, and what a run killed while writing left under temporary names, are no longer needed.
    for name in os.listdir(folder):
        match = _STEP_RE.match(name)
        if (match and int(match.group(1)) != step) or name.startswith(_TMP_PREFIX):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    blocks = os.path.join(folder, BLOCKS)
    for name in os.listdir(blocks) if os.path.isdir(blocks) else []:
        if _TMP_PREFIX in name:
            os.remove(os.path.join(blocks, name))
    return final


# ---------------------------------------------------------------------------------------------------- reading
def latest_step(folder: Optional[str]) -> Optional[str]:
    """The newest complete ``step-*`` folder in ``folder``, or None."""
    if not folder or not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = _STEP_RE.match(name)
        if match and os.path.isfile(os.path.join(folder, name, MANIFEST)):
            steps.append((int(match.group(1)), name))
    return os.path.join(folder, max(steps)[1]) if steps else None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({err}); delete the checkpoint folder and "
                              "start again") from None


class Checkpoint:
    """A complete step folder, read with json and safetensors only."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)
        manifest = _read_json(os.path.join(path, MANIFEST))
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: not a checkpoint of this version of hf-recon-prune "
                                  f"(format {manifest.get('format_version') if isinstance(manifest, dict) else '?'}, "
                                  f"expected {FORMAT_VERSION})")
        self.manifest: dict[str, Any] = manifest
        self.report: dict[str, Any] = _read_json(os.path.join(path, REPORT))

    def check_matches(self, config_dict: dict[str, Any], model_info: dict[str, Any], calibration: str) -> None:
        """Raise CheckpointError naming what differs between the checkpoint and this run."""
        saved = self.manifest.get("config") or {}
        mine = comparable_config(config_dict)
        theirs = comparable_config(saved)
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in differ[:8])
            raise CheckpointError(
                f"the checkpoint in {self.path} was made with a different configuration ({details}); resume with the "
                "same settings, or start afresh without resume (the checkpoint is then replaced)"
            )
        if self.manifest.get("model") != model_info:
            raise CheckpointError(
                f"the checkpoint in {self.path} was made for another model ({self.manifest.get('model')} vs "
                f"{model_info}); resume with the same model"
            )
        if self.manifest.get("calibration") != calibration:
            raise CheckpointError(
                f"the calibration data differs from the one the checkpoint in {self.path} was made with (its token "
                "ids have another fingerprint); resume with the same calibration source, samples and seed"
            )

    def check_dense_blocks(self, samples: list[Optional[str]]) -> None:
        """The blocks this resume takes from the model (neither finalised nor pending in the checkpoint) must hold the
        dense weights the run started from: a reloaded or another model, or one a failed run left half-pruned, would
        otherwise be mixed silently with the checkpoint's blocks."""
        recorded = self.manifest.get("dense_block_samples")
        if not recorded or len(recorded) != len(samples):
            return
        covered = set(self.manifest.get("finalised", [])) | set(self.manifest.get("pending", []))
        differ = [i for i, (then, now) in enumerate(zip(recorded, samples))
                  if i not in covered and then is not None and now is not None and then != now]
        if differ:
            raise CheckpointError(
                f"decoder blocks {differ} of this model do not hold the dense weights the checkpoint in {self.path} "
                "started from (another model, or one a failed run already modified); load the original dense model "
                "again and resume with it"
            )

    def state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(os.path.join(self.path, STATE))

    def stream(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file_name = (self.manifest.get("streams") or {}).get(name)
        if not isinstance(file_name, str) or os.path.basename(file_name) != file_name:
            raise CheckpointError(f"{self.path}: the manifest names no file for stream {name!r}")
        with safe_open(os.path.join(self.path, file_name), framework="pt") as handle:
            return handle.get_tensor("stream")

    def block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(state dict, masks by linear name) of a finalised block, checked to belong to this run."""
        from safetensors import safe_open

        path = block_file(self.folder, index)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; delete {self.folder} and start again")
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if (metadata.get("run_id") != self.manifest.get("run_id")
                    or metadata.get("fingerprint") != self.manifest.get("fingerprint")):
                raise CheckpointError(f"{path} belongs to another run than {self.path}; delete {self.folder} and "
                                      "start again")
            state, masks = {}, {}
            for key in handle.keys():
                kind, _, name = key.partition(".")
                (state if kind == "state" else masks)[name] = handle.get_tensor(key)
        return state, masks

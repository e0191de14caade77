"""Checkpoints of a pruning run, one per finalised block, so that an interrupted run can resume.

Layout of ``PruningConfig.checkpoint_dir``::

    blocks/block-00003.safetensors   final weights (state dict) and masks of decoder block 3, written once when the
                                     block is finalised (write to a temporary name, then rename)
    blocks/dense-00003.safetensors   the weights block 3 had when the run took it (runs with a dense stream: GP or
                                     error tracking), written once, when the block is first taken
    step-00003/                      the latest complete checkpoint: everything after block 3 was finalised
        manifest.json                config, fingerprints, which blocks are final, which streams the next window needs
        report.json                  the PruneReport so far
        state.safetensors            torch RNG state; weights, masks (and dense copy) of blocks prepared but not final

A step folder is written under a temporary name and renamed into place, so a ``step-*`` folder either is complete or
does not exist; older step folders are deleted once the new one is in place. Checkpoints cost what changed: each
block's files are written once, and the activation streams (``num_samples x seq_len x hidden`` values each, several
GiB per step at 7B) are not written at all: a resume recomputes them from the calibration ids, the dense block files
and the final block files, one forward pass per stream and block (``run_checkpoints.restore_run``). (Formats 1 and 2,
which wrote the streams, into each step folder or into ``streams/``, are still read.) Everything is read back with
``safetensors`` and ``json`` only: nothing in a checkpoint is unpickled, imported or evaluated. A checkpoint carries
a fingerprint of the configuration (execution-only fields excepted), the model's structure and the calibration token
ids (``fingerprints.py``); resuming with anything different is refused with a message that says what differs. The
manifest records the size of every file a resume reads: a torn file or a damaged manifest is refused, naming the
file, before anything is loaded. A fresh run over a checkpoint of the same run is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from typing import Any, Callable, Optional

import torch

from .fingerprints import (  # noqa: F401  (re-exported: the fingerprints were defined here)
    EXECUTION_ONLY_FIELDS,
    block_weights_sample,
    comparable_config,
    model_fingerprint,
    run_fingerprint,
    state_weights_sample,
    tensor_fingerprint,
)

logger = logging.getLogger(__name__)

#: Format 3 recomputes the streams on resume; format 2 (still written with ``run_checkpoints.SAVE_STREAMS``) and
#: format 1 carry them.
FORMAT_VERSION = 3
STREAMS_FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2, 3)
STREAMS = "streams"
MANIFEST = "manifest.json"
REPORT = "report.json"
STATE = "state.safetensors"
BLOCKS = "blocks"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"



class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume this run (made with other settings, or damaged)."""


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


def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A new CPU tensor with the value of ``tensor``: what a checkpoint file is written from."""
    return tensor.detach().to("cpu", copy=True)


def _save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None,
                  to_host: Callable[[torch.Tensor], torch.Tensor] = copy_to_host) -> None:
    """``to_host`` must return a new CPU tensor (the engine passes its pinned staging's copy)."""
    from safetensors.torch import save_file

    cpu = {name: to_host(t).contiguous() for name, t in tensors.items()}
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


def dense_block_file(folder: str, index: int) -> str:
    return os.path.join(folder, BLOCKS, f"dense-{index:05d}.safetensors")


def save_block(folder: str, index: int, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
               run_id: str, fingerprint: str, to_host: Callable[[torch.Tensor], torch.Tensor] = copy_to_host) -> None:
    """Write a finalised block's state dict and masks (``mask.<linear name>``) atomically."""
    tensors = {f"state.{name}": t for name, t in state.items()}
    tensors.update({f"mask.{name}": m for name, m in masks.items()})
    _save_block_tensors(block_file(folder, index), tensors, index, run_id, fingerprint, to_host)


def save_dense_block(folder: str, index: int, state: dict[str, torch.Tensor], run_id: str, fingerprint: str,
                     to_host: Callable[[torch.Tensor], torch.Tensor] = copy_to_host) -> None:
    """Write the state dict a block had when the run took it (``state.<name>``) atomically."""
    _save_block_tensors(dense_block_file(folder, index), {f"state.{name}": t for name, t in state.items()}, index,
                        run_id, fingerprint, to_host)


def _save_block_tensors(path: str, tensors: dict[str, torch.Tensor], index: int, run_id: str, fingerprint: str,
                        to_host: Callable[[torch.Tensor], torch.Tensor] = copy_to_host) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{_TMP_PREFIX}{os.getpid()}"
    _save_tensors(tensors, tmp, metadata={"run_id": run_id, "fingerprint": fingerprint, "block": str(index)},
                  to_host=to_host)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))  # the rename itself must survive a crash, like the step folder's


def save_stream(folder: str, name: str, tensor: torch.Tensor) -> tuple[str, int]:
    """Write one stream into ``<folder>/streams`` under a new name (atomically); returns (file name, size)."""
    directory = os.path.join(folder, STREAMS)
    os.makedirs(directory, exist_ok=True)
    file_name = f"stream-{name}-{uuid.uuid4().hex[:12]}.safetensors"
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{file_name}")
    _save_tensors({"stream": tensor}, tmp)
    os.replace(tmp, os.path.join(directory, file_name))
    return file_name, os.path.getsize(os.path.join(directory, file_name))


def save_step(folder: str, step: int, manifest: dict[str, Any], report: dict[str, Any],
              state: dict[str, torch.Tensor], stream_files: dict[str, tuple[str, int]]) -> str:
    """Write ``step-<step>`` (manifest, report, state) atomically, naming ``stream_files`` (stream name -> (file in
    ``streams/``, size), already written by :func:`save_stream`); delete older steps and unused stream files.
    Without stream files the step is of format 3: a resume recomputes the streams, from the dense block files that
    ``manifest["dense_blocks"]`` names and the final block files."""
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"step-{step:05d}")
    tmp = os.path.join(folder, f"{_TMP_PREFIX}step-{step:05d}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    if stream_files:
        _fsync_dir(os.path.join(folder, STREAMS))  # the stream files' renames survive a crash before the step's
    _save_tensors(state, os.path.join(tmp, STATE))
    _write_json(report, os.path.join(tmp, REPORT))
    # Sizes of every file a resume reads, so that a torn file is refused before anything is loaded.
    sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in (STATE, REPORT)}
    block_sizes = {str(i): os.path.getsize(block_file(folder, i)) for i in manifest.get("finalised", [])
                   if os.path.isfile(block_file(folder, i))}
    dense_sizes = {str(i): os.path.getsize(dense_block_file(folder, i)) for i in manifest.get("dense_blocks", [])}
    manifest = dict(manifest, format_version=STREAMS_FORMAT_VERSION if stream_files else FORMAT_VERSION, step=step,
                    streams={name: file for name, (file, _) in stream_files.items()},
                    stream_file_sizes={file: size for file, size in stream_files.values()}, file_sizes=sizes,
                    block_file_sizes=block_sizes, dense_block_file_sizes=dense_sizes)
    _write_json(manifest, os.path.join(tmp, MANIFEST))  # written last: a folder with a manifest is complete
    _fsync_dir(tmp)
    if os.path.exists(final):  # a step of an earlier run with the same index: replaced by this one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    _remove_unused(folder, step, {file for file, _ in stream_files.values()})
    return final


def _remove_unused(folder: str, step: int, stream_files: set[str]) -> None:
    """Older steps, stream files the new step does not name, and what a run killed while writing left under
    temporary names."""
    for name in os.listdir(folder):
        match = _STEP_RE.match(name)
        if (match and int(match.group(1)) != step) or name.startswith(_TMP_PREFIX):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    streams = os.path.join(folder, STREAMS)
    for name in os.listdir(streams) if os.path.isdir(streams) else []:
        if name not in stream_files:
            os.remove(os.path.join(streams, name))
    blocks = os.path.join(folder, BLOCKS)
    for name in os.listdir(blocks) if os.path.isdir(blocks) else []:
        if _TMP_PREFIX in name:
            os.remove(os.path.join(blocks, name))


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


_START_AGAIN = "start afresh without resume (with overwrite=True / --overwrite) or delete the checkpoint folder"
#: Entries of a step's manifest that a resume reads, with their types.
_MANIFEST_FIELDS = {
    "run_id": str, "fingerprint": str, "config": dict, "model": dict, "calibration": str, "finalised": list,
    "pending": list, "next_window": int, "stream_layout": dict, "forward_batch_size": int, "existing_zeros": list,
    "streams": dict,
}


def _check_manifest(path: str, manifest: dict[str, Any]) -> None:
    """Raise CheckpointError naming the first entry of the manifest that is missing or of the wrong type."""
    version = manifest.get("format_version")
    recomputed = isinstance(version, int) and version >= 3
    fields = dict(_MANIFEST_FIELDS, **({"dense_blocks": list} if recomputed else {}))
    for name, kind in fields.items():
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{os.path.join(path, MANIFEST)} is damaged: its {name!r} is "
                                  f"{'missing' if name not in manifest else type(value).__name__}, expected "
                                  f"{kind.__name__}; {_START_AGAIN}")
    for name in ("finalised", "pending", "existing_zeros") + (("dense_blocks",) if recomputed else ()):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in manifest[name]):
            raise CheckpointError(f"{os.path.join(path, MANIFEST)} is damaged: {name!r} must list integers; "
                                  f"{_START_AGAIN}")
    for file_name in manifest["streams"].values():
        if not isinstance(file_name, str) or os.path.basename(file_name) != file_name:
            raise CheckpointError(f"{os.path.join(path, MANIFEST)} is damaged: it names the stream file "
                                  f"{file_name!r}; {_START_AGAIN}")


def _safetensors_metadata(path: str) -> dict[str, str]:
    """The metadata of a safetensors file; CheckpointError when its header is torn or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # SafetensorError: "incomplete metadata, file not fully covered", "header too small"
        raise CheckpointError(f"{path} is torn or damaged ({err}); {_START_AGAIN}") from None


class Checkpoint:
    """A complete step folder, read with json and safetensors only."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)
        manifest = _read_json(os.path.join(path, MANIFEST))
        if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_FORMATS:
            raise CheckpointError(f"{path}: not a checkpoint of this version of hf-recon-prune "
                                  f"(format {manifest.get('format_version') if isinstance(manifest, dict) else '?'}, "
                                  f"expected {FORMAT_VERSION})")
        _check_manifest(path, manifest)
        self.manifest: dict[str, Any] = manifest
        self.stream_folder = path if manifest["format_version"] == 1 else os.path.join(self.folder, STREAMS)
        #: Format 3 holds no stream: a resume recomputes them (``run_checkpoints.restore_run``).
        self.recomputes_streams = manifest["format_version"] >= 3
        self._check_files()
        self.report: dict[str, Any] = _read_json(os.path.join(path, REPORT))
        if not isinstance(self.report, dict):
            raise CheckpointError(f"{os.path.join(path, REPORT)} is damaged (not a report); {_START_AGAIN}")

    def _check_files(self) -> None:
        """Every file a resume reads is there, has the size the manifest recorded and a readable safetensors
        header; otherwise CheckpointError names the file (nothing has been loaded into the model yet)."""
        sizes = dict(self.manifest.get("file_sizes") or {})
        files = [os.path.join(self.path, STATE)]
        owned = set()  # block files, which must be this run's
        for name in self.manifest["streams"].values():
            files.append(os.path.join(self.stream_folder, name))
            recorded = (self.manifest.get("stream_file_sizes") or {}).get(name)
            if recorded is not None:
                sizes[os.path.relpath(files[-1], self.path)] = recorded
        for index in self.manifest["finalised"]:
            files.append(block_file(self.folder, index))
            owned.add(files[-1])
            recorded = (self.manifest.get("block_file_sizes") or {}).get(str(index))
            if recorded is not None:
                sizes[os.path.relpath(block_file(self.folder, index), self.path)] = recorded
        for index in self.manifest.get("dense_blocks") or []:
            files.append(dense_block_file(self.folder, index))
            owned.add(files[-1])
            recorded = (self.manifest.get("dense_block_file_sizes") or {}).get(str(index))
            if recorded is not None:
                sizes[os.path.relpath(files[-1], self.path)] = recorded
        for path in files:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is missing: the checkpoint in {self.path} is incomplete; {_START_AGAIN}")
            recorded = sizes.get(os.path.relpath(path, self.path))
            if recorded is not None and os.path.getsize(path) != recorded:
                raise CheckpointError(f"{path} is torn: {os.path.getsize(path)} bytes where the checkpoint wrote "
                                      f"{recorded}; {_START_AGAIN}")
            metadata = _safetensors_metadata(path)
            if path in owned:
                self._check_owner(path, metadata)

    def _check_owner(self, path: str, metadata: dict[str, str]) -> None:
        if (metadata.get("run_id") != self.manifest.get("run_id")
                or metadata.get("fingerprint") != self.manifest.get("fingerprint")):
            raise CheckpointError(f"{path} belongs to another run than {self.path}; delete {self.folder} and "
                                  "start again")

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

    def check_dense_blocks(self, samples: list[Optional[str]], blocks: Optional[list[torch.nn.Module]] = None) -> None:
        """The blocks this resume takes from the model (neither finalised nor pending in the checkpoint) must hold the
        dense weights the run started from: a reloaded or another model, or one a failed run left half-pruned, would
        otherwise be mixed silently with the checkpoint's blocks.

        A block the failed run had taken but not finished (modified in place in this process) is put back from the
        copy of its dense weights the run wrote when it took it (runs with a dense stream write one), when that copy
        is this run's and matches the weights the run started from; any other mismatch raises CheckpointError."""
        recorded = self.manifest.get("dense_block_samples")
        if not recorded or len(recorded) != len(samples):
            return
        covered = set(self.manifest.get("finalised", [])) | set(self.manifest.get("pending", []))
        differ = [i for i, (then, now) in enumerate(zip(recorded, samples))
                  if i not in covered and then is not None and now is not None and then != now]
        differ = [i for i in differ if blocks is None or not self._restore_dense_block(i, blocks[i], recorded[i])]
        if differ:
            raise CheckpointError(
                f"decoder blocks {differ} of this model do not hold the dense weights the checkpoint in {self.path} "
                "started from (another model, or one a failed run already modified); load the original dense model "
                "again and resume with it"
            )

    def _restore_dense_block(self, index: int, block: torch.nn.Module, recorded_sample: str) -> bool:
        """Load the run's own copy of block ``index``'s dense weights into ``block``; False (nothing changed) when
        there is no such copy, it is another run's or unreadable, or it is not the weights the run started from."""
        if not os.path.isfile(dense_block_file(self.folder, index)):
            return False
        try:
            state = self.dense_block(index)
        except CheckpointError:
            return False
        names = list(block.state_dict())
        if sorted(names) != sorted(state) or state_weights_sample({n: state[n] for n in names}) != recorded_sample:
            return False
        block.load_state_dict(state, strict=True)
        logger.info("decoder block %d was modified by the failed run before its checkpoint: its dense weights were "
                    "restored from %s", index, dense_block_file(self.folder, index))
        return True

    def state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = os.path.join(self.path, STATE)
        try:
            return load_file(path)
        except Exception as err:  # SafetensorError, OSError
            raise CheckpointError(f"{path} cannot be read ({err}); {_START_AGAIN}") from None

    def stream(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file_name = (self.manifest.get("streams") or {}).get(name)
        if not isinstance(file_name, str) or os.path.basename(file_name) != file_name:
            raise CheckpointError(f"{self.path}: the manifest names no file for stream {name!r}")
        path = os.path.join(self.stream_folder, file_name)
        try:
            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor("stream")
        except Exception as err:  # SafetensorError (torn, no "stream" tensor), OSError
            raise CheckpointError(f"{path} cannot be read ({err}); {_START_AGAIN}") from None

    def block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(state dict, masks by linear name) of a finalised block, checked to belong to this run."""
        return self._block_tensors(block_file(self.folder, index))

    def dense_block(self, index: int) -> dict[str, torch.Tensor]:
        """The state dict block ``index`` had when the run took it, checked to belong to this run."""
        return self._block_tensors(dense_block_file(self.folder, index))[0]

    def _block_tensors(self, path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; delete {self.folder} and start again")
        try:
            handle = safe_open(path, framework="pt")
        except Exception as err:
            raise CheckpointError(f"{path} cannot be read ({err}); {_START_AGAIN}") from None
        with handle:
            self._check_owner(path, handle.metadata() or {})
            state, masks = {}, {}
            for key in handle.keys():
                kind, _, name = key.partition(".")
                (state if kind == "state" else masks)[name] = handle.get_tensor(key)
        return state, masks

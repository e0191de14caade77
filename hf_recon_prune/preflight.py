"""Checks made before any block is touched, so that a run that cannot succeed fails in seconds with a clear message
instead of hours later (or, worse, silently produces a broken model).

``preflight`` runs first in ``Pruner.prune``, before the calibration set is built:

- the model: not quantized (a ``quantization_config`` / ``hf_quantizer``, or bitsandbytes, GPTQ, AWQ, ... layers:
  bitsandbytes' ``Linear4bit`` and ``Linear8bitLt`` are ``nn.Linear`` subclasses and would otherwise be pruned, and a
  quantized model fails only when it is saved), no PEFT adapters, floating-point weights in its decoder blocks, and
  not left half-pruned by a failed run (unless that run is resumed from its checkpoint);
- the calibration windows fit the model's positions (``seq_len`` <= ``max_position_embeddings``: beyond it rotary
  models extrapolate silently and learned positions crash);
- sizes are possible: the activation streams that ``num_samples`` x ``seq_len`` tokens need fit this machine's memory
  and free disk together (``num_samples=10**12`` is refused here, not after the tokenizer has tried);
- the calibration source is not the marker a saved config carries instead of the user's texts;
- the requested ``device`` exists here;
- ``include_modules`` / ``exclude_modules`` leave some weight to prune, and every ``sparsity_overrides`` pattern
  names some weight (a typo would otherwise give a dense "pruned" model, or an override silently not applied).

``check_resources`` runs in ``BlockEngine.setup`` once the memory plan is made (still before any block is touched):
the streams the plan keeps in host memory against the available RAM, those it keeps on disk and the checkpoints
against the free disk. Set ``HF_RECON_PRUNE_SKIP_RESOURCE_CHECK=1`` to skip that check when the estimate is wrong.

Every failure raises ``PreflightError`` (a ``ValueError``) naming the field or the module, and nothing has changed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Optional

import torch
from torch import nn

#: Packages (and subpackages) whose layers hold quantized weights.
QUANTIZATION_LIBRARIES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "optimum.quanto", "optimum.gptq", "quanto",
                          "torchao", "hqq", "fp_quant", "compressed_tensors", "exllamav2", "aqlm", "eetq", "vptq",
                          "fbgemm_gpu")
#: Weight dtypes the criteria and the reconstruction work in.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SKIP_RESOURCE_CHECK = "HF_RECON_PRUNE_SKIP_RESOURCE_CHECK"

GiB = float(1 << 30)


class PreflightError(ValueError):
    """The run cannot succeed as configured; the message names the field or the module, and what to do."""


def preflight(model: nn.Module, layout: Any, config: Any, calibration_data: Any = None, *,
              resume: bool = False) -> None:
    """Raise ``PreflightError`` when pruning ``model`` with ``config`` cannot succeed (see the module docstring)."""
    _check_incomplete(model, config, resume)
    _check_quantization(model)
    _check_device(config)
    for index, block in enumerate(layout.blocks):
        _check_block(index, block)
    _check_selection(model, layout, config)
    rows, length = _calibration_shape(config, calibration_data)
    _check_positions(model, config, length, calibration_data is not None)
    _check_marker(config, calibration_data)
    _check_sizes(model, config, rows, length, calibration_data is not None)


# ---------------------------------------------------------------------------------------------------- the model
def _check_incomplete(model: nn.Module, config: Any, resume: bool) -> None:
    if not getattr(model, "_hf_recon_prune_incomplete", False):
        return
    from .checkpoint import latest_step

    if resume and latest_step(config.checkpoint_dir) is not None:
        return  # the checkpoint knows which blocks are final; the resume checks that the others are still dense
    raise PreflightError(
        "this model was left partially pruned by a failed prune(): some of its decoder blocks were already modified. "
        "Reload the dense model and prune it again, or resume the failed run from its checkpoint with "
        "prune(resume=True) (--resume) and the same PruningConfig.checkpoint_dir."
    )


def _check_quantization(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    loaded = [flag for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit") if getattr(model, flag, False) is True]
    if quantization is None and quantizer is None and not loaded:
        return
    method = _quant_method(quantization) or (type(quantizer).__name__ if quantizer is not None else None)
    raise PreflightError(
        f"{type(model).__name__} is quantized ({method or ', '.join(loaded) or 'quantization_config is set'}): "
        "pruning needs the full-precision weights, and a quantized model could not be saved afterwards. Load the "
        "model without quantization (no quantization_config / load_in_4bit / load_in_8bit, a dtype such as "
        "torch.bfloat16); a model loaded from a GGUF file must be rebuilt without its quantizer (from_config, then "
        "load_state_dict, as hf_recon_prune.models.load_default_model does)."
    )


def _check_device(config: Any) -> None:
    if config.device is None:
        return
    device = torch.device(config.device)
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if device.type != "cpu" and (available is None or not available()):
        raise PreflightError(f"PruningConfig.device={config.device!r}: this machine has no {device.type} device "
                             f"available to torch {torch.__version__}; allowed here: 'cpu'"
                             + (" (or None, which picks it)" if device.type == "cuda" else "") + ".")
    count = getattr(module, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise PreflightError(f"PruningConfig.device={config.device!r}: this machine has {count()} {device.type} "
                             f"device(s), numbered from 0.")


def _check_selection(model: nn.Module, layout: Any, config: Any) -> None:
    """Some weight is left to prune, and every override pattern names a weight of some block."""
    from .prunable import prunable_weights

    family = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    selected: set[str] = set()
    for block in layout.blocks:
        selected.update(prunable_weights(block, config.include_modules, config.exclude_modules, family))
    filters = {name: getattr(config, name) for name in ("include_modules", "exclude_modules") if getattr(config, name)}
    if not selected and layout.blocks:
        candidates = sorted(prunable_weights(layout.blocks[0], family_config=family))
        raise PreflightError(
            "no weight is left to prune: " + " and ".join(f"{k}={v!r}" for k, v in filters.items())
            + f" select none of the decoder blocks' weights (block 0 has {', '.join(candidates) or 'none'}); "
            "the patterns are regular expressions searched in those names.")
    unmatched = [p for p in (config.sparsity_overrides or {}) if not any(re.search(p, name) for name in selected)]
    if unmatched:
        raise PreflightError(
            f"PruningConfig.sparsity_overrides: {', '.join(map(repr, unmatched))} match no weight that is pruned; "
            f"allowed: regular expressions searched in the weights' names inside a block ({', '.join(sorted(selected))})"
            ".")


def _quant_method(quantization: Any) -> Optional[str]:
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        return quantization.get("quant_method") and f"quant_method={quantization['quant_method']!r}"
    method = getattr(quantization, "quant_method", None)
    return f"quant_method={getattr(method, 'value', method)!r}" if method is not None else type(quantization).__name__


def _check_block(index: int, block: nn.Module) -> None:
    """No quantized or adapter layer, and floating-point weights, in decoder block ``index``."""
    for name, module in block.named_modules():
        origin = type(module).__module__
        library = next((lib for lib in QUANTIZATION_LIBRARIES if origin == lib or origin.startswith(lib + ".")),
                       origin.split(".")[0])
        if library in QUANTIZATION_LIBRARIES:
            raise PreflightError(
                f"decoder block {index} module {name!r} is a {type(module).__name__} from {library}: quantized "
                "layers cannot be pruned (their weights are packed integers). Load the model without quantization."
            )
        if library == "peft" or name.endswith(("lora_A", "lora_B")):
            raise PreflightError(
                f"decoder block {index} module {name!r} is a PEFT adapter layer ({type(module).__name__}): merge the "
                "adapters into the weights first (model = model.merge_and_unload()), then prune."
            )
    for name, parameter in block.named_parameters():
        if parameter.dtype not in FLOAT_DTYPES:
            raise PreflightError(
                f"decoder block {index} parameter {name!r} has dtype {parameter.dtype}: pruning works on "
                f"{', '.join(str(d).replace('torch.', '') for d in FLOAT_DTYPES)} weights (a quantized or packed "
                "layer?). Load the model in one of those dtypes."
            )


# ---------------------------------------------------------------------------------------------------- calibration
def _calibration_shape(config: Any, data: Any) -> tuple[int, int]:
    """(rows of every stream of the run, tokens per row): from the data given, or from the config."""
    if data is None:
        from .calibration.builder import heldout_count

        rows = config.num_samples + config.num_self_samples + heldout_count(config.heldout_fraction,
                                                                           config.num_samples)
        return rows, config.seq_len
    ids = data if isinstance(data, torch.Tensor) else getattr(data, "input_ids", None)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise PreflightError(f"calibration_data must be a CalibrationSet or a LongTensor of token ids [N, L], got "
                             f"{type(data).__name__}")
    heldout = getattr(data, "heldout_ids", None)
    return ids.shape[0] + (heldout.shape[0] if isinstance(heldout, torch.Tensor) else 0), ids.shape[1]


def position_limit(model: nn.Module) -> Optional[int]:
    """The most tokens a window of ``model`` may have (``max_position_embeddings``), or None when it has no limit."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _check_positions(model: nn.Module, config: Any, length: int, given: bool) -> None:
    limit = position_limit(model)
    if limit is None or length <= limit:
        return
    what = (f"the calibration_data windows have {length} tokens" if given else
            f"PruningConfig.seq_len={length} is not allowed")
    raise PreflightError(
        f"{what}: {type(model).__name__} has max_position_embeddings={limit}, and positions beyond it are "
        f"extrapolated silently (rotary models) or crash (learned positions); allowed: seq_len <= {limit}."
    )


def _check_marker(config: Any, data: Any) -> None:
    if data is not None:
        return
    from .sanitise import parse_texts_marker

    for name in ("calibration", "heldout_source"):
        marker = parse_texts_marker(getattr(config, name))
        if marker is not None:
            raise PreflightError(
                f"PruningConfig.{name} is {getattr(config, name)[:40]}...>, the marker a saved model's config "
                f"carries in place of the {marker[0]} calibration texts it was pruned with (they are never saved); "
                f"allowed: the texts themselves ({name}=[...]), a dataset name or a file."
            )


def _check_sizes(model: nn.Module, config: Any, rows: int, length: int, given: bool) -> None:
    """One activation stream of every row must fit this machine's memory and free disk together."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", None) if hasattr(model.config, "get_text_config") \
        else getattr(model.config, "hidden_size", None)
    if not isinstance(hidden, int) or hidden <= 0:
        return
    dtype = _stream_dtype(model, config)
    stream = rows * length * hidden * torch.empty((), dtype=dtype).element_size()
    ram = host_memory()[1]
    disk = _free_disk(config.stream_folder)
    capacity = (ram or 0) + (disk or 0)
    if not capacity or stream <= capacity:
        return
    fields = ("the calibration_data" if given else
              f"PruningConfig.num_samples={config.num_samples}, num_self_samples={config.num_self_samples} and "
              f"seq_len={config.seq_len}")
    raise PreflightError(
        f"{fields} ask for {rows} windows of {length} tokens: one activation stream of them is "
        f"{stream / GiB:,.1f} GiB ({rows} x {length} x hidden_size {hidden} x {dtype}), more than this machine's "
        f"memory and free disk together ({capacity / GiB:,.1f} GiB); allowed: sizes whose streams fit, e.g. "
        "num_samples=256 and seq_len=1024 (the paper's)."
    )


def _stream_dtype(model: nn.Module, config: Any) -> torch.dtype:
    from .offload import resolve_dtype

    parameter = next(model.parameters(), None)
    default = parameter.dtype if parameter is not None and parameter.dtype in FLOAT_DTYPES else torch.float32
    return resolve_dtype(config.stream_dtype, default)


# ---------------------------------------------------------------------------------------------------- resources
def check_resources(estimate: Any, config: Any, blocks: Any, device: torch.device) -> None:
    """Raise ``PreflightError`` when the memory plan's host-memory or disk part cannot fit (see the module docs)."""
    if os.environ.get(SKIP_RESOURCE_CHECK, "").lower() in ("1", "true", "yes", "on"):
        return
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)  # processes of this host share its RAM
    streams = estimate.streams if estimate.stream_location == "cpu" else 0
    # On the CPU the window's working set is host memory too (its weights are the model's, already loaded).
    working = estimate.window_peak - estimate.window_weights if device.type == "cpu" else 0
    available = host_memory()[0]
    if available is not None and (streams + working) * processes > available:
        raise PreflightError(
            f"the run needs about {(streams + working) * processes / GiB:.2f} GiB of host memory (activation streams "
            f"{streams / GiB:.2f} GiB and the window's working set {working / GiB:.2f} GiB, times {processes} "
            f"process(es)) and {available / GiB:.2f} GiB are available; use stream_location='disk' (with "
            "stream_folder on a disk with room), fewer num_samples, a shorter seq_len or stream_dtype='bfloat16'. "
            f"(Set {SKIP_RESOURCE_CHECK}=1 if the estimate is wrong.)"
        )
    if estimate.stream_location == "disk":
        _check_disk(estimate.streams * processes, config.stream_folder, "stream_folder", "the disk-backed streams")
    if config.checkpoint_dir:
        _check_disk(checkpoint_bytes(blocks), config.checkpoint_dir, "checkpoint_dir", "the checkpoints")


def checkpoint_bytes(blocks: Any) -> int:
    """Disk the checkpoints of a run over ``blocks`` need at most: every block's final weights and masks (a byte a
    value at most) and the weights it had when taken (a resume recomputes the streams from them), and two step
    folders while one replaces the other (with CR each holds the block prepared for the next window). No stream is
    written."""
    sizes = [sum(t.numel() * t.element_size() for t in block.state_dict().values()) for block in blocks]
    values = sum(t.numel() for block in blocks for t in block.state_dict().values())
    return 2 * sum(sizes) + values + 2 * max(sizes, default=0)


def _check_disk(needed: int, folder: Optional[str], field: str, what: str) -> None:
    free = _free_disk(folder)
    if free is not None and needed > free:
        where = folder or tempfile.gettempdir()
        raise PreflightError(
            f"{what} need about {needed / GiB:.2f} GiB on disk in {where} and {free / GiB:.2f} GiB are free; set "
            f"PruningConfig.{field} to a folder on a disk with room, or need less (fewer num_samples, a shorter "
            f"seq_len). (Set {SKIP_RESOURCE_CHECK}=1 if the estimate is wrong.)"
        )


def _free_disk(folder: Optional[str]) -> Optional[int]:
    """Free bytes on the disk that holds ``folder`` (its nearest existing parent; the temporary folder for None)."""
    path = os.path.abspath(os.path.expanduser(folder)) if folder else tempfile.gettempdir()
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def host_memory() -> tuple[Optional[int], Optional[int]]:
    """(available, total) bytes of host memory, the container's limit included; None where unknown."""
    available = total = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.split()[1:]}
        available, total = info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        pass
    if total is None:
        try:
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            total = pages * size
            available = os.sysconf("SC_AVPHYS_PAGES") * size
        except (ValueError, OSError, AttributeError):
            return None, None
    limit = _cgroup_limit()
    if limit is not None:
        total = min(total, limit[0])
        available = min(available if available is not None else total, max(limit[0] - limit[1], 0))
    return available, total


def _cgroup_limit() -> Optional[tuple[int, int]]:
    """(limit, usage) of the cgroup v2 memory controller, when it sets a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as handle:
            text = handle.read().strip()
        if text == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as handle:
            return int(text), int(handle.read().strip())
    except (OSError, ValueError):
        return None

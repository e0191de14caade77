"""The memory a run needs, estimated before it starts, and the check against the execution device's budget.

Divide and conquer exists to prune under memory limits, so the engine says up front what one window of blocks needs
on the execution device and where the activation streams go, and refuses to start when a single window cannot fit.
The figures are estimates from shapes (not measurements): weights of the largest block in the window, its dense copy
when BR trains toward the dense block on the sparse stream, float32 master weights + gradients + Adam moments for
reconstruction, Hessians and the SparseGPT workspace for the statistics, the activations of one batch, and the
streams. Allocator fragmentation and library workspaces come on top; the check keeps a margin for them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .prunable import prunable_weights
from .config import PruningConfig, parse_memory_size

#: Fraction of the available memory a plan may use; the rest absorbs fragmentation and kernel workspaces.
MARGIN = 0.9

GiB = float(1 << 30)


class MemoryBudgetError(RuntimeError):
    """The execution device cannot hold one window of blocks (and what it must keep there) within the budget."""


@dataclass
class MemoryEstimate:
    """Bytes, per process. ``device_peak`` is what the run is expected to hold at most on the execution device."""

    device: str
    window_blocks: int  # blocks trained together: 1, or 2 with cross-block reconstruction
    block_weights: int  # the largest decoder block, in its own dtype
    window_weights: int
    dense_copies: int  # dense copies of the window (BR toward the dense block on the sparse stream)
    reconstruction: int  # float32 master weights, gradients and Adam moments of one window
    statistics: int  # Hessians / input norms of one block plus the SparseGPT workspace of its largest layer
    activations: int  # one training (or forward) batch through the window
    streams: int  # every activation stream at its peak (sparse, dense, targets; calibration and held-out)
    stream_location: str  # "device", "cpu" or "disk"
    resident: int  # already on the device when the run starts (model weights dispatched there, other tensors)
    budget: Optional[int]  # what the run may hold on the device in total; None: not checked
    window_peak: int = 0  # window weights + dense copies + the largest working set
    device_peak: int = 0  # resident + window_peak + streams kept on the device
    reconstruction_mode: str = ""  # what BR trains ("full" / "lora"; reconstruction_mode="auto" resolved)
    reconstruction_mode_why: str = ""  # why, for "auto"
    overlap_placement: bool = False  # blocks move while the device computes (offload.OVERLAP_PLACEMENT)
    overlap_bytes: int = 0  # the blocks that overlap holds on the device besides the window's (in device_peak)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def gib(value: int) -> str:
            return f"{value / GiB:.2f} GiB"

        lines = [
            f"memory estimate on {self.device} (per process): peak {gib(self.device_peak)}"
            + (f" of a {gib(self.budget)} budget" if self.budget is not None else ""),
            f"  window of {self.window_blocks} block(s): weights {gib(self.window_weights)} "
            f"({gib(self.block_weights)} per block), dense copies {gib(self.dense_copies)}, "
            f"reconstruction state {gib(self.reconstruction)}, statistics {gib(self.statistics)}, "
            f"activations {gib(self.activations)}",
            f"  activation streams {gib(self.streams)} on {self.stream_location}; already on the device "
            f"{gib(self.resident)}",
        ]
        if self.overlap_placement:
            lines.append(f"  blocks moved while the device computes: up to {gib(self.overlap_bytes)} more on the device")
        return "\n".join(lines)


def estimate_memory(
    blocks: nn.ModuleList,
    config: PruningConfig,
    rows: int,
    heldout_rows: int,
    seq_len: int,
    hidden_size: int,
    stream_dtype: torch.dtype,
    device: torch.device,
    attention: Optional[str] = None,
    num_heads: int = 0,
    experts_per_token: int = 0,
    reconstruction_mode: Optional[str] = None,
) -> MemoryEstimate:
    """Estimate the run's memory from the shapes; ``rows`` / ``heldout_rows`` are this process's shard.

    ``experts_per_token`` (a mixture-of-experts model's top-k): every token passes through that many experts, so the
    experts' activations (the gathered input, the gate/up output, the gated product and the down output of each
    routed copy) count top-k times per token. ``reconstruction_mode`` overrides the config's ("full" or "lora"; an
    ``"auto"`` config is estimated as "full")."""
    from .methods import get_criterion
    from .reconstruction import resolve_autocast_dtype
    from .reconstruction.plan import ReconstructionPlan

    plan = ReconstructionPlan.from_config(config, len(blocks))
    criterion = get_criterion(config.method)
    window = plan.window_blocks
    largest = max(blocks, key=lambda block: sum(t.numel() * t.element_size() for t in _tensors(block)))
    block_bytes = sum(t.numel() * t.element_size() for t in _tensors(largest))
    block_params = sum(p.numel() for p in largest.parameters())
    block_dtype_bytes = next((p.element_size() for p in largest.parameters() if p.is_floating_point()), 4)
    weights = prunable_weights(largest, config.include_modules, config.exclude_modules)
    # every matrix unit acts as a linear layer (an expert's gate, a fused q/k/v part); units reading one input
    # share their statistics, so those are counted once per input
    units = [unit for weight in weights.values() for unit in weight.units]
    layers = {unit.statistics: unit for unit in units}
    ffn = max([max(unit.in_features, unit.out_features) for unit in units] + [hidden_size])

    uses_br = plan.block_wise
    mode = reconstruction_mode or ("full" if config.reconstruction_mode == "auto" else config.reconstruction_mode)
    dense_copies = window * block_bytes if plan.dense_copies else 0

    reconstruction = 0
    if uses_br:
        pruned_weights = sum(weight.weight.numel() for weight in weights.values())
        others = block_params - pruned_weights
        if mode == "lora":
            trainable = sum(config.lora_rank * (unit.in_features + unit.out_features) for unit in units)
        else:
            trainable = pruned_weights
        if config.br_train_other_params:
            trainable += others
        # float32 master copy (or, for float32 models, the revert snapshot) + float32 gradient + two Adam moments
        reconstruction = window * (4 * block_params + 12 * trainable)

    gram_bytes, statistics = _statistics_bytes(layers, criterion.needs_statistics(plan.layer_wise),
                                               criterion.needs_hessian(plan.layer_wise))

    model_bytes = block_dtype_bytes
    attention_probs = num_heads * seq_len if attention == "eager" else 0
    intermediate = max([w.units[0].in_features for w in weights.values()
                        if w.kind == "experts" and w.param_name == "down_proj"] + [0])
    routed = experts_per_token * (3 * intermediate + 2 * hidden_size) if intermediate else 0
    forward_tokens = config.forward_batch_size * seq_len
    forward_activations = forward_tokens * ((4 * hidden_size + 3 * ffn + attention_probs + routed) * model_bytes
                                            + 8 * hidden_size)
    activations = forward_activations
    if uses_br:
        amp = resolve_autocast_dtype(config.autocast_dtype, device)
        act_bytes = 4 if amp is None else 2
        train_tokens = min(config.br_batch_size, max(rows, 1)) * seq_len
        per_token = window * ((16 * hidden_size + 8 * ffn + 3 * attention_probs + 3 * routed) * act_bytes) \
            + 12 * hidden_size
        activations = max(activations, train_tokens * per_token)

    stream_item = torch.empty((), dtype=stream_dtype).element_size()
    per_row = seq_len * hidden_size * stream_item
    dense = 2 if plan.dense_stream else 0
    cr = 1 if window == 2 else 0
    calibration_streams = 2 + dense + cr + (1 if plan.dense_copies else 0)
    heldout_streams = 2 + dense + cr
    streams = per_row * (rows * calibration_streams + heldout_rows * heldout_streams)

    working = max(gram_bytes + forward_activations, statistics, (reconstruction + activations) if uses_br else 0,
                  activations)
    window_peak = window * block_bytes + dense_copies + working
    return MemoryEstimate(
        device=str(device), window_blocks=window, block_weights=block_bytes, window_weights=window * block_bytes,
        dense_copies=dense_copies, reconstruction=reconstruction, statistics=statistics, activations=activations,
        streams=streams, stream_location="", resident=0, budget=None, window_peak=window_peak,
        reconstruction_mode=mode if uses_br else "",
    )


def choose_reconstruction_mode(config: PruningConfig, device: torch.device,
                               estimate_for: Callable[[str], MemoryEstimate]) -> tuple[str, str]:
    """(mode, why) for ``reconstruction_mode="auto"``: ``"full"`` when one full-mode window fits the part of the
    budget a run plans with (:data:`MARGIN`), else masked ``"lora"``; any other mode is returned as asked.
    ``estimate_for(mode)`` is the run's estimate in that mode. Without a budget (the CPU, no ``max_device_memory``)
    ``"auto"`` is full mode."""
    if config.reconstruction_mode != "auto":
        return config.reconstruction_mode, ""
    _, available = _device_memory(config, device)
    full = estimate_for("full")
    if available is None:
        return "full", "reconstruction_mode='auto': no device budget to check, so full mode"
    needs, plans = full.window_peak / GiB, MARGIN * available / GiB
    if full.window_peak <= MARGIN * available:
        return "full", (f"reconstruction_mode='auto': a full-mode window of {full.window_blocks} block(s) needs about "
                        f"{needs:.2f} GiB, within the {plans:.2f} GiB the budget plans with")
    lora = estimate_for("lora")
    return "lora", (f"reconstruction_mode='auto': a full-mode window of {full.window_blocks} block(s) needs about "
                    f"{needs:.2f} GiB, beyond the {plans:.2f} GiB the budget plans with, so masked LoRA (rank "
                    f"{config.lora_rank}): about {lora.window_peak / GiB:.2f} GiB")


def plan_placement(estimate: MemoryEstimate, config: PruningConfig, device: torch.device) -> MemoryEstimate:
    """Choose where the streams live ("auto"), check the budget, fill ``resident``/``budget``/``device_peak``.

    Raises:
        MemoryBudgetError: one window does not fit, or the streams were asked on the device and do not fit there.
    """
    resident, available = _device_memory(config, device)
    estimate.resident = resident
    estimate.budget = None if available is None else available + resident
    location = config.stream_location
    if location == "auto":
        fits = available is not None and estimate.window_peak + estimate.streams <= MARGIN * available
        location = "device" if device.type != "cpu" and fits else "cpu"
    if device.type == "cpu" and location == "device":
        location = "cpu"
    estimate.stream_location = location
    on_device = estimate.streams if location == "device" and device.type != "cpu" else 0
    estimate.device_peak = resident + estimate.window_peak + on_device
    _plan_overlap(estimate, device, available, on_device)

    if available is not None and estimate.window_peak > MARGIN * available:
        raise MemoryBudgetError(
            f"one window of {estimate.window_blocks} decoder block(s) needs about {estimate.window_peak / GiB:.2f} GiB "
            f"on {device}, but the budget leaves {available / GiB:.2f} GiB (of which {int(MARGIN * 100)}% is planned): "
            f"{_budget_words(config, resident)}. Per window: weights {estimate.window_weights / GiB:.2f} GiB, dense "
            f"copies {estimate.dense_copies / GiB:.2f} GiB, reconstruction state {estimate.reconstruction / GiB:.2f} "
            f"GiB, statistics {estimate.statistics / GiB:.2f} GiB, activations {estimate.activations / GiB:.2f} GiB. "
            "Raise max_device_memory, keep fewer model weights on the device (device_map / max_memory when loading), "
            "or need less: reconstruction_mode='lora' (or 'auto'), a smaller br_batch_size or forward_batch_size, "
            "autocast_dtype='bfloat16', 'gp' (no dense copy) or no 'cr' (one block per window)."
        )
    if on_device and estimate.window_peak + on_device > MARGIN * available:
        raise MemoryBudgetError(
            f"stream_location='device' puts {on_device / GiB:.2f} GiB of activation streams on {device} next to a "
            f"window needing {estimate.window_peak / GiB:.2f} GiB, beyond the {available / GiB:.2f} GiB the budget "
            f"leaves ({_budget_words(config, resident)}); use stream_location='cpu', 'disk' or 'auto', fewer "
            "samples or a smaller stream_dtype."
        )
    return estimate


#: Blocks that overlapped placement may hold on the device besides the window: the next one, loaded early, and the
#: last finished one, until it is written back.
OVERLAP_BLOCKS = 2


def _plan_overlap(estimate: MemoryEstimate, device: torch.device, available: Optional[int], on_device: int) -> None:
    """Overlapped placement (``offload.OVERLAP_PLACEMENT``) on CUDA where its extra blocks fit the budget next to the
    window and the device streams (which come first); its bytes join ``device_peak``."""
    from . import offload

    extra = OVERLAP_BLOCKS * estimate.block_weights
    fits = available is None or estimate.window_peak + on_device + extra <= MARGIN * available
    estimate.overlap_placement = bool(offload.OVERLAP_PLACEMENT and device.type == "cuda" and fits)
    estimate.overlap_bytes = extra if estimate.overlap_placement else 0
    estimate.device_peak += estimate.overlap_bytes


def _statistics_bytes(layers: dict, needed: bool, hessian: bool) -> tuple[int, int]:
    """(the statistics pass's bytes, the peak of the masks step). The statistics pass holds every layer's input norms
    and Gram matrix (an upper bound: layers that read one input share one). Solving a layer consumes its Gram matrix
    in place and adds at most two more d_in^2 float32 matrices (the Cholesky factor, then H^-1 and its factor) and
    float32 copies of the weight."""
    if not needed:
        return 0, 0
    gram_bytes = sum(4 * layer.in_features * ((layer.in_features if hessian else 0) + 1) for layer in layers.values())
    statistics = gram_bytes
    if hessian and layers:
        statistics += max(16 * layer.in_features * layer.out_features + 8 * layer.in_features**2
                          for layer in layers.values())
    return gram_bytes, statistics


def _budget_words(config: PruningConfig, resident: int) -> str:
    if config.max_device_memory is not None:
        return (f"max_device_memory={config.max_device_memory!r} minus {resident / GiB:.2f} GiB already allocated on "
                "the device (model weights placed there)")
    return "the device's free memory at the start of the run"


def _device_memory(config: PruningConfig, device: torch.device) -> tuple[int, Optional[int]]:
    """(bytes already held on the device, bytes the run may still use there or None when unknown/unchecked)."""
    resident = 0
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
    if config.max_device_memory is not None:
        return resident, parse_memory_size(config.max_device_memory) - resident
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return resident, free + torch.cuda.memory_reserved(device) - resident
    return resident, None


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()

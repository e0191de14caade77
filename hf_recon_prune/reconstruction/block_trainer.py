"""Block-wise reconstruction (BR): train one window of decoder blocks to reproduce its target outputs.

A window is one block, or two adjacent blocks under cross-block reconstruction (CR, see ``schedule.py``). Its
pruned linears keep their masks: only the kept weights move, pruned weights stay exactly zero at every step.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..block_io import batches, call_window, halved_after_out_of_memory, move_to
from ..config import PruningConfig
from ..distributed import ShardedRows
from ..offload import StreamRows, normalise_device
from .masked_lora import MaskedLoraHandle, attach_masked_lora, merge_masked_lora, unload_masked_lora

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "LossTransform", "reconstruct_window", "resolve_autocast_dtype"]

#: ``loss_transform(step, loss) -> loss``: applied to every mini-batch loss before the backward pass (``step`` counts
#: optimizer steps from 0 over the whole window). For tests and instrumentation, e.g. forcing a non-finite loss
#: (``lambda step, loss: loss * float("nan") if step == 3 else loss``) or inspecting the weights before each step
#: (they reflect every previous step, masks included). Return the loss unchanged to only observe.
LossTransform = Callable[[int, torch.Tensor], torch.Tensor]

_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)  # mean training MSE per epoch
    reverted: bool = False  # a non-finite loss reverted the window to its pre-training weights
    warning: Optional[str] = None
    seconds: float = 0.0
    num_steps: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. the micro-batch was halved after running out of memory


def resolve_autocast_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the training forward/backward, or None for plain float32.

    ``"auto"``: bfloat16 on CUDA (float16 on GPUs without bf16), none on CPU; ``"float32"``: none;
    ``"bfloat16"`` / ``"float16"``: that dtype on any device.
    """
    if name == "float32":
        return None
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _AUTOCAST[name]


def reconstruct_window(
    blocks: Sequence[nn.Module],
    masks: Mapping[nn.Linear, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs_per_block: Sequence[dict],
    config: PruningConfig,
    device: torch.device,
    show_progress: bool = False,
    loss_transform: Optional[LossTransform] = None,
    window_name: Optional[str] = None,
    sharded_rows: Optional[ShardedRows] = None,
) -> TrainResult:
    """Minimise ``MSE(call_window(blocks, inputs), targets)`` over the window's weights, in place.

    Args:
        blocks: consecutive decoder blocks, on ``device``, already masked.
        masks: for every pruned ``nn.Linear`` inside ``blocks``, a bool keep-mask (True = kept) of the weight's shape.
            Pruned weights are set to exactly zero at the start and stay exactly zero at every step and at the end
            (the gradient is masked by a hook, and the weight is re-masked after every optimizer step because Adam's
            momentum could otherwise move a zero-gradient weight).
        inputs: ``[N, L, d]`` inputs of ``blocks[0]`` (the sparse stream); CPU (pinned or not) or ``device``, any float
            dtype. Mini-batches are gathered and moved to ``device`` as they are consumed (non-blocking when pinned).
        targets: ``[N, L, d]`` target outputs of ``blocks[-1]``, same placement rules.
        kwargs_per_block: the captured keyword arguments of each block (batch 1, they broadcast over the batch).
        config: ``br_epochs`` epochs of ``ceil(N / br_batch_size)`` steps; Adam (fused on CUDA) at ``br_lr`` decayed
            linearly to 0 over all steps; mini-batches in an order shuffled by a ``torch.Generator`` seeded with
            ``seed`` (the global RNG is not touched). ``reconstruction_mode``:

            * ``"full"``: trains the kept weights of every pruned linear; with ``br_train_other_params`` also every
              other parameter of the blocks (norm weights, biases, linears that were not pruned).
            * ``"lora"``: attaches masked LoRA adapters (rank ``lora_rank``, scaling ``lora_alpha / lora_rank``,
              effective weight ``M * (W + s B A)``, see ``masked_lora.py``) to the pruned linears whose name inside
              their block matches one of ``lora_target_modules`` (``re.search``; None = all pruned linears), trains
              the adapters, merges them with the masked merge and removes every peft module. The pruned linears'
              own weights are frozen (those not targeted by a pattern stay exactly as they are);
              ``br_train_other_params`` additionally trains the blocks' other parameters (norms, biases, unpruned
              linears) directly, as in the full mode. What the paper (Shin et al., 2024) does here could not be
              checked while writing this (no copy of the paper was at hand): its BR updates the weights of each
              block by gradient descent on the block reconstruction error; whether norms/biases are trained along,
              and how a LoRA variant treats them, is not asserted here. Both modes therefore leave the choice to
              ``br_train_other_params`` (default True).

            Training runs on float32 master weights: bf16/fp16 parameters are upcast for the duration and written
            back in their original dtype (untrained parameters round-trip exactly). ``autocast_dtype`` selects the
            autocast of the forward/backward (see :func:`resolve_autocast_dtype`); float16 uses a gradient scaler.
        device: where the blocks are and the training runs.
        show_progress: a tqdm bar over the steps.
        loss_transform: see :data:`LossTransform`.
        window_name: how warnings name this window (e.g. ``"blocks (3, 4)"``); by default derived from the blocks'
            ``layer_idx`` attributes.
        sharded_rows: data-parallel training (see ``distributed.py``): ``inputs`` / ``targets`` hold this process's
            shard of the rows. Every process draws the permutation of all rows, runs the part of each mini-batch in
            its shard, and the summed gradient (and loss) is that of the whole mini-batch; all processes must call.

    To be able to revert, a copy of every parameter of the window (original dtype) is kept during the call, in
    pinned CPU memory when the window is on a GPU (on its device otherwise). A non-finite loss (checked once per
    epoch, which costs one device synchronisation per epoch) stops training and restores every parameter of the
    window bit-exactly to its value before the call; the result then has ``reverted=True`` and a warning naming the
    window, and the caller can carry on. On any exception the window is
    restored the same way before the exception propagates. Afterwards, nothing in the blocks requires grad or holds a
    ``.grad`` unless it did before; the blocks' train/eval modes are restored (training runs in eval mode: no dropout).
    """
    start_time = time.perf_counter()
    blocks = list(blocks)
    kwargs_per_block = list(kwargs_per_block)
    device = normalise_device(device)
    name = window_name or _describe_window(blocks)
    _check_arguments(blocks, masks, inputs, targets, kwargs_per_block, sharded_rows)
    num_rows = inputs.shape[0] if sharded_rows is None else sharded_rows.total_rows
    batch_size = min(config.br_batch_size, num_rows)
    steps_per_epoch = math.ceil(num_rows / batch_size)
    total_steps = config.br_epochs * steps_per_epoch
    amp_dtype = resolve_autocast_dtype(config.autocast_dtype, device)

    params = _unique_parameters(blocks)
    snapshot = [_snapshot(p) for p in params]  # exact pre-training values, original dtypes
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    original_dtypes = [p.dtype for p in params]
    training_modes = [block.training for block in blocks]
    # Keep-masks as given (no inverted copies: ``~keep`` is formed per use, one layer at a time).
    kept = {layer: mask.to(device=layer.weight.device, dtype=torch.bool) for layer, mask in masks.items()}

    result = TrainResult()
    handle: Optional[MaskedLoraHandle] = None
    hooks: list = []
    finished = False
    progress = None
    try:
        for param in params:
            param.requires_grad_(False)
            param.grad = None
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()  # float32 master weights, same Parameter objects
        for block in blocks:
            block.eval()
        _apply_masks(kept)
        train_kwargs = [move_to(kw, dtype=torch.float32) for kw in kwargs_per_block]

        pruned_weight_ids = {id(layer.weight) for layer in kept}
        others = [p for p in params if id(p) not in pruned_weight_ids and p.is_floating_point()]
        trainable: list[nn.Parameter] = []
        if config.reconstruction_mode == "lora":
            handle = attach_masked_lora(
                blocks, kept, config.lora_rank,
                config.lora_alpha, config.lora_target_modules, seed=config.seed,
            )
            for param in params:  # peft froze the blocks; start again from "nothing trains"
                param.requires_grad_(False)
            trainable.extend(handle.parameters())
        elif config.reconstruction_mode == "full":
            trainable.extend(layer.weight for layer in kept)
        else:
            raise ValueError(f"unknown reconstruction_mode {config.reconstruction_mode!r}")
        if config.br_train_other_params:
            trainable.extend(others)
        for param in trainable:
            param.requires_grad_(True)
        if config.reconstruction_mode == "full":
            for layer, keep in kept.items():
                hooks.append(layer.weight.register_hook(functools.partial(_mask_grad, keep)))

        if not trainable:
            result.warning = f"reconstruction of {name}: nothing to train (no pruned linear matched, no other parameters)"
            logger.warning(result.warning)
        else:
            if show_progress:
                from tqdm.auto import tqdm

                progress = tqdm(total=total_steps, desc=f"reconstructing {name}", unit="step", leave=False)
            bad = _train(
                blocks, kept if config.reconstruction_mode == "full" else {}, trainable, inputs, targets,
                train_kwargs, config, device, batch_size, steps_per_epoch, total_steps, amp_dtype, loss_transform,
                result, progress, num_rows, sharded_rows,
            )
            if bad is not None:
                step, value = bad
                result.reverted = True
                result.warning = (
                    f"reconstruction of {name}: non-finite training loss ({value}) at step {step} of {total_steps}; "
                    "the window's weights were restored to their values before reconstruction"
                )
                logger.warning(result.warning)
                return result  # the finally clause restores the snapshot
            if handle is not None:
                merge_masked_lora(handle)
        finished = True
        return result
    finally:
        if progress is not None:
            progress.close()
        for hook in hooks:
            hook.remove()
        if handle is not None and handle.active:
            unload_masked_lora(handle)
        with torch.no_grad():
            for param, saved, dtype in zip(params, snapshot, original_dtypes):
                if finished and not result.reverted:
                    if param.dtype != dtype:
                        param.data = param.data.to(dtype)
                else:
                    param.data = saved.to(param.device)
            if finished and not result.reverted:
                _apply_masks(kept)  # a no-op unless a float cast could have touched zeros
        for param, flag, grad in zip(params, requires_grad, grads):
            param.grad = grad
            param.requires_grad_(flag)
        for block, mode in zip(blocks, training_modes):
            block.train(mode)
        result.seconds = time.perf_counter() - start_time


def _train(
    blocks, kept, trainable, inputs, targets, kwargs, config, device, batch_size, steps_per_epoch, total_steps,
    amp_dtype, loss_transform, result, progress, num_rows, sharded_rows=None,
) -> Optional[tuple[int, float]]:
    """The optimisation loop; returns (step, loss) of the first non-finite loss, or None."""
    optimizer = torch.optim.Adam(trainable, lr=config.br_lr, fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    generator = torch.Generator().manual_seed(config.seed)
    forward = _WindowLoss(blocks, kwargs, _use_compile(config.compile_blocks, device))
    data = _MiniBatches(inputs, targets, device)

    step = 0
    micro_batch = batch_size  # halved after an out-of-memory error; the optimiser still sees whole mini-batches
    with torch.enable_grad():
        for _epoch in range(config.br_epochs):
            order = torch.randperm(num_rows, generator=generator)
            losses = torch.empty(steps_per_epoch, dtype=torch.float32, device=device)
            rows_per_step = []
            epoch_batches = list(batches(num_rows, batch_size))
            for i, rows in enumerate(epoch_batches):
                index = order[rows]
                following = order[epoch_batches[i + 1]] if i + 1 < len(epoch_batches) else None
                while True:  # no optimiser step has been taken when an error ends an attempt: retrying is exact
                    try:
                        if sharded_rows is None:
                            loss = _step(forward, optimizer, data, index, following, device, amp_dtype, scaler,
                                         loss_transform, step, micro_batch)
                        else:
                            loss = _sharded_step(forward, trainable, optimizer, data, index, device,
                                                 amp_dtype, scaler, loss_transform, step, sharded_rows)
                        break
                    except torch.OutOfMemoryError as error:
                        if sharded_rows is not None:
                            raise
                        optimizer.zero_grad(set_to_none=True)
                        micro_batch = _smaller_micro_batch(micro_batch, index.numel(), error, result)
                    except Exception as error:
                        if not (forward.compiled and _is_compile_error(error)):
                            raise
                        optimizer.zero_grad(set_to_none=True)
                        forward.fall_back_to_eager(error, result)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                _apply_masks(kept)
                losses[i] = loss.detach()
                rows_per_step.append(index.numel())
                step += 1
                result.num_steps = step
                if progress is not None:
                    progress.update(1)
            values = losses.cpu().double()  # one synchronisation per epoch
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                first = int((~finite).nonzero()[0])
                return step - steps_per_epoch + first, float(values[first])
            weights = torch.tensor(rows_per_step, dtype=torch.float64)
            result.epoch_losses.append(float((values * weights).sum() / num_rows))
            if progress is not None:
                progress.set_postfix(loss=f"{result.epoch_losses[-1]:.4g}")
    optimizer.zero_grad(set_to_none=True)
    return None


def _step(forward, optimizer, data, index, following, device, amp_dtype, scaler, loss_transform, step,
          micro_batch) -> torch.Tensor:
    """Gradients of the mean squared error over the mini-batch ``index``, in micro-batches of ``micro_batch`` rows.

    Each micro-batch's loss is its squared error divided by the size of the whole mini-batch, so the accumulated
    gradient is the mini-batch's (up to float rounding); a micro-batch as large as the mini-batch is the plain step.
    """
    # The previous step's gradients are cleared only now, right before the first backward (a loss_transform may
    # inspect them).
    total = None
    parts = index.split(micro_batch)
    for number, part in enumerate(parts):
        # the rows after these, copied to the device while these compute: the next part, or the next mini-batch's
        ahead = parts[number + 1] if number + 1 < len(parts) else (
            following[:micro_batch] if following is not None else None)
        loss = _part_loss(forward, data, part, index.numel(), device, amp_dtype, loss_transform, step, ahead)
        if number == 0:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
        del loss
    return total


def _part_loss(forward, data, rows, batch_rows, device, amp_dtype, loss_transform, step, ahead=None):
    """Squared error of the window's output on ``rows`` (part of a mini-batch of ``batch_rows`` rows) divided by
    the whole mini-batch's element count: the parts' gradients add up to the mini-batch mean's (a part that is the
    whole mini-batch gives its mean squared error)."""
    x, y = data.load(rows, ahead)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        squared_error = forward(x, y)
    loss = squared_error / (batch_rows * y[0].numel())
    return loss_transform(step, loss) if loss_transform is not None else loss


def _window_squared_error(blocks, kwargs, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed squared error of the window's output on ``x`` against ``y``, in float32.

    ``x`` and ``y`` come in the streams' dtype and are upcast here, inside what ``compile_blocks`` compiles, so that
    the compiled graph can fuse the casts instead of holding float32 copies of both for the whole step.
    """
    out = call_window(blocks, x.float(), kwargs)
    return (out.float() - y.float()).square().sum()


def _smaller_micro_batch(micro_batch: int, batch: int, error: BaseException, result: TrainResult) -> int:
    """Halve the training micro-batch after running out of memory (and say so); at one row, give up clearly."""
    current = min(micro_batch, batch)
    smaller = halved_after_out_of_memory(current, error, (
        "block-wise reconstruction ran out of memory even with a micro-batch of one row. Use "
        "reconstruction_mode='lora', a shorter seq_len, stream_location='cpu', or a device with more memory."))
    note = (f"block-wise reconstruction ran out of memory with a micro-batch of {current} rows; continuing with "
            f"micro-batches of {smaller} (gradients accumulated over the br_batch_size mini-batch, so the optimiser "
            "steps are unchanged)")
    logger.warning(note)
    result.notes.append(note)
    return smaller


def _sharded_step(forward, trainable, optimizer, data, index, device, amp_dtype, scaler,
                  loss_transform, step, sharded_rows) -> torch.Tensor:
    """Backward over this shard's rows of the mini-batch ``index``, then sum gradients and loss over processes.

    The local loss is the squared error of the local rows divided by the size of the *whole* mini-batch, so the
    summed gradient equals the gradient of the single-process mean.
    """
    local = sharded_rows.local(index)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    if local.numel():
        loss = _part_loss(forward, data, local, index.numel(), device, amp_dtype, loss_transform,
                          step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    else:
        optimizer.zero_grad(set_to_none=True)
    total = loss.detach().float().reshape(1).clone()
    sharded_rows.reduce_gradients_(trainable, extra=[total])
    return total[0]


_COMPILED: dict[str, Callable] = {}  # the compiled loss, made once per process
_COMPILE_FAILED: list[str] = []  # why compiling failed in this process: later windows do not try again


def _use_compile(setting, device: torch.device) -> bool:
    if _COMPILE_FAILED:
        return False
    return device.type == "cuda" if setting == "auto" else bool(setting)


def _is_compile_error(error: BaseException) -> bool:
    """An error of torch.compile itself (dynamo, inductor, a missing compiler), not of the computation."""
    dynamo_error = getattr(getattr(getattr(torch, "_dynamo", None), "exc", None), "TorchDynamoException", None)
    return dynamo_error is not None and isinstance(error, dynamo_error)


class _WindowLoss:
    """``(x, y) -> summed squared error`` of the window, compiled (``compile_blocks``) or eager."""

    def __init__(self, blocks, kwargs, compiled: bool):
        self.blocks, self.kwargs, self.compiled = blocks, kwargs, compiled

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        squared_error = _compiled_window_squared_error() if self.compiled else _window_squared_error
        return squared_error(self.blocks, self.kwargs, x, y)

    def fall_back_to_eager(self, error: BaseException, result: TrainResult) -> None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        note = (f"torch.compile failed ({type(error).__name__}: {reason[:300]}); block-wise reconstruction carries on "
                "uncompiled, with the same result up to float rounding (compile_blocks=False skips the attempt)")
        logger.warning(note)
        result.notes.append(note)
        _COMPILE_FAILED.append(note)
        self.compiled = False


def _compiled_window_squared_error() -> Callable:
    """``torch.compile(_window_squared_error)``, made once per process: dynamo treats the blocks' parameters as
    inputs, so every later window of the same block class reuses the first window's compiled code instead of
    compiling again (a window of two blocks, or a new batch shape, compiles once more)."""
    if "squared_error" not in _COMPILED:
        _COMPILED["squared_error"] = torch.compile(_window_squared_error)
    return _COMPILED["squared_error"]


def _mask_grad(keep: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(~keep, 0)


@torch.no_grad()
def _apply_masks(kept: Mapping[nn.Linear, torch.Tensor]) -> None:
    for layer, keep in kept.items():
        layer.weight.masked_fill_(~keep, 0)


def _snapshot(param: torch.Tensor) -> torch.Tensor:
    """A copy of ``param`` to restore it from: in pinned CPU memory when it lives on a GPU, where the window's
    memory is scarcest (restoring is rare; copying out costs milliseconds)."""
    if param.device.type == "cuda":
        copy = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
        return copy.copy_(param.detach())
    return param.detach().clone()


class _MiniBatches:
    """BR's inputs and targets, mini-batch by mini-batch on the device; the next rows are copied while the current
    ones compute (``StreamRows``: pinned CPU streams on a GPU)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device):
        self.inputs, self.targets = inputs, targets
        self.transfers = StreamRows(device)

    def load(self, rows: torch.Tensor, ahead: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transfers.load(self.inputs, rows, ahead), self.transfers.load(self.targets, rows, ahead)


def _unique_parameters(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for block in blocks:
        for param in block.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def _describe_window(blocks: Sequence[nn.Module]) -> str:
    indices = []
    for block in blocks:
        index = getattr(block, "layer_idx", None)
        if not isinstance(index, int):
            index = next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), None)
        indices.append(index)
    if all(i is not None for i in indices):
        return f"window of blocks {tuple(indices)}"
    return f"window of {len(blocks)} block(s) ({', '.join(type(b).__name__ for b in blocks)})"


def _check_arguments(blocks, masks, inputs, targets, kwargs_per_block, sharded_rows=None) -> None:
    if not blocks:
        raise ValueError("reconstruct_window needs at least one block")
    if len(kwargs_per_block) != len(blocks):
        raise ValueError(f"{len(kwargs_per_block)} kwargs dicts for {len(blocks)} blocks")
    if inputs.ndim != 3 or targets.shape != inputs.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must both be [N, L, d]")
    if (inputs.shape[0] if sharded_rows is None else sharded_rows.total_rows) == 0:
        raise ValueError("reconstruct_window needs at least one calibration row")
    if not (inputs.is_floating_point() and targets.is_floating_point()):
        raise TypeError("inputs and targets must be floating point")
    inside = {id(m) for block in blocks for m in block.modules()}
    for layer, mask in masks.items():
        if id(layer) not in inside:
            raise ValueError(f"a masked module ({layer!r}) is not inside the window's blocks")
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"masked module {layer!r} is not an nn.Linear")
        if tuple(mask.shape) != tuple(layer.weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(layer.weight.shape)} for {layer!r}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks must be bool (True = kept), got {mask.dtype}")

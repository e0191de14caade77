"""Block-wise reconstruction (BR): train one window of decoder blocks to reproduce its target outputs.

A window is one block, or two adjacent blocks under cross-block reconstruction (CR, see ``schedule.py``). Its
pruned linears keep their masks: only the kept weights move, pruned weights stay exactly zero at every step. What
is trained depends on the mode (``strategies.py``); the loop below is the same for every mode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..block_io import batches, halved_after_out_of_memory, move_to
from ..distributed import ShardedRows
from ..offload import StreamRows, normalise_device
from .execution import WindowLoss, choose_execution, is_compile_error
from .selection import HeldoutError, WindowChoice, train_window
from .settings import BlockTrainingSettings, resolve_autocast_dtype
from .strategies import TrainingStrategy, training_strategy
from .window_state import WindowState, apply_masks

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "LossTransform", "reconstruct_window", "resolve_autocast_dtype"]

#: ``loss_transform(step, loss) -> loss``: applied to every mini-batch loss before the backward pass (``step`` counts
#: optimizer steps from 0 over the whole window). For tests and instrumentation, e.g. forcing a non-finite loss
#: (``lambda step, loss: loss * float("nan") if step == 3 else loss``) or inspecting the weights before each step
#: (they reflect every previous step, masks included). Return the loss unchanged to only observe.
LossTransform = Callable[[int, torch.Tensor], torch.Tensor]

#: With device-resident streams, BR moves each epoch's row order to the device once (off: every step copies its rows'
#: index from the host, as before 6b1ed2b). ``benchmarks/stage_profile.py --br-index both`` runs both side by side;
#: ``tests/test_cuda.py`` checks that both give the same result.
INDEX_ON_DEVICE = True


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)  # mean training MSE per epoch
    reverted: bool = False  # a non-finite loss reverted the window to its pre-training weights
    warning: Optional[str] = None
    seconds: float = 0.0
    num_steps: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. the micro-batch was halved after running out of memory
    choice: Optional[WindowChoice] = None  # the learning rate, epoch and revert chosen, and why (selection.py)
    execution: str = "eager"  # how the loss ran in the end: "eager", "compiled" or "graphed" (execution.py)


def reconstruct_window(
    blocks: Sequence[nn.Module],
    masks: Mapping[nn.Linear, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs_per_block: Sequence[dict],
    settings: BlockTrainingSettings,
    device: torch.device,
    show_progress: bool = False,
    loss_transform: Optional[LossTransform] = None,
    window_name: Optional[str] = None,
    sharded_rows: Optional[ShardedRows] = None,
    heldout_inputs: Optional[torch.Tensor] = None,
    heldout_targets: Optional[torch.Tensor] = None,
    frozen: Sequence[nn.Parameter] = (),
) -> TrainResult:
    """Minimise ``MSE(call_window(blocks, inputs), targets)`` over the window's weights, in place.

    Args:
        blocks: consecutive decoder blocks, on ``device``, already masked.
        masks: for every pruned ``nn.Linear`` inside ``blocks``, a bool keep-mask (True = kept) of the weight's shape.
            Pruned weights are set to exactly zero at the start and stay exactly zero at every step and at the end
            (how each mode ensures it: see ``strategies.py``).
        inputs: ``[N, L, d]`` inputs of ``blocks[0]`` (the sparse stream); CPU (pinned or not) or ``device``, any float
            dtype. Mini-batches are gathered and moved to ``device`` as they are consumed (non-blocking when pinned).
        targets: ``[N, L, d]`` target outputs of ``blocks[-1]``, same placement rules.
        kwargs_per_block: the captured keyword arguments of each block (batch 1, they broadcast over the batch).
        settings: what is trained and how (mode, epochs, mini-batch size, learning rate, seed, autocast,
            compilation): see :class:`BlockTrainingSettings`. Training runs on float32 master weights: bf16/fp16
            parameters are upcast for the duration and written back in their original dtype (untrained parameters
            round-trip exactly). A ``PruningConfig`` is refused with ``TypeError`` (use
            :meth:`BlockTrainingSettings.from_config`).
        device: where the blocks are and the training runs.
        show_progress: a tqdm bar over the steps.
        loss_transform: see :data:`LossTransform`.
        window_name: how warnings name this window (e.g. ``"blocks (3, 4)"``); by default derived from the blocks'
            ``layer_idx`` attributes.
        sharded_rows: data-parallel training (see ``distributed.py``): ``inputs`` / ``targets`` hold this process's
            shard of the rows. Every process draws the permutation of all rows, runs the part of each mini-batch in
            its shard, and the summed gradient (and loss) is that of the whole mini-batch; all processes must call.
        heldout_inputs, heldout_targets: ``[H, L, d]`` inputs and targets of held-out rows (this process's shard
            when data-parallel), never trained on. With them, ``settings.br_lr="auto"``, ``br_keep_best`` and
            ``br_patience`` choose the learning rate, the epoch to keep (or the revert to the weights before BR,
            bit for bit, when no epoch beats them) and when to stop, by the held-out error (``selection.py``);
            without them every epoch is trained, the last kept, and ``"auto"`` trains at 1e-3. ``result.choice``
            says what was chosen and why.
        frozen: parameters that never train (the engine passes the routers of MoE blocks).

    A mini-batch that runs out of memory is redone in smaller micro-batches whose gradients add up to the whole
    mini-batch's (the optimizer steps are unchanged; the result's notes say so).

    To be able to revert, a copy of every parameter of the window (original dtype) is kept during the call, in
    pinned CPU memory when the window is on a GPU (on its device otherwise). A non-finite loss (checked once per
    epoch, which costs one device synchronisation per epoch) stops training and restores every parameter of the
    window bit-exactly to its value before the call; the result then has ``reverted=True`` and a warning naming the
    window, and the caller can carry on. On any exception the window is restored the same way before the exception
    propagates. Afterwards, nothing in the blocks requires grad or holds a ``.grad`` unless it did before; the
    blocks' train/eval modes are restored (training runs in eval mode: no dropout).
    An unknown ``reconstruction_mode`` raises ``ValueError`` before anything is changed.
    """
    start_time = time.perf_counter()
    if not isinstance(settings, BlockTrainingSettings):
        raise TypeError(f"reconstruct_window takes BlockTrainingSettings (BlockTrainingSettings.from_config(config)), "
                        f"got {type(settings).__name__}")
    blocks = list(blocks)
    kwargs_per_block = list(kwargs_per_block)
    device = normalise_device(device)
    name = window_name or _describe_window(blocks)
    _check_arguments(blocks, masks, inputs, targets, kwargs_per_block, sharded_rows)
    if (heldout_inputs is None) != (heldout_targets is None):
        raise ValueError("give both heldout_inputs and heldout_targets, or neither")
    strategy = training_strategy(settings)
    plan = _StepPlan.of(inputs.shape[0] if sharded_rows is None else sharded_rows.total_rows, settings)
    amp_dtype = resolve_autocast_dtype(settings.autocast_dtype, device)

    window = WindowState(blocks)  # exact pre-training values, original dtypes
    # Keep-masks as given (no inverted copies: ``~keep`` is formed per use, one layer at a time).
    kept = {layer: mask.to(device=layer.weight.device, dtype=torch.bool) for layer, mask in masks.items()}
    result = TrainResult()
    trained = False
    window_loss: Optional[WindowLoss] = None
    try:
        window.prepare(kept)
        train_kwargs = [move_to(kw, dtype=torch.float32) for kw in kwargs_per_block]
        trainable = _make_trainable(strategy, window, kept, settings, frozen)
        if not trainable:
            result.warning = (f"reconstruction of {name}: nothing to train (no pruned linear matched, "
                              "no other parameters)")
            logger.warning(result.warning)
        else:
            execution = choose_execution(settings.compile_blocks, device, blocks, routed=bool(frozen))
            window_loss = WindowLoss(blocks, train_kwargs, execution, amp_dtype)
            loss = _MiniBatchLoss(window_loss, _MiniBatches(inputs, targets, device), device, amp_dtype, loss_transform)
            heldout = None if heldout_inputs is None else HeldoutError(
                window_loss.evaluate, heldout_inputs, heldout_targets, device, amp_dtype, plan.batch_size,
                None if sharded_rows is None else sharded_rows.data_parallel.sum_floats)

            def make_training(lr: float, record: TrainResult) -> _Training:
                return _Training(loss, trainable, strategy.masks_to_reapply, lr, plan, record, sharded_rows, settings.seed)

            with _progress_bar(show_progress, plan.total_steps, name) as progress:
                non_finite = train_window(make_training, trainable, settings, plan, heldout, result, progress)
            if non_finite is not None:
                step, value = non_finite
                result.reverted = True
                result.warning = (
                    f"reconstruction of {name}: non-finite training loss ({value}) at step {step} of "
                    f"{plan.total_steps}; the window's weights were restored to their values before reconstruction"
                )
                logger.warning(result.warning)
                return result  # the finally clause restores the snapshot
            if result.choice.reverted_because_worse:
                logger.info("reconstruction of %s: no epoch beat the held-out error before BR; reverted", name)
                return result  # the finally clause restores the weights before BR, bit for bit
            strategy.finish()
        trained = True
        return result
    finally:
        if window_loss is not None:
            window_loss.release()
            result.execution = window_loss.execution
            result.notes.extend(note for note in window_loss.notes if note not in result.notes)
        strategy.close()
        window.restore(kept, keep_trained=trained)
        result.seconds = time.perf_counter() - start_time


def _make_trainable(strategy: TrainingStrategy, window: WindowState, kept: Mapping[nn.Linear, torch.Tensor],
                    settings: BlockTrainingSettings, frozen: Sequence[nn.Parameter] = ()) -> list[nn.Parameter]:
    """What the strategy trains and, with ``br_train_other_params``, the window's other floating parameters (those
    it had before the strategy added any, ``frozen`` ones such as routers excepted), now requiring grad."""
    trainable = list(strategy.trainable_parameters(window.blocks, kept))
    for param in window.params:  # attaching may change flags (peft freezes the blocks): start from "nothing trains"
        param.requires_grad_(False)
    if settings.br_train_other_params:
        pruned_weight_ids = {id(layer.weight) for layer in kept} | {id(p) for p in frozen}
        trainable.extend(p for p in window.params if id(p) not in pruned_weight_ids and p.is_floating_point())
    for param in trainable:
        param.requires_grad_(True)
    strategy.mask_gradients()
    return trainable


@dataclass(frozen=True)
class _StepPlan:
    """``epochs`` passes over ``num_rows`` rows (all processes' rows when data-parallel) in mini-batches of
    ``batch_size`` rows, one optimizer step each."""

    num_rows: int
    batch_size: int
    epochs: int

    @classmethod
    def of(cls, num_rows: int, settings: BlockTrainingSettings) -> _StepPlan:
        return cls(num_rows, min(settings.br_batch_size, num_rows), settings.br_epochs)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _progress_bar(show: bool, total_steps: int, name: str):
    if not show:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, desc=f"reconstructing {name}", unit="step", leave=False)


class _Training:
    """The optimisation of one window: Adam (fused on CUDA) at ``lr`` decayed linearly to 0 over all planned steps,
    mini-batches in an order shuffled by a generator seeded with ``seed``, the strategy's masks (if any) re-applied
    after every step. Adam has no weight decay: full mode relies on it to keep zero-gradient weights at exactly zero
    (``strategies.FullWeights``). Two trainings made alike from the same weights take the same steps (the probe of ``"auto"``)."""

    def __init__(self, loss: _MiniBatchLoss, trainable: list[nn.Parameter],
                 masks_to_reapply: Mapping[nn.Linear, torch.Tensor], lr: float,
                 plan: _StepPlan, result: TrainResult, sharded_rows: Optional[ShardedRows], seed: int):
        self.loss, self.trainable, self.masks_to_reapply = loss, trainable, masks_to_reapply
        self.plan, self.result, self.sharded_rows = plan, result, sharded_rows
        device = loss.device
        self.optimizer = torch.optim.Adam(trainable, lr=lr, fused=True if device.type == "cuda" else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, 1.0 - step / plan.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=loss.amp_dtype is torch.float16)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same order wherever the run is
        # A pageable host-to-device copy waits for the device's whole queue: an epoch's order goes to the device once,
        # not a step's rows at every step (the rows of device streams are then gathered without the host).
        on_device = INDEX_ON_DEVICE and sharded_rows is None
        self.index_device = loss.data.index_device if on_device else torch.device("cpu")
        self.step = 0
        # halved after an out-of-memory error; the optimiser still sees whole mini-batches
        self.micro_batch = plan.batch_size

    def run(self, progress=None, max_steps: Optional[int] = None,
            after_epoch: Optional[Callable[[int], bool]] = None) -> Optional[tuple[int, float]]:
        """Every epoch (or the first ``max_steps`` steps; ``after_epoch(epoch)`` after each, True stops); returns
        (step, loss) of the first non-finite loss, or None."""
        with torch.enable_grad():
            for epoch in range(1, self.plan.epochs + 1):
                non_finite = self._epoch(progress, max_steps)
                if non_finite is not None:
                    return non_finite
                if max_steps is not None and self.step >= max_steps:
                    break
                if after_epoch is not None and after_epoch(epoch):
                    break
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def _epoch(self, progress, max_steps: Optional[int] = None) -> Optional[tuple[int, float]]:
        plan = self.plan
        order = torch.randperm(plan.num_rows, generator=self.generator).to(self.index_device)
        epoch_batches = list(batches(plan.num_rows, plan.batch_size))
        if max_steps is not None:
            epoch_batches = epoch_batches[:max(0, max_steps - self.step)]
            if not epoch_batches:
                return None
        losses = torch.empty(len(epoch_batches), dtype=torch.float32, device=self.loss.device)
        rows_per_step = []
        for i, rows in enumerate(epoch_batches):
            index = order[rows]
            following = order[epoch_batches[i + 1]] if i + 1 < len(epoch_batches) else None
            loss = self._gradients(index, following)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            apply_masks(self.masks_to_reapply)
            losses[i] = loss.detach()
            rows_per_step.append(index.numel())
            self.step += 1
            self.result.num_steps = self.step
            if progress is not None:
                progress.update(1)
        values = losses.cpu().double()  # one synchronisation per epoch
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            return self.step - len(epoch_batches) + first, float(values[first])
        weights = torch.tensor(rows_per_step, dtype=torch.float64)
        self.result.epoch_losses.append(float((values * weights).sum() / weights.sum()))
        if progress is not None:
            progress.set_postfix(loss=f"{self.result.epoch_losses[-1]:.4g}")
        return None

    def _gradients(self, index: torch.Tensor, following: Optional[torch.Tensor]) -> torch.Tensor:
        """The gradients (and loss) of the mini-batch ``index``; ``following`` is the next mini-batch's rows."""
        while True:  # no optimiser step has been taken when an error ends an attempt: retrying is exact
            try:
                if self.sharded_rows is None:
                    return self._accumulated_gradients(index, following)
                return self._sharded_gradients(index)
            except torch.OutOfMemoryError as error:
                if self.sharded_rows is not None:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                self.loss.window.stop_graphing()  # a graph holds its memory, for one shape: micro-batches run eagerly
                self.micro_batch = _smaller_micro_batch(self.micro_batch, index.numel(), error, self.result)
            except Exception as error:
                if not (self.loss.window.compiled and is_compile_error(error)):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                self.loss.window.fall_back_to_eager("torch.compile", error)

    def _accumulated_gradients(self, index: torch.Tensor, following: Optional[torch.Tensor]) -> torch.Tensor:
        """Gradients of the mean squared error over the mini-batch ``index``, in micro-batches of ``micro_batch`` rows.

        Each micro-batch's loss is its squared error divided by the size of the whole mini-batch, so the accumulated
        gradient is the mini-batch's (up to float rounding); a micro-batch as large as the mini-batch is the plain step.
        """
        # The previous step's gradients are cleared only now, right before the first backward (a loss_transform may
        # inspect them).
        total = None
        parts = index.split(self.micro_batch)
        for number, part in enumerate(parts):
            # the rows after these, copied to the device while these compute: the next part, or the next mini-batch's
            ahead = parts[number + 1] if number + 1 < len(parts) else (
                following[:self.micro_batch] if following is not None else None)
            loss = self.loss(part, index.numel(), self.step, ahead)
            if number == 0:
                self.optimizer.zero_grad(set_to_none=True)
            with self.loss.window.backward_context():
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
            del loss
        return total

    def _sharded_gradients(self, index: torch.Tensor) -> torch.Tensor:
        """Backward over this shard's rows of the mini-batch ``index``, then sum gradients and loss over processes.

        The local loss is the squared error of the local rows divided by the size of the *whole* mini-batch, so the
        summed gradient equals the gradient of the single-process mean.
        """
        local = self.sharded_rows.local(index)
        loss = torch.zeros((), dtype=torch.float32, device=self.loss.device)
        if local.numel():
            loss = self.loss(local, index.numel(), self.step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        total = loss.detach().float().reshape(1).clone()
        self.sharded_rows.reduce_gradients_(self.trainable, extra=[total])
        return total[0]


@dataclass
class _MiniBatchLoss:
    """``(rows, batch_rows, step) -> loss``: the squared error of the window's output on ``rows`` (part of a
    mini-batch of ``batch_rows`` rows) divided by the whole mini-batch's element count, under autocast and
    ``loss_transform``. The parts' gradients add up to the mini-batch mean's (a part that is the whole mini-batch
    gives its mean squared error)."""

    window: WindowLoss
    data: _MiniBatches
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    loss_transform: Optional[LossTransform]

    def __call__(self, rows: torch.Tensor, batch_rows: int, step: int,
                 ahead: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, y = self.data.load(rows, ahead)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            squared_error = self.window(x, y)
        loss = squared_error / (batch_rows * y[0].numel())
        return self.loss_transform(step, loss) if self.loss_transform is not None else loss


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


class _MiniBatches:
    """BR's inputs and targets, mini-batch by mini-batch on the device; the next rows are copied while the current
    ones compute (``StreamRows``: pinned CPU streams on a GPU)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device):
        self.inputs, self.targets = inputs, targets
        self.transfers = StreamRows(device)

    @property
    def index_device(self) -> torch.device:
        """Where row indices should live: with the streams when both are off the CPU (device-resident), so that
        gathering a mini-batch needs no index from the host; on the CPU otherwise (CPU and disk streams are
        gathered on the host)."""
        if self.inputs.device == self.targets.device and self.inputs.device.type != "cpu":
            return self.inputs.device
        return torch.device("cpu")

    def load(self, rows: torch.Tensor, ahead: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transfers.load(self.inputs, rows, ahead), self.transfers.load(self.targets, rows, ahead)


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
        module = layer if isinstance(layer, nn.Module) else getattr(layer, "module", None)  # PrunableWeight
        if module is None or id(module) not in inside:
            raise ValueError(f"a masked module ({layer!r}) is not inside the window's blocks")
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Linear):
            raise TypeError(f"masked module {layer!r} is not an nn.Linear (other weights: a PrunableWeight)")
        if tuple(mask.shape) != tuple(layer.weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(layer.weight.shape)} for {layer!r}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks must be bool (True = kept), got {mask.dtype}")

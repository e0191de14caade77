"""Choices a window's training makes from held-out evidence: the learning rate (``br_lr="auto"``), the epoch whose
weights it keeps (``br_keep_best``), when it stops (``br_patience``), and whether BR is kept at all.

The evidence is the mean squared error of the window's output against its targets on the *held-out* rows (the
calibration set's held-out windows, ``heldout_fraction`` / ``heldout_source``), which never reach the optimiser.
Once they have chosen the epoch or the learning rate, the held-out error in the report is the error of the chosen
weights, so it is no longer an unbiased estimate of the error on new text (a separate evaluation text is).

Epochs are numbered from 1; epoch 0 stands for the weights before BR. Every choice is recorded in a
:class:`WindowChoice` (``TrainResult.choice``), which the engine copies into the block report (``br_choices``).

Costs. Held-out evaluation is a forward pass over the held-out rows (about a third of the cost of a training step
on as many rows) once before training and once per epoch, and a copy of the trained parameters whenever an epoch
beats the best so far (in pinned CPU memory when they live on a GPU, as the window's revert snapshot). The
learning-rate probe of ``"auto"`` costs at most :data:`AUTO_EXTRA_COST` (0.5) times the window's planned training,
by construction (:func:`probe_steps`), so an ``"auto"`` window takes at most 1.5 times as long as the same window
at a fixed learning rate with the same early stopping.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..block_io import batches, halved_after_out_of_memory
from ..offload import StreamRows

__all__ = ["AUTO_LR_GRID", "AUTO_EXTRA_COST", "FALLBACK_LR", "HeldoutError", "ParameterSnapshot", "WindowChoice",
           "probe_steps", "train_window"]

#: The learning rates ``br_lr="auto"`` chooses from (ascending; a tie goes to the smaller one).
AUTO_LR_GRID = (2e-4, 5e-4, 1e-3, 2e-3)
#: The learning rate ``"auto"`` falls back to when there is no held-out row to judge by. Not the paper's 2e-4: in
#: every setting measured (SmolLM2; 50 % and 2:4, BR + GP and BR + GP + CR on an H200 at the paper's budget, and the
#: demo's former budget, 32 x 256 tokens, on a CPU) 1e-3 beat 2e-4 on both held-out sources, and 2e-3 was not better
#: everywhere.
FALLBACK_LR = 1e-3
#: What the learning-rate probe may add to a window's training time, as a fraction of its planned training.
AUTO_EXTRA_COST = 0.5
#: The cost of a forward pass over a row relative to a training step's forward and backward pass over it.
EVALUATION_COST = 1.0 / 3.0


@dataclass
class WindowChoice:
    """What a window's training chose and why (JSON-able through :meth:`to_dict`).

    Attributes:
        lr: the learning rate the window was trained with.
        lr_rule: ``"fixed"`` (``br_lr`` a number), ``"auto"`` (the probe chose) or ``"auto-fallback"`` (``"auto"``
            could not probe: see ``notes``; :data:`FALLBACK_LR` was used).
        lr_probe: ``{"0.0002": held-out error after the probe, ...}`` for every candidate (None: a non-finite loss).
        probe_steps: optimizer steps each candidate was trained for (0 without a probe).
        heldout_before: held-out error of the weights before BR (None when nothing was measured).
        heldout_by_epoch: held-out error after each epoch trained.
        best_epoch: the epoch with the lowest held-out error (0: none beat the weights before BR).
        epochs_run: epochs trained (fewer than ``br_epochs`` when stopped early).
        stopped_early: ``br_patience`` epochs in a row brought no new best, so training stopped.
        kept_epoch: the epoch whose weights the window kept (0: reverted to the weights before BR).
        reverted_because_worse: no epoch beat the held-out error before BR, so the window was reverted to its
            pre-BR weights, bit for bit (``br_keep_best``).
        notes: why a choice fell back (no held-out rows, too little training to probe, ...).
    """

    lr: float
    lr_rule: str
    lr_probe: Optional[dict[str, Optional[float]]] = None
    probe_steps: int = 0
    heldout_before: Optional[float] = None
    heldout_by_epoch: list[float] = field(default_factory=list)
    best_epoch: Optional[int] = None
    epochs_run: int = 0
    stopped_early: bool = False
    kept_epoch: Optional[int] = None
    reverted_because_worse: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; a non-finite held-out error becomes None (JSON has no infinity)."""
        data = asdict(self)
        data["heldout_before"] = _finite_or_none(self.heldout_before)
        data["heldout_by_epoch"] = [_finite_or_none(error) for error in self.heldout_by_epoch]
        return data


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


class ParameterSnapshot:
    """Exact copies of parameters' current values (in pinned CPU memory for GPU parameters), to restore bit for bit.
    :meth:`take` copies the current values again into the same buffers."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.copies = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) if p.device.type == "cuda"
                       else torch.empty_like(p, memory_format=torch.contiguous_format) for p in self.params]
        self.take()

    @torch.no_grad()
    def take(self) -> None:
        for param, copy in zip(self.params, self.copies):
            copy.copy_(param.detach())  # blocking: the CPU may read the copy next

    @torch.no_grad()
    def restore(self) -> None:
        for param, copy in zip(self.params, self.copies):
            param.copy_(copy)


class HeldoutError:
    """The mean squared error of the window's current weights on the held-out rows, as one float.

    ``squared_error(x, y)`` is the summed squared error of the window's output on ``x`` against ``y``; it runs in
    micro-batches of ``batch_size`` rows under no_grad (and the training's autocast), halving them after running
    out of memory. In a data-parallel run each process holds its shard of the rows and ``sum_floats`` adds the sums
    over the processes, so every process gets the same value (every process must call).
    """

    def __init__(self, squared_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                 targets: torch.Tensor, device: torch.device, amp_dtype: Optional[torch.dtype], batch_size: int,
                 sum_floats: Optional[Callable[[list[float]], list[float]]] = None):
        if inputs.shape != targets.shape or inputs.ndim != 3:
            raise ValueError(f"held-out inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must both be "
                             "[H, L, d]")
        self.squared_error, self.inputs, self.targets = squared_error, inputs, targets
        self.device, self.amp_dtype, self.batch_size, self.sum_floats = device, amp_dtype, max(1, batch_size), sum_floats
        rows = float(inputs.shape[0])
        self.total_rows = int(sum_floats([rows])[0]) if sum_floats is not None else int(rows)

    def __call__(self) -> float:
        while True:
            try:
                total = self._squared_error_sum()
                break
            except torch.OutOfMemoryError as error:
                self.batch_size = halved_after_out_of_memory(self.batch_size, error, (
                    "measuring the held-out error ran out of memory even with a micro-batch of one row; use a "
                    "shorter seq_len, fewer held-out rows (heldout_fraction) or a device with more memory"))
        count = float(self.inputs[0].numel() * self.inputs.shape[0]) if self.inputs.shape[0] else 0.0
        if self.sum_floats is not None:
            total, count = self.sum_floats([total, count])
        error = total / count if count else math.nan
        return error if math.isfinite(error) else math.inf  # a non-finite error is never the best

    @torch.no_grad()
    def _squared_error_sum(self) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        transfers = StreamRows(self.device)
        num_rows = self.inputs.shape[0]
        parts = list(batches(num_rows, self.batch_size))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            for number, rows in enumerate(parts):
                following = parts[number + 1] if number + 1 < len(parts) else None
                x = transfers.load(self.inputs, rows, following)
                y = transfers.load(self.targets, rows, following)
                total += self.squared_error(x, y).double()
        transfers.finish()
        return float(total)  # one synchronisation per evaluation


def probe_steps(num_rows: int, epochs: int, batch_size: int, heldout_rows: int, candidates: int,
                extra: float = AUTO_EXTRA_COST) -> int:
    """Optimizer steps each of ``candidates`` learning rates is trained for in the probe of ``br_lr="auto"``.

    Costs are counted in rows passed forward and backward: the window's training is ``epochs * num_rows``; a probe
    step is at most ``batch_size`` rows; measuring a candidate on the held-out rows costs ``heldout_rows / 3``. The
    probe gets ``floor((extra * epochs * num_rows - candidates * heldout_rows / 3) / (candidates * batch_size))``
    steps, so all candidates together cost at most ``extra`` times the training (never more than the training's own
    steps); 0 means the training is too short to probe within that budget.
    """
    batch_size = min(batch_size, num_rows) if num_rows else batch_size
    budget = extra * epochs * num_rows - candidates * EVALUATION_COST * heldout_rows
    if budget <= 0 or candidates <= 0 or batch_size <= 0:
        return 0
    total_steps = epochs * math.ceil(num_rows / batch_size)
    return max(0, min(total_steps, math.floor(budget / (candidates * batch_size))))


#: ``make_training(lr, result)``: a fresh training of the window at ``lr`` (its own Adam state, schedule and seeded
#: batch order, from the window's current weights) that records into ``result``; its ``run(progress, max_steps=None,
#: after_epoch=None)`` returns the (step, loss) of a non-finite loss or None, ``after_epoch(epoch) -> stop?``.
MakeTraining = Callable[[float, Any], Any]


def train_window(make_training: MakeTraining, trainable: Sequence[torch.nn.Parameter], settings: Any, plan: Any,
                 heldout: Optional[HeldoutError], result: Any, progress: Any = None) -> Optional[tuple[int, float]]:
    """Choose the learning rate, train, keep the best epoch (or none): ``result.choice`` says what and why.

    Returns the (step, loss) of a non-finite training loss (the caller reverts the window), else None; when
    ``result.choice.reverted_because_worse`` is set the caller restores the window's weights before BR.
    ``plan`` has ``num_rows``, ``batch_size`` and ``epochs``; ``settings`` is the window's ``BlockTrainingSettings``.
    """
    choice = result.choice = WindowChoice(lr=FALLBACK_LR, lr_rule="fixed")
    wanted = settings.br_keep_best or settings.br_patience is not None or settings.br_lr == "auto"
    tracking = heldout is not None and heldout.total_rows > 0 and wanted
    if wanted and not tracking:
        choice.notes.append("no held-out rows: every epoch was trained and the last one kept (br_keep_best and "
                            "br_patience need held-out rows: heldout_fraction > 0 or heldout_source)")
    if tracking:
        choice.heldout_before = heldout()
    choice.lr = _choose_lr(make_training, trainable, settings, plan, heldout if tracking else None, result)
    best = _BestEpoch(heldout, trainable, settings, plan.epochs, choice) if tracking else None
    training = make_training(choice.lr, result)
    non_finite = training.run(progress, after_epoch=best.after_epoch if best is not None else None)
    choice.epochs_run = len(result.epoch_losses)
    if non_finite is not None:
        return non_finite
    choice.kept_epoch = choice.epochs_run
    if best is not None:
        best.finish(choice.epochs_run)
    return None


def _choose_lr(make_training: MakeTraining, trainable: Sequence[torch.nn.Parameter], settings: Any, plan: Any,
               heldout: Optional[HeldoutError], result: Any) -> float:
    """``br_lr`` when it is a number; for ``"auto"`` the probe (see :func:`probe_lr`) or, without held-out rows or
    room for a probe, :data:`FALLBACK_LR` with a note."""
    choice = result.choice
    if settings.br_lr != "auto":
        choice.lr_rule = "fixed"
        return float(settings.br_lr)
    grid = tuple(sorted(settings.br_lr_grid))
    steps = 0 if heldout is None else probe_steps(plan.num_rows, plan.epochs, plan.batch_size, heldout.total_rows,
                                                  len(grid))
    if heldout is None or steps < 1:
        choice.lr_rule = "auto-fallback"
        why = "no held-out rows to judge by" if heldout is None else (
            f"{plan.epochs} epoch(s) over {plan.num_rows} rows leave no room for a probe of {len(grid)} learning "
            f"rates within {AUTO_EXTRA_COST:g}x the training")
        choice.notes.append(f"br_lr='auto': {why}; trained at {FALLBACK_LR:g} (the fallback rate)")
        return FALLBACK_LR
    choice.lr_rule, choice.probe_steps = "auto", steps
    return probe_lr(make_training, trainable, grid, steps, heldout, result)


def probe_lr(make_training: MakeTraining, trainable: Sequence[torch.nn.Parameter], grid: Sequence[float],
             steps: int, heldout: HeldoutError, result: Any) -> float:
    """Train each learning rate of ``grid`` for ``steps`` optimizer steps from the same weights, batch order and
    schedule (the first ``steps`` steps of a full training at that rate), measure the held-out error, and put the
    weights back exactly; the rate with the lowest error wins (ties: the smaller rate; every candidate non-finite:
    the smallest). The winner is then trained from the start like a fixed rate, so its first ``steps`` steps repeat
    its probe."""
    start = ParameterSnapshot(trainable)
    errors: dict[float, float] = {}
    for lr in grid:
        scratch = type(result)()
        non_finite = make_training(lr, scratch).run(None, max_steps=steps)
        errors[lr] = math.inf if non_finite is not None else heldout()
        result.notes.extend(note for note in scratch.notes if note not in result.notes)
        start.restore()
    result.choice.lr_probe = {f"{lr:g}": (error if math.isfinite(error) else None) for lr, error in errors.items()}
    finite = [lr for lr in grid if math.isfinite(errors[lr])]
    if not finite:
        result.choice.notes.append("br_lr='auto': every candidate's probe had a non-finite loss or held-out error; "
                                   f"trained at the smallest, {min(grid):g}")
        return min(grid)
    return min(finite, key=lambda lr: (errors[lr], lr))


class _BestEpoch:
    """Held-out error after every epoch: the best epoch's weights (``br_keep_best``) and ``br_patience``."""

    def __init__(self, heldout: HeldoutError, trainable: Sequence[torch.nn.Parameter], settings: Any, epochs: int,
                 choice: WindowChoice):
        self.heldout, self.trainable, self.epochs, self.choice = heldout, list(trainable), epochs, choice
        self.keep_best, self.patience = settings.br_keep_best, settings.br_patience
        self.best_error, self.best_epoch = choice.heldout_before, 0
        self.snapshot: Optional[ParameterSnapshot] = None

    def after_epoch(self, epoch: int) -> bool:
        """Measure epoch ``epoch`` (1-based); True to stop training."""
        error = self.heldout()
        self.choice.heldout_by_epoch.append(error)
        if error < self.best_error:
            self.best_error, self.best_epoch = error, epoch
            if self.keep_best and epoch < self.epochs:  # after the last epoch the weights are the current ones
                if self.snapshot is None:
                    self.snapshot = ParameterSnapshot(self.trainable)
                else:
                    self.snapshot.take()
        stop = self.patience is not None and epoch - self.best_epoch >= self.patience and epoch < self.epochs
        self.choice.stopped_early = stop
        return stop

    def finish(self, last_epoch: int) -> None:
        """Put back the best epoch's weights (or flag the revert) when ``br_keep_best``."""
        self.choice.best_epoch = self.best_epoch
        if not self.keep_best:
            return
        self.choice.kept_epoch = self.best_epoch
        if self.best_epoch == 0:
            self.choice.reverted_because_worse = True
        elif self.best_epoch != last_epoch:
            self.snapshot.restore()

"""What block-wise reconstruction needs to know to train a window: thirteen of the PruningConfig's fields (and the
learning rates ``br_lr="auto"`` chooses from), and the autocast dtype they resolve to on a device."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from .selection import AUTO_LR_GRID

if TYPE_CHECKING:
    from ..config import PruningConfig

__all__ = ["BlockTrainingSettings", "resolve_autocast_dtype"]


@dataclass(frozen=True)
class BlockTrainingSettings:
    """How :func:`~hf_recon_prune.reconstruction.reconstruct_window` trains a window.

    The fields are the :class:`~hf_recon_prune.PruningConfig` fields of the same names, which hold the defaults and
    validate them (except ``br_lr_grid``, which has its own default): make one with :meth:`from_config`
    (``dataclasses.replace`` for variations).

    Attributes:
        reconstruction_mode: what is trained.

            * ``"full"``: the kept weights of every pruned linear. (``PruningConfig(reconstruction_mode="auto")``
              reaches here resolved to ``"full"`` or ``"lora"`` by ``memory.choose_reconstruction_mode``.)
            * ``"lora"``: masked LoRA adapters (rank ``lora_rank``, scaling ``lora_alpha / lora_rank``, effective
              weight ``M * (W + s B A)``, see ``masked_lora.py``) on the pruned linears whose name inside their block
              matches one of ``lora_target_modules`` (``re.search``; None = all pruned linears); after training they
              are merged with the masked merge and every peft module is removed. The pruned linears' own weights are
              frozen (those not targeted by a pattern stay exactly as they are).

            Any other value makes ``reconstruct_window`` raise ``ValueError``.
        br_train_other_params: in either mode, also train every other parameter of the blocks directly (norm weights,
            biases, linears that were not pruned). What the paper (Shin et al., 2024) does here could not be checked
            while writing this (no copy of the paper was at hand): its BR updates the weights of each block by
            gradient descent on the block reconstruction error; whether norms/biases are trained along, and how a
            LoRA variant treats them, is not asserted here. Both modes therefore leave the choice to this setting.
        br_epochs: passes over the window's ``N`` calibration rows.
        br_batch_size: rows per optimizer step; an epoch is ``ceil(N / br_batch_size)`` steps (a mini-batch larger
            than ``N`` is ``N`` rows).
        br_lr: the learning rate of Adam (fused on CUDA), decayed linearly to 0 over all steps; or ``"auto"``: each
            window chooses it from ``br_lr_grid`` by held-out error (see ``selection.py``: every candidate is trained
            for the first steps of its run from the same weights, batch order and schedule, the one with the lowest
            held-out error is trained in full; the probe costs at most half the window's planned training, so a
            window takes at most 1.5x as long as at a fixed rate). Without held-out rows, or when the training is too
            short to probe within that budget, ``"auto"`` trains at ``selection.FALLBACK_LR`` (1e-3) and the window's
            report says so.
        br_keep_best: measure the held-out error before BR and after every epoch, and end with the weights of the
            epoch with the lowest one; when no epoch beats the weights before BR, the window is reverted to them,
            bit for bit. False: the weights after the last epoch. Needs held-out rows (without them: the last epoch).
        br_patience: stop training a window after this many epochs in a row without a new lowest held-out error
            (the weights before BR count as epoch 0); None: train every epoch. Needs held-out rows.
        br_lr_grid: the learning rates ``br_lr="auto"`` chooses from (default
            :data:`~hf_recon_prune.reconstruction.selection.AUTO_LR_GRID`: 2e-4, 5e-4, 1e-3, 2e-3). Not a
            PruningConfig field: vary it with ``dataclasses.replace(settings, br_lr_grid=...)``.
        seed: seeds the ``torch.Generator`` that shuffles the order of the mini-batches every epoch, and the
            initialisation of the LoRA adapters; the global RNG is not touched.
        lora_rank, lora_alpha, lora_target_modules: the LoRA adapters of ``reconstruction_mode="lora"`` (unused by
            ``"full"``); the patterns are held as a tuple.
        autocast_dtype: the autocast of the forward/backward (see
            :func:`~hf_recon_prune.reconstruction.resolve_autocast_dtype`); float16 uses a gradient scaler. The
            master weights are float32 either way.
        compile_blocks: how the window's loss runs (``execution.py``): True compiles it with ``torch.compile``,
            False runs it eagerly, ``"auto"`` (on CUDA only) compiles windows of at least
            ``execution.COMPILE_MIN_PARAMETERS`` parameters and replays smaller ones from CUDA graphs. The compiled
            loss is made once per process and reused by every later window of the same block class; a compilation
            that fails is reported in the result's notes and training carries on eagerly (as do the later windows of
            the process); a capture that fails leaves that window eager, with a note.
    """

    reconstruction_mode: str
    br_train_other_params: bool
    br_epochs: int
    br_batch_size: int
    br_lr: Union[float, str]
    seed: int
    lora_rank: int
    lora_alpha: float
    lora_target_modules: Optional[Sequence[str]]
    autocast_dtype: str
    compile_blocks: Union[bool, str]
    br_keep_best: bool
    br_patience: Optional[int]
    br_lr_grid: tuple[float, ...] = AUTO_LR_GRID

    def __post_init__(self) -> None:
        if self.lora_target_modules is not None:  # a list would let a "frozen" settings object change
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        object.__setattr__(self, "br_lr_grid", tuple(float(lr) for lr in self.br_lr_grid))
        if not self.br_lr_grid or any(not (0 < lr < float("inf")) for lr in self.br_lr_grid):
            raise ValueError(f"br_lr_grid={self.br_lr_grid!r} is not allowed; allowed: learning rates > 0")

    @classmethod
    def from_config(cls, config: PruningConfig) -> BlockTrainingSettings:
        """The settings a :class:`~hf_recon_prune.PruningConfig` asks for."""
        return cls(**{setting.name: getattr(config, setting.name) for setting in fields(cls)
                      if setting.name != "br_lr_grid"})


_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


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

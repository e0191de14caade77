"""What block-wise reconstruction needs to know to train a window: eleven of the PruningConfig's fields."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Optional, Sequence, Union

if TYPE_CHECKING:
    from ..config import PruningConfig

__all__ = ["BlockTrainingSettings"]


@dataclass(frozen=True)
class BlockTrainingSettings:
    """How :func:`~hf_recon_prune.reconstruction.reconstruct_window` trains a window.

    The fields are the :class:`~hf_recon_prune.PruningConfig` fields of the same names, which hold the defaults and
    validate them: make one with :meth:`from_config` (``dataclasses.replace`` for variations).

    Attributes:
        reconstruction_mode: what is trained.

            * ``"full"``: the kept weights of every pruned linear.
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
        br_lr: the learning rate of Adam (fused on CUDA), decayed linearly to 0 over all steps.
        seed: seeds the ``torch.Generator`` that shuffles the order of the mini-batches every epoch, and the
            initialisation of the LoRA adapters; the global RNG is not touched.
        lora_rank, lora_alpha, lora_target_modules: the LoRA adapters of ``reconstruction_mode="lora"`` (unused by
            ``"full"``); the patterns are held as a tuple.
        autocast_dtype: the autocast of the forward/backward (see
            :func:`~hf_recon_prune.reconstruction.resolve_autocast_dtype`); float16 uses a gradient scaler. The
            master weights are float32 either way.
        compile_blocks: ``torch.compile`` the window's loss: True, False, or ``"auto"`` (on CUDA devices only). The
            compiled loss is made once per process and reused by every later window of the same block class; a
            compilation that fails is reported in the result's notes and training carries on uncompiled (as do the
            later windows of the process).
    """

    reconstruction_mode: str
    br_train_other_params: bool
    br_epochs: int
    br_batch_size: int
    br_lr: float
    seed: int
    lora_rank: int
    lora_alpha: float
    lora_target_modules: Optional[Sequence[str]]
    autocast_dtype: str
    compile_blocks: Union[bool, str]

    def __post_init__(self) -> None:
        if self.lora_target_modules is not None:  # a list would let a "frozen" settings object change
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    @classmethod
    def from_config(cls, config: PruningConfig) -> BlockTrainingSettings:
        """The settings a :class:`~hf_recon_prune.PruningConfig` asks for."""
        return cls(**{setting.name: getattr(config, setting.name) for setting in fields(cls)})

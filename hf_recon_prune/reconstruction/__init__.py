"""Block-wise reconstruction (BR) and cross-block reconstruction (CR) of pruned decoder blocks.

``reconstruction_windows`` says which blocks are trained together; ``reconstruct_window`` trains one window in
place, as ``BlockTrainingSettings`` say (choosing the learning rate, the epoch kept and whether to revert from
held-out rows, ``selection.py``): full fine-tuning of the kept weights or masked LoRA merged back, the two
``TRAINING_STRATEGIES``; ``masked_lora`` holds the peft-based LoRA layer whose effective weight is ``M * (W + s B A)``.
"""

from .block_trainer import LossTransform, TrainResult, reconstruct_window, resolve_autocast_dtype
from .masked_lora import (
    MaskedLoraHandle,
    MaskedLoraLinear,
    attach_masked_lora,
    has_lora_layers,
    merge_masked_lora,
    unload_masked_lora,
)
from .plan import ReconstructionPlan
from .schedule import CR_SCHEDULES, reconstruction_windows
from .selection import AUTO_LR_GRID, WindowChoice
from .settings import BlockTrainingSettings
from .strategies import TRAINING_STRATEGIES, FullWeights, MaskedLora, TrainingStrategy, training_strategy

__all__ = [
    "AUTO_LR_GRID",
    "CR_SCHEDULES",
    "ReconstructionPlan",
    "TRAINING_STRATEGIES",
    "BlockTrainingSettings",
    "FullWeights",
    "LossTransform",
    "MaskedLora",
    "MaskedLoraHandle",
    "MaskedLoraLinear",
    "TrainResult",
    "TrainingStrategy",
    "WindowChoice",
    "attach_masked_lora",
    "has_lora_layers",
    "merge_masked_lora",
    "reconstruct_window",
    "reconstruction_windows",
    "resolve_autocast_dtype",
    "training_strategy",
    "unload_masked_lora",
]

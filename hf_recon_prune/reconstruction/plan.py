"""The reconstruction plan: what the ``reconstruction=[...]`` techniques of a config mean for one run, decided once.

The engine and the memory estimate read the plan instead of decoding the technique letters themselves:

* ``layer_wise`` (LR): SparseGPT's weight update follows every mask;
* ``block_wise`` (BR): each window's kept weights are trained toward a target;
* ``global_targets`` (GP): BR's targets are the dense model's own activations (the dense stream), instead of the
  window's dense copy applied to the sparse stream (which then needs ``dense_copies``);
* ``windows`` (CR makes them two adjacent blocks, see ``schedule.py``);
* ``dense_stream``: the dense model's activations are propagated alongside (GP's targets, or the reported errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schedule import reconstruction_windows


@dataclass(frozen=True)
class ReconstructionPlan:
    layer_wise: bool
    block_wise: bool
    global_targets: bool
    windows: tuple[tuple[int, ...], ...]
    dense_stream: bool

    @classmethod
    def from_config(cls, config: Any, num_blocks: int) -> "ReconstructionPlan":
        techniques = set(config.reconstruction)
        block_wise = "br" in techniques
        cross_block = block_wise and "cr" in techniques
        windows = reconstruction_windows(num_blocks, cross_block=cross_block)
        global_targets = block_wise and "gp" in techniques
        return cls(layer_wise="lr" in techniques, block_wise=block_wise, global_targets=global_targets,
                   windows=tuple(windows), dense_stream=global_targets or bool(config.track_reconstruction_error))

    @property
    def window_blocks(self) -> int:
        """Blocks trained together at most (2 with CR on a model of two or more blocks)."""
        return max((len(window) for window in self.windows), default=1)

    @property
    def dense_copies(self) -> bool:
        """BR without GP: each window's dense blocks are kept to compute its targets."""
        return self.block_wise and not self.global_targets

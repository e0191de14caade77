"""The reconstruction plan: what the ``reconstruction=[...]`` techniques of a config mean for one run, decided once.

The engine and the memory estimate read the plan instead of decoding the technique letters themselves:

* ``layer_wise`` (LR): SparseGPT's weight update follows every mask;
* ``block_wise`` (BR): each window's kept weights are trained toward a target;
* ``global_targets`` (GP): BR's targets are the dense model's own activations (the dense stream), instead of the
  window's dense copy applied to the sparse stream (which then needs ``dense_copies``);
* ``windows`` (CR makes them two adjacent blocks, with single-block windows at both ends under the default
  ``cr_schedule="authors"``, see ``schedule.py``); :meth:`ReconstructionPlan.finalised_after` says which blocks are
  final after each window (those whose last window it is);
* ``dense_stream``: the dense model's activations are propagated alongside (GP's targets, or the reported errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import schedule


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
        windows = schedule.reconstruction_windows(num_blocks, cross_block=cross_block,
                                                  schedule=getattr(config, "cr_schedule", "authors"))
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

    def finalised_after(self, window_number: int) -> tuple[int, ...]:
        """The blocks that are final once window ``window_number`` is trained: those it is the last window of."""
        return schedule.finalised_after(self.windows, window_number)

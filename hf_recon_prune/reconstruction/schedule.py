"""Which decoder blocks are reconstructed together (the BR / CR windows), and when each block is final."""

from __future__ import annotations

from typing import Sequence

from ..config import CR_SCHEDULES  # the schedules PruningConfig.cr_schedule takes, built below

__all__ = ["CR_SCHEDULES", "finalised_after", "reconstruction_windows"]


def reconstruction_windows(num_blocks: int, cross_block: bool, schedule: str = "authors") -> list[tuple[int, ...]]:
    """The windows of block indices that block-wise reconstruction trains, in order.

    Without cross-block reconstruction (CR) every block is its own window: ``[(0,), (1,), ..., (n-1,)]``.

    With CR a window is two adjacent blocks, sliding by one block, and ``schedule`` says what happens at the ends:

    * ``"authors"`` (the schedule of the paper's code, Shin et al. 2024): a single-block window at both ends,
      ``[(0,), (0, 1), (1, 2), ..., (n-2, n-1), (n-1,)]``. Every block is trained twice, block 0 is first fitted to
      its own (dense) output, and the last block is fitted to its own output once more after the pair before it.
    * ``"sliding"``: pairs only, ``[(0, 1), (1, 2), ..., (n-2, n-1)]``. Interior blocks ``1 .. n-2`` are trained
      twice, the first and the last block once.

    A model with a single block has the single window ``[(0,)]`` either way (there is nothing to cross).
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks={num_blocks!r} must be an integer >= 0")
    if schedule not in CR_SCHEDULES:
        raise ValueError(f"cr_schedule={schedule!r} is not allowed; allowed: {', '.join(map(repr, CR_SCHEDULES))}")
    if not cross_block or num_blocks < 2:
        return [(i,) for i in range(num_blocks)]
    pairs = [(i, i + 1) for i in range(num_blocks - 1)]
    if schedule == "sliding":
        return pairs
    return [(0,), *pairs, (num_blocks - 1,)]


def finalised_after(windows: Sequence[tuple[int, ...]], window_number: int) -> tuple[int, ...]:
    """The blocks whose last window is ``windows[window_number]``, in increasing order: they are final (their output
    becomes the next block's input) once that window is trained."""
    last: dict[int, int] = {}
    for number, window in enumerate(windows):
        for index in window:
            last[index] = number
    return tuple(sorted(index for index, number in last.items() if number == window_number))

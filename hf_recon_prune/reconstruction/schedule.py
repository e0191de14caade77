"""Which decoder blocks are reconstructed together (the BR / CR windows)."""

from __future__ import annotations


def reconstruction_windows(num_blocks: int, cross_block: bool) -> list[tuple[int, ...]]:
    """The windows of block indices that block-wise reconstruction trains, in order.

    Without cross-block reconstruction (CR) every block is its own window: ``[(0,), (1,), ..., (n-1,)]``.

    With CR a window is two adjacent blocks and the windows slide by one block:
    ``[(0, 1), (1, 2), ..., (n-2, n-1)]``. Every interior block ``1 .. n-2`` therefore appears in two windows and is
    trained twice: first as the second block of window ``(i-1, i)`` and again as the first block of ``(i, i+1)``;
    the first and the last block are trained once. A model with a single block has the single window ``[(0,)]``.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks={num_blocks!r} must be an integer >= 0")
    if not cross_block or num_blocks < 2:
        return [(i,) for i in range(num_blocks)]
    return [(i, i + 1) for i in range(num_blocks - 1)]

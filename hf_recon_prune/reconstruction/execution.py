"""How BR runs a window's loss on the device: eagerly, through ``torch.compile``, or replayed from CUDA graphs.

``compile_blocks`` decides (:func:`choose_execution`):

* ``True``: compiled; ``False``: eager, everywhere.
* ``"auto"`` (the default), on CUDA: windows of at least :data:`COMPILE_MIN_PARAMETERS` parameters are compiled,
  smaller ones are *graphed*: the forward and backward of one mini-batch are captured once per window in CUDA
  graphs and replayed at every step. A step of a small block is a few hundred short kernels, so the time goes on
  launching them; a replay launches them all at once, and capturing costs a few steps, not a compilation. Windows
  with data-dependent routing (mixture-of-experts routers) or module hooks stay eager. On the CPU ``"auto"`` is
  eager.

A graph replays the same kernels on the same addresses, so it computes what the eager step computes. What it
needs: inputs of the captured shape (a mini-batch of another size, such as an epoch's last, runs eagerly), no host
synchronisation inside the window's forward (a capture that fails leaves the window eager, with a note), and the
parameters updated in place (Adam and the re-masking do). A compilation that fails falls back to eager the same way,
and later windows of the process do not try again.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..block_io import call_window
from .window_state import unique_parameters

logger = logging.getLogger(__name__)

__all__ = ["COMPILE_MIN_PARAMETERS", "EXECUTIONS", "WindowLoss", "choose_execution", "graph_obstacle",
           "window_squared_error"]

#: The ways a window's loss can run.
EXECUTIONS = ("eager", "compiled", "graphed")

#: ``compile_blocks="auto"`` compiles on CUDA when a window's blocks hold at least this many parameters, and graphs
#: smaller windows. Measured on the H200 (docs/benchmarks.md): Llama-2-7B blocks (202 M) train 1.24x faster
#: compiled; SmolLM2-135M blocks (3.5 M) take 12 % longer end to end compiled, the compilation costing more than it
#: saves. Nothing between was measured.
COMPILE_MIN_PARAMETERS = 50_000_000

_COMPILED: dict[str, Callable] = {}  # the compiled loss, made once per process
_COMPILE_FAILED: list[str] = []  # why compiling failed in this process: later windows do not try again


def window_squared_error(blocks, kwargs, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed squared error of the window's output on ``x`` against ``y``, in float32.

    ``x`` and ``y`` come in the streams' dtype and are upcast here, inside what is compiled or captured, so that a
    compiled graph can fuse the casts instead of holding float32 copies of both for the whole step.
    """
    out = call_window(blocks, x.float(), kwargs)
    return (out.float() - y.float()).square().sum()


def graph_obstacle(blocks: Sequence[nn.Module], routed: bool = False) -> Optional[str]:
    """Why the window's forward cannot be captured in a CUDA graph (None: nothing known stands in the way).

    ``routed``: the window has routers (mixture of experts), whose token dispatch has data-dependent shapes. Hooks
    (module hooks, Accelerate's ``_hf_hook``) are Python that a replay would skip."""
    if routed:
        return "its experts' routing has data-dependent shapes"
    for block in blocks:
        for module in block.modules():
            if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks or getattr(module, "_hf_hook", None) is not None):
                return f"a module of it ({type(module).__name__}) has hooks"
    return None


def choose_execution(setting, device: torch.device, blocks: Sequence[nn.Module] = (), routed: bool = False) -> str:
    """``"compiled"``, ``"graphed"`` or ``"eager"``, for ``compile_blocks=setting`` (module docstring)."""
    if setting is not True and setting != "auto":
        return "eager"
    if setting is True:
        return "eager" if _COMPILE_FAILED else "compiled"
    if device.type != "cuda":
        return "eager"
    if sum(p.numel() for p in unique_parameters(blocks)) >= COMPILE_MIN_PARAMETERS:
        return "eager" if _COMPILE_FAILED else "compiled"
    return "eager" if graph_obstacle(blocks, routed) else "graphed"


def is_compile_error(error: BaseException) -> bool:
    """An error of torch.compile itself (dynamo, inductor, a missing compiler), not of the computation."""
    dynamo_error = getattr(getattr(getattr(torch, "_dynamo", None), "exc", None), "TorchDynamoException", None)
    return dynamo_error is not None and isinstance(error, dynamo_error)


def _compiled_window_squared_error() -> Callable:
    """``torch.compile(window_squared_error)``, made once per process: dynamo treats the blocks' parameters as
    inputs, so every later window of the same block class reuses the first window's compiled code instead of
    compiling again (a window of two blocks, or a new batch shape, compiles once more)."""
    if "squared_error" not in _COMPILED:
        _COMPILED["squared_error"] = torch.compile(window_squared_error)
    return _COMPILED["squared_error"]


class _Window(nn.Module):
    """The window's loss as a module, which is what ``torch.cuda.make_graphed_callables`` captures: its parameters
    are the blocks' (shared, not copied)."""

    def __init__(self, blocks: Sequence[nn.Module], kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.kwargs = kwargs
        self.training = False  # the blocks train in eval mode; not .eval(), which would recurse into them

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return window_squared_error(list(self.blocks), self.kwargs, x, y)


class WindowLoss:
    """``(x, y) -> summed squared error`` of the window, run as :attr:`execution` says (module docstring).

    :meth:`evaluate` is the same under no_grad for the held-out rows: it replays the forward graph when there is one
    of the same shape, and never uses the compiled loss (whose guards would recompile it for no_grad)."""

    def __init__(self, blocks: Sequence[nn.Module], kwargs, execution: str, amp_dtype: Optional[torch.dtype] = None):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution={execution!r} is not allowed; allowed: {', '.join(EXECUTIONS)}")
        self.blocks, self.kwargs, self.execution, self.amp_dtype = list(blocks), kwargs, execution, amp_dtype
        self.notes: list[str] = []  # why the window fell back to eager
        self._graphed: Optional[Callable] = None
        self._graphed_shape: Optional[tuple] = None
        self._module: Optional[_Window] = None

    @property
    def compiled(self) -> bool:
        return self.execution == "compiled"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.execution == "graphed":
            graphed = self._graph_for(x, y)
            if graphed is not None:
                return graphed(x, y)
        if self.execution == "compiled":
            return _compiled_window_squared_error()(self.blocks, self.kwargs, x, y)
        return window_squared_error(self.blocks, self.kwargs, x, y)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._graphed is not None and self._fits(x, y):
            return self._graphed(x, y)
        return window_squared_error(self.blocks, self.kwargs, x, y)

    def _fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return (x.shape, x.dtype, y.shape, y.dtype, x.device) == self._graphed_shape

    def _graph_for(self, x: torch.Tensor, y: torch.Tensor) -> Optional[Callable]:
        """The graphed loss for ``x, y``'s shape; the first call with grad enabled captures it."""
        if self._graphed is not None:
            return self._graphed if self._fits(x, y) else None
        if not torch.is_grad_enabled():
            return None
        try:
            self._module = _Window(self.blocks, self.kwargs)
            with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                                cache_enabled=False), _accumulators_of_the_capture_stream(), _no_garbage_collection():
                # (autocast's weight cache cannot be captured)
                self._graphed = torch.cuda.make_graphed_callables(self._module, (x.clone(), y.clone()))
        except Exception as error:  # noqa: BLE001 - any failure to capture leaves the window eager
            self.fall_back_to_eager("capturing the window in CUDA graphs", error)
            return None
        self._graphed_shape = (x.shape, x.dtype, y.shape, y.dtype, x.device)
        return self._graphed

    def backward_context(self):
        """Where the window's backward runs. A graphed backward hands its gradients to accumulators made on
        another stream (the capture's, or its warm-up's, which torch keeps alive), and torch warns once of the
        mismatch (it costs a wait on an event, no copy): silenced for these calls, and the capture, only."""
        return _accumulators_of_the_capture_stream() if self._graphed is not None else contextlib.nullcontext()

    def fall_back_to_eager(self, what: str, error: BaseException) -> None:
        """Carry on eagerly after ``what`` failed with ``error``, and say so in :attr:`notes`."""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        note = (f"{what} failed ({type(error).__name__}: {reason[:300]}); block-wise reconstruction carries on "
                "eagerly, with the same result up to float rounding (compile_blocks=False skips the attempt)")
        logger.warning(note)
        self.notes.append(note)
        if self.execution == "compiled":
            _COMPILE_FAILED.append(note)
        self.release()
        self.execution = "eager"

    def stop_graphing(self) -> None:
        """Run eagerly from now on and free the graphs (after running out of memory: micro-batches follow)."""
        self.release()
        if self.execution == "graphed":
            self.execution = "eager"

    def release(self) -> None:
        """Free the graphs and their memory (after the window's training)."""
        self._graphed = self._graphed_shape = self._module = None


@contextlib.contextmanager
def _no_garbage_collection():
    """No cyclic garbage collection during a capture. ``make_graphed_callables`` keeps its graphs in reference cycles
    (an autograd Function class made per capture), so a released window's graphs are destroyed by whichever
    collection comes next, and destroying a graph while another is being captured is a CUDA error that fails the
    capture (CUDA warns "operation not permitted when stream is capturing (function reset)"): before this, one
    window in 30 of SmolLM2's shape fell back to eager that way on the H200, in each of three runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _accumulators_of_the_capture_stream():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
        yield

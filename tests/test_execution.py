"""How BR runs a window's loss (``reconstruction/execution.py``), on the CPU.

A CUDA graph needs a GPU (``tests/test_cuda.py`` checks graphed BR against eager BR there). Here the logic around
it runs with a stand-in for ``torch.cuda.make_graphed_callables`` that records what it was asked to capture and
returns the module itself, so the graphed path computes the eager loss: when a capture happens, which shapes replay
it, what runs eagerly, and how a failed capture falls back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_recon_prune.reconstruction import execution


def _window(seed: int = 0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 6)], [{}, {}]


def _reference(blocks, x, y) -> torch.Tensor:
    """The summed squared error in float64, on copies of the blocks."""
    out = x.double()
    with torch.no_grad():
        for block in blocks:
            out = copy.deepcopy(block).double()(out)
    return (out - y.double()).square().sum()


class _FakeCapture:
    """Stands in for make_graphed_callables: records each capture (grad mode, autocast cache, sample shapes) and
    returns the module, whose forward is then the 'replay'."""

    def __init__(self, fail: bool = False):
        self.captures: list[dict] = []
        self.fail = fail

    def __call__(self, module, sample_args):
        self.captures.append({"grad": torch.is_grad_enabled(), "autocast_cache": torch.is_autocast_cache_enabled(),
                              "shapes": [tuple(a.shape) for a in sample_args],
                              "pointers": [a.data_ptr() for a in sample_args]})
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing (simulated)")
        return module


def test_the_first_training_call_captures_and_calls_of_that_shape_replay(monkeypatch):
    capture = _FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    blocks, kwargs = _window()
    loss = execution.WindowLoss(blocks, kwargs, "graphed", amp_dtype=None)
    x, y = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    with torch.no_grad():  # the held-out error before training: no graph yet, eager
        assert torch.allclose(loss.evaluate(x, y).double(), _reference(blocks, x, y), rtol=1e-5)
    assert capture.captures == []
    with torch.no_grad():  # a no-grad call never captures (a graph needs the backward recorded)
        loss(x, y)
    assert capture.captures == []
    value = loss(x, y)
    assert len(capture.captures) == 1
    assert capture.captures[0]["grad"] and not capture.captures[0]["autocast_cache"]
    assert capture.captures[0]["shapes"] == [(4, 3, 6), (4, 3, 6)]
    # the graph's static inputs are copies: a replay copies each batch into them, never into the caller's tensors
    assert not {x.data_ptr(), y.data_ptr()} & set(capture.captures[0]["pointers"])
    assert torch.allclose(value.double(), _reference(blocks, x, y), rtol=1e-5)
    value.backward()  # through the 'replayed' module: the blocks get gradients
    assert all(p.grad is not None for block in blocks for p in block.parameters())
    loss(torch.randn(4, 3, 6), torch.randn(4, 3, 6))  # the same shape: no second capture
    smaller = torch.randn(1, 3, 6), torch.randn(1, 3, 6)  # an epoch's last mini-batch: eager, no capture
    assert torch.allclose(loss(*smaller).double(), _reference(blocks, *smaller), rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(loss.evaluate(*smaller).double(), _reference(blocks, *smaller), rtol=1e-5)
    assert len(capture.captures) == 1 and loss.execution == "graphed" and not loss.notes


def test_a_capture_that_fails_leaves_the_window_eager_with_a_note(monkeypatch, caplog):
    capture = _FakeCapture(fail=True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    blocks, kwargs = _window(1)
    loss = execution.WindowLoss(blocks, kwargs, "graphed")
    x, y = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    assert torch.allclose(loss(x, y).double(), _reference(blocks, x, y), rtol=1e-5)
    loss(x, y)
    assert len(capture.captures) == 1  # tried once
    assert loss.execution == "eager" and len(loss.notes) == 1
    assert "capturing the window in CUDA graphs failed (RuntimeError: operation not permitted" in loss.notes[0]
    assert "capturing the window in CUDA graphs failed" in caplog.text
    assert not execution._COMPILE_FAILED  # a failed capture does not stop later windows from compiling


def test_a_real_capture_on_the_cpu_fails_and_falls_back():
    """Without the stand-in: on a machine without CUDA the capture itself raises, and the window goes on eagerly."""
    blocks, kwargs = _window(2)
    loss = execution.WindowLoss(blocks, kwargs, "graphed")
    x, y = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the capture would succeed (tests/test_cuda.py covers it)")
    assert torch.allclose(loss(x, y).double(), _reference(blocks, x, y), rtol=1e-5)
    assert loss.execution == "eager" and loss.notes


def test_out_of_memory_stops_graphing_and_release_frees_the_graph(monkeypatch):
    capture = _FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    blocks, kwargs = _window(3)
    loss = execution.WindowLoss(blocks, kwargs, "graphed")
    x, y = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    loss(x, y)
    loss.stop_graphing()  # what the trainer does after running out of memory: micro-batches follow, eagerly
    assert loss.execution == "eager" and loss._graphed is None
    loss(x, y)
    assert len(capture.captures) == 1
    compiled = execution.WindowLoss(blocks, kwargs, "compiled")
    compiled.stop_graphing()  # only a graphed window changes
    assert compiled.execution == "compiled"


def test_the_backward_context_silences_only_the_accumulator_stream_warning(monkeypatch):
    import warnings

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _FakeCapture())
    blocks, kwargs = _window(4)
    loss = execution.WindowLoss(blocks, kwargs, "graphed")
    message = "The AccumulateGrad node's stream does not match the stream of the node that produced the gradient"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loss.backward_context():  # no graph yet: nothing silenced
            warnings.warn(message, UserWarning)
        loss(torch.randn(2, 3, 6), torch.randn(2, 3, 6))
        with loss.backward_context():
            warnings.warn(message, UserWarning)
            warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in caught] == [message, "another warning"]

"""Where a measurement runs (``evaluation.evaluation_device``): a GPU when the model fits there, else the CPU.

The moves themselves need a GPU (``tests/test_cuda.py``); here the choice is checked with the CUDA queries stubbed.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from hf_recon_prune.evaluation import (
    EVALUATION_MEMORY_FRACTION,
    evaluation_device,
    evaluation_working_bytes,
    placed_for_evaluation,
)

GIB = 1 << 30


def _weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.fixture
def one_gpu(monkeypatch):
    """CUDA queries answering as a machine with one GPU (index 0) would."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_without_a_gpu_auto_means_the_cpu_and_a_gpu_cannot_be_asked_for():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = make_tiny_model()
    assert evaluation_device(model, "auto") == (torch.device("cpu"), "no GPU")
    assert evaluation_device(model, "cpu")[0] == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda:0': this machine has no CUDA device"):
        evaluation_device(model, "cuda:0")
    with pytest.raises(ValueError, match="device='tpu' is not allowed here; allowed: 'auto', 'cpu' or a CUDA"):
        evaluation_device(model, "tpu")
    with placed_for_evaluation(model) as (device, _):  # nothing moves
        assert device == torch.device("cpu")


def test_the_model_goes_to_the_gpu_when_weights_and_one_batch_fit(one_gpu):
    model = make_tiny_model()
    weights = _weights_bytes(model)
    working = 1000
    enough = int((weights + working) / EVALUATION_MEMORY_FRACTION) + 1
    assert evaluation_device(model, "auto", working_bytes=working, free_bytes=enough) == (
        torch.device("cuda", 0), "the model fits on cuda:0")
    assert evaluation_device(model, "cuda:1", working_bytes=working, free_bytes=enough)[0] == torch.device("cuda", 1)
    device, why = evaluation_device(model, "auto", working_bytes=working, free_bytes=enough - 2)
    assert device == torch.device("cpu") and "free: it runs on the CPU" in why
    with pytest.raises(ValueError, match=r"device='cuda': the model and one batch need .* GiB and cuda:0 has"):
        evaluation_device(model, "cuda", working_bytes=working, free_bytes=enough - 2)


def test_a_model_not_in_cpu_memory_runs_where_it_is(one_gpu):
    model = make_tiny_model()
    model.model.layers[1].to("meta")  # offloaded, as Accelerate leaves a dispatched layer
    assert evaluation_device(model, "auto", free_bytes=100 * GIB) == (
        torch.device("cpu"), "the model runs where it was loaded")
    assert "not in CPU memory" in evaluation_device(model, "cpu")[1]
    dispatched = make_tiny_model()
    dispatched.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk"}
    assert evaluation_device(dispatched, "auto", free_bytes=100 * GIB)[1] == "the model runs where it was loaded"


def test_one_batch_needs_the_logits_three_times_and_some_hidden_states():
    model = make_tiny_model()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert evaluation_working_bytes(model, 4, 32) == 3 * 4 * 128 * vocab + 16 * 4 * 128 * hidden


def test_the_cli_names_the_flag_of_a_device_it_cannot_use(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from hf_recon_prune import cli

    code = cli.main(["eval", "--eval-device", "cuda:0", "--eval-seq-len", "32", "--eval-windows", "1"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "--eval-device cuda:0: device='cuda:0': this machine has no CUDA device; use 'auto' or 'cpu'" in err

"""reconstruction_mode="auto": the memory estimate picks full mode when a window fits the budget, masked LoRA when
only that fits, and the run then trains exactly as if that mode had been asked for."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_model
from hf_recon_prune.memory import MARGIN, MemoryEstimate, choose_reconstruction_mode
from test_engine_reconstruction import _run
from test_pruner import _calibration, _config

CR = dict(reconstruction=["lr", "br", "gp", "cr"], br_epochs=2)


def _estimates(full_peak: int, lora_peak: int):
    def estimate_for(mode: str) -> MemoryEstimate:
        peak = {"full": full_peak, "lora": lora_peak}[mode]
        return MemoryEstimate(device="cpu", window_blocks=2, block_weights=0, window_weights=0, dense_copies=0,
                              reconstruction=0, statistics=0, activations=0, streams=0, stream_location="cpu",
                              resident=0, budget=None, window_peak=peak)
    return estimate_for


@pytest.mark.parametrize("budget, expected", [(1000, "full"), (int(900 / MARGIN) - 1, "lora"), (None, "full")])
def test_auto_picks_full_mode_when_its_window_fits_the_planned_budget_else_lora(budget, expected):
    config = _config(**CR, reconstruction_mode="auto", max_device_memory=budget)
    mode, why = choose_reconstruction_mode(config, torch.device("cpu"), _estimates(full_peak=900, lora_peak=300))
    assert mode == expected and why.startswith("reconstruction_mode='auto'")
    if expected == "lora":
        assert "beyond" in why and "masked LoRA (rank 8)" in why


@pytest.mark.parametrize("asked", ["full", "lora"])
def test_an_explicit_mode_is_kept_whatever_the_budget(asked):
    config = _config(**CR, reconstruction_mode=asked, max_device_memory=10)
    assert choose_reconstruction_mode(config, torch.device("cpu"), _estimates(900, 300)) == (asked, "")


def test_auto_trains_as_the_mode_it_picked_and_the_report_and_card_say_which():
    from hf_recon_prune.hub.card import _reconstruction_mode

    base = make_tiny_model("llama", num_layers=3)
    calibration = _calibration(num=16)
    runs = {mode: _run(copy.deepcopy(base), calibration, **CR, reconstruction_mode=mode) for mode in ("full", "lora")}
    peaks = {mode: report.memory["estimate"]["window_peak"] for mode, (_, report) in runs.items()}
    assert peaks["lora"] < peaks["full"]
    between = int((peaks["lora"] + peaks["full"]) / 2 / MARGIN)
    for budget, expected in ((10 * peaks["full"], "full"), (between, "lora")):
        model = copy.deepcopy(base)
        pruner, report = _run(model, calibration, **CR, reconstruction_mode="auto", max_device_memory=budget)
        assert report.reconstruction_mode == expected
        assert report.memory["estimate"]["reconstruction_mode_why"].startswith("reconstruction_mode='auto'")
        reference = runs[expected][0].model.state_dict()
        for name, value in model.state_dict().items():
            assert torch.equal(value, reference[name]), name
        label = _reconstruction_mode(pruner.config, report)
        assert label.startswith(f"`{expected}` mode (chosen by `reconstruction_mode=\"auto\"`")
    assert runs["full"][1].reconstruction_mode == "full" and runs["lora"][1].reconstruction_mode == "lora"

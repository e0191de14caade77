"""The block engine on tiny models of every supported family."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import FAMILIES, VOCAB, fail_pruning_after, make_tiny_model, random_ids
from hf_recon_prune import PruningConfig
from hf_recon_prune.architectures import UnsupportedModelError, prunable_linears, resolve_layout
from hf_recon_prune.calibration import CalibrationSet
from hf_recon_prune.evaluation import perplexity, perplexity_of_ids
from hf_recon_prune.pruner import Pruner, PruningFailedError


def _config(**overrides) -> PruningConfig:
    base = dict(method="sparsegpt", sparsity=0.5, reconstruction=["lr"], num_samples=8, seq_len=16,
                sparsegpt_block_size=16, forward_batch_size=4, device="cpu")
    base.update(overrides)
    return PruningConfig(**base)


def _calibration(num: int = 8, seq_len: int = 16, heldout: int = 4, num_self: int = 0, seed: int = 1) -> CalibrationSet:
    ids = random_ids(num + num_self, seq_len, seed=seed)
    flags = torch.zeros(num + num_self, dtype=torch.bool)
    flags[num:] = True
    return CalibrationSet(
        input_ids=ids, is_self_generated=flags, heldout_ids=random_ids(heldout, seq_len, seed=seed + 100),
        statistics_mask=~flags, description={"source": "test"},
    )


def _prune(model, config, calibration=None, **kwargs):
    pruner = Pruner(model, config, calibration_data=calibration or _calibration(), show_progress=False, **kwargs)
    return pruner, pruner.prune()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_family_method_and_pattern(family, method, pattern):
    model = make_tiny_model(family)
    dense = copy.deepcopy(model)
    _, report = _prune(model, _config(method=method, pattern=pattern))
    layout = resolve_layout(model)
    pruned_names = set()
    for index, block in enumerate(layout.blocks):
        for name, layer in prunable_linears(block).items():
            pruned_names.add(f"{layout.blocks_path}.{index}.{name}.weight")
            w = layer.weight
            # Rounding rule: floor(0.5 * group size) per group; every group size here is even, so exactly half.
            assert int((w == 0).sum()) == w.numel() // 2, name
            if pattern == "2:4":
                assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
            assert report.blocks[index].layer_sparsity[name] == pytest.approx(0.5)
    dense_state = dense.state_dict()
    for key, value in model.state_dict().items():
        if key not in pruned_names:
            assert torch.equal(value, dense_state[key]), f"{key} changed but is not a pruned weight"
    out = model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_report_error_matches_an_independent_forward():
    """error_after[k] is the MSE between the pruned and the dense model's hidden states after block k."""
    model = make_tiny_model("llama", num_layers=3)
    dense = copy.deepcopy(model)
    calibration = _calibration()
    _, report = _prune(model, _config(method="wanda"), calibration)
    with torch.no_grad():
        h_sparse = model(calibration.input_ids, output_hidden_states=True).hidden_states
        h_dense = dense(calibration.input_ids, output_hidden_states=True).hidden_states
        h_sparse_ho = model(calibration.heldout_ids, output_hidden_states=True).hidden_states
        h_dense_ho = dense(calibration.heldout_ids, output_hidden_states=True).hidden_states
    for k in range(2):  # hidden_states[-1] is after the final norm, so compare blocks 0 and 1
        expected = float(((h_sparse[k + 1].double() - h_dense[k + 1].double()) ** 2).mean())
        assert report.blocks[k].error_after["calibration"] == pytest.approx(expected, rel=1e-4)
        expected_ho = float(((h_sparse_ho[k + 1].double() - h_dense_ho[k + 1].double()) ** 2).mean())
        assert report.blocks[k].error_after["heldout"] == pytest.approx(expected_ho, rel=1e-4)
    assert report.blocks[0].error_after["calibration"] > 0


def test_heldout_and_self_generated_rows_never_reach_mask_statistics():
    base = make_tiny_model("llama")
    masks = []
    for calibration in (_calibration(heldout=0), _calibration(heldout=6, num_self=5)):
        pruner, _ = _prune(copy.deepcopy(base), _config(method="sparsegpt"), calibration)
        masks.append(pruner.masks)
    assert masks[0].keys() == masks[1].keys() and masks[0]
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name


def test_statistics_mask_decides_which_rows_feed_statistics():
    """build_calibration_set marks self-generated rows per self_samples_use; the engine follows the mark, and a
    mark that is not a prefix (rows 8.. only) gives the same masks as a set holding only those rows."""
    base = make_tiny_model("llama")
    calibration = _calibration(num_self=8)
    everything = dataclasses.replace(calibration, statistics_mask=torch.ones(16, dtype=torch.bool))
    self_only = dataclasses.replace(calibration, statistics_mask=calibration.is_self_generated.clone())
    only_self_rows = dataclasses.replace(
        calibration, input_ids=calibration.input_ids[8:], is_self_generated=torch.ones(8, dtype=torch.bool),
        statistics_mask=torch.ones(8, dtype=torch.bool),
    )
    real = _prune(copy.deepcopy(base), _config(method="wanda"), calibration)[0].masks
    every = _prune(copy.deepcopy(base), _config(method="wanda"), everything)[0].masks
    selected = _prune(copy.deepcopy(base), _config(method="wanda"), self_only)[0].masks
    reference = _prune(copy.deepcopy(base), _config(method="wanda"), only_self_rows)[0].masks
    assert any(not torch.equal(real[k], every[k]) for k in real)
    assert all(torch.equal(selected[k], reference[k]) for k in real)


def test_failure_without_backup_says_loudly_which_blocks_changed(monkeypatch):
    model = make_tiny_model("llama", num_layers=3)
    fail_pruning_after(monkeypatch, 7)  # fails in block 1
    with pytest.raises(PruningFailedError, match=r"blocks \[0, 1\].*ALREADY MODIFIED"):
        _prune(model, _config())
    assert model._hf_recon_prune_incomplete is True


def test_failure_with_backup_restores_the_model(monkeypatch):
    model = make_tiny_model("llama", num_layers=3)
    original = copy.deepcopy(model.state_dict())
    fail_pruning_after(monkeypatch, 10, "simulated failure")
    with pytest.raises(RuntimeError, match="simulated failure"):
        _prune(model, _config(), keep_backup=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_include_exclude_patterns_leave_other_layers_untouched():
    model = make_tiny_model("llama")
    dense = copy.deepcopy(model)
    _prune(model, _config(method="magnitude", reconstruction=[], include_modules=[r"mlp\."], exclude_modules=["down_proj"]))
    for (name, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
        pruned = ("gate_proj" in name or "up_proj" in name) and name.endswith("weight")
        assert torch.equal(p, q) != pruned, name


def test_unsupported_model_error_names_the_class():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "toy"})()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match="Toy"):
        resolve_layout(Toy())


def test_perplexity_matches_float64_reference():
    model = make_tiny_model("qwen2")
    windows = random_ids(5, 12, seed=3)
    ours = perplexity_of_ids(model, windows, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            for t in range(len(row) - 1):
                total -= float(log_probs[t, row[t + 1]])
                count += 1
    assert ours == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexity(model, source=windows, batch_size=3) == pytest.approx(ours, rel=1e-6)


def test_perplexity_takes_int32_ids_keeps_a_float64_model_exact_and_checks_its_batch_size():
    model = make_tiny_model("qwen2").double()
    windows = random_ids(3, 12, seed=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            log_probs = torch.log_softmax(model(row[None]).logits[0], dim=-1)  # float64 all the way
            total -= float(log_probs[torch.arange(len(row) - 1), row[1:]].sum())
            count += len(row) - 1
    assert perplexity_of_ids(model, windows.int(), batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-12)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} is not allowed"):
            perplexity_of_ids(model, windows, batch_size=bad)
    with pytest.raises(TypeError, match="integer token ids"):
        perplexity_of_ids(model, windows.float())


def test_bfloat16_model_prunes_with_exact_sparsity():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    _, report = _prune(model, _config(method="sparsegpt"))
    for block in resolve_layout(model).blocks:
        for layer in prunable_linears(block).values():
            assert layer.weight.dtype == torch.bfloat16
            assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2
    assert math.isfinite(report.blocks[-1].error_after["calibration"])

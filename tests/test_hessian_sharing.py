"""Shared input statistics (q/k/v, gate/up) and the engine's one-factor-per-Hessian path, against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_model, random_ids
from hf_recon_prune import Pruner, PruningConfig
from hf_recon_prune.architectures import prunable_linears, resolve_layout
from hf_recon_prune.criteria import HessianFactors, InputStatistics, StatisticsRecorder, inverse_hessian_cholesky
from hf_recon_prune.criteria import sparsegpt as sparsegpt_module
from hf_recon_prune.criteria import statistics as statistics_module


def _record(family: str):
    """Run a tiny model on two batches with a recorder on block 0, capturing every linear's inputs independently."""
    model = make_tiny_model(family)
    block = resolve_layout(model).blocks[0]
    layers = prunable_linears(block)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach().clone()))
               for name, layer in layers.items()]
    recorder = StatisticsRecorder(layers, hessian=True)
    with torch.no_grad():
        for seed in (1, 2):
            model(input_ids=random_ids(3, 12, seed=seed), use_cache=False)
    recorder.remove()
    for handle in handles:
        handle.remove()
    return recorder, seen


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_layers_reading_one_input_share_statistics_equal_to_float64_reference(family):
    recorder, seen = _record(family)
    for name, stats in recorder.stats.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]]).double()
        reference = x.T @ x / x.shape[0]
        torch.testing.assert_close(stats.hessian.double(), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.squared_norms.double(), (x**2).sum(0), rtol=1e-5, atol=1e-6)
        assert stats.num_tokens == x.shape[0]
    groups = {}
    for name, stats in recorder.stats.items():
        groups.setdefault(id(stats), []).append(name)
    shared = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    expected = {
        "llama": [["mlp.gate_proj", "mlp.up_proj"], ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]],
        "opt": [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]],
        "gpt_neox": [],
    }[family]
    assert shared == expected
    assert len(recorder.unique_stats()) == len(groups)


def test_recorder_refuses_sharing_that_changes_between_batches():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    recorder = StatisticsRecorder({"first": first, "second": second}, hessian=False)
    x = torch.randn(3, 4)
    first(x)
    second(x)  # same input object: shares
    assert recorder.stats["second"] is recorder.stats["first"]
    first(x)
    with pytest.raises(RuntimeError, match="second read the same input as first in the first batch"):
        second(x.clone())


def test_take_hessian_hands_over_the_gram_matrix_bitwise():
    stats = InputStatistics(24, torch.device("cpu"), hessian=True)
    stats.add(torch.randn(50, 24))
    stats.add(torch.randn(30, 24))
    expected = stats.hessian
    taken = stats.take_hessian()
    assert torch.equal(taken, expected)
    with pytest.raises(RuntimeError, match="without a Hessian"):
        stats.hessian
    untouched = InputStatistics(5, torch.device("cpu"), hessian=True)
    assert torch.equal(untouched.take_hessian(), torch.zeros(5, 5))  # no tokens: a zero Hessian, as before


def test_squared_norms_are_summed_in_chunks_without_changing_them(monkeypatch):
    x = torch.randn(70, 16, dtype=torch.float64).float()
    monkeypatch.setattr(statistics_module, "_NORM_CHUNK_TOKENS", 8)
    stats = InputStatistics(16, torch.device("cpu"), hessian=False)
    stats.add(x)
    torch.testing.assert_close(stats.squared_norms.double(), (x.double() ** 2).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("singular", [False, True])
def test_in_place_inverse_factor_equals_the_copying_one_and_the_float64_inverse(singular):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 20, generator=g)
    H = x.T @ x / x.shape[0]
    if singular:  # indefinite until the dampening reaches 1 (mean diagonal 2.05): two retries
        H = -torch.eye(20)
        H[0, 0] = 60.0
    copied, damp_copied = inverse_hessian_cholesky(H, 0.01)
    work = H.clone()
    in_place, damp_in_place = inverse_hessian_cholesky(work, 0.01, overwrite=True)
    assert damp_in_place == damp_copied
    assert (damp_copied > 0.01) == singular
    torch.testing.assert_close(in_place, copied, rtol=1e-5, atol=1e-6)
    if not singular:
        assert torch.equal(in_place, copied)
    # U^T U is the inverse of the dampened H, computed in float64 here
    H64 = H.double()
    dampened = H64 + damp_copied * H64.diagonal().mean().clamp_min(1e-8) * torch.eye(20, dtype=torch.float64)
    U = in_place.double()
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(dampened), rtol=2e-3, atol=2e-3)
    assert torch.equal(U, torch.triu(U))


def test_hessian_factors_factor_each_shared_hessian_once_and_free_it(monkeypatch):
    recorder, seen = _record("llama")
    calls = []
    real = sparsegpt_module.factor_hessian
    monkeypatch.setattr(sparsegpt_module, "factor_hessian",
                        lambda hessian, *a, **k: calls.append(hessian.shape) or real(hessian, *a, **k))
    references = {name: stats.hessian for name, stats in recorder.stats.items()}
    factors = HessianFactors(recorder.stats, 0.01)
    for name in recorder.stats:
        factor = factors.for_layer(name)
        expected, _ = inverse_hessian_cholesky(references[name], 0.01)
        assert torch.equal(factor.inverse_cholesky, expected)
    assert len(calls) == 4  # q/k/v, o, gate/up, down
    assert factors._factors == {}  # every factor freed after its last layer


def test_engine_result_is_bitwise_the_same_with_and_without_sharing(monkeypatch):
    ids = random_ids(8, 16)
    results = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(StatisticsRecorder, "_same_input_as_previous", lambda self, x: None)
        model = make_tiny_model("llama")
        config = PruningConfig(method="sparsegpt", sparsity=0.5, reconstruction=["lr"], num_samples=8, seq_len=16,
                               heldout_fraction=0.0)
        Pruner(model, config, calibration_data=ids, show_progress=False).prune()
        results.append(model.state_dict())
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name

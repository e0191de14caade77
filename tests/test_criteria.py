"""Criteria against independent references computed here (brute force, float64, hand-worked cases)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from hf_recon_prune.criteria import (
    InputStatistics,
    PruneRequest,
    StatisticsRecorder,
    magnitude_mask,
    sparsegpt_prune,
    wanda_mask,
)
from hf_recon_prune.methods import prune_linear


def _inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Correlated features with a few large-scale columns, like LLM activations (the case OBS compensation exploits)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    mixing = torch.randn(features // 4, features, generator=g)
    latent = torch.randn(tokens, features // 4, generator=g)
    return (latent @ mixing + 0.3 * torch.randn(tokens, features, generator=g)) * scales


def test_magnitude_hand_made_layer():
    weight = torch.tensor([[1.0, -4.0, 0.5, 3.0], [-0.1, 0.2, -0.3, 0.4], [9.0, 8.0, -7.0, 6.0]])
    keep = magnitude_mask(weight, 0.5, None)
    expected = torch.tensor([[False, True, False, True], [False, False, True, True], [True, True, False, False]])
    assert torch.equal(keep, expected)
    keep_nm = magnitude_mask(torch.tensor([[1.0, -4.0, 0.5, 3.0, 2.0, 0.0, -1.0, 5.0]]), 0.5, (2, 4))
    assert keep_nm.tolist() == [[False, True, False, True, True, False, False, True]]


def test_wanda_matches_brute_force_from_recorded_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(16, 6, bias=False)
    x = _inputs(3 * 10, 16).reshape(3, 10, 16)
    recorder = StatisticsRecorder({"proj": layer}, hessian=False)
    layer(x)
    recorder.remove()
    norms = recorder.stats["proj"].column_norms
    keep = wanda_mask(layer.weight, norms, 0.5, None)

    # Brute force in float64: for every row, score every weight, prune the 8 lowest by an explicit sort.
    w64, x64 = layer.weight.detach().double(), x.reshape(-1, 16).double()
    col_norm = torch.sqrt((x64**2).sum(0))
    for row in range(6):
        scores = [(abs(float(w64[row, j])) * float(col_norm[j]), j) for j in range(16)]
        pruned = {j for _, j in sorted(scores)[:8]}
        assert keep[row].tolist() == [j not in pruned for j in range(16)]


def test_wanda_nm_brute_force():
    torch.manual_seed(1)
    weight = torch.randn(4, 16)
    norms = torch.rand(16) + 0.1
    keep = wanda_mask(weight, norms, 0.5, (2, 4))
    scores = (weight.abs() * norms).double()
    for row, group in itertools.product(range(4), range(4)):
        cols = range(4 * group, 4 * group + 4)
        best = sorted(cols, key=lambda j: float(scores[row, j]), reverse=True)[:2]
        assert [keep[row, j].item() for j in cols] == [j in best for j in cols]


def _output_error(weight, new_weight, x):
    return float(((x @ weight.T - x @ new_weight.T) ** 2).mean())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_and_magnitude_on_layer_error(nm):
    torch.manual_seed(2)
    weight = torch.randn(32, 64)
    x = _inputs(512, 64, seed=3)
    stats = InputStatistics(64, torch.device("cpu"), hessian=True)
    stats.add(x)
    sgpt = sparsegpt_prune(weight, stats.hessian, 0.5, nm, block_size=16, dampening=0.01)
    wanda = weight * wanda_mask(weight, stats.column_norms, 0.5, nm)
    magnitude = weight * magnitude_mask(weight, 0.5, nm)
    e_sgpt, e_wanda, e_mag = (_output_error(weight, w, x) for w in (sgpt.weight, wanda, magnitude))
    assert e_sgpt < e_wanda < e_mag
    assert float((sgpt.weight == 0).float().mean()) == pytest.approx(0.5)


def test_sparsegpt_update_is_least_squares_optimum_when_pruned_columns_come_first():
    """OBS compensates only columns to the right; if every pruned column precedes every kept one, the sequential
    update equals the exact least-squares optimum w_K = H_KK^-1 H_K: w (with the same dampening), solved in float64."""
    torch.manual_seed(4)
    weight = torch.randn(5, 12)
    x = _inputs(200, 12, seed=5)
    hessian = x.T @ x / x.shape[0]
    keep = torch.zeros(5, 12, dtype=torch.bool)
    keep[:, 4:] = True
    result = sparsegpt_prune(weight, hessian, 0.0, None, block_size=3, dampening=0.01, fixed_keep_mask=keep)

    H = hessian.double()
    H = H + 0.01 * torch.diagonal(H).mean() * torch.eye(12, dtype=torch.float64)
    K = slice(4, 12)
    expected = torch.linalg.solve(H[K, K], H[K, :] @ weight.double().T).T
    assert torch.allclose(result.weight[:, :4], torch.zeros(5, 4))
    assert torch.allclose(result.weight[:, K].double(), expected, atol=1e-4, rtol=1e-4)


def test_sparsegpt_lazy_blocks_do_not_change_the_result():
    torch.manual_seed(6)
    weight = torch.randn(8, 32)
    x = _inputs(300, 32, seed=7)
    H = x.T @ x / 300
    keep = magnitude_mask(weight, 0.5, None)
    a = sparsegpt_prune(weight, H, 0.5, None, block_size=32, fixed_keep_mask=keep).weight
    b = sparsegpt_prune(weight, H, 0.5, None, block_size=4, fixed_keep_mask=keep).weight
    assert torch.allclose(a, b, atol=1e-5)


def test_rank_deficient_hessian_gives_no_nan():
    weight = torch.randn(8, 32)
    x = torch.randn(3, 32)  # 3 tokens: rank 3 of 32
    x[:, 5] = 0.0  # a dead input column
    H = x.T @ x / 3
    result = sparsegpt_prune(weight, H, 0.5, (2, 4), block_size=8, dampening=0.0001)
    assert torch.isfinite(result.weight).all()
    zero_hessian = sparsegpt_prune(weight, torch.zeros(32, 32), 0.5, None)
    assert torch.isfinite(zero_hessian.weight).all()


def test_singular_hessian_falls_back_to_more_dampening():
    H = -torch.eye(16)  # not positive definite at any small dampening of its (negative) mean diagonal
    H[0, 0] = 40.0
    result = sparsegpt_prune(torch.randn(4, 16), H, 0.5, None, dampening=0.01)
    assert result.dampening > 0.01 and torch.isfinite(result.weight).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("lr", [False, True])
def test_prune_linear_writes_exact_sparsity(method, lr):
    torch.manual_seed(8)
    layer = nn.Linear(64, 24)
    stats = InputStatistics(64, torch.device("cpu"), hessian=True)
    stats.add(_inputs(128, 64))
    result = prune_linear(layer, method, PruneRequest(0.5, None, stats, lr, block_size=16))
    zeros = (layer.weight == 0)
    assert torch.equal(zeros, ~result.keep_mask)
    assert int(zeros.sum()) == 24 * 32


def test_nm_shape_error_names_layer():
    layer = nn.Linear(30, 4)
    with pytest.raises(ValueError, match="in_features=30 is not a multiple of M=4"):
        prune_linear(layer, "magnitude", PruneRequest(0.5, (2, 4), None, False, name="block 0 mlp.down_proj"))

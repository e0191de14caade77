"""Non-uniform sparsity: OWL's ratios against a hand-worked case and the authors' formula, outlier ratios against a
brute-force count, and per-module overrides."""

from __future__ import annotations

import random

import pytest
import torch

from hf_recon_prune.sparsity_profile import outlier_ratio, owl_sparsities, weight_sparsity


def test_owl_ratios_of_a_hand_worked_case():
    # ratios normalised to [0, 0.5, 0.25, 1], times 2 * lambda = 0.16 -> [0, 0.08, 0.04, 0.16], mean 0.07;
    # densities 0.5 - 0.07 + that = [0.43, 0.51, 0.47, 0.59]; sparsities 1 - density
    assert owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.5, 0.08) == pytest.approx([0.57, 0.49, 0.53, 0.41])


def _authors_formula(ratios, sparsity, lambda_):
    """OWL's published code, in plain Python: min-max normalise, scale by 2 lambda, shift to mean density."""
    low, high = min(ratios), max(ratios)
    scaled = [(r - low) * (1.0 / (high - low) * lambda_ * 2) for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [1.0 - (s - mean + (1.0 - sparsity)) for s in scaled]


@pytest.mark.parametrize("seed", range(5))
def test_owl_ratios_match_the_authors_formula_and_average_to_the_target(seed):
    rng = random.Random(seed)
    ratios = [rng.uniform(0.0, 0.1) for _ in range(rng.randint(2, 40))]
    target, lambda_ = rng.uniform(0.3, 0.7), rng.uniform(0.01, 0.1)
    ours = owl_sparsities(ratios, target, lambda_)
    assert ours == pytest.approx(_authors_formula(ratios, target, lambda_))
    assert sum(ours) / len(ours) == pytest.approx(target)
    assert max(ours) - min(ours) == pytest.approx(2 * lambda_)
    assert ours[ratios.index(max(ratios))] == pytest.approx(min(ours))  # most outliers: least pruned


def test_equal_ratios_give_uniform_sparsity():
    assert owl_sparsities([0.02, 0.02, 0.02], 0.6, 0.08) == [0.6, 0.6, 0.6]


def test_outlier_ratio_counts_scores_above_m_times_the_block_mean():
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, 16, generator=generator) ** 4, torch.rand(4, 32, generator=generator) ** 6]
    values = [float(v) for s in scores for v in s.reshape(-1)]
    mean = sum(values) / len(values)
    expected = sum(v > 3.0 * mean for v in values) / len(values)
    assert outlier_ratio(scores, 3.0) == pytest.approx(expected)


def test_overrides_pick_the_first_matching_pattern():
    overrides = {r"mlp\.down_proj$": 0.3, r"mlp\.": 0.6}
    assert weight_sparsity("mlp.down_proj", 0.5, overrides) == 0.3
    assert weight_sparsity("mlp.up_proj", 0.5, overrides) == 0.6
    assert weight_sparsity("self_attn.q_proj", 0.5, overrides) == 0.5
    assert weight_sparsity("self_attn.q_proj", 0.5, None) == 0.5


def _dense_outlier_ratios(model, ids, threshold):
    """Brute force: the inputs of every linear of the dense model, hooked; Wanda scores over each whole block."""
    from hf_recon_prune.architectures import prunable_linears, resolve_layout

    blocks = resolve_layout(model).blocks
    inputs = {}
    def hook(key):
        def record(_module, args, _output):
            inputs[key] = args[0].detach()

        return record

    handles = [layer.register_forward_hook(hook((i, name)))
               for i, block in enumerate(blocks) for name, layer in prunable_linears(block).items()]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    ratios = []
    for i, block in enumerate(blocks):
        scores = []
        for name, layer in prunable_linears(block).items():
            x = inputs[(i, name)].double().reshape(-1, layer.in_features)
            scores.append(layer.weight.detach().double().abs() * x.square().sum(0).sqrt())
        flat = torch.cat([s.reshape(-1) for s in scores])
        ratios.append(float((flat > threshold * flat.mean()).double().mean()))
    return ratios


def test_owl_through_the_engine_uses_dense_outlier_ratios_and_keeps_the_mean():
    from conftest import make_tiny_model, random_ids
    from hf_recon_prune import PruningConfig
    from hf_recon_prune.evaluation import model_sparsity
    from hf_recon_prune.pruner import Pruner

    model = make_tiny_model("llama", num_layers=4)
    with torch.no_grad():  # give the blocks different outlier shares
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, : 4 * (i + 1)] *= 8.0
    ids = random_ids(8, 16)
    expected = _dense_outlier_ratios(model, ids, 3.0)
    config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=[], num_samples=8, seq_len=16,
                           heldout_fraction=0.0, sparsity_profile="owl", owl_threshold=3.0, owl_lambda=0.1)
    report = Pruner(model, config, calibration_data=ids, show_progress=False).prune()
    assert [b.outlier_ratio for b in report.blocks] == pytest.approx(expected, rel=1e-6)
    targets = [b.target_sparsity for b in report.blocks]
    assert targets == pytest.approx(owl_sparsities(expected, 0.5, 0.1))
    assert sum(targets) / 4 == pytest.approx(0.5)
    for block, target in zip(report.blocks, targets):  # each row prunes floor(target * in_features)
        for name, measured in block.layer_sparsity.items():
            in_features = 128 if name.endswith("down_proj") else 64
            assert measured == pytest.approx(int(target * in_features) / in_features), name
    assert model_sparsity(model)["overall"] == pytest.approx(report.mean_sparsity)


def test_overrides_through_the_engine():
    from conftest import make_tiny_model, random_ids
    from hf_recon_prune import PruningConfig
    from hf_recon_prune.pruner import Pruner

    model = make_tiny_model("llama", num_layers=2)
    config = PruningConfig(method="magnitude", sparsity=0.5, reconstruction=[], num_samples=8, seq_len=16,
                           heldout_fraction=0.0, sparsity_overrides={r"self_attn\.[qk]_proj": 0.25})
    report = Pruner(model, config, calibration_data=random_ids(8, 16), show_progress=False).prune()
    for block in report.blocks:
        for name, measured in block.layer_sparsity.items():
            assert measured == pytest.approx(0.25 if name in ("self_attn.q_proj", "self_attn.k_proj") else 0.5), name

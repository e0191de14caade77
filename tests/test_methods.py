"""The criterion table: a criterion registered from user code works end to end, like the built-in ones."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_model
from hf_recon_prune import PruningConfig, register_criterion
from hf_recon_prune.architectures import prunable_linears, resolve_layout
from hf_recon_prune.criteria import Criterion
from hf_recon_prune.methods import available_criteria, get_criterion, unregister_criterion
from test_pruner import _calibration, _config, _prune

NAME = "signed-weight"


@pytest.fixture
def signed_weight():
    """Registered the way a user would, from outside the package: a class whose only method is ``scores``."""

    @register_criterion(NAME)
    class SignedWeight:
        """keep the largest signed weights"""

        def scores(self, weight, statistics):
            return weight.detach().float()  # not |W|: the most negative weights go first

    yield SignedWeight
    unregister_criterion(NAME)


def _expected_keep(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    """Brute force: per output row (or per group of 4 columns for 2:4), keep the highest-scoring entries."""
    keep = torch.zeros_like(weight, dtype=torch.bool)
    rows, cols = weight.shape
    for r in range(rows):
        if pattern == "2:4":
            for g in range(0, cols, 4):
                order = sorted(range(g, g + 4), key=lambda c: float(weight[r, c].detach()), reverse=True)
                keep[r, order[:2]] = True
        else:
            order = sorted(range(cols), key=lambda c: float(weight[r, c].detach()), reverse=True)
            keep[r, order[: cols - cols // 2]] = True
    return keep


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("reconstruction", [[], ["lr"], ["lr", "br", "gp"]])
def test_a_registered_scores_only_criterion_prunes_end_to_end(signed_weight, pattern, reconstruction):
    model = make_tiny_model("llama")
    dense = copy.deepcopy(model)
    config = _config(method=NAME, pattern=pattern, reconstruction=reconstruction, br_epochs=2, br_lr=1e-3)
    pruner, report = _prune(model, config)

    layout, dense_layout = resolve_layout(model), resolve_layout(dense)
    for index, (block, dense_block) in enumerate(zip(layout.blocks, dense_layout.blocks)):
        dense_layers = prunable_linears(dense_block)
        for name, layer in prunable_linears(block).items():
            # The scores of the weights the block had when its masks were chosen: the dense ones (scores read only
            # the weights, and no window reaches into a later block without CR).
            expected = _expected_keep(dense_layers[name].weight, pattern)
            mask = pruner.masks[f"{layout.blocks_path}.{index}.{name}"]
            assert torch.equal(mask, expected), name
            assert (layer.weight[~mask] == 0).all(), name
            if "br" not in reconstruction and "lr" not in reconstruction:
                assert torch.equal(layer.weight, dense_layers[name].weight * expected), name
    assert report.config["method"] == NAME
    if "br" in reconstruction:
        assert report.blocks[-1].train_losses  # BR trained the windows
    criterion = get_criterion(NAME)
    assert isinstance(criterion, Criterion) and criterion.label == NAME
    assert criterion.description == "keep the largest signed weights"


def test_a_criterion_reading_input_norms_reproduces_wanda():
    """A user criterion with ``statistics = "norms"`` gets the same input norms Wanda's built-in uses."""

    class MyWanda(Criterion):
        statistics = "norms"
        label = "my Wanda"

        def scores(self, weight, statistics):
            return weight.abs() * statistics.column_norms.unsqueeze(0)

    register_criterion("my-wanda", MyWanda)
    try:
        mine, builtin = make_tiny_model("llama"), make_tiny_model("llama")
        mine_pruner, _ = _prune(mine, _config(method="my-wanda", reconstruction=[]))
        builtin_pruner, _ = _prune(builtin, _config(method="wanda", reconstruction=[]))
        for name, mask in mine_pruner.masks.items():
            assert torch.equal(mask, builtin_pruner.masks[name]), name
        assert get_criterion("my-wanda").label == "my Wanda"
    finally:
        unregister_criterion("my-wanda")


def test_the_table_names_every_criterion_and_refuses_what_it_does_not_know(signed_weight):
    assert available_criteria()[:3] == ("magnitude", "wanda", "sparsegpt") and NAME in available_criteria()
    with pytest.raises(ValueError, match=r"PruningConfig.method='nope' is not allowed; allowed: 'magnitude', "
                                         r"'wanda', 'sparsegpt', 'signed-weight'"):
        PruningConfig(method="nope")
    with pytest.raises(ValueError, match="registered already"):
        register_criterion(NAME, signed_weight)
    with pytest.raises(ValueError, match="statistics='gradients' is not allowed"):
        register_criterion("bad", type("Bad", (), {"statistics": "gradients", "scores": lambda s, w, x: w}))
    with pytest.raises(TypeError, match="takes a class"):
        register_criterion("not-a-class", lambda w, s: w)


def test_a_criterion_validates_its_own_settings():
    """SparseGPT's own rule: N:M groups must not straddle its column blocks."""
    with pytest.raises(ValueError, match=r"sparsegpt_block_size=6 is not allowed; allowed: a multiple of M=4"):
        PruningConfig(method="sparsegpt", pattern="2:4", sparsity=0.5, sparsegpt_block_size=6)
    PruningConfig(method="wanda", pattern="2:4", sparsity=0.5, sparsegpt_block_size=6)  # not Wanda's concern


def test_scores_of_the_wrong_shape_are_refused_naming_the_criterion():
    register_criterion("transposed", type("Transposed", (), {"scores": lambda self, w, s: w.T}))
    try:
        with pytest.raises(Exception, match=r"criterion 'transposed' returned scores of shape"):
            _prune(make_tiny_model("llama"), _config(method="transposed", reconstruction=[]),
                   calibration=_calibration())
    finally:
        unregister_criterion("transposed")

"""What the report and the model card say matches what the run did: calibration given as token ids, weights left
dense by an override or by the module filters (also when a pruned model is saved again without its report), the
comparison group of an unstructured mask. Each expected figure is counted in the test from the weights."""

from __future__ import annotations

import os

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, random_ids
from hf_recon_prune import PruningConfig
from hf_recon_prune.evaluation import model_sparsity
from hf_recon_prune.hub import save_already_pruned
from hf_recon_prune.hub.card import build_model_card
from hf_recon_prune.pruner import Pruner


def _prune(config: PruningConfig, ids: torch.Tensor, layers: int = 2):
    model = make_tiny_model("llama", num_layers=layers)
    pruner = Pruner(model, config, calibration_data=ids, show_progress=False)
    return model, pruner, pruner.prune()


def _zeros_and_sizes(model, keep) -> tuple[int, int]:
    """Zeros and sizes summed over the decoder blocks' linear weights whose name ``keep`` accepts."""
    zeros = size = 0
    for block in model.model.layers:
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and keep(name):
                zeros += int((module.weight == 0).sum())
                size += module.weight.numel()
    return zeros, size


def _row(card_text: str, setting: str) -> str:
    return next(line for line in card_text.splitlines() if line.startswith(f"| {setting} |"))


def test_token_ids_are_described_as_given_not_by_the_unused_config_fields():
    ids = random_ids(6, 16)
    config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=[], device="cpu")  # calibration "c4", 256 x 1024
    model, pruner, report = _prune(config, ids)
    assert report.calibration["seq_len"] == 16 and report.calibration["split"] is None
    text = build_model_card(model, config, report, model_name="tiny").text
    assert "6 windows of 16 tokens" in _row(text, "calibration samples")
    data_row = _row(text, "calibration data")
    assert "`calibration_data`" in data_row and "were not used" in data_row
    assert "1024 tokens" not in text and "split `train`" not in text


def test_a_weight_an_override_sets_to_zero_is_reported_as_left_dense():
    config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=[], num_samples=4, seq_len=16,
                           heldout_fraction=0.0, device="cpu", sparsity_overrides={r"mlp\.down_proj": 0.0})
    model, _, report = _prune(config, random_ids(4, 16))
    zeros, size = _zeros_and_sizes(model, lambda name: not name.endswith("down_proj"))
    assert report.mean_sparsity == pytest.approx(zeros / size) == pytest.approx(0.5)  # the other weights
    down = sum(block.mlp.down_proj.weight.numel() for block in model.model.layers)
    assert report.left_dense()["sparsity override 0"] == down
    assert all(b.left_dense["mlp.down_proj.weight"] == "sparsity override 0" for b in report.blocks)
    block_parameters = sum(p.numel() for block in model.model.layers for p in block.parameters())
    assert report.block_sparsity == pytest.approx(zeros / block_parameters)

    text = build_model_card(model, config, report, model_name="tiny").text
    assert "| sparsity override 0 | " in text and "`mlp.down_proj.weight`" in text
    share = f"{100 * down / block_parameters:.2f}%"
    assert f"{share} of the decoder blocks' parameters were left dense (sparsity override 0" in text
    assert "mean kept at the target" not in _row(text, "non-uniform sparsity")
    assert "the mean moves" in _row(text, "non-uniform sparsity")


def test_a_model_saved_again_without_its_report_keeps_what_was_left_dense(tmp_path):
    config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=[], num_samples=4, seq_len=16,
                           heldout_fraction=0.0, device="cpu", exclude_modules=["down_proj"])
    model, pruner, report = _prune(config, random_ids(4, 16))
    folder = pruner.save_pretrained(tmp_path / "first")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)

    measured = model_sparsity(reloaded, PruningConfig.from_pretrained(folder))
    zeros, size = _zeros_and_sizes(reloaded, lambda name: not name.endswith("down_proj"))
    assert (measured["zeros"], measured["total"]) == (zeros, size)
    assert measured["overall"] == pytest.approx(report.mean_sparsity) == pytest.approx(0.5)
    assert measured["left_dense"] == report.left_dense()
    assert model_sparsity(reloaded)["overall"] < 0.5  # without the config, down_proj counts (and is dense)

    again = save_already_pruned(reloaded, tmp_path / "again", base_model="example-org/tiny")
    text = ModelCard.load(os.path.join(again, "README.md")).text
    assert "| measured sparsity of the pruned weights | 50.00% |" in text
    assert "| excluded | " in text and "`mlp.down_proj.weight`" in text
    assert "were left dense (excluded" in text


@pytest.mark.parametrize("method, group", [("wanda", "every output row"),
                                           ("sparsegpt", "every block of 8 input columns, over all its rows")])
def test_the_card_names_where_an_unstructured_mask_prunes_the_same_fraction(method, group):
    config = PruningConfig(method=method, sparsity=0.5, reconstruction=[], sparsegpt_block_size=8, br_epochs=1,
                           device="cpu")
    text = build_model_card(make_tiny_model("llama"), config, None, model_name="tiny").text
    assert f"unstructured (the same fraction pruned in {group}" in _row(text, "sparsity pattern")


def test_perplexity_on_the_first_windows_only_says_so_in_the_card_and_the_comparison():
    from hf_recon_prune.comparison import compare

    config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=[], num_samples=4, seq_len=16,
                           heldout_fraction=0.0, device="cpu")
    model, pruner, report = _prune(config, random_ids(4, 16))
    pruner.record_perplexity("wikitext2", "test", 16, 20.0, 25.0, windows=3)
    pruner.record_perplexity("my_corpus.jsonl", "test", 16, 30.0, 33.0)
    card = build_model_card(model, config, report, model_name="tiny")
    assert "| WikiText-2 (raw) | test | 16 | 3 | 20 | 25 |" in card.text.replace(".000", "").replace(".0 ", " ")
    assert "| my_corpus.jsonl | test | 16 | all |" in card.text
    results = {r.dataset_name: r for r in card.data.eval_results if r.metric_type == "perplexity"}
    assert results["WikiText-2 (raw)"].metric_args == {"seq_len": 16, "windows": 3}
    # a local file's name is no Hub dataset type
    assert (results["my_corpus.jsonl"].dataset_type, results["my_corpus.jsonl"].metric_args) == ("custom", {"seq_len": 16})

    other = _with_wikitext2_windows(report, windows=None)
    table = compare({"first 3 windows": report, "whole split": other})
    headers = [c["header"] for c in table.columns if c["key"].startswith("ppl:wikitext2")]
    assert sorted(headers) == ["ppl wikitext2 (test, 16)", "ppl wikitext2 (test, 16, 3 windows)"]


def test_a_model_named_dense_keeps_its_row_next_to_the_baseline():
    from hf_recon_prune.comparison import compare

    config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=[], num_samples=4, seq_len=16,
                           heldout_fraction=0.0, device="cpu")
    _, pruner, report = _prune(config, random_ids(4, 16))
    pruner.record_perplexity("wikitext2", "test", 16, 20.0, 25.0)
    table = compare({"dense": report}, include_dense=True)
    assert [row["name"] for row in table.rows] == ["dense (baseline)", "dense"]


def _with_wikitext2_windows(report, windows):
    """A copy of ``report`` whose wikitext2 perplexity was measured on the whole split (``windows`` None)."""
    import copy

    other = copy.deepcopy(report)
    entry = dict(other.perplexity["wikitext2"])
    entry.pop("windows", None)
    if windows is not None:
        entry["windows"] = windows
    other.perplexity = {"wikitext2": entry}
    return other


def test_held_out_windows_from_the_calibration_split_say_how_they_are_apart():
    from hf_recon_prune.report import PruneReport

    config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=[], calibration="default", device="cpu")
    report = PruneReport(model_name="tiny", family="llama", config=config.to_dict())
    same = {"num": 2, "source": "default", "split": "train", "disjoint_from_calibration": True}
    report.calibration = {"source": "default", "split": "train", "num_real": 8, "num_self_generated": 0,
                          "seq_len": 16, "heldout": same}
    text = build_model_card(make_tiny_model("llama"), config, report, model_name="tiny").text
    assert "split `train`, at token positions no calibration window covers" in _row(
        text, "held-out samples (error measurement only)")
    report.calibration["heldout"] = {**same, "split": "test"}  # the source's own held-out split: nothing to add
    text = build_model_card(make_tiny_model("llama"), config, report, model_name="tiny").text
    assert _row(text, "held-out samples (error measurement only)").endswith("split `test` |")

"""Every script in examples/ runs as written, at tiny settings: a tiny Llama saved like a Hub checkout, its word-level
tokenizer, word-soup text, 4 calibration windows of 32 tokens. Each example's main(argv) is the script's own entry
point; what it returns and what it saved are checked against the model, not against numbers written here."""

from __future__ import annotations

import json
import math
import os
import runpy

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_recon_prune import PruningConfig
from hf_recon_prune.hub import MARKER_FILE, model_sparsity
from tiny_assets import TOKEN, save_tiny_llama, start_stand_in_hub, write_text

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY = ["--num-samples", "4", "--seq-len", "32"]


def run_example(name: str, *argv: str):
    module = runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"), run_name=f"example_{name}")
    return module["main"](list(argv))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": save_tiny_llama(root / "tiny-llama"), "text": write_text(root / "corpus.txt")}


def test_every_example_is_tested():
    names = {f[:-3] for f in os.listdir(EXAMPLES) if f.endswith(".py")}
    tested = {"quickstart", "sparsegpt_br_gp_llama", "masked_lora_reconstruction", "self_generated_calibration",
              "offload_memory_limit", "evaluate_and_push", "custom_criterion", "reconstruction_demo"}
    assert names == tested


def assert_pruned_folder(folder: str, sparsity: float = 0.5) -> dict:
    """The folder reloads with plain transformers, at the sparsity asked, with its config and card."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    measured = model_sparsity(model)
    # Unstructured masks zero floor(sparsity * in_features) weights per row; 64 and 128 inputs divide exactly.
    assert measured["overall"] == pytest.approx(sparsity, abs=1e-9)
    assert os.path.isfile(os.path.join(folder, "README.md"))
    return measured


def test_quickstart(assets, tmp_path, capsys):
    folder = run_example("quickstart", "--model", assets["model"], "--calibration", assets["text"], *TINY,
                         "--output", str(tmp_path / "out"))
    assert folder == str(tmp_path / "out")
    assert_pruned_folder(folder)
    config = PruningConfig.from_pretrained(folder)
    # The calibration file's absolute path is published as its last component only (hf_recon_prune.sanitise).
    assert (config.method, config.reconstruction, config.calibration) == ("sparsegpt", ["lr"],
                                                                          os.path.basename(assets["text"]))
    assert f"saved to {folder}" in capsys.readouterr().out


def test_sparsegpt_br_gp_llama(assets, tmp_path):
    result = run_example("sparsegpt_br_gp_llama", "--model", assets["model"], "--calibration", assets["text"], *TINY,
                         "--br-epochs", "2", "--br-lr", "1e-3", "--eval-source", assets["text"],
                         "--eval-seq-len", "32", "--eval-windows", "8", "--output", str(tmp_path / "out"))
    report = result["report"]
    assert PruningConfig.from_pretrained(result["folder"]).reconstruction == ["lr", "br", "gp"]
    assert_pruned_folder(result["folder"])
    assert math.isfinite(result["dense"]) and math.isfinite(result["pruned"])
    assert result["pruned"] != result["dense"]
    for block in report.blocks:  # BR ran on every block (2 epochs each) and held its masks
        assert len(block.train_losses) == 1 and len(block.train_losses[0]) == 2
        assert not block.reverted
    # The perplexity measured by the script is the one the card reports.
    card = ModelCard.load(os.path.join(result["folder"], "README.md"))
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["perplexity"] == pytest.approx(result["pruned"], abs=1e-4)
    assert values["perplexity_dense_baseline"] == pytest.approx(result["dense"], abs=1e-4)


def test_sparsegpt_br_gp_llama_two_four_with_cross_block(assets, tmp_path):
    result = run_example("sparsegpt_br_gp_llama", "--model", assets["model"], "--calibration", assets["text"], *TINY,
                         "--pattern", "2:4", "--cross-block", "--br-epochs", "1", "--eval-source", assets["text"],
                         "--eval-seq-len", "32", "--eval-windows", "4", "--output", str(tmp_path / "out"))
    config = PruningConfig.from_pretrained(result["folder"])
    assert (config.pattern, config.reconstruction) == ("2:4", ["lr", "br", "gp", "cr"])
    model = AutoModelForCausalLM.from_pretrained(result["folder"])
    weight = model.model.layers[1].mlp.down_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()  # 2 of every 4 inputs at most


def test_masked_lora_reconstruction(assets, tmp_path):
    result = run_example("masked_lora_reconstruction", "--model", assets["model"], "--calibration", assets["text"],
                         *TINY, "--lora-rank", "4", "--br-epochs", "1", "--output", str(tmp_path / "out"))
    assert result["nonzero_outside_masks"] == 0
    assert 0 < result["lora_weights"] < result["full_weights"]
    assert PruningConfig.from_pretrained(result["folder"]).reconstruction_mode == "lora"
    model = AutoModelForCausalLM.from_pretrained(result["folder"])
    assert not [name for name, _ in model.named_parameters() if "lora" in name]
    assert_pruned_folder(result["folder"], sparsity=0.5)
    losses = [block.train_losses[0] for block in result["report"].blocks]
    assert all(len(epochs) == 1 and math.isfinite(epochs[0]) for epochs in losses)


def test_self_generated_calibration(assets, tmp_path):
    result = run_example("self_generated_calibration", "--model", assets["model"], "--calibration", assets["text"],
                         *TINY, "--num-self-samples", "4", "--br-epochs", "1", "--language", "none",
                         "--eval-source", assets["text"], "--eval-seq-len", "32", "--eval-windows", "4",
                         "--output", str(tmp_path / "out"))
    samples = result["samples"]
    assert tuple(samples.input_ids.shape) == (4, 32)
    with open(result["jsonl"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert [row["input_ids"] for row in rows] == samples.input_ids.tolist()

    real, mixed = result["results"]["real only"], result["results"]["real + self-generated"]
    assert real["report"].calibration["num_self_generated"] == 0
    mixed_calibration = mixed["report"].calibration
    assert mixed_calibration["num_self_generated"] == 4
    assert mixed_calibration["self_generation"]["from_cache"] is True  # step 1 generated them; pruning re-read them
    # Both runs measure their held-out error on the same windows, which no calibration row overlaps.
    assert real["report"].calibration["heldout"] == mixed_calibration["heldout"]
    for run in (real, mixed):
        assert math.isfinite(run["heldout_error"]) and math.isfinite(run["perplexity"])


def test_offload_memory_limit(assets, tmp_path):
    # 200KB of CPU memory holds the embeddings and about one block: the rest goes to disk.
    result = run_example("offload_memory_limit", "--model", assets["model"], "--max-cpu-memory", "200KB",
                         "--offload-folder", str(tmp_path / "offload"), "--calibration", assets["text"], *TINY,
                         "--output", str(tmp_path / "out"))
    assert "disk" in set(map(str, result["device_map"].values()))
    assert_pruned_folder(result["folder"])


def test_evaluate_and_push(assets, tmp_path, monkeypatch):
    # A pruned folder with its report, as `hf-recon-prune prune` or the quickstart leaves it.
    pruned = run_example("quickstart", "--model", assets["model"], "--calibration", assets["text"], *TINY,
                         "--output", str(tmp_path / "pruned"))
    hub = start_stand_in_hub(monkeypatch, tmp_path)
    hub_url = hub.url
    try:
        result = run_example("evaluate_and_push", "--model", pruned, "--dense-model", assets["model"],
                             "--base-model", "example-org/tiny-llama", "--eval-source", assets["text"],
                             "--eval-seq-len", "32", "--eval-windows", "8", "--output", str(tmp_path / "carded"),
                             "--repo-id", "tester/tiny-sparse")
    finally:
        hub.stop()
    assert not hub.errors, hub.errors
    assert result["url"].startswith(f"{hub_url}/tester/tiny-sparse/commit/")
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-9)

    files = hub.repos["tester/tiny-sparse"].files
    local = {name: open(os.path.join(result["folder"], name), "rb").read() for name in os.listdir(result["folder"])
             if name != MARKER_FILE}  # the package's own marker is never uploaded
    assert files == local
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "example-org/tiny-llama"
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["perplexity"] == pytest.approx(result["pruned"], abs=1e-4)
    assert values["perplexity_dense_baseline"] == pytest.approx(result["dense"], abs=1e-4)
    assert json.loads(files["config.json"])["pruning_config"]["method"] == "sparsegpt"
    # The dense baseline is really the dense model's: pruning half the weights changed the perplexity.
    assert result["pruned"] != result["dense"]
    assert hub.token_leaks(TOKEN) == []


def test_custom_criterion(assets, tmp_path):
    from hf_recon_prune.methods import unregister_criterion

    try:
        result = run_example("custom_criterion", "--model", assets["model"], "--calibration", assets["text"], *TINY,
                             "--output", str(tmp_path / "out"))
        model = AutoModelForCausalLM.from_pretrained(result["folder"])
        weight = model.model.layers[0].mlp.down_proj.weight
        assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()  # 2:4 held after LR
        assert PruningConfig.from_pretrained(result["folder"]).method == "row-relative-magnitude"
        card = open(os.path.join(result["folder"], "README.md"), encoding="utf-8").read()
        assert "row-relative magnitude (|W| divided by the mean |W| of its output row)" in card
    finally:
        unregister_criterion("row-relative-magnitude")


def test_reconstruction_demo_compares_lr_with_lr_br_gp_on_two_held_out_sources(assets, tmp_path, capsys):
    result = run_example("reconstruction_demo", "--model", assets["model"], "--num-samples", "4", "--seq-len", "32",
                         "--epochs", "1", "--eval-seq-len", "32", "--eval-windows", "2",
                         "--output", str(tmp_path / "demo"))
    perplexity = result["perplexity"]
    assert list(perplexity) == ["dense", "LR", "LR + BR + GP"]
    sources = list(perplexity["dense"])
    assert len(sources) == 2 and "another source" in sources[1]
    assert all(math.isfinite(v) for row in perplexity.values() for v in row.values())
    assert_pruned_folder(result["folder"])
    card = open(os.path.join(result["folder"], "README.md"), encoding="utf-8").read()
    for source in sources:  # both perplexities of the saved (LR + BR + GP) model reach its card
        assert source in card and f"{perplexity['LR + BR + GP'][source]:.2f}" in card
    table = capsys.readouterr().out
    assert "| LR + BR + GP |" in table and "gap to dense closed" in table

"""Saving (atomic folder, dense safetensors, PruningConfig in config.json, report, plot, card) and pushing to a
stand-in Hub on 127.0.0.1 with the real huggingface_hub client. No network, tiny models only."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_recon_prune import PruningConfig
from hf_recon_prune.hub import (
    MARKER_FILE,
    HubUploadError,
    model_sparsity,
    push_folder_to_hub,
    rewrite_report_and_card,
    save_already_pruned,
    save_pruned_model,
)
from hf_recon_prune.report import BlockReport, PruneReport
from hub_server import StandInHub

TOKEN = "hf_StandInTokenForTests0123456789abcdefXYZ"
BASE = "example-org/tiny-llama"
LAYER_TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
CITATION_AUTHORS = "Shin, Sungbin and Park, Wonpyo and Lee, Jaeho and Lee, Namhoon"


# ---------------------------------------------------------------------------------------------------- fixtures
def tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # zero half of every block linear weight: the odd input columns
        for block in model.model.layers:
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight[:, 1::2] = 0.0
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(62)}
    vocab.update({"<unk>": 62, "</s>": 63})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def tiny_config(**overrides) -> PruningConfig:
    values = dict(method="wanda", sparsity=0.5, reconstruction=["lr", "br", "gp"], calibration="c4",
                  num_samples=4, seq_len=8, num_self_samples=2, seed=3, device="cpu")
    values.update(overrides)
    return PruningConfig(**values)


def tiny_report(config: PruningConfig, model_name: str = BASE) -> PruneReport:
    blocks = [
        BlockReport(
            index=i,
            layer_sparsity={name: 0.5 for name in LAYER_TYPES},
            error_before={"calibration": 0.02 * (i + 1), "heldout": 0.025 * (i + 1)},
            error_after={"calibration": 0.004 * (i + 1), "heldout": 0.02 * (i + 1)},
            train_losses=[[0.02, 0.01, 0.004]],
            seconds={"masks_lr": 0.1, "reconstruction": 0.5},
        )
        for i in range(2)
    ]
    report = PruneReport(model_name=model_name, family="llama", config=config.to_dict(), blocks=blocks,
                         calibration={"source": "c4", "split": "train", "seq_len": 8, "num_real": 4,
                                      "num_self_generated": 2, "num_heldout": 1, "heldout": {"num": 1}},
                         total_seconds=1.5)
    report.perplexity["wikitext2"] = {"split": "test", "seq_len": 8, "dense": 20.0, "pruned": 24.5}
    return report


@pytest.fixture
def saved(tmp_path):
    """A tiny pruned model saved with tokenizer, report and license: (folder, model, config, report)."""
    model = tiny_llama()
    config = tiny_config(self_gen_cache_dir=str(tmp_path / "private" / "selfgen-cache"))
    report = tiny_report(config)
    folder = save_pruned_model(model, tmp_path / "out" / "tiny-sparse", config, tokenizer=tiny_tokenizer(),
                               report=report, base_model=BASE, license="apache-2.0")
    return folder, model, config, report


def published(config: PruningConfig) -> PruningConfig:
    """What a saved folder holds of ``config``: the execution-only paths (here the self-generation cache) dropped."""
    return PruningConfig.from_dict({**config.to_dict(), "self_gen_cache_dir": None})


def snapshot(folder) -> dict[str, str]:
    result = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                result[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return result


def assert_same_weights(expected, actual) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype, key
        assert torch.equal(want[key], got[key]), key


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stand-in Hub that needs TOKEN; huggingface_hub is pointed at it (endpoint read at import: patched too)."""
    import huggingface_hub.constants as hf_constants

    server = StandInHub(token=TOKEN, lifetime=120).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # `make test` runs with HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never a real cached login
    # huggingface_hub 2.x caches a registry it fetches from the endpoint under HF_HOME (a path read at import).
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / "agents.json"),
                        raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server
    server.stop()
    assert not server.errors, server.errors


def use_plain_commit(monkeypatch) -> None:
    """huggingface_hub's single-commit path (no hf_xet pipeline; HF_HUB_DISABLE_XET is read at import)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)


# ---------------------------------------------------------------------------------------------------- saving
def test_saved_folder_reloads_with_plain_transformers(saved):
    folder, model, config, report = saved
    assert os.path.isabs(folder) and os.path.basename(folder) == "tiny-sparse"
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "README.md", "prune_report.json", "reconstruction_error.png",
            "tokenizer.json", MARKER_FILE} <= files
    assert not [f for f in os.listdir(os.path.dirname(folder)) if f != "tiny-sparse"]  # no temporary leftovers

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(reloaded) is type(model)
    assert_same_weights(model, reloaded)
    assert model_sparsity(reloaded) == model_sparsity(model)
    assert model_sparsity(reloaded)["overall"] == 0.5

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        stored = json.load(handle)
    # The config as published: the absolute self-generation cache folder only said where the run kept things.
    assert stored["pruning_config"] == published(config).to_dict()
    assert stored["pruning_config"]["self_gen_cache_dir"] is None
    assert PruningConfig.from_pretrained(folder) == published(config)
    assert AutoConfig.from_pretrained(folder).pruning_config == published(config).to_dict()

    with open(os.path.join(folder, "prune_report.json"), encoding="utf-8") as handle:
        assert PruneReport.from_dict(json.load(handle)).perplexity == report.perplexity
    with open(os.path.join(folder, "reconstruction_error.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert AutoTokenizer.from_pretrained(folder)("w1 w2").input_ids == [1, 2]


def test_model_card_metadata_and_content(saved, tmp_path):
    folder, model, config, report = saved
    card = ModelCard.load(os.path.join(folder, "README.md"))
    data = card.data
    assert data.base_model == BASE
    assert data.base_model_relation == "finetune"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert {"pruned", "sparse", "wanda", "unstructured", "hf-recon-prune"} <= set(data.tags)
    assert data.datasets == ["allenai/c4"]
    by_type = {r.metric_type: r for r in data.eval_results}
    assert by_type["perplexity"].metric_value == pytest.approx(24.5)
    assert by_type["perplexity"].task_type == "text-generation"
    assert by_type["perplexity"].dataset_type == "Salesforce/wikitext"
    assert by_type["perplexity"].dataset_split == "test"
    assert by_type["perplexity_dense_baseline"].metric_value == pytest.approx(20.0)
    assert data.model_name == "tiny-sparse"

    text = card.text
    assert report.to_markdown() in text
    assert "](reconstruction_error.png)" in text
    assert CITATION_AUTHORS in text and "Rethinking Pruning Large Language Models" in text
    assert "AutoModelForCausalLM.from_pretrained" in text
    for technique in ("Layer-wise reconstruction", "Block-wise reconstruction", "Global propagation"):
        assert technique in text
    assert "Cross-block" not in text
    assert "| `mlp.down_proj` | 50.00% |" in text
    assert "| WikiText-2 (raw) | test | 8 | all | 20.000 | 24.500 | +22.5% |" in text
    raw = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert str(tmp_path) not in raw  # neither the folder nor the config's absolute cache path
    assert "selfgen-cache" not in raw  # ... which only said where the run kept things: dropped
    assert os.path.expanduser("~") + os.sep not in raw
    assert TOKEN not in raw


def test_card_never_names_a_local_base_model_path(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = str(tmp_path / "models" / "my-llama")  # loaded from a local folder
    os.makedirs(model.config._name_or_path)
    config = tiny_config(reconstruction=[], calibration=str(tmp_path / "data" / "corpus.txt"), num_self_samples=0)
    report = tiny_report(config, model_name=model.config._name_or_path)
    report.calibration = {"source": config.calibration, "split": "train", "seq_len": 8, "num_real": 4,
                          "num_self_generated": 0, "num_heldout": 0, "heldout": {"num": 0}}
    report.warnings.append(f"could not read {tmp_path}/data/other.txt, skipped")
    folder = save_pruned_model(model, tmp_path / "plain", config, report=report)
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.get("base_model") is None and card.data.get("license") is None
    assert card.data.get("datasets") is None  # a local file is not a Hub dataset
    raw = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert str(tmp_path) not in raw
    assert "corpus.txt" in raw and "other.txt" in raw
    assert "No reconstruction was applied" in raw

    with_base = save_pruned_model(model, tmp_path / "with-base", config, report=report, base_model=BASE)
    assert ModelCard.load(os.path.join(with_base, "README.md")).data.base_model == BASE


def test_name_or_path_hub_id_becomes_base_model(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = BASE
    config = tiny_config(pattern="2:4", method="sparsegpt", reconstruction=["lr"], num_self_samples=0)
    folder = save_pruned_model(model, tmp_path / "nm", config, report=tiny_report(config))
    data = ModelCard.load(os.path.join(folder, "README.md")).data
    assert data.base_model == BASE
    assert {"sparsegpt", "2:4-sparsity"} <= set(data.tags)


def test_save_already_pruned_model_loaded_back(saved, tmp_path):
    folder, model, config, _ = saved
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    again = save_already_pruned(reloaded, tmp_path / "again", base_model=BASE)
    assert PruningConfig.from_pretrained(again) == published(config)  # read back from model.config
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(again))
    assert "prune_report.json" not in os.listdir(again) and "reconstruction_error.png" not in os.listdir(again)
    card = ModelCard.load(os.path.join(again, "README.md"))
    assert card.data.base_model == BASE and "wanda" in card.data.tags
    assert card.data.get("eval_results") is None
    assert "measured on the saved weights" in card.text and "| `self_attn.q_proj` | 50.00% |" in card.text
    assert "Reconstruction error per block" not in card.text
    assert str(tmp_path) not in card.content


def test_failed_save_keeps_previous_folder(saved, monkeypatch):
    folder, model, config, report = saved
    before = snapshot(folder)

    def broken_save(*args, **kwargs):
        os.makedirs(args[0], exist_ok=True)
        with open(os.path.join(args[0], "model.safetensors"), "wb") as handle:
            handle.write(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(model, folder, tiny_config(sparsity=0.5, method="magnitude"), report=report)
    assert snapshot(folder) == before
    assert os.listdir(os.path.dirname(folder)) == ["tiny-sparse"]
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(folder))


def test_save_replaces_a_previous_save_completely(saved):
    folder, model, config, report = saved
    new_config = tiny_config(method="magnitude", reconstruction=[], num_self_samples=0)
    assert save_pruned_model(model, folder, new_config) == folder  # no tokenizer, no report this time
    assert PruningConfig.from_pretrained(folder) == new_config
    assert "tokenizer.json" not in os.listdir(folder) and "prune_report.json" not in os.listdir(folder)
    assert os.listdir(os.path.dirname(folder)) == ["tiny-sparse"]


def test_rewriting_the_report_and_card_equals_saving_anew_and_keeps_the_weights(saved, tmp_path):
    """Measured after the save: the rewritten report and card are those a save with the new report writes, and no
    other file of the folder changes."""
    folder, model, config, report = saved
    before = snapshot(folder)
    report.perplexity["corpus.txt"] = {"split": "test", "seq_len": 8, "windows": 3, "dense": 30.0, "pruned": 33.0}
    assert rewrite_report_and_card(model, folder, config, tokenizer=tiny_tokenizer(), report=report,
                                   base_model=BASE, license="apache-2.0") == folder
    after = snapshot(folder)
    changed = sorted(name for name in after if after[name] != before.get(name))
    assert changed == ["README.md", "prune_report.json"] and sorted(after) == sorted(before)  # no file left over
    fresh = save_pruned_model(model, tmp_path / "again" / "tiny-sparse", config, tokenizer=tiny_tokenizer(),
                              report=report, base_model=BASE, license="apache-2.0")
    for name in changed:
        with open(os.path.join(folder, name), encoding="utf-8") as mine, \
                open(os.path.join(fresh, name), encoding="utf-8") as theirs:
            assert mine.read() == theirs.read(), name
    assert "33.0" in ModelCard.load(os.path.join(folder, "README.md")).content


def test_rewriting_the_card_of_a_folder_this_package_did_not_save_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("my card")
    with pytest.raises(FileExistsError, match="not a model folder hf-recon-prune saved"):
        rewrite_report_and_card(tiny_llama(), other, tiny_config(), report=tiny_report(tiny_config()))
    assert (other / "README.md").read_text() == "my card" and os.listdir(other) == ["README.md"]


def test_refuses_to_replace_a_folder_that_is_not_a_saved_model(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not hold a saved model"):
        save_pruned_model(tiny_llama(), precious, tiny_config())
    assert os.listdir(precious) == ["todo.txt"] and sorted(os.listdir(tmp_path)) == ["notes"]


def test_missing_matplotlib_skips_the_plot_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    config = tiny_config()
    with pytest.warns(UserWarning, match="matplotlib"):
        folder = save_pruned_model(tiny_llama(), tmp_path / "noplot", config, report=tiny_report(config))
    assert "reconstruction_error.png" not in os.listdir(folder)
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "reconstruction_error.png" not in text and "| block | sparsity |" in text


def test_model_sparsity_skips_embeddings_and_head():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
    result = model_sparsity(model)
    assert len(result["layers"]) == 2 * len(LAYER_TYPES)
    assert set(result["by_type"]) == set(LAYER_TYPES)
    assert result["overall"] == 0.5 and result["zeros"] * 2 == result["total"]
    assert all(name.startswith("model.layers.") for name in result["layers"])


# ---------------------------------------------------------------------------------------------------- pushing
@pytest.mark.parametrize("client_path", ["plain-commit", "client-default"])
def test_push_uploads_the_folder_over_http(saved, hub, monkeypatch, client_path):
    if client_path == "plain-commit":
        use_plain_commit(monkeypatch)
    folder = saved[0]
    before = snapshot(folder)
    url = push_folder_to_hub(folder, "tester/tiny-sparse", private=True, token=TOKEN)
    assert url.startswith(f"{hub.url}/tester/tiny-sparse/commit/")

    repo = hub.repos["tester/tiny-sparse"]
    assert repo.private is True
    assert len(repo.commits) == 1 and repo.commits[0]["header"]["summary"].startswith("Upload pruned model")
    local = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as handle:
            local[name] = handle.read()
    assert MARKER_FILE in local and MARKER_FILE not in repo.files  # the package's own marker stays local
    del local[MARKER_FILE]
    assert repo.files == local  # every other file, byte for byte: card, config.json with pruning_config, weights, plot
    assert json.loads(repo.files["config.json"])["pruning_config"] == published(saved[2]).to_dict()
    assert ModelCard(repo.files["README.md"].decode()).data.base_model == BASE
    assert hub.token_leaks(TOKEN) == []
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.api_requests())
    assert snapshot(folder) == before


def test_pruner_push_to_hub_end_to_end(hub, monkeypatch, tmp_path):
    from hf_recon_prune.pruner import Pruner

    use_plain_commit(monkeypatch)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama().config).eval()
    config = PruningConfig(method="magnitude", reconstruction=[], num_samples=4, seq_len=8, device="cpu",
                           calibration="default")
    pruner = Pruner(model, config, calibration_data=torch.randint(0, 64, (4, 8)), show_progress=False)
    pruner.prune()
    pruner.record_perplexity("default", "heldout", 8, 70.0, 75.0)
    url = pruner.push_to_hub("tester/pruned", token=TOKEN, local_dir=str(tmp_path / "pruned"))
    assert url.startswith(hub.url)

    download = tmp_path / "download"
    download.mkdir()
    for name, content in hub.repos["tester/pruned"].files.items():
        (download / name).write_bytes(content)
    reloaded = AutoModelForCausalLM.from_pretrained(download)
    assert_same_weights(model, reloaded)
    assert model_sparsity(reloaded)["overall"] == pytest.approx(0.5)
    card = ModelCard.load(download / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(75.0)
    assert card.data.get("datasets") is None  # the offline default corpus is no Hub dataset
    assert card.data.get("base_model") is None  # built from a config: no Hub id, and never the class name
    assert hub.repos["tester/pruned"].private is False
    assert hub.token_leaks(TOKEN) == []


@pytest.mark.parametrize("failing", [("commit", 500), ("preupload", 403), ("create", 403)])
def test_failed_push_names_the_intact_local_copy(saved, hub, monkeypatch, failing):
    use_plain_commit(monkeypatch)
    folder, model = saved[0], saved[1]
    before = snapshot(folder)
    hub.fail = dict([failing])
    with pytest.raises(HubUploadError) as caught:
        push_folder_to_hub(folder, "tester/broken", token=TOKEN)
    message = str(caught.value)
    assert "failed" in message and f"complete local copy is at {folder}" in message
    assert f"hf-recon-prune push {folder} tester/broken" in message
    assert TOKEN not in message and caught.value.folder == folder
    assert snapshot(folder) == before
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(folder))
    assert all(not repo.commits for repo in hub.repos.values())
    assert hub.token_leaks(TOKEN) == []


def serve_the_file_listing(hub, monkeypatch) -> None:
    """The file listing of a revision (``HfApi.list_repo_files``, which ``upload_folder(delete_patterns=...)``
    reads; the stand-in serves no tree endpoint) answered from the stand-in's own files."""
    from huggingface_hub import HfApi

    def list_repo_files(self, repo_id, *, revision=None, **kwargs):
        return sorted(hub.repos[repo_id].branches[revision or "main"])

    monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)


def test_a_second_push_leaves_no_stale_file_in_the_repo(saved, hub, monkeypatch):
    """The repo mirrors the folder: what the new folder does not hold (the old report and plot, a weight shard of
    the previous model) is deleted in the same commit that uploads the new files; .gitattributes stays."""
    use_plain_commit(monkeypatch)
    serve_the_file_listing(hub, monkeypatch)
    folder, model = saved[0], saved[1]
    push_folder_to_hub(folder, "tester/mirror", token=TOKEN)
    repo = hub.repos["tester/mirror"]
    assert {"prune_report.json", "reconstruction_error.png", "tokenizer.json"} <= set(repo.files)
    repo.files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"  # what the Hub adds
    repo.files["model-00002-of-00002.safetensors"] = b"a shard of an earlier, larger upload"

    # Saved again without a report or a tokenizer, then pushed to the same repo.
    save_pruned_model(model, folder, tiny_config(method="magnitude", reconstruction=[], num_self_samples=0))
    local = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder) if name != MARKER_FILE}
    assert "prune_report.json" not in local and "tokenizer.json" not in local
    push_folder_to_hub(folder, "tester/mirror", token=TOKEN)
    assert repo.files == {**local, ".gitattributes": repo.files[".gitattributes"]}
    assert len(repo.commits) == 2
    second = set(repo.commits[1]["paths"])
    assert {"prune_report.json", "reconstruction_error.png", "tokenizer.json", "model-00002-of-00002.safetensors",
            "config.json"} <= second and ".gitattributes" not in second
    assert json.loads(repo.files["config.json"])["pruning_config"]["method"] == "magnitude"

    # Nothing stale: no deletion asked for (no listing of the repo's files needed).
    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_files", lambda *a, **k: pytest.fail("listed"))
    push_folder_to_hub(folder, "tester/mirror", token=TOKEN)
    assert repo.files == {**local, ".gitattributes": repo.files[".gitattributes"]}
    assert hub.token_leaks(TOKEN) == []


@pytest.mark.parametrize("given", ["token", "saved-token"])
def test_the_token_is_in_no_message_exception_chain_or_logged_traceback(saved, hub, monkeypatch, given):
    """An error whose text holds the token (a proxy or a library echoing it): the HubUploadError's message has it
    replaced, and no chained exception keeps the original, so logger.exception cannot print it either."""
    import io
    import logging
    import traceback

    from huggingface_hub import HfApi

    def create_repo(self, *args, **kwargs):
        try:
            raise ConnectionError(f"proxy refused Authorization: Bearer {TOKEN}")
        except ConnectionError as inner:
            raise ValueError(f"401 Client Error: invalid credentials {TOKEN}") from inner

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    if given == "saved-token":  # token=True: huggingface_hub's saved token (here from HF_TOKEN)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_hub.user_code")
    logger.addHandler(handler)
    try:
        with pytest.raises(HubUploadError) as caught:
            push_folder_to_hub(saved[0], "tester/leaky", token=TOKEN if given == "token" else True)
        try:
            raise caught.value
        except HubUploadError:
            logger.exception("push failed")
    finally:
        logger.removeHandler(handler)
    error = caught.value
    assert "ValueError: 401 Client Error: invalid credentials <token>" in str(error)
    assert error.__cause__ is None and error.__context__ is None
    logged = stream.getvalue()
    assert "push failed" in logged and "HubUploadError" in logged and "invalid credentials <token>" in logged
    for text in (str(error), repr(error), "".join(traceback.format_exception(error)), logged):
        assert TOKEN not in text


def test_token_true_reports_the_real_upload_error(saved, hub, monkeypatch):
    use_plain_commit(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail = {"commit": 500}
    with pytest.raises(HubUploadError) as caught:
        push_folder_to_hub(saved[0], "tester/saved-token", token=True)
    message = str(caught.value)
    assert "commit fails with 500 on purpose" in message and TOKEN not in message
    assert f"complete local copy is at {saved[0]}" in message
    assert hub.token_leaks(TOKEN) == []


def test_private_push_refuses_an_existing_public_repo(saved, hub, monkeypatch):
    use_plain_commit(monkeypatch)
    push_folder_to_hub(saved[0], "tester/public", private=False, token=TOKEN)
    with pytest.raises(HubUploadError, match="public"):
        push_folder_to_hub(saved[0], "tester/public", private=True, token=TOKEN)
    assert len(hub.repos["tester/public"].commits) == 1


def test_push_to_a_branch_and_as_pull_request(saved, hub, monkeypatch):
    use_plain_commit(monkeypatch)
    push_folder_to_hub(saved[0], "tester/branches", revision="v1", token=TOKEN)
    repo = hub.repos["tester/branches"]
    assert "README.md" in repo.branches["v1"] and not repo.files
    url = push_folder_to_hub(saved[0], "tester/branches", create_pr=True, token=TOKEN)
    assert url == f"{hub.url}/tester/branches/discussions/1"
    assert "README.md" in repo.branches["refs/pr/1"]


def test_push_of_a_missing_folder_is_refused_before_any_request(hub, tmp_path):
    with pytest.raises(FileNotFoundError):
        push_folder_to_hub(tmp_path / "nothing", "tester/x", token=TOKEN)
    assert hub.api_requests() == []


def test_card_says_which_learning_rates_auto_chose(tmp_path):
    from conftest import make_tiny_model, random_ids
    from hf_recon_prune.pruner import Pruner

    model = make_tiny_model("llama")
    config = PruningConfig(method="wanda", reconstruction=["br", "gp"], br_lr="auto", br_epochs=8, br_batch_size=2,
                           num_samples=12, seq_len=16, device="cpu")
    from hf_recon_prune.calibration import CalibrationSet

    calibration = CalibrationSet(input_ids=random_ids(12, 16), is_self_generated=torch.zeros(12, dtype=torch.bool),
                                 heldout_ids=random_ids(4, 16, seed=9), statistics_mask=torch.ones(12, dtype=torch.bool),
                                 description={"source": "test"})
    pruner = Pruner(model, config, calibration_data=calibration, show_progress=False)
    report = pruner.prune()
    choices = [choice for block in report.blocks for choice in block.br_choices]
    assert [c["lr_rule"] for c in choices] == ["auto", "auto"]  # the probe ran in both windows
    chosen = [c["lr"] for c in choices]
    card = open(os.path.join(pruner.save_pretrained(str(tmp_path / "auto")), "README.md"), encoding="utf-8").read()
    assert "learning rate chosen per window by held-out error (" in card
    for lr in set(chosen):
        assert f"{lr:g} in {chosen.count(lr)} window" in card


def test_card_names_the_default_corpus_python_and_the_calibration_tokens_hash(tmp_path):
    import platform

    config = tiny_config(calibration="default", num_self_samples=0)
    report = tiny_report(config)
    report.calibration.update(source="default", source_version=f"pydoc_data of Python {platform.python_version()}",
                              windows_sha256="0123456789abcdef")
    folder = save_pruned_model(tiny_llama(), tmp_path / "out", config, tokenizer=tiny_tokenizer(), report=report,
                               base_model=BASE)
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    row = next(line for line in text.splitlines() if line.startswith("| calibration data |"))
    assert f"(pydoc_data of Python {platform.python_version()})" in row
    assert "| calibration tokens, sha256 | `0123456789abcdef` (two runs with the same value calibrated on the same " \
           "token windows) |" in text

"""Data safety: nothing private is published, nothing is replaced without being asked, a killed save leaves nothing
behind, and a singular Hessian costs one layer's update, not the run. Saving and pushing use the stand-in Hub of
tests/test_hub.py (no network)."""

from __future__ import annotations

import json
import logging
import os
import random

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from hf_recon_prune import PruningConfig
from hf_recon_prune.criteria import sparsegpt as sparsegpt_module
from hf_recon_prune.criteria.masks import prune_lowest
from hf_recon_prune.hub import MARKER_FILE, push_folder_to_hub, save_pruned_model
from hf_recon_prune.pruner import PreflightError, Pruner
from hf_recon_prune.hub import check_publishable
from hf_recon_prune.sanitise import (
    parse_texts_marker,
    sanitise_config_dict,
    sanitise_report_dict,
    strip_paths,
    texts_digest,
    texts_marker,
)
from test_hub import TOKEN, hub, snapshot, tiny_config, tiny_llama, tiny_report, tiny_tokenizer, use_plain_commit  # noqa: F401


def _secret_texts(count: int, seed: int, words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(62)}" for _ in range(words)) for _ in range(count)]


def _all_bytes(files: dict[str, bytes]) -> bytes:
    return b"\n".join(files.values())


# ---------------------------------------------------------------------------------------------------- publishing
def test_push_with_a_list_calibration_publishes_no_text_and_no_local_path(hub, monkeypatch, tmp_path):
    """The acceptance test: a run calibrated on private texts, from a model in a local folder, with checkpoints,
    disk streams and an evaluation file under local paths, pushed to the stand-in Hub."""
    use_plain_commit(monkeypatch)
    source = tmp_path / "private" / "models" / "secret-llama"
    tiny_llama().save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    texts, heldout = _secret_texts(6, seed=1), _secret_texts(3, seed=2)
    config = PruningConfig(
        method="magnitude", reconstruction=[], calibration=texts, heldout_source=heldout, num_samples=4, seq_len=8,
        device="cpu", checkpoint_dir=str(tmp_path / "private" / "ckpt"), stream_location="disk",
        stream_folder=str(tmp_path / "private" / "streams"), self_gen_cache_dir=str(tmp_path / "private" / "cache"),
    )
    pruner = Pruner(model, config, tokenizer=tiny_tokenizer(), show_progress=False)
    report = pruner.prune()
    report.warnings.append(f"could not read {tmp_path}/private/notes.txt, skipped")
    pruner.record_perplexity(str(tmp_path / "private" / "eval.txt"), "test", 8, 70.0, 75.0)
    pruner.push_to_hub("tester/sanitised", token=TOKEN, local_dir=str(tmp_path / "out" / "pushed"))

    files = hub.repos["tester/sanitised"].files
    assert {"config.json", "prune_report.json", "README.md", "model.safetensors"} <= set(files)
    assert MARKER_FILE not in files
    published = _all_bytes(files)
    for text in texts + heldout:
        assert text.encode() not in published
        assert text[:30].encode() not in published  # not even a prefix of one
    for private in (str(tmp_path), os.path.expanduser("~") + os.sep, "/private/"):
        assert private.encode() not in published, private
    assert hub.token_leaks(TOKEN) == []

    stored = json.loads(files["config.json"])["pruning_config"]
    assert stored["calibration"] == texts_marker(texts) and parse_texts_marker(stored["calibration"]) == \
        (6, texts_digest(texts))
    assert stored["heldout_source"] == texts_marker(heldout)
    assert stored["checkpoint_dir"] is None and stored["stream_folder"] is None and stored["self_gen_cache_dir"] is None
    saved_report = json.loads(files["prune_report.json"])
    assert saved_report["config"] == stored
    assert saved_report["model_name"] == "secret-llama"  # a local folder keeps its last component
    assert list(saved_report["perplexity"]) == ["eval.txt"]
    assert "could not read notes.txt, skipped" in saved_report["warnings"]
    card = files["README.md"].decode()
    assert "6 user-provided texts" in card and texts_digest(texts)[:16] in card

    # What was published reads back; its marker cannot calibrate a new run, and says why.
    download = tmp_path / "download"
    download.mkdir()
    for name, content in files.items():
        (download / name).write_bytes(content)
    again = PruningConfig.from_pretrained(download)
    assert again.calibration == texts_marker(texts)
    with pytest.raises(PreflightError, match="never saved"):
        Pruner(AutoModelForCausalLM.from_pretrained(download), again, tokenizer=tiny_tokenizer(),
               show_progress=False).prune()


def test_push_refuses_a_folder_that_still_holds_private_data(saved_folder, hub, tmp_path):
    """A folder saved by an older version (texts in config.json) is refused before any request."""
    config_file = os.path.join(saved_folder, "config.json")
    stored = json.loads(open(config_file, encoding="utf-8").read())
    stored["pruning_config"]["calibration"] = ["my private text"]
    stored["pruning_config"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(stored, handle)
    with pytest.raises(ValueError, match=r"refusing to upload .*config\.json: pruning_config\.calibration, "
                                         r"config\.json: pruning_config\.checkpoint_dir.*Save it again"):
        push_folder_to_hub(saved_folder, "tester/leaky", token=TOKEN)
    assert hub.api_requests() == []


def test_the_sanitiser_is_idempotent_and_keeps_what_is_not_private():
    config = PruningConfig(calibration=["a secret", "another"], heldout_source="/home/someone/data/heldout.jsonl",
                           checkpoint_dir="/scratch/ckpt", stream_folder="/scratch/streams",
                           include_modules=["mlp/.*_proj"], device="cpu").to_dict()
    clean = sanitise_config_dict(config)
    assert clean["calibration"] == texts_marker(["a secret", "another"])
    assert clean["heldout_source"] == "heldout.jsonl"
    assert clean["checkpoint_dir"] is None and clean["stream_folder"] is None
    assert clean["include_modules"] == ["mlp/.*_proj"] and clean["device"] == "cpu"  # not paths
    assert sanitise_config_dict(clean) == clean
    assert PruningConfig.from_dict(clean).calibration == clean["calibration"]  # still a valid config

    report = {"config": config, "model_name": "/models/llama", "warnings": ["see /tmp/x/log.txt and https://a.org/b/c"],
              "calibration": {"source": ["a secret"], "tokenizer": "C:\\Users\\me\\tok"}, "perplexity": {"/d/e.txt": {}}}
    clean_report = sanitise_report_dict(report)
    assert clean_report["config"] == clean and clean_report["model_name"] == "llama"
    assert clean_report["warnings"] == ["see log.txt and https://a.org/b/c"]
    assert clean_report["calibration"] == {"source": texts_marker(["a secret"]), "tokenizer": "tok"}
    assert list(clean_report["perplexity"]) == ["e.txt"]
    assert sanitise_report_dict(clean_report) == clean_report


def test_relative_paths_keep_only_their_last_component_and_hub_ids_stay(tmp_path, monkeypatch):
    """A relative path (given from the working directory) names local folders as much as an absolute one; a
    preset, a Hub id ("owner/name") or a bare name does not."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpora" / "shards").mkdir(parents=True)  # an existing folder that is shaped like a Hub id
    cut = {
        "../../home/alice/private/corpus.txt": "corpus.txt",
        "./secret/dir/x.jsonl": "x.jsonl",
        "secret_alice_dir/corpora/private_corpus.jsonl": "private_corpus.jsonl",
        "alice/notes.jsonl": "notes.jsonl",  # one separator, but a data file's suffix
        "data\\sub\\eval.txt": "eval.txt",
        "corpora/shards": "shards",  # exists on disk
        "models/my-tok/": "my-tok",
    }
    kept = ["allenai/c4", "wikitext", "c4", "wikitext2", "default", "Salesforce/wikitext", "EleutherAI/gpt-neo-1.3B",
            "self", texts_marker(["a"])]
    for value, last in cut.items():
        clean = sanitise_config_dict({"calibration": value, "heldout_source": value})
        assert clean == {"calibration": last, "heldout_source": last}, value
    for value in kept:
        assert sanitise_config_dict({"calibration": value, "heldout_source": value}) == \
            {"calibration": value, "heldout_source": value}, value

    report = {
        "model_name": "checkpoints/runs/llama-local",
        "calibration": {"source": "secret_alice_dir/corpora/private_corpus.jsonl", "tokenizer": "models/my-tok/",
                        "heldout": {"source": "../held/out/part.jsonl", "split": "heldout"}},
        "perplexity": {"evals/private/wiki.txt": {"pruned": 1.0}, "wikitext2": {"pruned": 2.0},
                       "allenai/c4": {"pruned": 3.0}},
        "zero_shot": {"tasks": {"arc": {"dataset": {"path": "/srv/alice/tasks/arc", "name": "ARC-Easy"}},
                                "piqa": {"dataset": {"path": "ybisk/piqa", "name": None}}}},
        "warnings": ["could not read secret_alice_dir/corpora/other.jsonl, skipped"],
        "config": {"calibration": "secret_alice_dir/corpora/private_corpus.jsonl", "include_modules": ["mlp/.*_proj"]},
    }
    clean = sanitise_report_dict(report)
    assert clean["model_name"] == "llama-local"
    assert clean["calibration"] == {"source": "private_corpus.jsonl", "tokenizer": "my-tok",
                                    "heldout": {"source": "part.jsonl", "split": "heldout"}}
    assert list(clean["perplexity"]) == ["wiki.txt", "wikitext2", "allenai/c4"]
    assert clean["zero_shot"]["tasks"]["arc"]["dataset"]["path"] == "arc"
    assert clean["zero_shot"]["tasks"]["piqa"]["dataset"]["path"] == "ybisk/piqa"
    assert clean["warnings"] == ["could not read other.jsonl, skipped"]  # the source's folders, wherever they appear
    assert clean["config"] == {"calibration": "private_corpus.jsonl", "include_modules": ["mlp/.*_proj"]}
    assert sanitise_report_dict(clean) == clean
    for token in ("secret_alice_dir", "corpora", "evals", "checkpoints", "alice", "models/", "../"):
        assert token not in json.dumps(clean), token

    # With a tokenizer or a model named by a Hub id, nothing changes.
    hub_named = {"model_name": "meta-llama/Llama-2-7b-hf", "calibration": {"source": "c4",
                                                                          "tokenizer": "meta-llama/Llama-2-7b-hf"}}
    assert sanitise_report_dict(hub_named) == hub_named


def test_a_relative_calibration_path_is_not_published(tmp_path, monkeypatch):
    """The reviewer's case: calibration and held-out texts in a file given relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    relative = "secret_alice_dir/corpora/private_corpus.jsonl"
    (tmp_path / "secret_alice_dir" / "corpora").mkdir(parents=True)
    (tmp_path / relative).write_text('{"text": "w1 w2"}\n')
    config = tiny_config(calibration=relative, heldout_source=relative)
    report = tiny_report(config, model_name="secret_alice_dir/models/llama-local")
    report.calibration.update(source=relative, tokenizer="secret_alice_dir/models/llama-local",
                              heldout={"num": 1, "source": relative, "split": "heldout"})
    folder = save_pruned_model(tiny_llama(), tmp_path / "out", config, tokenizer=tiny_tokenizer(), report=report)
    published = _all_bytes({name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)})
    assert b"secret_alice_dir" not in published and b"corpora" not in published
    stored = json.loads(open(os.path.join(folder, "config.json"), encoding="utf-8").read())["pruning_config"]
    assert stored["calibration"] == stored["heldout_source"] == "private_corpus.jsonl"
    saved_report = json.loads(open(os.path.join(folder, "prune_report.json"), encoding="utf-8").read())
    assert saved_report["calibration"]["source"] == saved_report["calibration"]["heldout"]["source"] == \
        "private_corpus.jsonl"
    assert "`private_corpus.jsonl`, split `train`" in open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    check_publishable(folder)

    # A folder that still holds the relative path (saved by an older version) is refused before upload.
    saved_report["calibration"]["source"] = relative
    with open(os.path.join(folder, "prune_report.json"), "w", encoding="utf-8") as handle:
        json.dump(saved_report, handle)
    with pytest.raises(ValueError, match=r"refusing to upload .*prune_report\.json: calibration\.source"):
        check_publishable(folder)


def test_a_path_with_spaces_in_its_folders_loses_all_of_them(tmp_path):
    private = tmp_path / "Alice Private" / "medical records"
    private.mkdir(parents=True)
    notes = str(private / "notes.txt")
    with open(notes, "w", encoding="utf-8") as handle:
        handle.write("\n".join(_secret_texts(60, seed=3)))
    # A lone path, in a known path field or in any string: the whole of it is one path.
    assert strip_paths("/data/My Drive/secret/corpus.txt") == "corpus.txt"
    assert strip_paths("C:\\Users\\Alice Smith\\data\\corpus.txt") == "corpus.txt"
    assert strip_paths("/data/x is missing") == "x is missing"  # free text that starts with a path: as before
    # In free text: a quoted path, and an unquoted one whose folders exist.
    assert strip_paths("could not read '/data/My Drive/secret/corpus.txt', skipped") == \
        "could not read 'corpus.txt', skipped"
    assert strip_paths(f"skipped {notes} (empty), see https://a.org/b/c") == \
        "skipped notes.txt (empty), see https://a.org/b/c"

    report = {"calibration": {"source": "/media/Alice Private/medical records/notes.txt",
                              "heldout": {"source": "/media/Alice Private/medical records/notes.txt"}},
              "warnings": ["/media/Alice Private/medical records/notes.txt: 3 short lines dropped"],
              "config": {"calibration": "/media/Alice Private/medical records/notes.txt"}}
    clean = sanitise_report_dict(report)
    assert clean["calibration"] == {"source": "notes.txt", "heldout": {"source": "notes.txt"}}
    assert clean["config"] == {"calibration": "notes.txt"}
    assert clean["warnings"] == ["notes.txt: 3 short lines dropped"]  # the source's folders, also in free text
    assert sanitise_report_dict(clean) == clean

    # Saved: neither the report, nor the card (settings, model-index), nor config.json name a folder.
    config = tiny_config(calibration=notes, reconstruction=[], num_self_samples=0)
    saved = tiny_report(config)
    saved.calibration.update(source=notes, heldout={"num": 1, "source": notes, "split": "train"})
    folder = save_pruned_model(tiny_llama(), tmp_path / "out", config, report=saved)
    for name in os.listdir(folder):
        content = open(os.path.join(folder, name), "rb").read()
        for word in (b"Alice", b"Private", b"medical", b"records"):
            assert word not in content, (name, word)
    assert json.loads(open(os.path.join(folder, "prune_report.json")).read())["calibration"]["source"] == "notes.txt"
    check_publishable(folder)


# ---------------------------------------------------------------------------------------------------- overwriting
@pytest.fixture
def saved_folder(tmp_path):
    config = tiny_config()
    return save_pruned_model(tiny_llama(), tmp_path / "out" / "tiny-sparse", config, tokenizer=tiny_tokenizer(),
                             report=tiny_report(config))


def test_save_refuses_the_folder_the_model_was_loaded_from(tmp_path):
    source = tmp_path / "dense-llama"
    tiny_llama().save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    before = snapshot(source)
    for target in (source, tmp_path):  # the folder itself, and one that contains it
        with pytest.raises(FileExistsError, match=rf"refusing to save into {target}: the model was loaded from .*"
                                                  r"pass overwrite=True \(--overwrite\)"):
            save_pruned_model(model, target, tiny_config())
    assert snapshot(source) == before
    save_pruned_model(model, source, tiny_config(), overwrite=True)
    assert PruningConfig.from_pretrained(source).method == "wanda"


def test_save_refuses_a_model_folder_it_did_not_write(tmp_path):
    other = tmp_path / "someone-elses-model"
    tiny_llama(seed=1).save_pretrained(other)
    before = snapshot(other)
    with pytest.raises(FileExistsError, match=rf"refusing to replace {other}: it holds a model that hf-recon-prune "
                                              rf"did not save \(no {MARKER_FILE}: .*overwrite=True"):
        save_pruned_model(tiny_llama(), other, tiny_config())
    assert snapshot(other) == before and sorted(os.listdir(tmp_path)) == ["someone-elses-model"]
    save_pruned_model(tiny_llama(), other, tiny_config(), overwrite=True)
    assert MARKER_FILE in os.listdir(other)


def test_save_replaces_its_own_folders_without_overwrite(saved_folder):
    save_pruned_model(tiny_llama(seed=2), saved_folder, tiny_config(method="magnitude"))  # the marker says: ours
    assert PruningConfig.from_pretrained(saved_folder).method == "magnitude"
    assert MARKER_FILE in os.listdir(saved_folder) and "prune_report.json" not in os.listdir(saved_folder)
    save_pruned_model(tiny_llama(seed=3), saved_folder, tiny_config(method="wanda"))
    assert PruningConfig.from_pretrained(saved_folder).method == "wanda"


def test_save_refuses_a_downloaded_copy_of_a_pushed_model(saved_folder, tmp_path):
    """What snapshot_download or a git clone of a pushed repo gives: every file but the marker (never uploaded),
    so prune_report.json and a pruning_config prove nothing about who wrote the folder."""
    import shutil

    download = tmp_path / "someones-model"
    shutil.copytree(saved_folder, download, ignore=shutil.ignore_patterns(MARKER_FILE))
    (download / "MY_FINETUNE_NOTES.md").write_text("my notes")
    assert {"prune_report.json", "config.json"} <= set(os.listdir(download))
    before = snapshot(download)
    with pytest.raises(FileExistsError) as caught:
        save_pruned_model(tiny_llama(seed=7), download, tiny_config(method="magnitude"))
    message = str(caught.value)
    assert message.startswith(f"refusing to replace {download}: it holds a model that hf-recon-prune did not save "
                              f"(no {MARKER_FILE}")
    assert "downloaded from the Hub" in message and "would delete every file in it" in message
    assert message.endswith("choose another save_directory, or pass overwrite=True (--overwrite) to replace it")
    assert snapshot(download) == before and (download / "MY_FINETUNE_NOTES.md").read_text() == "my notes"
    save_pruned_model(tiny_llama(seed=7), download, tiny_config(method="magnitude"), overwrite=True)
    assert PruningConfig.from_pretrained(download).method == "magnitude" and MARKER_FILE in os.listdir(download)
    assert "MY_FINETUNE_NOTES.md" not in os.listdir(download)


def test_a_non_model_folder_is_refused_even_with_overwrite(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not hold a saved model"):
        save_pruned_model(tiny_llama(), notes, tiny_config(), overwrite=True)
    assert os.listdir(notes) == ["todo.txt"]


def test_leftovers_of_a_killed_save_are_cleaned_up(saved_folder, caplog):
    parent, name = os.path.split(saved_folder)
    dead_tmp = os.path.join(parent, f".{name}.tmp-999999999-0123456789ab")  # no such process
    old_style = os.path.join(parent, f".{name}.old-ba9876543210")  # a name without a pid: an older version's
    running = os.path.join(parent, f".{name}.tmp-{os.getppid()}-aaaaaaaaaaaa")  # a save still running elsewhere
    unrelated = os.path.join(parent, ".other.tmp-999999999-0123456789ab")
    for folder in (dead_tmp, old_style, running, unrelated):
        os.makedirs(folder)
    save_pruned_model(tiny_llama(), saved_folder, tiny_config())
    assert sorted(os.listdir(parent)) == sorted([name, os.path.basename(running), os.path.basename(unrelated)])

    # Killed between moving the previous save aside and renaming the new one in: the previous one is put back.
    aside = os.path.join(parent, f".{name}.old-999999999-cccccccccccc")
    os.rename(saved_folder, aside)
    with caplog.at_level(logging.WARNING, logger="hf_recon_prune.hub.save"):
        save_pruned_model(tiny_llama(seed=4), saved_folder, tiny_config(method="magnitude"))
    assert "it was put back" in caplog.text and not os.path.exists(aside)
    assert PruningConfig.from_pretrained(saved_folder).method == "magnitude"


def test_save_refuses_when_the_disk_is_full(tmp_path, monkeypatch):
    import shutil

    import hf_recon_prune.hub.save as save_module

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(save_module.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(OSError, match=r"not enough disk space to save the model in .*: it needs about"):
        save_pruned_model(tiny_llama(), tmp_path / "full", tiny_config())
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- singular Hessian
@pytest.mark.parametrize("hessian", ["nan", "indefinite"])
def test_a_singular_hessian_falls_back_to_magnitude_without_the_update(hessian, caplog):
    """A Hessian no dampening makes positive definite (non-finite statistics, or not a Gram matrix at all): the
    layer gets the magnitude mask of each column block and its kept weights stay as they were."""
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    H = torch.full((32, 32), float("nan")) if hessian == "nan" else -torch.eye(32)
    notes = []
    with caplog.at_level(logging.WARNING, logger="hf_recon_prune.criteria.sparsegpt"), \
            sparsegpt_module.on_singular_hessian(notes.append):
        result = sparsegpt_module.sparsegpt_prune(weight, H, 0.5, None, block_size=16)
    expected = torch.cat([prune_lowest(weight[:, s:s + 16].square().reshape(1, -1), 64).reshape(8, 16)
                          for s in (0, 16)], dim=1)
    assert torch.equal(result.keep_mask, expected)
    assert torch.equal(result.weight, weight * expected)  # no OBS update
    assert len(notes) == 1 and "without the OBS weight update" in notes[0] and "not positive definite" in caplog.text
    # N:M masks fall back the same way: the larger magnitudes of every group of four.
    nm = sparsegpt_module.sparsegpt_prune(weight, H, 0.5, (2, 4), block_size=16)
    groups = weight.abs().reshape(8, 8, 4)
    assert torch.equal(nm.keep_mask.reshape(8, 8, 4), groups >= groups.sort(-1).values[..., 2:3])


def test_a_singular_hessian_is_a_warning_in_the_report_not_a_failed_run(monkeypatch):
    from conftest import make_tiny_model, random_ids
    from hf_recon_prune.calibration import CalibrationSet

    real, calls = sparsegpt_module.inverse_hessian_cholesky, {"n": 0}

    def third_layer_singular(hessian, dampening, overwrite=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise sparsegpt_module.SingularHessianError("simulated: not positive definite")
        return real(hessian, dampening, overwrite)

    monkeypatch.setattr(sparsegpt_module, "inverse_hessian_cholesky", third_layer_singular)
    calibration = CalibrationSet(input_ids=random_ids(8, 16), is_self_generated=torch.zeros(8, dtype=torch.bool),
                                 heldout_ids=random_ids(2, 16, seed=5), statistics_mask=torch.ones(8, dtype=torch.bool),
                                 description={"source": "test"})
    model = make_tiny_model("llama")
    config = PruningConfig(method="sparsegpt", reconstruction=["lr"], num_samples=8, seq_len=16, device="cpu",
                           sparsegpt_block_size=16)
    report = Pruner(model, config, calibration_data=calibration, show_progress=False).prune()
    warned = [w for w in report.warnings if "without the OBS weight update" in w]
    assert len(warned) == 1 and warned[0].startswith("block 0: the Hessian of ")
    assert warned == [w for w in report.blocks[0].warnings if "OBS" in w]
    assert all(abs(s - 0.5) < 1e-9 for b in report.blocks for s in b.layer_sparsity.values())


def test_transformers_model_is_still_saveable_after_the_sanitised_round_trip(saved_folder):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved_folder)
    assert PruningConfig.from_dict(reloaded.config.pruning_config).self_gen_cache_dir is None

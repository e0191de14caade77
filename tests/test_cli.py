"""The console script: flags mirror PruningConfig, --config files, prune -> eval -> info -> push against a stand-in
Hub, self-generation to JSONL, exit codes and messages. In-process (main(argv)) on tiny saved models, so the suite
pays for torch's import once."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from huggingface_hub import ModelCard

from hf_recon_prune import PruningConfig, cli
from hf_recon_prune.hub import MARKER_FILE
from hf_recon_prune.report import BlockReport, PruneReport
from tiny_assets import TOKEN, save_tiny_llama, start_stand_in_hub, write_text


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-assets")
    return {"model": save_tiny_llama(root / "tiny-llama"), "text": write_text(root / "corpus.txt")}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import hf_recon_prune.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the arguments were already known to be wrong")

    monkeypatch.setattr(hf_recon_prune.models, "load_model", refuse)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------- parser
def test_console_script_points_at_main():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("hf-recon-prune") == "hf_recon_prune.cli:main"


def test_help_needs_no_torch():
    code = ("import sys\nfrom hf_recon_prune.cli import main\n"
            "for argv in ([], ['prune'], ['eval'], ['generate-calibration'], ['push'], ['info']):\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("torch imported: False")
    for command in ("prune", "eval", "generate-calibration", "push", "info"):
        assert f"usage: hf-recon-prune {command}" in done.stdout
    assert "exit codes:" in done.stdout


def test_every_config_field_is_a_prune_flag():
    prune = cli.build_parser()._subparsers._group_actions[0].choices["prune"]
    flags = {option for action in prune._actions for option in action.option_strings}
    for f in dataclasses.fields(PruningConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def as_flags(config: PruningConfig) -> list[str]:
    argv = []
    for f in dataclasses.fields(PruningConfig):
        value = getattr(config, f.name)
        if value is None:
            text = "none"
        elif isinstance(value, list):
            text = ",".join(value)
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += ["--" + f.name.replace("_", "-"), text]
    return argv


def test_flags_round_trip_every_field(capsys, no_model_loading):
    config = PruningConfig(method="wanda", pattern="4:8", reconstruction=["lr", "br", "gp", "cr"], calibration="ptb",
                           num_samples=7, seq_len=33, num_self_samples=5, self_gen_language=None,
                           include_modules=["mlp", "attn"], br_train_other_params=False, br_lr=3e-4,
                           reconstruction_mode="lora", stream_dtype="bfloat16", device="cpu", compile_blocks=False)
    code, out, err = run(capsys, "prune", "-o", "unused", "--print-config", *as_flags(config))
    assert code == 0, err
    assert PruningConfig.from_dict(json.loads(out)) == config


def test_config_file_then_flags_override(tmp_path, capsys, no_model_loading):
    saved = PruningConfig(method="magnitude", sparsity=0.7, reconstruction=["lr"], num_samples=3)
    saved.to_json_file(tmp_path / "pruning.json")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "pruning_config": saved.to_dict()}))
    for source in (tmp_path / "pruning.json", tmp_path / "model", tmp_path / "model" / "config.json"):
        code, out, err = run(capsys, "prune", "-o", "unused", "--config", source, "--sparsity", "0.6",
                             "--self-gen-language", "none", "--print-config")
        assert code == 0, err
        # Flags not given keep the file's values; "none" clears one.
        assert PruningConfig.from_dict(json.loads(out)) == dataclasses.replace(saved, sparsity=0.6,
                                                                               self_gen_language=None)


@pytest.mark.parametrize("argv, names", [
    (["--num-samples", "-3"], ["--num-samples", "num_samples=-3", "integer > 0"]),
    (["--pattern", "2:4", "--sparsity", "0.6"], ["--sparsity", "1 - N/M = 0.5"]),
    (["--method", "obc"], ["--method", "'magnitude', 'wanda', 'sparsegpt'"]),
    (["--reconstruction", "gp"], ["--reconstruction", "only together with 'br'"]),
    (["--config", "/nonexistent/pruning.json"], ["--config", "no such file"]),
    (["--eval-seq-len", "1"], ["--eval-seq-len", "at least 2"]),
    (["--compile-blocks", "sometimes"], ["--compile-blocks", "True, False or 'auto'"]),
])
def test_bad_configuration_exits_2_naming_the_flag(argv, names, tmp_path, capsys, no_model_loading):
    code, out, err = run(capsys, "prune", "-o", tmp_path / "out", *argv)
    assert code == cli.EXIT_USAGE
    assert err.startswith("hf-recon-prune prune: error: ")
    for name in names:
        assert name in err
    assert not (tmp_path / "out").exists()


def test_unparseable_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["prune", "-o", "x", "--num-samples", "many"])
    assert info.value.code == 2
    assert "argument --num-samples: invalid int value: 'many'" in capsys.readouterr().err


def test_output_that_is_not_a_model_folder_is_refused_before_loading(tmp_path, capsys, no_model_loading):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    code, _, err = run(capsys, "prune", "-o", tmp_path / "notes")
    assert code == cli.EXIT_USAGE and "not replaced" in err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_missing_local_model_folder_is_named(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--model", tmp_path / "no-such-model")
    assert code == cli.EXIT_USAGE
    assert f"--model {tmp_path / 'no-such-model'}: no such folder" in err


def test_interrupt_exits_130(monkeypatch, capsys):
    import hf_recon_prune.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_recon_prune.models, "load_model", interrupted)
    code, _, err = run(capsys, "eval")
    assert code == cli.EXIT_INTERRUPTED and "interrupted" in err


def test_summary_table_rows():
    report = PruneReport(model_name="m", family="llama", config=PruningConfig().to_dict(), blocks=[
        BlockReport(index=0, layer_sparsity={"a": 0.5, "b": 0.5},
                    error_before={"calibration": 0.25, "heldout": 0.5}, error_after={"calibration": 0.125,
                                                                                     "heldout": 0.375}),
    ], total_seconds=3.0)
    table = cli.summary_table(report, {"dense": 20.0, "pruned": 25.0}, {"pruning": 3.0, "evaluation": 1.5,
                                                                         "total": 5.0})
    rows = {line.split("  ")[0]: line.split("  ")[-1].strip() for line in table.splitlines() if "  " in line}
    assert rows["sparsity of the pruned weights"] == "0.5000 (2 weights)"
    assert rows["final-block error, calibration (before -> after BR)"] == "0.25 -> 0.125"
    assert rows["final-block error, held-out (before -> after BR)"] == "0.5 -> 0.375"
    assert rows["perplexity before (dense)"] == "20.000"
    assert rows["perplexity after (pruned)"] == "25.000 (+25.0%)"
    assert rows["time (s): pruning / evaluation / total"] == "3.0 / 1.5 / 5.0"

    report.config = PruningConfig(reconstruction=["lr"]).to_dict()  # no BR: one error per split
    report.blocks[0].error_before = dict(report.blocks[0].error_after)
    table = cli.summary_table(report, {}, {})
    assert "before -> after" not in table and "perplexity" not in table
    assert re.search(r"final-block error, held-out\s+0\.375\n", table)


# ---------------------------------------------------------------------------------------------------- end to end
def test_prune_eval_info_push(assets, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "tiny-wanda50"
    code, out, err = run(
        capsys, "prune", "--model", assets["model"], "--output", out_dir, "--method", "wanda", "--sparsity", "0.5",
        "--reconstruction", "lr,br,gp", "--br-epochs", "1", "--calibration", assets["text"], "--num-samples", "4",
        "--seq-len", "32", "--device", "cpu", "--eval-source", assets["text"], "--eval-seq-len", "32",
        "--eval-windows", "8", "--base-model", "example-org/tiny-llama",
    )
    assert code == 0, err
    assert f"saved the pruned model with its model card to {out_dir}" in out
    with open(out_dir / "prune_report.json", encoding="utf-8") as handle:
        report = json.load(handle)
    measured = report["perplexity"]["corpus.txt"]  # the evaluation file's absolute path is not published
    # The table prints what was measured and stored.
    assert re.search(rf"perplexity before \(dense\)\s+{measured['dense']:.3f}\n", out)
    assert re.search(rf"perplexity after \(pruned\)\s+{measured['pruned']:.3f} \(", out)
    assert re.search(rf"sparsity of the pruned weights\s+{report['mean_sparsity']:.4f} \(14 weights\)", out)
    assert "pruning blocks" in err  # the progress bar
    assert PruningConfig.from_pretrained(out_dir).reconstruction == ["lr", "br", "gp"]

    # eval reloads the saved folder and measures the same perplexity on the same windows.
    code, out, err = run(capsys, "eval", "--model", out_dir, "--eval-source", assets["text"], "--eval-seq-len", "32",
                         "--eval-windows", "8", "--json", tmp_path / "eval.json")
    assert code == 0, err
    result = json.loads(out)
    assert result == json.loads((tmp_path / "eval.json").read_text())
    assert result["perplexity"]["value"] == pytest.approx(measured["pruned"], rel=1e-5)
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-6)

    code, out, err = run(capsys, "info", out_dir)
    assert code == 0, err
    assert "wanda, unstructured, sparsity 0.5, reconstruction lr,br,gp" in out
    assert f"dense {measured['dense']:.3f} -> pruned {measured['pruned']:.3f}" in out

    hub = start_stand_in_hub(monkeypatch, tmp_path)
    hub_url = hub.url
    try:
        code, out, err = run(capsys, "push", out_dir, "tester/tiny-wanda50", "--private")
    finally:
        hub.stop()
    assert code == 0, err
    assert not hub.errors, hub.errors
    repo = hub.repos["tester/tiny-wanda50"]
    assert repo.private is True
    assert repo.files == {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir) if name != MARKER_FILE}
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.base_model == "example-org/tiny-llama"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["perplexity"] == \
        pytest.approx(measured["pruned"], abs=1e-4)
    assert out.strip().startswith(f"pushed {out_dir} to {hub_url}/tester/tiny-wanda50/commit/")
    assert hub.token_leaks(TOKEN) == []


def test_generate_calibration_writes_jsonl_and_reuses_its_cache(assets, tmp_path, capsys):
    argv = ["generate-calibration", "--model", assets["model"], "--num-samples", "3", "--seq-len", "16",
            "--language", "none", "--batch-size", "2", "--seed", "5", "--cache-dir", tmp_path / "cache"]
    code, out, err = run(capsys, *argv, "--output", tmp_path / "a.jsonl")
    assert code == 0, err
    assert "(read from the cache)" not in out
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(row["input_ids"]) == 16 and row["text"] for row in rows)

    code, out, err = run(capsys, *argv, "--output", tmp_path / "b.jsonl")
    assert code == 0, err
    assert "(read from the cache)" in out
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()


# ---------------------------------------------------------------------------------------------------- push errors
def test_push_of_a_folder_without_a_model_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "push", tmp_path, "tester/x")
    assert code == cli.EXIT_USAGE and "not a saved model folder" in err


def test_push_while_offline_says_so(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hf_constants

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    code, _, err = run(capsys, "push", tmp_path, "tester/x")
    assert code == cli.EXIT_USAGE and "HF_HUB_OFFLINE" in err


def test_failed_upload_exits_1_with_the_retry_command(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hub = start_stand_in_hub(monkeypatch, tmp_path, fail={"commit": 500})
    try:
        code, _, err = run(capsys, "push", folder, "tester/broken")
    finally:
        hub.stop()
    assert code == cli.EXIT_FAILURE
    assert "failed: HubUploadError" in err
    assert f"Retry with: hf-recon-prune push {folder} tester/broken" in err
    assert TOKEN not in err


# ---------------------------------------------------------------------------------------------------- refusals, token
def test_prune_refuses_the_models_own_folder_and_foreign_model_folders(assets, tmp_path, capsys, no_model_loading):
    code, _, err = run(capsys, "prune", "--model", assets["model"], "--output", assets["model"], "--no-eval")
    assert code == cli.EXIT_USAGE
    assert f"refusing to save into {assets['model']}: the model was loaded from it" in err and "--overwrite" in err
    foreign = save_tiny_llama(tmp_path / "someone-elses")  # a model folder hf-recon-prune did not write
    code, _, err = run(capsys, "prune", "--output", foreign, "--no-eval")
    assert code == cli.EXIT_USAGE and "hf-recon-prune did not save" in err and "pass --overwrite" in err


def test_prune_with_overwrite_replaces_a_foreign_model_folder(assets, tmp_path, capsys):
    foreign = save_tiny_llama(tmp_path / "someone-elses", seed=3)
    code, out, err = run(capsys, "prune", "--model", assets["model"], "--output", foreign, "--overwrite", "--no-eval",
                         "--method", "magnitude", "--reconstruction", "none", "--calibration", assets["text"],
                         "--num-samples", "2", "--seq-len", "16", "--device", "cpu")
    assert code == 0, err
    assert PruningConfig.from_pretrained(foreign).method == "magnitude"


LEAKED = "hf_LeakyTokenForRedactionTests0123456789abcd"


def _leaky_hub(monkeypatch, tmp_path):
    """huggingface_hub as a careless library: it logs the token and puts it into an exception chain."""
    import logging

    import huggingface_hub
    import huggingface_hub.constants as hf_constants

    def create_repo(self, *args, **kwargs):
        token = self.token or os.environ.get("HF_TOKEN")
        logging.getLogger("huggingface_hub.hf_api").warning("POST /api/repos/create with Bearer %s", token)
        logging.getLogger("huggingface_hub.hf_api").debug("headers: {'authorization': 'Bearer %s'}", token)
        try:
            raise ConnectionError(f"connection reset; request headers were {{'authorization': 'Bearer {token}'}}")
        except ConnectionError as inner:
            raise RuntimeError(f"could not create the repo with token {token}") from inner

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never a real cached login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("source", ["token-file", "environment", "flag"])
def test_the_token_appears_in_no_message_traceback_or_log(tmp_path, capsys, caplog, monkeypatch, verbose, source):
    import logging

    folder = _leaky_hub(monkeypatch, tmp_path)
    argv = (["-v"] if verbose else []) + ["push", str(folder), "tester/leaky"]
    if source == "token-file":
        (tmp_path / "token").write_text(LEAKED + "\n")
        argv += ["--token-file", str(tmp_path / "token")]
    elif source == "environment":
        monkeypatch.setenv("HF_TOKEN", LEAKED)
    else:
        argv += ["--token", LEAKED]
    caplog.set_level(logging.DEBUG)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILURE
    everything = out + err + caplog.text + "".join(str(r.msg) + str(r.exc_text) for r in caplog.records)
    assert LEAKED not in everything
    assert "could not create the repo with token" in err  # the cause is still said
    assert "<redacted token>" in caplog.text  # the library's log line was kept, without the token
    if verbose:
        assert "Traceback" in err
    assert "caused by ConnectionError: connection reset" in err  # what the chain said, redacted, not the chain
    assert ("shows the token in the process list" in err) == (source == "flag")
    # Logging is back to normal after the command.
    logging.getLogger("after").warning("plain %s", LEAKED)
    assert LEAKED in caplog.records[-1].getMessage()


def test_token_file_problems_are_usage_errors(tmp_path, capsys, monkeypatch):
    folder = _leaky_hub(monkeypatch, tmp_path)
    code, _, err = run(capsys, "push", folder, "tester/x", "--token-file", tmp_path / "missing")
    assert code == cli.EXIT_USAGE and "--token-file" in err and "cannot be read" in err
    (tmp_path / "two").write_text("a" * 20 + "\n" + "b" * 20)
    code, _, err = run(capsys, "push", folder, "tester/x", "--token-file", tmp_path / "two")
    assert code == cli.EXIT_USAGE and "alone, on one line" in err


# ---------------------------------------------------------------------------------------------------- --config files
def test_config_file_values_are_overridden_before_validation(tmp_path, capsys, no_model_loading):
    (tmp_path / "nm.json").write_text(json.dumps({"sparsity": 0.7, "pattern": "2:4"}))
    code, out, err = run(capsys, "prune", "-o", tmp_path / "out", "--config", tmp_path / "nm.json", "--sparsity",
                         "0.5", "--print-config")
    assert code == 0, err
    config = PruningConfig.from_dict(json.loads(out))
    assert (config.sparsity, config.pattern) == (0.5, "2:4")


def test_a_bad_value_from_the_config_file_names_the_file_and_the_field(tmp_path, capsys, no_model_loading):
    (tmp_path / "nm.json").write_text(json.dumps({"sparsity": 0.7, "pattern": "2:4"}))
    code, _, err = run(capsys, "prune", "-o", tmp_path / "out", "--config", tmp_path / "nm.json")
    assert code == cli.EXIT_USAGE
    assert f"'sparsity', 'pattern' come from --config {tmp_path / 'nm.json'}: fix them there" in err
    assert "(fix --sparsity)" not in err
    # A flag that does not fix it is named as a flag, the file's value as the file's.
    code, _, err = run(capsys, "prune", "-o", tmp_path / "out", "--config", tmp_path / "nm.json", "--pattern", "4:8")
    assert code == cli.EXIT_USAGE
    assert "fix --pattern; 'sparsity' comes from --config" in err and "override with --sparsity" in err
    (tmp_path / "few.json").write_text(json.dumps({"num_samples": -1}))
    code, _, err = run(capsys, "prune", "-o", tmp_path / "out", "--config", tmp_path / "few.json")
    assert code == cli.EXIT_USAGE and f"'num_samples' comes from --config {tmp_path / 'few.json'}" in err


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfe{", "not UTF-8 text"),
    (b"{sparsity: 0.5}", "not valid JSON"),
    (b"[0.5]", "holds a JSON list, not an object of PruningConfig fields"),
    (b'{"pruning_config": "wanda"}', "its 'pruning_config' is a JSON str"),
])
def test_an_unreadable_config_file_is_named(content, says, tmp_path, capsys, no_model_loading):
    (tmp_path / "bad.json").write_bytes(content)
    code, _, err = run(capsys, "prune", "-o", tmp_path / "out", "--config", tmp_path / "bad.json")
    assert code == cli.EXIT_USAGE
    assert err.startswith(f"hf-recon-prune prune: error: --config {tmp_path / 'bad.json'}: {says}")


def test_a_model_config_without_pruning_config_is_refused(assets, capsys, no_model_loading):
    for source in (os.path.join(assets["model"], "config.json"), assets["model"]):
        code, out, err = run(capsys, "prune", "-o", "unused", "--config", source, "--print-config")
        assert code == cli.EXIT_USAGE and out == ""
        assert f"--config {source}" in err and "a model's config.json without 'pruning_config'" in err


# ---------------------------------------------------------------------------------------------------- output folders
@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--stream-folder", "--self-gen-cache-dir"])
@pytest.mark.parametrize("where", ["same", "output inside", "inside output"])
def test_output_apart_from_the_runs_own_folders_is_checked_before_loading(flag, where, tmp_path, capsys,
                                                                         no_model_loading):
    output, folder = {"same": ("run", "run"), "output inside": ("run/model", "run"),
                      "inside output": ("run", "run/work")}[where]
    code, _, err = run(capsys, "prune", "-o", tmp_path / output, flag, tmp_path / folder, "--no-eval")
    assert code == cli.EXIT_USAGE
    assert f"--output {tmp_path / output} and {flag} {tmp_path / folder}: " in err
    assert {"same": "they are the same folder", "output inside": f"--output lies inside {flag}",
            "inside output": f"{flag} lies inside --output"}[where] in err
    assert not (tmp_path / "run").exists()


def test_a_save_error_at_the_end_names_the_flags(assets, tmp_path, capsys, monkeypatch):
    from hf_recon_prune.pruner import Pruner

    def refuse(self, save_directory, **kwargs):
        raise FileExistsError(f"refusing to replace {save_directory}: it changed meanwhile; choose another "
                              "save_directory, or pass overwrite=True (--overwrite) to replace it")

    monkeypatch.setattr(Pruner, "save_pretrained", refuse)
    code, _, err = run(capsys, "prune", "--model", assets["model"], "-o", tmp_path / "out", "--no-eval", "--method",
                       "magnitude", "--reconstruction", "none", "--calibration", assets["text"], "--num-samples", "2",
                       "--seq-len", "16", "--device", "cpu")
    assert code == cli.EXIT_USAGE
    assert "choose another --output, or pass --overwrite to replace it" in err and "save_directory" not in err


# ---------------------------------------------------------------------------------------------------- eval
def _saved_report(folder, error: float):
    folder.mkdir(parents=True)
    PruneReport(model_name="m", family="llama", config=PruningConfig().to_dict(), blocks=[
        BlockReport(index=0, layer_sparsity={"a": 0.5}, error_before={"calibration": 2 * error},
                    error_after={"calibration": error}),
    ], total_seconds=1.0).to_json_file(folder / "prune_report.json")
    return folder


def test_eval_compare_keeps_every_row_when_names_collide(assets, tmp_path, capsys):
    a, b = _saved_report(tmp_path / "a" / "m", 0.25), _saved_report(tmp_path / "b" / "m", 0.5)
    protocol = ["--eval-source", assets["text"], "--eval-seq-len", "16", "--eval-windows", "2"]
    code, out, err = run(capsys, "eval", "--model", assets["model"], *protocol, "--compare", a, b,
                         "--json", tmp_path / "tiny-llama.json")
    assert code == 0, err
    rows = {row["name"]: row["values"] for row in json.loads(out)["comparison"]["rows"]}
    assert list(rows) == ["tiny-llama", "a/m", "b/m"]
    assert rows["a/m"]["error_calibration"] == 0.25 and rows["b/m"]["error_calibration"] == 0.5

    # The model again, against its own earlier result of the same name: both rows, the fresh one first.
    code, out, err = run(capsys, "eval", "--model", assets["model"], *protocol[:-1], "1", "--compare",
                         tmp_path / "tiny-llama.json", b, b, "--markdown", tmp_path / "table.md")
    assert code == 0, err
    parent, here = os.path.basename(os.path.dirname(assets["model"])), tmp_path.name
    names = [row["name"] for row in json.loads(out)["comparison"]["rows"]]
    assert names == [f"{parent}/tiny-llama", f"{here}/tiny-llama", "m", "m (2)"]
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in names)


@pytest.fixture
def tiny_task_folder(tmp_path):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_task.yaml").write_text(
        "task: tiny_task\ndataset_path: json\ndataset_kwargs:\n  data_files: tiny.jsonl\noutput_type: "
        "multiple_choice\ntest_split: train\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    return folder


def test_an_unknown_task_is_refused_before_loading(tiny_task_folder, capsys, no_model_loading):
    code, _, err = run(capsys, "eval", "--tasks", "tiny_task,tiny_tsak", "--no-perplexity", "--include-path",
                       tiny_task_folder, "--no-default-tasks")
    assert code == cli.EXIT_USAGE
    assert "--tasks: unknown task 'tiny_tsak'" in err and "did you mean 'tiny_task'?" in err
    assert f"lm-eval ls tasks --include_path {tiny_task_folder}" in err


# ---------------------------------------------------------------------------------------------------- prune's eval
def test_prune_records_a_limited_number_of_evaluation_windows(assets, tmp_path, capsys):
    code, out, err = run(capsys, "prune", "--model", assets["model"], "-o", tmp_path / "out", "--method", "magnitude",
                         "--reconstruction", "none", "--calibration", assets["text"], "--num-samples", "2",
                         "--seq-len", "16", "--device", "cpu", "--eval-source", assets["text"], "--eval-seq-len",
                         "16", "--eval-windows", "3")
    assert code == 0, err
    assert re.search(r"perplexity measured on\s+\S*corpus\.txt \(test, seq_len 16, first 3 windows\)\n", out)
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["perplexity"]["corpus.txt"]["windows"] == 3


def test_a_whole_split_scored_by_prune_and_by_eval_shares_one_comparison_column(assets, tmp_path, capsys):
    """Without --eval-windows prune records the count it scored, as eval does, so the two results of one protocol
    are one column of the comparison, not two."""
    protocol = ["--eval-source", assets["text"], "--eval-seq-len", "16"]
    code, out, err = run(capsys, "prune", "--model", assets["model"], "-o", tmp_path / "out", "--method", "magnitude",
                         "--reconstruction", "none", "--calibration", assets["text"], "--num-samples", "2",
                         "--seq-len", "16", "--device", "cpu", *protocol)
    assert code == 0, err
    assert re.search(r"perplexity measured on\s+\S*corpus\.txt \(test, seq_len 16\)\n", out)  # not "first N"
    recorded = json.loads((tmp_path / "out" / "prune_report.json").read_text())["perplexity"]["corpus.txt"]
    code, out, err = run(capsys, "eval", "--model", assets["model"], *protocol, "--compare", tmp_path / "out")
    assert code == 0, err
    result = json.loads(out)
    assert recorded["windows"] == result["perplexity"]["windows"] > 1
    columns = [c["key"] for c in result["comparison"]["columns"] if c["kind"] == "perplexity"]
    assert columns == ["ppl:corpus.txt"] and not result["comparison"]["notes"]
    rows = {row["name"]: row["values"][columns[0]] for row in result["comparison"]["rows"]}
    assert rows["dense"] == pytest.approx(recorded["dense"]) and rows["out"] == pytest.approx(recorded["pruned"])
    assert rows["tiny-llama"] == pytest.approx(recorded["dense"], rel=1e-5)  # the dense model measured again


def test_local_files_of_one_name_share_a_column_and_a_note_says_when_they_are_several():
    from hf_recon_prune import EvalResults, compare

    def entry(value):
        return {"split": "test", "seq_len": 16, "windows": 4, "value": value}

    table = compare({"a": EvalResults(model="a", perplexity={"/data/x/corpus.txt": entry(10.0)}),
                     "b": EvalResults(model="b", perplexity={"/data/y/corpus.txt": entry(12.0)}),
                     "c": EvalResults(model="c", perplexity={"corpus.txt": entry(11.0)})})
    assert [c["key"] for c in table.columns if c["kind"] == "perplexity"] == ["ppl:corpus.txt"]
    assert [row["values"]["ppl:corpus.txt"] for row in table.rows] == [10.0, 12.0, 11.0]
    assert table.notes == ["perplexity on corpus.txt comes from 2 local files of that name in different folders, "
                           "shown in one column"]
    one_file = compare({"a": EvalResults(model="a", perplexity={"/data/x/corpus.txt": entry(10.0)}),
                        "c": EvalResults(model="c", perplexity={"corpus.txt": entry(11.0)})})
    assert not one_file.notes and len([c for c in one_file.columns if c["kind"] == "perplexity"]) == 1


def test_prune_saves_before_evaluating_the_pruned_model(assets, tmp_path, capsys, monkeypatch):
    """The pruned model's evaluation comes after the save: interrupted there, the pruned model is on disk (its card
    without perplexity); finished, the card and report are rewritten with the measured perplexity."""
    import transformers

    from hf_recon_prune.cli import commands

    real, calls = commands._perplexity, []

    def interrupted(model, tokenizer, args):
        calls.append(os.path.isfile(tmp_path / "out" / "model.safetensors"))
        if len(calls) == 2:  # the pruned model's evaluation
            raise KeyboardInterrupt
        return real(model, tokenizer, args)

    monkeypatch.setattr(commands, "_perplexity", interrupted)
    argv = ["prune", "--model", assets["model"], "-o", tmp_path / "out", "--method", "magnitude", "--reconstruction",
            "none", "--calibration", assets["text"], "--num-samples", "2", "--seq-len", "16", "--device", "cpu",
            "--eval-source", assets["text"], "--eval-seq-len", "16", "--eval-windows", "2"]
    code, out, err = run(capsys, *argv)
    assert code == cli.EXIT_INTERRUPTED and calls == [False, True]  # dense before pruning; the save came first
    assert "the evaluation did not finish: the pruned model is saved in" in err
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["perplexity"] == {} and report["mean_sparsity"] == pytest.approx(0.5)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None

    monkeypatch.setattr(commands, "_perplexity", real)
    code, out, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    measured = json.loads((tmp_path / "out" / "prune_report.json").read_text())["perplexity"]["corpus.txt"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{measured['pruned']:.2f}" in card and measured["windows"] == 2
    assert not [name for name in os.listdir(tmp_path / "out") if ".tmp-" in name]


def test_the_eval_label_says_first_windows_only_when_the_limit_cut_the_split():
    from argparse import Namespace

    from hf_recon_prune.cli.commands import _eval_label, _limited_windows

    args = Namespace(eval_source="wikitext2", eval_split="test", eval_seq_len=2048, eval_windows=32)
    assert _limited_windows(args, 32) == 32 and _limited_windows(args, 20) is None  # 20: the whole split
    assert _limited_windows(Namespace(eval_windows=None), 140) is None
    assert _eval_label(args, 32) == "wikitext2 (test, seq_len 2048, first 32 windows)"
    assert _eval_label(args, 1) == "wikitext2 (test, seq_len 2048, first window)"
    assert _eval_label(args, None) == "wikitext2 (test, seq_len 2048)"


# ---------------------------------------------------------------------------------------------------- generate
def test_generate_calibration_refuses_a_folder_as_output(tmp_path, capsys, no_model_loading):
    code, _, err = run(capsys, "generate-calibration", "--output", tmp_path, "--num-samples", "2", "--seq-len", "8")
    assert code == cli.EXIT_USAGE
    assert f"--output {tmp_path}: is a folder; give the JSONL file to write" in err


def test_generate_calibration_takes_the_static_cache_setting(tmp_path, capsys, monkeypatch):
    import hf_recon_prune.calibration
    import hf_recon_prune.models

    seen = {}

    def generate(model, tokenizer, num_samples, seq_len, **kwargs):
        seen.update(kwargs)
        from types import SimpleNamespace

        return SimpleNamespace(texts=["w1"] * num_samples, from_cache=False)

    monkeypatch.setattr(hf_recon_prune.models, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(hf_recon_prune.calibration, "generate_self_calibration", generate)
    monkeypatch.setattr(hf_recon_prune.calibration, "save_texts_jsonl", lambda data, path: None)
    for flag, value, expected in (("--self-gen-static-cache", "false", False), ("--static-cache", "true", True),
                                  (None, None, "auto")):
        seen.clear()
        argv = [flag, value] if flag else []
        code, _, err = run(capsys, "generate-calibration", "-o", tmp_path / "g.jsonl", "--num-samples", "2", *argv)
        assert code == 0, err
        assert repr(seen["static_cache"]) == repr(expected)
    code, _, err = run(capsys, "generate-calibration", "-o", tmp_path / "g.jsonl", "--self-gen-static-cache", "maybe")
    assert code == cli.EXIT_USAGE and "--self-gen-static-cache maybe: give true, false or auto" in err


def test_prune_reads_the_samples_generate_calibration_cached(assets, tmp_path, capsys):
    """What docs/how-to/self-generated-calibration.md shows: the same count, --seq-len and --seed share the cache."""
    code, out, err = run(capsys, "generate-calibration", "--model", assets["model"], "--num-samples", "3",
                         "--seq-len", "16", "--batch-size", "3", "--output", tmp_path / "self.jsonl", "--cache-dir",
                         tmp_path / "cache")
    assert code == 0 and "(read from the cache)" not in out, err
    code, out, err = run(capsys, "prune", "--model", assets["model"], "-o", tmp_path / "out", "--no-eval",
                         "--reconstruction", "lr,br", "--br-epochs", "1", "--calibration", assets["text"],
                         "--num-samples", "2", "--seq-len", "16", "--num-self-samples", "3", "--self-gen-cache-dir",
                         tmp_path / "cache", "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["calibration"]["self_generation"]["from_cache"] is True


# ---------------------------------------------------------------------------------------------------- push retry
def test_the_retry_command_keeps_the_token_file_and_commit_message(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "token").write_text(TOKEN + "\n")
    hub = start_stand_in_hub(monkeypatch, tmp_path, fail={"commit": 500})
    try:
        code, _, err = run(capsys, "push", folder, "tester/broken", "--token-file", tmp_path / "token",
                           "--commit-message", "first try, 50%")
    finally:
        hub.stop()
    assert code == cli.EXIT_FAILURE
    assert (f"Retry with: hf-recon-prune push {folder} tester/broken --token-file {tmp_path / 'token'} "
            "--commit-message 'first try, 50%'") in err
    assert TOKEN not in err


def test_preflight_refuses_before_the_dense_perplexity_is_measured(assets, tmp_path, capsys, monkeypatch):
    import hf_recon_prune.cli.commands as commands

    measured = []
    monkeypatch.setattr(commands, "_perplexity", lambda *a, **k: measured.append(1) or (1.0, 1))
    code, _, err = run(capsys, "prune", "--model", assets["model"], "--calibration", assets["text"],
                       "--include-modules", "q_prj", "--output", tmp_path / "out")
    assert code == cli.EXIT_USAGE and "no weight is left to prune" in err and "include_modules=['q_prj']" in err
    assert measured == [] and not (tmp_path / "out").exists()


def test_list_flags_split_only_at_commas_outside_a_regexs_brackets():
    from hf_recon_prune.cli.arguments import _config_from_args, build_parser

    args = build_parser().parse_args(["prune", "--include-modules", r"layers\.[0-9]{1,2},mlp", "--sparsity-overrides",
                                      r"proj{1,2}=0.3,(q|k)_proj=0.2", "--output", "x"])
    config = _config_from_args(args)
    assert config.include_modules == [r"layers\.[0-9]{1,2}", "mlp"]
    assert config.sparsity_overrides == {"proj{1,2}": 0.3, "(q|k)_proj": 0.2}


def test_info_shows_a_config_it_cannot_validate_and_names_unreadable_files(tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    stored = {"method": "row-relative-magnitude", "sparsity": 0.5}  # a criterion registered only in the user's code
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "pruning_config": stored}))
    code, out, _ = run(capsys, "info", folder)
    assert code == cli.EXIT_OK and "not readable as a PruningConfig here" in out and '"row-relative-magnitude"' in out
    (folder / "prune_report.json").write_text("{not json")
    code, _, err = run(capsys, "info", folder)
    assert code == cli.EXIT_USAGE and "prune_report.json cannot be read as JSON" in err
    code, _, err = run(capsys, "info", tmp_path / "missing")
    assert code == cli.EXIT_USAGE and "does not exist" in err


def test_evaluation_windows_beyond_the_models_positions_are_refused(assets, tmp_path, capsys):
    # the tiny model has max_position_embeddings=128
    code, _, err = run(capsys, "eval", "--model", assets["model"], "--eval-source", assets["text"],
                       "--eval-seq-len", "129")
    assert code == cli.EXIT_USAGE and "--eval-seq-len 129" in err and "max_position_embeddings=128" in err
    code, _, err = run(capsys, "prune", "--model", assets["model"], "--calibration", assets["text"],
                       "--num-samples", "4", "--seq-len", "16", "--eval-seq-len", "200", "--output", tmp_path / "out")
    assert code == cli.EXIT_USAGE and "--eval-seq-len 200" in err and not (tmp_path / "out").exists()

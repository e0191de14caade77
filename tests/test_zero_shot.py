"""Zero-shot evaluation through the real lm-evaluation-harness, the evaluation entry point, report, card, comparison.

The harness runs a multiple-choice task defined in tests/data/zero_shot (a task YAML and a JSONL file read through
the datasets "json" builder) on a tiny Llama built from a config, with a word-level tokenizer; its accuracy is
checked against the same log-likelihood comparison computed here directly with the model.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import sys

import numpy as np
import pytest
import torch
import transformers

from conftest import make_tiny_model, random_ids
from hf_recon_prune.config import PruningConfig
from hf_recon_prune.evaluation import EvalResults, compare, evaluate, perplexity, perplexity_of_ids
from hf_recon_prune.report import BlockReport, PruneReport
from hf_recon_prune.zero_shot import (
    PAPER_TASKS, TaskScore, ZeroShotResults, evaluate_zero_shot, get_task_manager, parse_harness_output,
)

TASK = "hfrp_tiny_mc"
TASK_DIR = os.path.join(os.path.dirname(__file__), "data", "zero_shot")
DATA_FILE = os.path.join(TASK_DIR, "tiny_mc.jsonl")
WORD = re.compile(r"\w+|[^\w\s]+")  # the tokenizer's Whitespace pre-tokenizer splits the same way


def load_docs() -> list[dict]:
    with open(DATA_FILE, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def build_vocab() -> dict[str, int]:
    words = set(WORD.findall("Question: Answer:"))
    for doc in load_docs():
        for text in [doc["question"], *doc["choices"]]:
            words.update(WORD.findall(text))
    vocab = {"<unk>": 0, "</s>": 1}
    for word in sorted(words):
        vocab[word] = len(vocab)
    return vocab


VOCAB = build_vocab()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def ids_of(text: str) -> list[int]:
    return [VOCAB[word] for word in WORD.findall(text)]


@torch.no_grad()
def reference_loglikelihoods(model, docs) -> list[list[float]]:
    """Per document, each choice's summed log-probability of its tokens after the task's prompt (float64)."""
    rows = []
    for doc in docs:
        context = ids_of(f"Question: {doc['question']}\nAnswer:")
        lls = []
        for choice in doc["choices"]:
            continuation = ids_of(choice)
            logits = model(torch.tensor([context + continuation])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            lls.append(sum(float(logp[len(context) + i - 1, token]) for i, token in enumerate(continuation)))
        rows.append(lls)
    return rows


def reference_accuracy(docs, lls) -> dict[str, float]:
    acc = [int(np.argmax(row)) == doc["label"] for doc, row in zip(docs, lls)]
    norm = [int(np.argmax(np.array(row) / [len(c) for c in doc["choices"]])) == doc["label"]
            for doc, row in zip(docs, lls)]
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(norm))}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Runs with the task folder as working directory (data_files is relative) and a private datasets cache."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is installed by the dev extra")
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(TASK_DIR)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
        # Only the task folder is indexed: the harness's own ~10k task configs take many seconds to index.
        yield get_task_manager(TASK_DIR, include_defaults=False)


@pytest.fixture(scope="module")
def pruned_run(harness):
    """Dense and 50%-magnitude-pruned tiny Llama, each measured with ``evaluate``; the run's report."""
    from hf_recon_prune.pruner import Pruner

    tokenizer = tiny_tokenizer()
    model = make_tiny_model("llama", seed=0)
    windows = random_ids(4, 16, seed=3)
    measure = dict(perplexity={"random-ids": windows}, zero_shot=[TASK], task_manager=harness, zero_shot_batch_size=4)
    dense_results = evaluate(model, tokenizer, model_name="tiny-dense", **measure)
    dense_model = copy.deepcopy(model)
    config = PruningConfig(method="magnitude", sparsity=0.5, reconstruction=[], num_samples=4, seq_len=8,
                           device="cpu", calibration="default")
    pruner = Pruner(model, config, calibration_data=random_ids(4, 8, seed=5), show_progress=False)
    report = pruner.prune()
    pruned_results = evaluate(model, tokenizer, report=report, model_name="tiny-magnitude-50", **measure)
    report.record_evaluation(dense_results, role="dense")
    report.record_evaluation(pruned_results, role="pruned")
    return dict(tokenizer=tokenizer, dense_model=dense_model, model=model, windows=windows, config=config,
                report=report, dense=dense_results, pruned=pruned_results)


# ====================================================================================================== harness
def test_harness_accuracy_matches_direct_loglikelihood_comparison(harness):
    tokenizer = tiny_tokenizer()
    model = make_tiny_model("llama", seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    random.seed(7)
    expected_draw = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(7)

    results = evaluate_zero_shot(model, tokenizer, tasks=[TASK], batch_size=3, task_manager=harness,
                                 return_samples=True)

    docs = load_docs()
    reference = reference_loglikelihoods(model, docs)
    score = results.tasks[TASK]
    assert score.num_samples == len(docs)
    by_doc = {s["doc_id"]: s["loglikelihoods"] for s in score.samples}
    for doc_id, lls in enumerate(reference):
        np.testing.assert_allclose(by_doc[doc_id], lls, rtol=0, atol=1e-4)
    expected = reference_accuracy(docs, reference)
    assert score.metrics["acc"] == pytest.approx(expected["acc"], abs=1e-12)
    assert score.metrics["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-12)
    assert score.metric == "acc" and score.value == score.metrics["acc"]
    assert score.stderr == pytest.approx(np.std([int(np.argmax(r)) == d["label"] for d, r in zip(docs, reference)],
                                                ddof=1) / np.sqrt(len(docs)))
    assert score.dataset == {"path": "json", "name": None, "split": "test"}
    assert results.mean == score.value and results.num_fewshot == 0

    # The caller's model, tokenizer and random generators are as they were.
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert tokenizer.pad_token is None
    draw = (torch.rand(3), random.random())
    assert torch.equal(draw[0], expected_draw[0]) and draw[1] == expected_draw[1]

    normalised = evaluate_zero_shot(model, tokenizer, tasks=TASK, task_manager=harness, metric="acc_norm")
    assert normalised.tasks[TASK].metric == "acc_norm"
    assert normalised.mean == pytest.approx(expected["acc_norm"], abs=1e-12)


def test_evaluate_measures_pruned_model_and_reports_errors(pruned_run):
    docs = load_docs()
    for key, model in (("dense", pruned_run["dense_model"]), ("pruned", pruned_run["model"])):
        expected = reference_accuracy(docs, reference_loglikelihoods(model, docs))
        metrics = pruned_run[key].zero_shot.tasks[TASK].metrics
        assert metrics["acc"] == pytest.approx(expected["acc"], abs=1e-12)
        assert metrics["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-12)
        assert pruned_run[key].perplexity["random-ids"]["value"] == pytest.approx(
            perplexity_of_ids(model, pruned_run["windows"]), rel=1e-6)
    dense, pruned, report = pruned_run["dense"], pruned_run["pruned"], pruned_run["report"]
    assert dense.sparsity == pytest.approx(0.0) and pruned.sparsity == pytest.approx(0.5, abs=1e-3)
    assert dense.reconstruction is None
    last = report.blocks[-1]
    assert pruned.reconstruction["block"] == last.index
    assert pruned.reconstruction["final"]["calibration"]["after"] == last.error_after["calibration"]
    assert EvalResults.from_dict(json.loads(json.dumps(pruned.to_dict()))).to_dict() == pruned.to_dict()


def test_results_flow_into_report_and_model_card(pruned_run, tmp_path):
    from huggingface_hub import ModelCard

    from hf_recon_prune.hub import save_pruned_model

    report, dense, pruned = pruned_run["report"], pruned_run["dense"], pruned_run["pruned"]
    dense_acc = dense.zero_shot.tasks[TASK].metrics["acc"]
    pruned_acc = pruned.zero_shot.tasks[TASK].metrics["acc"]
    entry = report.zero_shot["tasks"][TASK]
    assert entry["metric"] == "acc" and entry["num_samples"] == len(load_docs())
    assert entry["dense"]["acc"] == dense_acc and entry["pruned"]["acc"] == pruned_acc
    assert report.zero_shot_mean("pruned") == pruned_acc and report.zero_shot_mean("dense") == dense_acc
    assert report.perplexity["random-ids"]["dense"] == dense.perplexity["random-ids"]["value"]
    assert report.perplexity["random-ids"]["pruned"] == pruned.perplexity["random-ids"]["value"]
    assert "zero-shot mean accuracy over 1 tasks" in report.summary()
    assert PruneReport.from_dict(json.loads(json.dumps(report.to_dict()))).zero_shot == report.zero_shot

    folder = save_pruned_model(pruned_run["model"], tmp_path / "tiny-sparse", pruned_run["config"],
                               tokenizer=pruned_run["tokenizer"], report=report, base_model="org/tiny-llama")
    card = ModelCard.load(os.path.join(folder, "README.md"))
    results = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
    acc = results[(TASK, "acc")]
    assert acc.metric_value == pytest.approx(pruned_acc, abs=1e-4)
    assert acc.task_type == "text-generation" and acc.dataset_split == "test"
    assert acc.dataset_args == {"num_few_shot": 0}
    assert results[(TASK, "acc_dense_baseline")].metric_value == pytest.approx(dense_acc, abs=1e-4)
    assert results[(TASK, "acc_norm")].metric_value == pytest.approx(
        pruned.zero_shot.tasks[TASK].metrics["acc_norm"], abs=1e-4)
    ppl = results[("random-ids", "perplexity")]
    assert ppl.metric_value == pytest.approx(pruned.perplexity["random-ids"]["value"], rel=1e-4)
    assert ppl.metric_args == {"seq_len": 16, "windows": pruned.perplexity["random-ids"]["windows"]}
    heldout_or_calibration = [r for r in card.data.eval_results if r.metric_type.startswith("reconstruction_error_")]
    assert heldout_or_calibration
    for r in heldout_or_calibration:
        samples = r.metric_type.rsplit("_", 1)[-1]
        assert r.metric_value == pytest.approx(report.blocks[-1].error_after[samples], rel=1e-5)
        # The run's calibration data were token ids handed over directly: no Hub dataset to point to.
        assert (r.dataset_type, r.dataset_name) == ("custom", "user-provided token ids")
    row = f"| {TASK} | acc | {100 * dense_acc:.2f} | {100 * pruned_acc:.2f} | {100 * (pruned_acc - dense_acc):+.2f} |"
    assert row in card.text
    assert "## Quality before and after pruning" in card.text


def test_cli_eval_runs_zero_shot_on_a_saved_model(pruned_run, tmp_path, capsys):
    from hf_recon_prune import cli

    folder = tmp_path / "dense"
    pruned_run["dense_model"].save_pretrained(folder)
    pruned_run["tokenizer"].save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(load_docs()[0]["question"] for _ in range(40)), encoding="utf-8")
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--model", str(folder), "--dtype", "float32", "--tasks", TASK,
                     "--include-path", TASK_DIR, "--no-default-tasks", "--zero-shot-batch-size", "4",
                     "--eval-source", str(text), "--eval-seq-len", "16", "--json", str(out)])
    assert code == 0
    written = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed == written
    expected = pruned_run["dense"].zero_shot.tasks[TASK].metrics
    assert written["results"]["zero_shot"]["tasks"][TASK]["metrics"]["acc"] == pytest.approx(expected["acc"])
    assert written["zero_shot_mean"] == pytest.approx(expected["acc"])
    assert written["perplexity"]["value"] > 1.0

    # The same model again, zero-shot only, side by side with the first run's JSON.
    markdown = tmp_path / "table.md"
    code = cli.main(["eval", "--model", str(folder), "--dtype", "float32", "--tasks", TASK, "--no-perplexity",
                     "--include-path", TASK_DIR, "--no-default-tasks", "--compare", str(out),
                     "--markdown", str(markdown)])
    assert code == 0
    again = json.loads(capsys.readouterr().out)
    assert "perplexity" not in again
    rows = {r["name"]: r["values"] for r in again["comparison"]["rows"]}
    assert set(rows) == {"dense", "eval"}
    assert rows["dense"][f"zs:{TASK}"] == rows["eval"][f"zs:{TASK}"] == pytest.approx(expected["acc"])
    column = f"ppl:{os.path.basename(text)}"  # a local file's column is its file name, what a saved card publishes
    assert rows["eval"][column] == written["perplexity"]["value"] and rows["dense"][column] is None
    table = markdown.read_text()
    assert f"| dense | 0.00 | – | {100 * expected['acc']:.2f} | {100 * expected['acc']:.2f} |" in table


# ====================================================================================================== missing extra
def test_missing_harness_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    model, tokenizer = make_tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ImportError, match=r"pip install 'hf-recon-prune\[eval\]'"):
        evaluate_zero_shot(model, tokenizer, tasks=[TASK])
    with pytest.raises(ImportError, match=r"hf-recon-prune\[eval\]"):
        evaluate(model, tokenizer, zero_shot=True)


def test_cli_missing_harness_fails_before_loading_the_model(monkeypatch, capsys):
    from hf_recon_prune import cli
    from hf_recon_prune.cli import commands

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setattr(commands, "_load", lambda args: pytest.fail("the model was loaded before checking lm_eval"))
    assert cli.main(["eval", "--model", "org/any", "--tasks", "paper"]) == 1
    assert "hf-recon-prune[eval]" in capsys.readouterr().err


# ====================================================================================================== units
def test_parse_harness_output_picks_metrics_and_skips_groups():
    output = {
        "results": {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.75, "acc_stderr,none": 0.01,
                         "acc_norm,none": 0.7, "acc_norm_stderr,none": "N/A"},
            "boolq": {"alias": "boolq", "acc,none": 0.6, "acc_stderr,none": 0.02},
            "ai2_arc": {"acc,none": 0.5},  # a group's aggregate
        },
        "configs": {"arc_easy": {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", "test_split": "test"},
                    "boolq": {"dataset_path": "aps/super_glue", "dataset_name": "boolq",
                              "validation_split": "validation"}},
        "n-samples": {"arc_easy": {"original": 2376, "effective": 2376}, "boolq": {"original": 3270, "effective": 100}},
        "versions": {"arc_easy": 1.0, "boolq": 2},
    }
    parsed = parse_harness_output(output, metric="acc_norm", limit=100)
    assert list(parsed.tasks) == ["arc_easy", "boolq"]
    arc, boolq = parsed.tasks["arc_easy"], parsed.tasks["boolq"]
    assert (arc.metric, arc.value, arc.stderr) == ("acc_norm", 0.7, None)
    assert (boolq.metric, boolq.value, boolq.stderr, boolq.num_samples) == ("acc", 0.6, 0.02, 100)
    assert boolq.dataset == {"path": "aps/super_glue", "name": "boolq", "split": "validation"}
    assert arc.version == "1.0"
    assert parsed.mean == pytest.approx((0.7 + 0.6) / 2)
    table = parsed.to_markdown()
    assert "| arc_easy | acc_norm | 70.00 | – | 2376 |" in table and "| **mean** | | **65.00** | | |" in table
    assert ZeroShotResults.from_dict(parsed.to_dict()).to_dict() == parsed.to_dict()


def zs(values: dict[str, float], **kwargs) -> ZeroShotResults:
    return ZeroShotResults(tasks={t: TaskScore(task=t, metric="acc", value=v, metrics={"acc": v})
                                  for t, v in values.items()}, **kwargs)


def test_compare_side_by_side_json_and_markdown():
    dense = EvalResults(model="dense", sparsity=0.0, zero_shot=zs({"boolq": 0.75, "rte": 0.65}),
                        perplexity={"wikitext2": {"split": "test", "seq_len": 2048, "windows": 10, "value": 5.68}})
    sparsegpt = EvalResults(model="m", sparsity=0.5, zero_shot=zs({"boolq": 0.72, "rte": 0.55}),
                            perplexity={"wikitext2": {"split": "test", "seq_len": 2048, "windows": 10, "value": 7.2}},
                            reconstruction={"block": 31, "final": {"calibration": {"before": 0.6, "after": 0.4},
                                                                   "heldout": {"before": 2.4, "after": 2.5}}})
    partial = EvalResults(model="m2", sparsity=0.5, zero_shot=zs({"boolq": 0.7}))
    table = compare({"dense": dense, "SparseGPT+BR": sparsegpt, "Wanda": partial})
    data = json.loads(table.to_json())
    assert [r["name"] for r in data["rows"]] == ["dense", "SparseGPT+BR", "Wanda"]
    assert [c["key"] for c in data["columns"]] == ["sparsity", "error_calibration", "error_heldout",
                                                   "ppl:wikitext2", "zs:boolq", "zs:rte", "zs:mean"]
    assert table.value("SparseGPT+BR", "zs:mean") == pytest.approx((0.72 + 0.55) / 2)
    assert table.value("Wanda", "zs:mean") is None  # not a mean over fewer tasks
    assert table.value("SparseGPT+BR", "error_heldout") == 2.5
    markdown = table.to_markdown()
    assert markdown.splitlines()[0] == ("| model | sparsity (%) | error calib. | error held-out | ppl wikitext2 | "
                                        "boolq (acc) | rte (acc) | zero-shot mean |")
    assert "| SparseGPT+BR | 50.00 | 0.4 | 2.5 | 7.20 | 72.00 | 55.00 | 63.50 |" in markdown
    assert "| Wanda | 50.00 | – | – | – | 70.00 | – | – |" in markdown


def test_compare_takes_reports_and_files_with_their_dense_baseline(tmp_path):
    report = PruneReport(model_name="org/m", family="llama", config={},
                         blocks=[BlockReport(index=0, layer_sparsity={"q": 0.5},
                                             error_before={"calibration": 0.2}, error_after={"calibration": 0.1})])
    report.record_evaluation(EvalResults(zero_shot=zs({"boolq": 0.75})), role="dense")
    report.record_evaluation(EvalResults(zero_shot=zs({"boolq": 0.7})), role="pruned")
    path = tmp_path / "prune_report.json"
    report.to_json_file(path)
    other = EvalResults(model="x", zero_shot=zs({"boolq": 0.6}))
    other_path = tmp_path / "other.json"
    other.to_json_file(other_path)
    table = compare({"magnitude": str(tmp_path), "wanda": str(other_path)})
    assert [r["name"] for r in table.rows] == ["dense", "magnitude", "wanda"]
    assert table.value("dense", "zs:boolq") == 0.75 and table.value("magnitude", "zs:boolq") == 0.7
    assert table.value("magnitude", "error_calibration") == 0.1 and table.value("magnitude", "sparsity") == 0.5
    assert compare({"magnitude": report}, include_dense=False).rows[0]["name"] == "magnitude"


def test_record_evaluation_drops_a_baseline_measured_differently():
    report = PruneReport(model_name="m", family="llama", config={})
    report.record_perplexity_value("wikitext2", 5.0, role="dense", split="test", seq_len=2048)
    report.record_perplexity_value("wikitext2", 7.0, role="pruned", split="test", seq_len=2048)
    assert report.perplexity["wikitext2"] == {"split": "test", "seq_len": 2048, "dense": 5.0, "pruned": 7.0}
    with pytest.warns(UserWarning, match="dense value was measured with a different seq_len"):
        report.record_perplexity_value("wikitext2", 8.0, role="pruned", split="test", seq_len=512)
    assert "dense" not in report.perplexity["wikitext2"]
    assert "dense not measured -> pruned 8.000" in report.summary()

    report.record_zero_shot(zs({"boolq": 0.7}), role="dense")
    with pytest.warns(UserWarning, match="different settings"):
        report.record_zero_shot(zs({"boolq": 0.6}, num_fewshot=5), role="pruned")
    assert report.zero_shot["tasks"]["boolq"] == {"version": None, "num_samples": None, "metric": "acc",
                                                  "dataset": {}, "pruned": {"acc": 0.6}}
    with pytest.raises(ValueError, match="role"):
        report.record_evaluation(EvalResults(), role="sparse")


def test_evaluate_perplexity_sources_reuse_the_standard_protocol():
    model, tokenizer = make_tiny_model("llama"), tiny_tokenizer()
    texts = [" ".join(doc["question"] for doc in load_docs())] * 3
    windows = random_ids(3, 12, seed=4)
    results = evaluate(model, tokenizer, perplexity={"texts": texts, "ids": windows}, seq_len=8, batch_size=2)
    assert results.perplexity["ids"]["value"] == pytest.approx(perplexity_of_ids(model, windows), rel=1e-6)
    assert results.perplexity["ids"]["windows"] == 3 and results.perplexity["ids"]["seq_len"] == 12
    assert results.perplexity["texts"]["value"] == pytest.approx(
        perplexity(model, tokenizer, source=texts, seq_len=8), rel=1e-6)
    assert results.perplexity["texts"]["source"]["texts"] == 3
    assert results.zero_shot is None and results.sparsity == pytest.approx(0.0)
    with pytest.raises(TypeError, match="mapping"):
        evaluate(model, tokenizer, perplexity=[texts])
    assert len(PAPER_TASKS) == 7

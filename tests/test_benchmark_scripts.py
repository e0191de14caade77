"""The GPU benchmark scripts at tiny CPU settings: they run, and their FLOP model and CR accounting are right."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _benchmark(name: str):
    """Import a script of benchmarks/ (they import each other by plain name, so the folder goes on sys.path)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)


@pytest.fixture(scope="module")
def stage_profile():
    return _benchmark("stage_profile")


def test_stage_profile_flop_model_and_cross_block_medians(stage_profile, tmp_path):
    hidden, intermediate, samples, seq_len = 128, 344, 8, 32
    out = tmp_path / "profile.json"
    assert stage_profile.main([
        "--device", "cpu", "--layers", "3", "--hidden", str(hidden), "--intermediate", str(intermediate),
        "--heads", "4", "--vocab", "256", "--samples", str(samples), "--seq-len", str(seq_len), "--epochs", "1",
        "--recipes", "lr,br+gp+cr", "--out", str(out),
    ]) == 0
    runs = {run["recipe"]: run for run in json.loads(out.read_text())["runs"]}
    assert (tmp_path / "profile.md").is_file()

    # Hand count for one block over T tokens: a forward is T * (2 * linear params + 4 * seq_len * hidden) FLOPs;
    # the statistics pass is one forward plus 2 * T * d_in^2 per distinct linear input (q/k/v share the normed
    # hidden states, o_proj has its own, gate/up share one, down_proj reads the intermediate activations).
    tokens = samples * seq_len
    params = 4 * hidden * hidden + 3 * hidden * intermediate
    forward = tokens * (2 * params + 4 * seq_len * hidden)
    gram = 2 * tokens * (3 * hidden * hidden + intermediate * intermediate)
    assert runs["lr"]["stages"]["statistics"]["flops_per_block"] == forward + gram
    assert runs["lr"]["stages"]["propagation"]["flops_per_block"] == forward
    # BR: forward + backward = 3 forwards per token and epoch (1 epoch here); with CR every block is trained twice.
    assert runs["br+gp+cr"]["stages"]["reconstruction"]["flops_per_block"] == 2 * 3 * 1 * forward

    # With CR the first and last block carry half a window each: the median is over the interior block only.
    cross = runs["br+gp+cr"]
    assert cross["blocks_in_median"] == 1
    interior = cross["blocks"][1]["seconds"]["reconstruction"]
    assert cross["stages"]["reconstruction"]["median_seconds_per_block"] == pytest.approx(interior)
    assert cross["stages"]["reconstruction"]["total_seconds"] == pytest.approx(
        sum(b["seconds"].get("reconstruction", 0.0) for b in cross["blocks"]))


def test_sparsegpt_solver_benchmark_runs_and_its_solvers_agree(tmp_path):
    sparsegpt_solver = _benchmark("sparsegpt_solver")
    out = tmp_path / "solver.json"
    assert sparsegpt_solver.main(["--shapes", "16x64", "--patterns", "unstructured,2:4", "--tokens", "128",
                                  "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["unstructured", "2:4"]
    for row in rows:
        assert row["same_mask"] and row["max_weight_difference"] < 1e-4
        assert row["column_loop_seconds"] > 0 and row["batched_seconds"] > 0
    # the CPU's grouped solve beside one solve a block, for unstructured masks only; the module is left as it was
    assert rows[0]["group_columns"] == 32 and rows[0]["one_solve_a_block_seconds"] > 0
    assert "one_solve_a_block_seconds" not in rows[1]
    from hf_recon_prune.criteria import sparsegpt as sparsegpt_module

    assert sparsegpt_module.SOLVE_GROUP_COLUMNS == {"cpu": 32}


def test_gpu_check_runs_every_location_and_judges_by_the_lr_bar(tmp_path):
    gpu_check = _benchmark("gpu_check")
    out = tmp_path / "check.json"
    # A random tiny model: reconstruction need not beat LR there, so only the agreement across locations is checked.
    gpu_check.main(["--tiny", "--device", "cpu", "--seq-len", "32", "--epochs", "2", "--br-lr", "1e-3",
                    "--dispatch-gpu-memory", "200KB", "--out", str(out)])
    runs = {r["run"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"dense", "lr-only", "br+gp-device", "br+gp-cpu", "br+gp-disk", "br+gp-dispatched"}
    values = {name: r["perplexity"]["tiny_heldout"] for name, r in runs.items() if name.startswith("br+gp")}
    assert max(values.values()) / min(values.values()) - 1 < 1e-4, values
    assert all(r["perplexity"]["block_linear_sparsity"] == pytest.approx(0.5) for n, r in runs.items() if n != "dense")
    # The verdict: a spread above the tolerance and a run not below LR are both named.
    fake = [{"run": "lr-only", "perplexity": {"x": 20.0}}, {"run": "a", "perplexity": {"x": 15.0}},
            {"run": "b", "perplexity": {"x": 15.1}}, {"run": "c", "perplexity": {"x": 21.0}}]
    problems = gpu_check.check(fake, 0.01)
    assert any("differ by 40.00%" in p for p in problems) and any("c 21.000 is not below LR-only" in p for p in problems)
    assert not gpu_check.check(fake[:3], 0.01)


def test_moe_profile_reports_coverage_time_and_sparsity(tmp_path):
    moe_profile = _benchmark("moe_profile")
    out = tmp_path / "moe.json"
    moe_profile.main(["--device", "cpu", "--layers", "2", "--hidden", "64", "--experts", "4", "--top-k", "2",
                      "--moe-intermediate", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                      "--vocab", "256", "--samples", "4", "--seq-len", "16", "--epochs", "1",
                      "--recipes", "lr,br+gp", "--out", str(out)])
    results = json.loads(out.read_text())
    assert [r["recipe"] for r in results["recipes"]] == ["lr", "br+gp"]
    for entry in results["recipes"]:
        assert entry["sparsity_of_pruned_weights"] == pytest.approx(0.5)
        assert entry["block_sparsity"] < 0.5 and entry["left_dense"]["router"] == 2 * 4 * 64
        assert [c["total"] for c in entry["expert_coverage"]] == [4 * 16 * 2] * 2  # every token, top-2
        assert entry["seconds_per_block_median"] > 0 and "masks_lr" in entry["stage_median_seconds"]


def test_lr_sweep_compares_fixed_rates_with_auto_against_the_lr_baseline(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_assets import save_tiny_llama

    lr_sweep = _benchmark("lr_sweep")
    out = tmp_path / "sweep.json"
    results = lr_sweep.main(["--model", save_tiny_llama(tmp_path / "tiny"), "--device", "cpu", "--samples", "6",
                             "--seq-len", "16", "--epochs", "2", "--lrs", "1e-3,auto", "--eval-seq-len", "16",
                             "--eval-windows", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    baseline, fixed, auto = results["runs"]
    assert baseline["reconstruction"] == ["lr"] and [fixed["lr"], auto["lr"]] == [1e-3, "auto"]
    assert auto["chosen_lrs"] and fixed["chosen_lrs"] is None
    for run in (fixed, auto):
        for source, value in run["perplexity"].items():
            gap = baseline["perplexity"][source] - results["dense"][source]
            assert run["gap_closed"][source] == pytest.approx((baseline["perplexity"][source] - value) / gap)


def test_lr_sweep_workers_share_the_runs_and_a_second_invocation_resumes(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_assets import save_tiny_llama

    lr_sweep = _benchmark("lr_sweep")
    out = tmp_path / "sweep.json"
    argv = ["--model", save_tiny_llama(tmp_path / "tiny"), "--device", "cpu", "--samples", "6", "--seq-len", "16",
            "--epochs", "1", "--lrs", "1e-3,auto", "--self-samples", "0,2", "--eval-seq-len", "16",
            "--eval-windows", "2", "--workers", "2", "--out", str(out)]
    results = lr_sweep.main(argv)
    planned = [lr_sweep.run_key(r) for r in lr_sweep.planned_runs(lr_sweep.parse_args(argv))]
    assert [lr_sweep.run_key(r) for r in results["runs"]] == planned and not results["missing"]
    assert len(planned) == 1 + 2 * 2  # the LR baseline, then {0, 2} self samples x {1e-3, auto}
    assert results["self_generation"]["2"]["rows"] == 2
    assert {r["self_samples"] for r in results["runs"]} == {0, 2}
    with_self = [r for r in results["runs"] if r["self_samples"] == 2]
    assert all(r["workers"] == 2 and "gap_closed" in r for r in with_self)

    again = lr_sweep.main(argv)  # everything is done: nothing runs again, the same results come back
    assert again["runs"] == results["runs"]
    lines = (tmp_path / "sweep.work" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(planned)

    # Another work dir (another machine) that adopts these results runs nothing either.
    adopted = lr_sweep.main([*argv[:-2], "--work-dir", str(tmp_path / "elsewhere"), "--resume-from",
                             str(tmp_path / "sweep.work" / "results.jsonl"), "--out", str(tmp_path / "again.json")])
    assert adopted["runs"] == results["runs"]
    assert len((tmp_path / "elsewhere" / "results.jsonl").read_text().splitlines()) == len(planned)
    assert {r["corpus"] for r in results["runs"]} == {results["corpus"]["id"]}

    # A run made on another text (another Python's pydoc_data) is not resumed: it runs again on this one.
    foreign = [json.loads(line) for line in lines]
    foreign[1]["corpus"] = "python-0.0.0/pydoc_data-000000000000"
    (tmp_path / "foreign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in foreign))
    rerun = lr_sweep.main([*argv[:-2], "--work-dir", str(tmp_path / "third"), "--resume-from",
                           str(tmp_path / "foreign.jsonl"), "--out", str(tmp_path / "third.json")])
    assert [lr_sweep.run_key(r) for r in rerun["runs"]] == planned
    assert {r["corpus"] for r in rerun["runs"]} == {results["corpus"]["id"]}

    # The same run made on both texts: this text's is adopted (before 2026-12-04 both were left out and it ran again).
    twice = lines + [json.dumps({**json.loads(lines[1]), "corpus": "python-0.0.0/pydoc_data-000000000000",
                                 "seconds": -1.0})]
    (tmp_path / "twice.jsonl").write_text("".join(line + "\n" for line in twice))
    both = lr_sweep.main([*argv[:-2], "--work-dir", str(tmp_path / "fourth"), "--resume-from",
                          str(tmp_path / "twice.jsonl"), "--out", str(tmp_path / "fourth.json")])
    assert both["runs"] == results["runs"]

    # A sweep told which text to expect stops before loading anything when the running Python has another.
    with pytest.raises(SystemExit, match="python-0.0.0/pydoc_data-000000000000"):
        lr_sweep.main([*argv[:-2], "--work-dir", str(tmp_path / "never"), "--require-corpus",
                       "python-0.0.0/pydoc_data-000000000000", "--out", str(tmp_path / "never.json")])
    assert not (tmp_path / "never").exists()


def test_lr_sweep_generates_the_self_samples_a_later_invocation_adds_into_the_given_cache(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_assets import save_tiny_llama

    lr_sweep = _benchmark("lr_sweep")
    argv = ["--model", save_tiny_llama(tmp_path / "tiny"), "--device", "cpu", "--samples", "6", "--seq-len", "16",
            "--epochs", "1", "--lrs", "1e-3", "--eval-seq-len", "16", "--eval-windows", "2",
            "--work-dir", str(tmp_path / "work"), "--self-gen-cache", str(tmp_path / "carried")]
    first = lr_sweep.main([*argv, "--self-samples", "0", "--out", str(tmp_path / "a.json")])
    assert first["self_generation"] == {} and not (tmp_path / "carried").exists()
    # The same work dir asked for self-generated samples: they are made once, before any run, where asked.
    second = lr_sweep.main([*argv, "--self-samples", "0,2", "--out", str(tmp_path / "b.json")])
    assert second["self_generation"]["2"]["rows"] == 2 and second["self_generation"]["2"]["seconds"] > 0
    assert len(os.listdir(tmp_path / "carried")) == 1
    assert [r["self_samples"] for r in second["runs"]] == [0, 0, 2] and not second["missing"]
    assert "self_gen_cache" not in second["settings"]  # a local path stays out of the results


def test_lr_sweep_deadline_allows_an_auto_run_half_a_fixed_run_more():
    lr_sweep = _benchmark("lr_sweep")
    done = {"a": {"recipe": "br+gp", "self_samples": 0, "lr": 1e-3, "seconds": 100.0},
            "b": {"recipe": "br+gp+cr", "self_samples": 0, "lr": 1e-3, "seconds": 300.0}}
    fixed = {"recipe": "br+gp", "self_samples": 0, "lr": 2e-3}
    auto = {**fixed, "lr": "auto"}
    assert lr_sweep._estimate(fixed, done, 256) == pytest.approx(110.0)
    assert lr_sweep._estimate(auto, done, 256) == pytest.approx(100.0 * 1.5 * 1.1)
    done["c"] = {**auto, "seconds": 120.0}  # a measured auto run counts as it is
    assert lr_sweep._estimate(auto, done, 256) == pytest.approx(150.0 * 1.1)
    # No run with self-generated samples yet: the longest without (c's 120 s; a fixed-rate run counts an auto one as
    # it is), scaled by the rows the loss sees (256 + 256 of 256).
    assert lr_sweep._estimate({**fixed, "self_samples": 256}, done, 256) == pytest.approx(2 * 120.0 * 1.1)
    done["d"] = {**fixed, "self_samples": 256, "seconds": 170.0}
    assert lr_sweep._estimate({**fixed, "self_samples": 256}, done, 256) == pytest.approx(170.0 * 1.1)
    assert lr_sweep._estimate({"recipe": "lr", "self_samples": 0, "lr": None}, done, 256) is None


def test_self_generation_speed_times_every_setting_on_a_random_gqa_model(tmp_path):
    speed = _benchmark("self_generation_speed")
    out = tmp_path / "selfgen.json"
    results = speed.main(["--random", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                          "--kv-heads", "2", "--vocab", "300", "--samples", "3", "--seq-len", "12", "--device", "cpu",
                          "--dtypes", "float32", "--static-cache", "off", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    (run,) = results["runs"]
    assert (run["samples"], run["seq_len"]) == (3, 12) and run["seconds"] > 0
    assert run["candidates_used"] >= 3 and run["candidates_used"] - run["ended_before_seq_len"] == 3


def test_self_generation_speed_step_mode_times_each_batch_size_and_cache(tmp_path):
    speed = _benchmark("self_generation_speed")
    out = tmp_path / "steps.json"
    results = speed.main(["--random", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                          "--kv-heads", "2", "--vocab", "300", "--step-batches", "2,3", "--step-tokens", "8",
                          "--device", "cpu", "--dtypes", "float32", "--static-cache", "off,on",
                          "--compile-backends", "none,cudagraphs", "--dynamic-caches", "preallocated,cat",
                          "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["runs"] == []  # the step mode replaces the timing of the defaults
    rows = results["steps"]
    # every backend with the static cache, none without it; every kind of dynamic cache without it
    assert [(r["static_cache"], r["compile_backend"], r["dynamic_cache"], r["batch"]) for r in rows] == [
        (False, "none", "preallocated", 2), (False, "none", "preallocated", 3), (False, "none", "cat", 2),
        (False, "none", "cat", 3), (True, "none", None, 2), (True, "none", None, 3),
        (True, "cudagraphs", None, 2), (True, "cudagraphs", None, 3)]
    for row in rows:
        assert row["first_call_s"] > 0 and row["ms_per_step"] == pytest.approx(1000 * row["last_call_s"] / 8)


def test_self_generation_speed_profiles_every_cache_setting(tmp_path):
    speed = _benchmark("self_generation_speed")
    out = tmp_path / "selfgen.json"
    speed.main(["--random", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                "--vocab", "300", "--samples", "2", "--profile", "6", "--device", "cpu", "--dtypes", "float32",
                "--static-cache", "on,off", "--dynamic-caches", "preallocated,cat", "--out", str(out)])
    text = (tmp_path / "selfgen.profile.txt").read_text()
    headers = [line for line in text.splitlines() if "rows x" in line]
    assert headers == [f"float32, static_cache={static} (none, dynamic cache {kind}), 2 rows x 6 tokens"
                       for static, kind in ((True, None), (False, "preallocated"), (False, "cat"))]
    assert text.count("Self CPU") >= 3  # a profiler table under each header


def test_scale_gpu_runs_a_recipe_in_parts_that_resume_from_the_package_checkpoints(tmp_path):
    scale_gpu = _benchmark("scale_gpu")
    argv = ["--device", "cpu", "--layers", "3", "--hidden", "64", "--intermediate", "128", "--heads", "4",
            "--vocab", "128", "--samples", "8", "--seq-len", "32", "--epochs", "1", "--recipes", "br+gp",
            "--checkpoint-dir", str(tmp_path / "checkpoints")]
    parts = []
    for index, extra in enumerate([["--stop-after", "0"], ["--stop-after", "0"], []]):
        out = tmp_path / f"part{index}.json"
        assert scale_gpu.main([*argv, *extra, "--out", str(out)]) == 0
        (run,) = json.loads(out.read_text())["runs"]
        parts.append(run)
    # Each part finalises one block past its time (0 s) and stops; the last runs to the end.
    assert [[b["index"] for b in p["blocks_this_part"]] for p in parts] == [[0], [1], [2]]
    assert [p["complete"] for p in parts] == [False, False, True]
    assert parts[2]["seconds_per_block"] == pytest.approx(parts[2]["total_seconds"])  # one block in that part
    with pytest.raises(SystemExit):
        scale_gpu.parse_args(["--stop-after", "10"])  # a part without checkpoints could not be resumed


def test_stage_profile_runs_br_with_and_without_re_masking_side_by_side(stage_profile, tmp_path):
    import hf_recon_prune.reconstruction.strategies as strategies

    out = tmp_path / "remask.json"
    assert stage_profile.main([
        "--device", "cpu", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--vocab",
        "128", "--samples", "4", "--seq-len", "16", "--epochs", "2", "--recipes", "br+gp", "--remask", "both",
        "--out", str(out),
    ]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(run["recipe"], run["remask_after_every_step"]) for run in runs] == [("br+gp re-masked every step", True),
                                                                                 ("br+gp", False)]
    assert runs[0]["blocks"][0]["error_after"] == runs[1]["blocks"][0]["error_after"] is not None  # same weights
    assert strategies.REMASK_AFTER_EVERY_STEP is False  # restored


def test_stage_profile_runs_br_with_host_and_device_indices_side_by_side(stage_profile, tmp_path):
    import hf_recon_prune.reconstruction.block_trainer as block_trainer

    out = tmp_path / "index.json"
    assert stage_profile.main([
        "--device", "cpu", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--vocab",
        "128", "--samples", "4", "--seq-len", "16", "--epochs", "1", "--recipes", "br+gp", "--stream-location",
        "device", "--br-index", "both", "--out", str(out),
    ]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(run["recipe"], run["br_index_on_device"]) for run in runs] == [("br+gp host index", False),
                                                                            ("br+gp", True)]
    assert block_trainer.INDEX_ON_DEVICE is True  # the switch is restored after the runs


@pytest.mark.parametrize("option, switch, recipes, field", [
    ("--placement-staging", "PINNED_STAGING", ["lr plain placement copies", "lr"], "placement_staging"),
    ("--overlap-placement", "OVERLAP_PLACEMENT", ["lr placement in turn", "lr"], "overlap_placement"),
])
def test_stage_profile_runs_a_placement_switch_off_and_on_side_by_side(stage_profile, tmp_path, option, switch,
                                                                      recipes, field):
    import hf_recon_prune.offload as offload

    out = tmp_path / "placement.json"
    assert stage_profile.main([
        "--device", "cpu", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--vocab",
        "128", "--samples", "4", "--seq-len", "16", "--recipes", "lr", option, "both", "--out", str(out),
    ]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [run["recipe"] for run in runs] == recipes
    # staging is asked for (and is a plain copy on the CPU); the CPU never overlaps (the plan says so)
    assert [run[field] for run in runs] == ([False, True] if switch == "PINNED_STAGING" else [False, False])
    assert getattr(offload, switch) is True  # restored


def test_checkpoint_cost_compares_recomputed_and_saved_streams(tmp_path):
    checkpoint_cost = _benchmark("checkpoint_cost")
    import hf_recon_prune.run_checkpoints as run_checkpoints

    out = tmp_path / "cost.json"
    assert checkpoint_cost.main([
        "--device", "cpu", "--layers", "2", "--hidden", "32", "--intermediate", "64", "--heads", "4", "--vocab",
        "128", "--dtype", "float32", "--samples", "64", "--seq-len", "32", "--epochs", "1", "--work-dir",
        str(tmp_path / "work"), "--out", str(out),
    ]) == 0
    runs = {run["mode"]: run for run in json.loads(out.read_text())["runs"]}
    assert runs["recompute"]["identical"] and runs["save"]["identical"]
    stream = 64 * 32 * 32 * 4
    assert runs["save"]["stream_bytes"] == stream
    # format 2 wrote the two calibration streams (sparse and dense) at each of the 2 steps on top of what format 3
    # writes, and format 3 writes each block's dense weights on top of what format 2 writes
    block = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # linear weights + norms of one block, float32 values
    difference = runs["save"]["written_bytes"] - runs["recompute"]["written_bytes"]
    assert abs(difference - (2 * 2 * stream - 2 * 4 * block)) < 0.05 * difference
    assert run_checkpoints.SAVE_STREAMS is False  # restored


def test_stage_profile_counts_grouped_query_attention_projections(stage_profile):
    args = stage_profile.parse_args(["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--heads", "8",
                                     "--kv-heads", "2"])
    shapes = stage_profile.block_shapes(args)
    assert shapes["k_proj"] == shapes["v_proj"] == (16, 64) and shapes["q_proj"] == (64, 64)
    from scale_gpu import llama_config

    assert llama_config(args).num_key_value_heads == 2


def test_memory_plan_on_paper_matches_a_hand_count_for_the_70b_shape(tmp_path):
    memory_plan = _benchmark("memory_plan")
    results = memory_plan.main(["--shapes", "llama-3-70b", "--out", str(tmp_path / "plan.json")])
    rows = {(r["recipe"], r["mode"]): r for r in results["shapes"]["llama-3-70b"]["rows"]}
    hidden, ffn, kv = 8192, 28672, 8192 * 8 // 64
    linear = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
    params = linear + 2 * hidden  # + the two RMSNorm weights
    # full mode, one block per window: float32 master (4 B) per parameter + gradient and two Adam moments (12 B) per
    # trained one (the pruned weights and, by default, br_train_other_params, the norms); CR trains two blocks at once
    assert rows[("br+gp", "full")]["reconstruction_state_gib"] * 2**30 == 4 * params + 12 * params
    assert rows[("br+gp+cr", "full")]["reconstruction_state_gib"] * 2**30 == 2 * (4 * params + 12 * params)
    assert rows[("br+gp+cr", "full")]["window_blocks"] == 2
    # the point: a two-block CR window does not fit 24 GiB in full mode; masked LoRA does
    assert not rows[("br+gp+cr", "full")]["fits"] and rows[("br+gp+cr", "lora")]["fits"]
    assert rows[("br+gp", "full")]["fits"] and rows[("lr", "full")]["fits"]


def test_br_step_profile_times_the_steps_of_one_window(tmp_path):
    br_step_profile = _benchmark("br_step_profile")
    out = tmp_path / "steps.json"
    assert br_step_profile.main([
        "--device", "cpu", "--hidden", "32", "--intermediate", "64", "--heads", "4", "--kv-heads", "2", "--vocab",
        "128", "--rows", "8", "--seq-len", "16", "--br-batch-size", "4", "--epochs", "3", "--compile", "off",
        "--remask", "both", "--out", str(out),
    ]) == 0
    import hf_recon_prune.reconstruction.strategies as strategies

    runs = json.loads(out.read_text())["runs"]
    assert [r["remask_after_every_step"] for r in runs] == [True, False]
    assert strategies.REMASK_AFTER_EVERY_STEP is False  # restored
    for run in runs:
        assert run["execution"] == "eager" and run["steps"] == 3 * 2 and run["steady_steps"] == 2 * 2  # 8 rows, batch 4
        assert run["wall_ms_per_step"] > 0 and run["kernels_per_step"] == 0  # no device kernels on the CPU
        assert run["gpu_ms_per_step_by_kind"] == {} and run["matmul_tflops"] is None
        names = {op["name"] for op in run["top_host_ops"]}
        assert "aten::mm" in names or "aten::addmm" in names  # the block's linears ran under the profiler
    # q/k/v (32x32, 16x32, 16x32: 2048 weights) skip the input gradient; o, gate, up, down (1024 + 3 * 2048) do not
    assert runs[0]["matmul_flops_per_step"] == 4 * 64 * 2048 + 6 * 64 * (1024 + 3 * 2048)  # 4 rows of 16 tokens
    assert (tmp_path / "steps.md").read_text().startswith("# BR step profile")


def test_br_step_profile_sorts_kernels_by_kind():
    from types import SimpleNamespace

    br_step_profile = _benchmark("br_step_profile")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    assert br_step_profile.is_kernel(SimpleNamespace(device_type=cuda, is_user_annotation=False, name="nvjet_x"))
    assert not br_step_profile.is_kernel(SimpleNamespace(device_type=cpu, is_user_annotation=False, name="aten::mm"))
    # the optimizer's record_function span, which holds its kernels: counted once, through the kernels
    assert not br_step_profile.is_kernel(SimpleNamespace(device_type=cuda, is_user_annotation=True, name="region"))
    assert not br_step_profile.is_kernel(SimpleNamespace(device_type=cuda, name="Optimizer.step#Adam.step"))
    kind = br_step_profile.kernel_kind
    assert kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>") \
        == "attention"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matrix products"
    assert kind("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT") == "matrix products"
    assert kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>") \
        == "optimizer"
    assert kind("void at::native::elementwise_kernel<128, 2, at::native::where_kernel_impl(...)::{lambda()#1}>") \
        == "masking"
    assert kind("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled (fused)"
    assert kind("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)>") \
        == "copies and casts"
    assert kind("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t>>") \
        == "reductions"
    assert kind("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(...)>") \
        == "other element-wise"


def test_sparsity_profiles_runs_uniform_and_owl_side_by_side_at_the_same_mean(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_assets import save_tiny_llama

    script = _benchmark("sparsity_profiles")
    out = tmp_path / "profiles.json"
    results = script.main(["--model", save_tiny_llama(tmp_path / "tiny"), "--runs", "wanda:mask,sparsegpt:lr",
                           "--sparsities", "0.5", "--owl-lambdas", "0.1", "--num-samples", "4", "--seq-len", "16",
                           "--eval-seq-len", "16", "--eval-windows", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "profiles.md").is_file()
    assert [(r["method"], r["recipe"], r["profile"]) for r in results["runs"]] == [
        ("wanda", "mask", "uniform"), ("wanda", "mask", "owl"), ("sparsegpt", "lr", "uniform"),
        ("sparsegpt", "lr", "owl")]
    for run in results["runs"]:
        targets = run["block_target_sparsity"]
        assert sum(targets) / len(targets) == pytest.approx(0.5)  # OWL moves blocks, not the mean
        assert run["mean_sparsity_of_pruned_weights"] == pytest.approx(0.5, abs=0.01)
        assert set(run["perplexity"]) == set(results["dense"])
        # min-max normalised ratios: the least and most outlier-rich blocks sit lambda below and above the mean
        spread = 2 * 0.1 if run["profile"] == "owl" else 0.0
        assert max(targets) - min(targets) == pytest.approx(spread)


def test_demo_budgets_runs_each_budget_and_reuses_lr_across_epochs(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_assets import save_tiny_llama

    script = _benchmark("demo_budgets")
    out = tmp_path / "budgets.json"
    results = script.main(["--model", save_tiny_llama(tmp_path / "tiny"), "--budgets", "4x16x1,4x16x2",
                           "--eval-seq-len", "16", "--eval-windows", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    runs = results["runs"]
    assert [(r["samples"], r["seq_len"], r["epochs"]) for r in runs] == [(4, 16, 1), (4, 16, 2)]
    assert runs[0]["lr"] == runs[1]["lr"]  # LR is run once: epochs do not change it
    for run in runs:
        dense, lr, rebuilt = results["dense"], run["lr"]["perplexity"], run["lr_br_gp"]["perplexity"]
        for name, closed in run["gap_closed"].items():
            assert closed == pytest.approx((lr[name] - rebuilt[name]) / (lr[name] - dense[name]))
    assert script.gap_closed({"a": 10.0}, {"a": 20.0}, {"a": 15.0}) == {"a": 0.5}
    for wrong in ("24x128", "24x128x0", "a,b"):
        with pytest.raises(SystemExit):
            script.main(["--budgets", wrong])


def test_lr_sweep_keeps_the_grids_held_out_topics_apart_from_the_packages_text(tmp_path):
    from pydoc_data.topics import topics

    lr_sweep = _benchmark("lr_sweep")
    keys = sorted(topics)
    legacy = lr_sweep.default_heldout_texts("topics")
    assert legacy == [topics[k] for k in keys[7::8]]  # the rule the H200 grid measured with, every eighth topic whole
    train = {p.strip() for k in keys if keys.index(k) % 8 != 7 for p in topics[k].split("\n\n")}
    repeats = lambda texts: sum(len(p) for t in texts for p in t.split("\n\n") if p.strip() and p.strip() in train)
    assert repeats(legacy) > 0.1 * sum(map(len, legacy))  # why the package's rule changed
    assert repeats(lr_sweep.default_heldout_texts("package")) == 0
    topics_id, package_id = (lr_sweep.corpus_fingerprint(rule)["id"] for rule in ("topics", "package"))
    assert package_id == topics_id + "/heldout-package"  # the grid's ids stay those of its earlier runs

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_assets import save_tiny_llama

    argv = ["--model", save_tiny_llama(tmp_path / "tiny"), "--device", "cpu", "--samples", "6", "--seq-len", "16",
            "--epochs", "1", "--lrs", "1e-3", "--recipes", "br+gp", "--eval-seq-len", "16", "--eval-windows", "2",
            "--work-dir", str(tmp_path / "work")]
    results = lr_sweep.main([*argv, "--default-heldout", "topics", "--out", str(tmp_path / "a.json")])
    assert results["corpus"]["id"] == topics_id and results["corpus"]["default_heldout"] == "topics"
    with pytest.raises(SystemExit, match="holds held-out windows of .* not of .*/heldout-package"):
        lr_sweep.main([*argv, "--out", str(tmp_path / "b.json")])  # the same work dir, the package's text


def test_masked_adam_candidate_is_torch_adam_on_masked_gradients(tmp_path):
    """The candidate kernel's formula against torch.optim.Adam in float64 (the reference), over steps with changing
    gradients: equal to float64 rounding, and the pruned weights stay exactly zero. The script's own comparison
    (eager here: no compiler assumed on the CPU) agrees."""
    masked_adam = _benchmark("masked_adam")
    generator = torch.Generator().manual_seed(3)
    keep = torch.rand(6, 5, generator=generator) >= 0.5
    start = torch.randn(6, 5, generator=generator, dtype=torch.float64) * keep
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([reference], lr=1e-2, betas=masked_adam.BETAS, eps=masked_adam.EPS, foreach=False)
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for step in range(1, 6):
        grad = torch.randn(6, 5, generator=generator, dtype=torch.float64)
        reference.grad = torch.where(keep, grad, 0.0)
        optimizer.step()
        masked_adam.masked_adam_(param, grad, keep, exp_avg, exp_avg_sq,
                                 torch.tensor(1e-2 / (1 - 0.9 ** step), dtype=torch.float64),
                                 torch.tensor((1 - 0.999 ** step) ** 0.5, dtype=torch.float64))
        torch.testing.assert_close(param, reference.detach(), rtol=1e-12, atol=1e-14)
    assert torch.all(param[~keep] == 0) and torch.all(param[keep] != start[keep])

    out = tmp_path / "adam.json"
    assert masked_adam.main(["--device", "cpu", "--shapes", "16x8,8x16", "--counts", "2,1", "--steps", "4",
                             "--repeats", "3", "--compile", "off", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["weights"] == 3 * 128 and result["pruned_weights_nonzero"] == 0
    assert result["relative_drift_after_steps"] < 1e-5
    assert set(result["timings"]) == {"current", "fused-masked"}

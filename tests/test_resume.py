"""Checkpoints and resume: a run killed after block k and resumed equals an uninterrupted run, bit for bit (CPU)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import fail_pruning_after, make_tiny_model, random_ids
from hf_recon_prune import PruningConfig
from hf_recon_prune import checkpoint as checkpoints
from hf_recon_prune.calibration import CalibrationSet
from hf_recon_prune.pruner import Pruner, PruningFailedError

TESTS = os.path.dirname(os.path.abspath(__file__))
NUM_BLOCKS = 4
VARIANTS = {
    "br_gp": dict(reconstruction=["lr", "br", "gp"]),
    "br_gp_cr": dict(reconstruction=["lr", "br", "gp", "cr"]),
}

# The subprocess of the SIGKILL tests imports torch and transformers once (seconds), then runs every step of a plan
# in a *fresh forked child* that has never pruned anything: a pruning run that kills itself with SIGKILL right after
# the checkpoint of block k, or a resumed run. The parent only imports, forks and waits (no torch computation, so the
# children start from a clean state); it reports how every child ended and which step folders it left.
DRIVER = textwrap.dedent('''
    import json, os, signal, sys, traceback
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from conftest import make_tiny_model, random_ids
    from hf_recon_prune import PruningConfig
    from hf_recon_prune.calibration import CalibrationSet
    from hf_recon_prune.pruner import Pruner
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before forking, like everything else)


    def run(step):
        calibration = CalibrationSet(
            input_ids=random_ids(8, 16, seed=1), is_self_generated=torch.zeros(8, dtype=torch.bool),
            heldout_ids=random_ids(4, 16, seed=101), statistics_mask=torch.ones(8, dtype=torch.bool),
            description={{"source": "test"}},
        )
        config = PruningConfig(**step["settings"], checkpoint_dir=step["checkpoint_dir"])
        finished = []

        def on_block_end(index, report):
            finished.append(index)
            if index == step["kill_after"]:
                os.kill(os.getpid(), signal.SIGKILL)  # as hard as a crash: nothing after this line runs

        model = make_tiny_model("llama", num_layers={num_blocks})
        Pruner(model, config, calibration_data=calibration, show_progress=False,
               on_block_end=on_block_end).prune(resume=step["resume"])
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, step["output"])
        with open(step["output"] + ".blocks.json", "w") as handle:
            json.dump(finished, handle)


    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    results = []
    for step in plan:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(step)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        folder = step["checkpoint_dir"]
        results.append({{
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "steps": sorted(n for n in os.listdir(folder) if n.startswith("step-")) if os.path.isdir(folder) else [],
        }})
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle)
''').format(tests=TESTS, num_blocks=NUM_BLOCKS)

KILLS = {"br_gp": [0, 1, 2], "br_gp_cr": [0, 1]}  # with CR, blocks 2 and 3 are finalised by the same last window
CHAIN = [0, 1, 2]


def _settings(variant: str) -> dict:
    return dict(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=16, sparsegpt_block_size=16,
                forward_batch_size=4, device="cpu", br_epochs=2, **VARIANTS[variant])


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Runs the plan: for every variant and k, a run killed after block k and a resume in another process; and a
    chain (killed after 0, resumed and killed after 1, resumed and killed after 2, resumed to the end)."""
    folder = tmp_path_factory.mktemp("sigkill")
    plan, cases = [], {}

    def step(variant, name, kill_after=None, resume=False):
        plan.append(dict(settings=_settings(variant), checkpoint_dir=str(folder / name / "checkpoints"),
                         output=str(folder / name / "model.safetensors"), resume=resume,
                         kill_after=-1 if kill_after is None else kill_after))
        os.makedirs(folder / name, exist_ok=True)
        return len(plan) - 1

    for variant, kills in KILLS.items():
        for k in kills:
            name = f"{variant}-{k}"
            cases[name] = ([step(variant, name, kill_after=k)], step(variant, name, resume=True), folder / name)
    chain = [step("br_gp", "chain", kill_after=k, resume=i > 0) for i, k in enumerate(CHAIN)]
    cases["chain"] = (chain, step("br_gp", "chain", resume=True), folder / "chain")
    (folder / "plan.json").write_text(json.dumps(plan))
    (folder / "driver.py").write_text(DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    result = subprocess.run([sys.executable, str(folder / "driver.py"), str(folder / "plan.json"),
                             str(folder / "results.json")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((folder / "results.json").read_text())
    return {name: ([results[i] for i in kills], results[last], path, result.stderr)
            for name, (kills, last, path) in cases.items()}


@pytest.fixture(scope="module")
def uninterrupted():
    """The uninterrupted run of every variant, without checkpoints."""
    models = {}
    for variant in VARIANTS:
        model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
        Pruner(model, PruningConfig(**_settings(variant)), calibration_data=_calibration(), show_progress=False).prune()
        models[variant] = model.state_dict()
    return models


def _assert_identical(state, reference):
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"{key} differs from the uninterrupted run"


@pytest.mark.parametrize("case", [f"{variant}-{k}" for variant, kills in KILLS.items() for k in kills] + ["chain"])
def test_sigkill_after_block_k_then_resume_equals_uninterrupted_run(killed_and_resumed, uninterrupted, case):
    """Killed with SIGKILL right after the checkpoint of block k, resumed in a new process: the resumed process
    starts after block k and the model equals the uninterrupted run's bit for bit. The chain resumes three times."""
    killed, resumed, folder, stderr = killed_and_resumed[case]
    kills = CHAIN if case == "chain" else [int(case.rsplit("-", 1)[1])]
    for k, outcome in zip(kills, killed):
        assert outcome["signal"] == signal.SIGKILL, (outcome, stderr[-3000:])
        assert outcome["steps"] == [f"step-{k:05d}"]  # only the latest complete checkpoint is kept
    assert resumed["exit"] == 0, (resumed, stderr[-3000:])
    # The last process started after the last k: it finalised only the blocks after it.
    assert json.loads((folder / "model.safetensors.blocks.json").read_text()) == list(range(kills[-1] + 1, NUM_BLOCKS))
    variant = "br_gp" if case == "chain" else case.rsplit("-", 1)[0]
    _assert_identical(load_file(str(folder / "model.safetensors")), uninterrupted[variant])


# ---------------------------------------------------------------------------------------------------- in-process
def _calibration(seed: int = 1) -> CalibrationSet:
    return CalibrationSet(
        input_ids=random_ids(8, 16, seed=seed), is_self_generated=torch.zeros(8, dtype=torch.bool),
        heldout_ids=random_ids(4, 16, seed=seed + 100), statistics_mask=torch.ones(8, dtype=torch.bool),
        description={"source": "test"},
    )


def _config(checkpoint_dir=None, **overrides) -> PruningConfig:
    settings = _settings("br_gp")
    settings.update(overrides)
    return PruningConfig(**settings, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir))


class _Stop(Exception):
    pass


def _stop_after(k):
    def callback(index, report):
        if index == k:
            raise _Stop(f"stopped after block {k}")

    return callback


def _interrupted(config, k, calibration=None, num_layers=NUM_BLOCKS):
    model = make_tiny_model("llama", num_layers=num_layers)
    with pytest.raises(PruningFailedError):
        Pruner(model, config, calibration_data=calibration or _calibration(), show_progress=False,
               on_block_end=_stop_after(k)).prune()


def _pruned(config, resume=False, calibration=None, num_layers=NUM_BLOCKS, overwrite=False, **kwargs):
    model = make_tiny_model("llama", num_layers=num_layers)
    pruner = Pruner(model, config, calibration_data=calibration or _calibration(), show_progress=False, **kwargs)
    report = pruner.prune(resume=resume, overwrite=overwrite)
    return model, pruner, report


@pytest.mark.parametrize("overrides", [
    dict(reconstruction=["lr"]),                                   # no BR: streams kept from the mask step
    dict(reconstruction=["lr", "br"]),                             # BR toward the dense block on the sparse stream
    dict(reconstruction=["br", "cr"], method="wanda"),             # CR without GP: a pending block's dense copy
    dict(reconstruction=["lr", "br", "gp"], reconstruction_mode="lora", lora_rank=4),
    dict(reconstruction=["lr", "br"], track_reconstruction_error=False),  # no dense stream to recompute
    dict(reconstruction=["lr", "br", "gp", "cr"], cr_schedule="sliding"),
])
def test_resume_in_process_equals_uninterrupted(tmp_path, overrides):
    reference, _, reference_report = _pruned(_config(**overrides))
    config = _config(tmp_path, **overrides)
    _interrupted(config, 1)
    model, pruner, report = _pruned(config, resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())
    for mine, theirs in zip(report.blocks, reference_report.blocks):
        assert mine.error_after == theirs.error_after and mine.layer_sparsity == theirs.layer_sparsity
        assert mine.train_losses == theirs.train_losses
    assert set(pruner.masks) == {f"model.layers.{i}.{name}" for i in range(NUM_BLOCKS)
                                 for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_resume_without_held_out_rows_equals_uninterrupted(tmp_path):
    """A split with no rows passes its (empty) streams along unchanged, in the run and in the recomputation."""
    calibration = _calibration()
    calibration.heldout_ids = calibration.heldout_ids[:0]
    reference, _, _ = _pruned(_config(**VARIANTS["br_gp_cr"]), calibration=calibration)
    config = _config(tmp_path, **VARIANTS["br_gp_cr"])
    _interrupted(config, 1, calibration=calibration)
    model, _, _ = _pruned(config, resume=True, calibration=calibration)
    _assert_identical(model.state_dict(), reference.state_dict())


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    """Dying between the block file and the step folder's rename leaves the previous step as the latest."""
    reference, _, _ = _pruned(_config())
    config = _config(tmp_path)
    real_replace = os.replace

    def dying_replace(src, dst):
        if os.path.basename(dst) == "step-00002":
            raise KeyboardInterrupt("killed while renaming the checkpoint of block 2")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _pruned(config)
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert os.path.basename(checkpoints.latest_step(str(tmp_path))) == "step-00001"
    assert any(name.startswith(".tmp-step-00002") for name in os.listdir(tmp_path))  # the half-written step
    seen = []
    model, _, _ = _pruned(config, resume=True, on_block_end=lambda index, report: seen.append(index))
    assert seen == [2, 3]
    _assert_identical(model.state_dict(), reference.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["blocks", "step-00003"]  # leftovers of the crash are gone
    assert sorted(os.listdir(tmp_path / "blocks")) == [f"{kind}-{i:05d}.safetensors" for kind in ("block", "dense")
                                                       for i in range(NUM_BLOCKS)]


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    config = _config(tmp_path)
    _interrupted(config, 1)
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names]
    assert files and all(name.endswith((".safetensors", ".json")) for name in files), files
    manifest = json.loads((tmp_path / "step-00001" / "manifest.json").read_text())
    assert manifest["finalised"] == [0, 1] and manifest["next_window"] == 2
    assert manifest["config"]["checkpoint_dir"] == str(tmp_path)


def test_resume_refuses_a_checkpoint_made_with_another_config(tmp_path):
    _interrupted(_config(tmp_path), 1)
    with pytest.raises(checkpoints.CheckpointError, match=r"different configuration \(br_epochs: checkpoint 2 vs now 3"):
        _pruned(_config(tmp_path, br_epochs=3), resume=True)


def test_resume_refuses_other_calibration_data_and_another_model(tmp_path):
    _interrupted(_config(tmp_path), 1)
    with pytest.raises(checkpoints.CheckpointError, match="calibration data differs"):
        _pruned(_config(tmp_path), resume=True, calibration=_calibration(seed=7))
    with pytest.raises(checkpoints.CheckpointError, match="another model"):
        _pruned(_config(tmp_path), resume=True, num_layers=3)


def test_execution_only_fields_may_change_on_resume(tmp_path):
    reference, _, _ = _pruned(_config())
    _interrupted(_config(tmp_path / "a"), 0)
    os.rename(tmp_path / "a", tmp_path / "b")  # moved folder, other stream placement: same result
    model, _, _ = _pruned(_config(tmp_path / "b", stream_location="cpu", max_device_memory="1GiB"), resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())


def test_resume_without_a_checkpoint_starts_from_the_first_block(tmp_path, caplog):
    reference, _, _ = _pruned(_config())
    seen = []
    with caplog.at_level(logging.INFO, logger="hf_recon_prune.run_checkpoints"):
        model, _, _ = _pruned(_config(tmp_path / "empty"), resume=True, on_block_end=lambda i, r: seen.append(i))
    assert "no checkpoint" in caplog.text and seen == [0, 1, 2, 3]
    _assert_identical(model.state_dict(), reference.state_dict())


def test_resume_needs_a_checkpoint_dir():
    model = make_tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Pruner(model, _config(), calibration_data=_calibration(), show_progress=False).prune(resume=True)


def test_a_fresh_run_replaces_an_old_checkpoint(tmp_path, caplog):
    _interrupted(_config(tmp_path), 2)
    with caplog.at_level(logging.WARNING, logger="hf_recon_prune.run_checkpoints"):
        _interrupted(_config(tmp_path, br_epochs=1), 0)
    assert "will be replaced" in caplog.text
    assert [n for n in os.listdir(tmp_path) if n.startswith("step-")] == ["step-00000"]
    # The block files the first run left for blocks 1-2 belong to another run: resuming never mixes them in.
    reference, _, _ = _pruned(_config(br_epochs=1))
    model, _, _ = _pruned(_config(tmp_path, br_epochs=1), resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())


def test_a_block_file_of_another_run_is_refused(tmp_path):
    _interrupted(_config(tmp_path / "one"), 1)
    _interrupted(_config(tmp_path / "two"), 1)
    os.replace(tmp_path / "one" / "blocks" / "block-00000.safetensors",
               tmp_path / "two" / "blocks" / "block-00000.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match="belongs to another run"):
        _pruned(_config(tmp_path / "two"), resume=True)


def test_cli_resume_needs_checkpoint_dir(tmp_path, capsys):
    from hf_recon_prune.cli import EXIT_USAGE, main

    code = main(["prune", "--resume", "--output", str(tmp_path / "out"), "--no-eval"])
    assert code == EXIT_USAGE
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err


def test_resume_of_a_disk_offloaded_model(tmp_path):
    """Blocks that Accelerate keeps on disk: the checkpointed weights are written back through the offload storage,
    and the resumed model saves like the uninterrupted in-memory run."""
    import transformers

    folder = tmp_path / "tiny"
    make_tiny_model("llama", num_layers=3).save_pretrained(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    Pruner(reference, _config(), calibration_data=_calibration(), show_progress=False).prune()
    size = sum(p.numel() * p.element_size() for p in reference.parameters())

    def offloaded(name):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map="auto", max_memory={"cpu": size // 4}, offload_folder=str(tmp_path / name)).eval()
        assert "disk" in set(model.hf_device_map.values())
        return model

    config = _config(tmp_path / "checkpoints")
    with pytest.raises(PruningFailedError):
        Pruner(offloaded("first"), config, calibration_data=_calibration(), show_progress=False,
               on_block_end=_stop_after(0)).prune()
    model = offloaded("second")
    Pruner(model, config, calibration_data=_calibration(), show_progress=False).prune(resume=True)
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_resume_refuses_a_model_whose_remaining_blocks_are_not_the_dense_ones(tmp_path):
    """The blocks a resume takes from the model (after the checkpoint) must be the dense weights the run started
    from: a fine-tune of the same shape, or a model a failed run already modified, is refused instead of mixed in."""
    _interrupted(_config(tmp_path), 1)
    other = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with torch.no_grad():
        other.model.layers[3].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(checkpoints.CheckpointError, match=r"decoder blocks \[3\] .* dense weights"):
        Pruner(other, _config(tmp_path), calibration_data=_calibration(), show_progress=False).prune(resume=True)


def test_resume_with_the_interrupted_model_object_itself(tmp_path):
    """In the same process, the model left by the interrupted run (blocks 0-1 final, 2-3 untouched) resumes."""
    reference, _, _ = _pruned(_config())
    config = _config(tmp_path)
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with pytest.raises(PruningFailedError):
        Pruner(model, config, calibration_data=_calibration(), show_progress=False, on_block_end=_stop_after(1)).prune()
    Pruner(model, config, calibration_data=_calibration(), show_progress=False).prune(resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())


# ---------------------------------------------------------------------------------------------------- refusals
def _dense_state():
    return make_tiny_model("llama", num_layers=NUM_BLOCKS).state_dict()


def _snapshot(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_a_fresh_run_over_a_checkpoint_of_the_same_run_is_refused(tmp_path):
    reference, _, _ = _pruned(_config())
    _interrupted(_config(tmp_path), 1)
    before = _snapshot(tmp_path)
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with pytest.raises(checkpoints.CheckpointError, match=r"holds a checkpoint of this same run .*after decoder block 1"
                                                          r".*resume=True \(--resume\).*overwrite=True \(--overwrite\)"):
        Pruner(model, _config(tmp_path), calibration_data=_calibration(), show_progress=False).prune()
    _assert_identical(model.state_dict(), _dense_state())  # refused before any block was touched
    assert _snapshot(tmp_path) == before
    model, _, _ = _pruned(_config(tmp_path), overwrite=True)
    _assert_identical(model.state_dict(), reference.state_dict())
    # The finished run's checkpoint is refused too; resuming it restores the finished model without pruning again.
    with pytest.raises(checkpoints.CheckpointError, match="after decoder block 3"):
        _pruned(_config(tmp_path))
    seen = []
    model, _, _ = _pruned(_config(tmp_path), resume=True, on_block_end=lambda i, r: seen.append(i))
    assert seen == []
    _assert_identical(model.state_dict(), reference.state_dict())


@pytest.mark.parametrize("target", ["stream", "state", "block", "dense", "header", "missing dense"])
def test_a_torn_checkpoint_file_is_refused_on_resume(tmp_path, target, monkeypatch):
    import hf_recon_prune.run_checkpoints as run_checkpoints

    monkeypatch.setattr(run_checkpoints, "SAVE_STREAMS", target == "stream")  # stream files: format 2 only
    _interrupted(_config(tmp_path), 1)
    monkeypatch.setattr(run_checkpoints, "SAVE_STREAMS", False)
    step = tmp_path / "step-00001"
    path = {"stream": next(iter((tmp_path / "streams").glob("stream-*.safetensors")), None),
            "state": step / "state.safetensors", "block": tmp_path / "blocks" / "block-00001.safetensors",
            "dense": tmp_path / "blocks" / "dense-00001.safetensors",
            "missing dense": tmp_path / "blocks" / "dense-00000.safetensors",
            "header": tmp_path / "blocks" / "block-00000.safetensors"}[target]
    data = path.read_bytes()
    if target == "header":  # same size, damaged header: what a torn write that left the length can look like
        path.write_bytes(b"\xff" * 8 + data[8:])
        match = rf"{path} is torn or damaged \(.*\)"
    elif target == "missing dense":
        path.unlink()
        match = rf"{path} is missing: the checkpoint in {step} is incomplete"
    else:
        path.write_bytes(data[: len(data) // 2])
        match = rf"{path} is torn: {len(data) // 2} bytes where the checkpoint wrote {len(data)}"
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with pytest.raises(checkpoints.CheckpointError, match=match + r".*start afresh without resume"):
        Pruner(model, _config(tmp_path), calibration_data=_calibration(), show_progress=False).prune(resume=True)
    _assert_identical(model.state_dict(), _dense_state())  # nothing was loaded


@pytest.mark.parametrize("damage", ["truncated", "missing", "wrong type", "escaping stream name", "not a dict"])
def test_a_damaged_manifest_is_refused_on_resume(tmp_path, damage):
    _interrupted(_config(tmp_path), 1)
    manifest = tmp_path / "step-00001" / "manifest.json"
    data = json.loads(manifest.read_text())
    if damage == "truncated":
        manifest.write_text(manifest.read_text()[:200])
        match = r"manifest\.json cannot be read"
    elif damage == "not a dict":
        manifest.write_text("[1, 2, 3]")
        match = r"not a checkpoint of this version"
    else:
        if damage == "missing":
            del data["finalised"]
            match = r"manifest\.json is damaged: its 'finalised' is missing, expected list"
        elif damage == "wrong type":
            data["next_window"] = "2"
            match = r"manifest\.json is damaged: its 'next_window' is str, expected int"
        else:
            data["streams"]["calibration-sparse-2"] = "../../outside.safetensors"
            match = r"manifest\.json is damaged: it names the stream file '\.\./\.\./outside\.safetensors'"
        manifest.write_text(json.dumps(data))
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with pytest.raises(checkpoints.CheckpointError, match=match):
        Pruner(model, _config(tmp_path), calibration_data=_calibration(), show_progress=False).prune(resume=True)
    _assert_identical(model.state_dict(), _dense_state())
    # A damaged checkpoint cannot be the same run's: a fresh run replaces it without overwrite.
    reference, _, _ = _pruned(_config())
    model, _, _ = _pruned(_config(tmp_path))
    _assert_identical(model.state_dict(), reference.state_dict())


def test_save_after_an_in_process_resume_works(tmp_path):
    """The model a failed run left is flagged (it refuses to save); resumed to the end in the same process, the
    flag is cleared and it saves like the uninterrupted run."""
    import transformers

    from hf_recon_prune.hub import save_pruned_model

    reference, _, _ = _pruned(_config())
    config = _config(tmp_path / "checkpoints")
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with pytest.raises(PruningFailedError):
        Pruner(model, config, calibration_data=_calibration(), show_progress=False, on_block_end=_stop_after(1)).prune()
    with pytest.raises(RuntimeError, match="partially pruned"):
        save_pruned_model(model, tmp_path / "too-early", config)
    pruner = Pruner(model, config, calibration_data=_calibration(), show_progress=False)
    pruner.prune(resume=True)
    folder = pruner.save_pretrained(str(tmp_path / "saved"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    _assert_identical(reloaded.state_dict(), reference.state_dict())


@pytest.mark.parametrize("dense_stream", [True, False])
def test_in_process_resume_after_a_failure_inside_a_block(tmp_path, monkeypatch, dense_stream):
    """A failure inside block 1, after LR changed two of its linears in place: resuming the same in-memory model puts
    block 1 back from the dense copy the run wrote when it took it, and ends like the uninterrupted run. A run with
    no dense stream writes no such copy, so the resume refuses, naming the block."""
    overrides = {} if dense_stream else dict(reconstruction=["lr", "br"], track_reconstruction_error=False)
    reference, _, _ = _pruned(_config(**overrides))
    config = _config(tmp_path, **overrides)
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    taken = {k: v.clone() for k, v in model.model.layers[1].state_dict().items()}
    with monkeypatch.context() as patch, pytest.raises(PruningFailedError,
                                                       match=r"out of memory in block 1.* let prune\(resume=True\)"):
        fail_pruning_after(patch, 9, "out of memory in block 1")  # the 3rd of block 1's linears: 2 changed
        Pruner(model, config, calibration_data=_calibration(), show_progress=False).prune()
    modified = model.model.layers[1].state_dict()
    assert any(not torch.equal(modified[k], v) for k, v in taken.items())  # LR changed block 1 before the failure
    pruner = Pruner(model, config, calibration_data=_calibration(), show_progress=False)
    if not dense_stream:
        with pytest.raises(checkpoints.CheckpointError, match=r"decoder blocks \[1\] of this model do not hold"):
            pruner.prune(resume=True)
        return
    pruner.prune(resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())
    assert not getattr(model, "_hf_recon_prune_incomplete", False)


def test_a_dense_copy_that_is_not_the_starting_weights_is_not_restored(tmp_path, monkeypatch):
    """The dense copy of the failed block is used only when it is the weights the run started from: a copy whose
    weights differ (written over by hand here) leaves the refusal in place and the model as it was."""
    config = _config(tmp_path)
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with monkeypatch.context() as patch, pytest.raises(PruningFailedError):
        fail_pruning_after(patch, 9)
        Pruner(model, config, calibration_data=_calibration(), show_progress=False).prune()
    path = checkpoints.dense_block_file(str(tmp_path), 1)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    tensors = {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, path, metadata=metadata)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(checkpoints.CheckpointError, match=r"decoder blocks \[1\]"):
        Pruner(model, config, calibration_data=_calibration(), show_progress=False).prune(resume=True)
    _assert_identical(model.state_dict(), before)


def test_the_blocks_folder_is_fsynced_after_every_rename(tmp_path, monkeypatch):
    synced = []
    real = checkpoints._fsync_dir
    monkeypatch.setattr(checkpoints, "_fsync_dir", lambda path: (synced.append(os.path.abspath(path)), real(path)))
    _pruned(_config(tmp_path))
    assert synced.count(str(tmp_path / "blocks")) == 2 * NUM_BLOCKS  # once per final and dense file, after its rename


@pytest.mark.parametrize("variant", ["br_gp", "br_gp_cr"])
def test_a_checkpoint_writes_no_stream_and_each_block_once(tmp_path, variant):
    """Format 3: a step holds no stream (a resume recomputes them, see test_resume_in_process_equals_uninterrupted
    and the SIGKILL tests); each block's dense and final weights are written once, so the files grow with the
    blocks done, not with the calibration set."""
    manifests = []
    _pruned(_config(tmp_path, **VARIANTS[variant]),
            on_block_end=lambda index, report: manifests.append(
                json.loads((Path(checkpoints.latest_step(str(tmp_path))) / "manifest.json").read_text())))
    for manifest in manifests:
        assert manifest["format_version"] == 3 and manifest["streams"] == {} and manifest["stream_layout"]
        assert manifest["dense_blocks"] == sorted(manifest["finalised"] + manifest["pending"])
    assert not (tmp_path / "streams").exists()
    assert sorted(os.listdir(tmp_path / "blocks")) == [f"{kind}-{i:05d}.safetensors" for kind in ("block", "dense")
                                                       for i in range(NUM_BLOCKS)]
    dense = load_file(str(tmp_path / "blocks" / "dense-00002.safetensors"))
    taken = make_tiny_model("llama", num_layers=NUM_BLOCKS).model.layers[2].state_dict()
    _assert_identical({k.removeprefix("state."): v for k, v in dense.items()}, taken)  # the weights as taken


def test_a_run_without_a_dense_stream_writes_no_dense_block(tmp_path):
    _pruned(_config(tmp_path, reconstruction=["lr", "br"], track_reconstruction_error=False))  # no dense stream
    assert sorted(os.listdir(tmp_path / "blocks")) == [f"block-{i:05d}.safetensors" for i in range(NUM_BLOCKS)]


def test_a_format_2_checkpoint_writes_only_the_streams_that_changed(tmp_path, monkeypatch):
    """Format 2 (``SAVE_STREAMS``, kept so that reading it stays tested): stream files are written when a stream is
    new or was written to; one that is carried over from the last step keeps its file, and the run still resumes to
    the uninterrupted result."""
    import hf_recon_prune.run_checkpoints as run_checkpoints

    monkeypatch.setattr(run_checkpoints, "SAVE_STREAMS", True)
    written, steps = [], []
    real = run_checkpoints.save_stream

    def counting(folder, name, tensor):
        written.append(name)
        return real(folder, name, tensor)

    def after_block(index, report):
        step = checkpoints.latest_step(str(tmp_path))
        steps.append(json.loads((Path(step) / "manifest.json").read_text())["streams"])

    monkeypatch.setattr(run_checkpoints, "save_stream", counting)
    config = _config(tmp_path, **VARIANTS["br_gp_cr"])
    reference, _, _ = _pruned(_config(**VARIANTS["br_gp_cr"]))
    _pruned(config, on_block_end=after_block)
    named = sum(len(files) for files in steps)
    carried = sum(1 for before, after in zip(steps, steps[1:]) for name, file in after.items() if before.get(name) == file)
    assert carried > 0 and len(written) == named - carried  # each carried-over stream was not written again
    # the dense stream CR computed ahead for the next window is one of them
    assert any(name.split("-")[1] == "dense" for before, after in zip(steps, steps[1:])
               for name, file in after.items() if before.get(name) == file)

    # interrupted after block 1 and resumed: bit for bit the uninterrupted run
    other = tmp_path / "resumed"
    _interrupted(_config(other, **VARIANTS["br_gp_cr"]), 1)
    model, _, _ = _pruned(_config(other, **VARIANTS["br_gp_cr"]), resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())


def test_a_run_resumed_from_a_format_2_checkpoint_goes_on_writing_streams(tmp_path, monkeypatch):
    """Its earlier blocks have no dense files to recompute the streams from, so its later steps carry them too, and
    a second interruption still resumes to the uninterrupted result."""
    import hf_recon_prune.run_checkpoints as run_checkpoints

    reference, _, _ = _pruned(_config())
    config = _config(tmp_path)
    monkeypatch.setattr(run_checkpoints, "SAVE_STREAMS", True)
    _interrupted(config, 0)
    monkeypatch.setattr(run_checkpoints, "SAVE_STREAMS", False)
    model = make_tiny_model("llama", num_layers=NUM_BLOCKS)
    with pytest.raises(PruningFailedError):
        Pruner(model, config, calibration_data=_calibration(), show_progress=False,
               on_block_end=_stop_after(1)).prune(resume=True)
    manifest = json.loads((tmp_path / "step-00001" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["streams"]
    model, _, _ = _pruned(config, resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())


def test_a_checkpoint_of_format_1_with_its_streams_in_the_step_folder_still_resumes(tmp_path, monkeypatch):
    import hf_recon_prune.run_checkpoints as run_checkpoints

    reference, _, _ = _pruned(_config())
    monkeypatch.setattr(run_checkpoints, "SAVE_STREAMS", True)
    _interrupted(_config(tmp_path), 1)
    monkeypatch.setattr(run_checkpoints, "SAVE_STREAMS", False)
    step = tmp_path / "step-00001"
    manifest = json.loads((step / "manifest.json").read_text())
    for file_name in manifest["streams"].values():
        os.replace(tmp_path / "streams" / file_name, step / file_name)
    manifest["format_version"] = 1
    manifest["file_sizes"].update(manifest.pop("stream_file_sizes"))
    (step / "manifest.json").write_text(json.dumps(manifest))
    model, _, _ = _pruned(_config(tmp_path), resume=True)
    _assert_identical(model.state_dict(), reference.state_dict())

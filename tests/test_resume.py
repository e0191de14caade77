"""Checkpoints and resume: a run killed after block k and resumed equals an uninterrupted run, bit for bit (CPU)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model, random_ids
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

# The pruning run of the subprocess tests: a tiny 4-block Llama, SparseGPT + LR + BR (+ GP, CR), 2 epochs.
SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from conftest import make_tiny_model, random_ids
    from hf_recon_prune import PruningConfig
    from hf_recon_prune.calibration import CalibrationSet
    from hf_recon_prune.pruner import Pruner

    variant, checkpoint_dir, output = sys.argv[1], sys.argv[2], sys.argv[3]
    resume = os.environ.get("RESUME") == "1"
    kill_after = int(os.environ.get("KILL_AFTER", "-1"))
    settings = json.loads(os.environ["SETTINGS"])
    calibration = CalibrationSet(
        input_ids=random_ids(8, 16, seed=1), is_self_generated=torch.zeros(8, dtype=torch.bool),
        heldout_ids=random_ids(4, 16, seed=101), statistics_mask=torch.ones(8, dtype=torch.bool),
        description={{"source": "test"}},
    )
    config = PruningConfig(**settings, checkpoint_dir=None if checkpoint_dir == "-" else checkpoint_dir)
    finished = []

    def on_block_end(index, report):
        finished.append(index)
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # as hard as a crash: nothing after this line runs

    model = make_tiny_model("llama", num_layers={num_blocks})
    Pruner(model, config, calibration_data=calibration, show_progress=False, on_block_end=on_block_end).prune(resume=resume)
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, output)
    with open(output + ".blocks.json", "w") as handle:
        json.dump(finished, handle)
''').format(tests=TESTS, num_blocks=NUM_BLOCKS)


def _settings(variant: str) -> dict:
    return dict(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=16, sparsegpt_block_size=16,
                forward_batch_size=4, device="cpu", br_epochs=2, **VARIANTS[variant])


def _run_script(tmp_path, variant, checkpoint_dir, output, kill_after=None, resume=False):
    script = tmp_path / "prune_script.py"
    if not script.exists():
        script.write_text(SCRIPT)
    env = dict(os.environ, SETTINGS=json.dumps(_settings(variant)), RESUME="1" if resume else "0",
               KILL_AFTER=str(-1 if kill_after is None else kill_after), HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, str(script), variant, str(checkpoint_dir), str(output)], env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_identical(state, reference):
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"{key} differs from the uninterrupted run"


@pytest.mark.parametrize("variant, kills", [("br_gp", [0, 1, 2]), ("br_gp_cr", [0, 1])])
def test_sigkill_after_block_k_then_resume_equals_uninterrupted_run(tmp_path, variant, kills):
    """The run is killed (SIGKILL) right after the checkpoint of block k, resumed in a new process that is killed
    after the next k, and so on; the last process runs to the end. Every resume must start right after its k, and
    the final model must equal the uninterrupted run's bit for bit (any wrong state would propagate into it)."""
    checkpoint_dir, output = tmp_path / "checkpoints", tmp_path / "model.safetensors"
    done = -1
    for k in kills:
        killed = _run_script(tmp_path, variant, checkpoint_dir, output, kill_after=k, resume=done >= 0)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not output.exists()
        steps = [name for name in os.listdir(checkpoint_dir) if name.startswith("step-")]
        assert steps == [f"step-{k:05d}"]  # only the latest complete checkpoint is kept
        done = k
    resumed = _run_script(tmp_path, variant, checkpoint_dir, output, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    # The last process started after the last k: it finalised only the blocks after it.
    assert json.loads((tmp_path / "model.safetensors.blocks.json").read_text()) == list(range(done + 1, NUM_BLOCKS))

    reference = make_tiny_model("llama", num_layers=NUM_BLOCKS)  # the uninterrupted run, without checkpoints
    Pruner(reference, PruningConfig(**_settings(variant)), calibration_data=_calibration(),
           show_progress=False).prune()
    _assert_identical(load_file(str(output)), reference.state_dict())


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


def _pruned(config, resume=False, calibration=None, num_layers=NUM_BLOCKS, **kwargs):
    model = make_tiny_model("llama", num_layers=num_layers)
    pruner = Pruner(model, config, calibration_data=calibration or _calibration(), show_progress=False, **kwargs)
    report = pruner.prune(resume=resume)
    return model, pruner, report


@pytest.mark.parametrize("overrides", [
    dict(reconstruction=["lr"]),                                   # no BR: streams kept from the mask step
    dict(reconstruction=["lr", "br"]),                             # BR toward the dense block on the sparse stream
    dict(reconstruction=["br", "cr"], method="wanda"),             # CR without GP: a pending block's dense copy
    dict(reconstruction=["lr", "br", "gp"], reconstruction_mode="lora", lora_rank=4),
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
    seen = []
    model, _, _ = _pruned(config, resume=True, on_block_end=lambda index, report: seen.append(index))
    assert seen == [2, 3]
    _assert_identical(model.state_dict(), reference.state_dict())


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
    with caplog.at_level(logging.INFO, logger="hf_recon_prune.pruner"):
        model, _, _ = _pruned(_config(tmp_path / "empty"), resume=True, on_block_end=lambda i, r: seen.append(i))
    assert "no checkpoint" in caplog.text and seen == [0, 1, 2, 3]
    _assert_identical(model.state_dict(), reference.state_dict())


def test_resume_needs_a_checkpoint_dir():
    model = make_tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Pruner(model, _config(), calibration_data=_calibration(), show_progress=False).prune(resume=True)


def test_a_fresh_run_replaces_an_old_checkpoint(tmp_path, caplog):
    _interrupted(_config(tmp_path), 2)
    with caplog.at_level(logging.WARNING, logger="hf_recon_prune.pruner"):
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

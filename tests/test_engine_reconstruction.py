"""BR / GP / CR through the block engine: targets, windows, masks, report, revert."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_recon_prune.reconstruction as reconstruction
from conftest import make_tiny_model, random_ids
from hf_recon_prune.architectures import prunable_linears, resolve_layout
from hf_recon_prune.block_io import call_block
from hf_recon_prune.capture import capture_block_kwargs
from hf_recon_prune.config import PruningConfig
from hf_recon_prune.pruner import Pruner
from test_pruner import _calibration, _config

BR = dict(br_epochs=15, br_lr=1e-3, br_batch_size=4)


def _run(model, calibration, **overrides):
    pruner = Pruner(model, _config(**{**BR, **overrides}), calibration_data=calibration, show_progress=False)
    return pruner, pruner.prune()


class _Spy:
    """Wraps reconstruct_window to record the windows, inputs and targets the engine trains with."""

    def __init__(self, monkeypatch, loss_transform=None):
        self.calls = []
        self._real = reconstruction.reconstruct_window
        self._loss_transform = loss_transform
        monkeypatch.setattr(reconstruction, "reconstruct_window", self)

    def __call__(self, blocks, masks, inputs, targets, kwargs, config, device, **kw):
        self.calls.append({"blocks": list(blocks), "inputs": inputs.clone(), "targets": targets.clone()})
        if self._loss_transform is not None:
            kw["loss_transform"] = self._loss_transform
        return self._real(blocks, masks, inputs, targets, kwargs, config, device, **kw)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_br_lowers_error_below_lr_and_keeps_every_zero(mode):
    base = make_tiny_model("llama", num_layers=3)
    calibration = _calibration(num=16)
    lr_model, br_model = copy.deepcopy(base), copy.deepcopy(base)
    _, lr_report = _run(lr_model, calibration, reconstruction=["lr"])
    pruner, br_report = _run(br_model, calibration, reconstruction=["lr", "br"], reconstruction_mode=mode)
    for lr_block, br_block in zip(lr_report.blocks, br_report.blocks):
        assert br_block.error_after["calibration"] < lr_block.error_after["calibration"]
        assert br_block.error_before["calibration"] > br_block.error_after["calibration"]
        # One window per block; early stopping on the held-out rows may end it before br_epochs, and says so.
        choice = br_block.br_choices[0]
        assert len(br_block.train_losses) == 1 == len(br_block.br_choices)
        assert len(br_block.train_losses[0]) == choice["epochs_run"] <= BR["br_epochs"]
        assert choice["stopped_early"] == (choice["epochs_run"] < BR["br_epochs"])
    layout = resolve_layout(br_model)
    for index, block in enumerate(layout.blocks):
        for name, layer in prunable_linears(block).items():
            mask = pruner.masks[f"{layout.blocks_path}.{index}.{name}"]
            assert torch.equal(layer.weight != 0, mask), name  # zeros exactly where the mask says, none more
            assert type(layer) is torch.nn.Linear
    assert not any("lora" in name for name, _ in br_model.named_modules())


def test_gp_trains_toward_the_dense_stream_and_local_toward_the_dense_block_on_the_sparse_stream(monkeypatch):
    base = make_tiny_model("llama", num_layers=3)  # hidden_states[3] is after the final norm; compare [1] and [2]
    calibration = _calibration(num=8)
    dense = copy.deepcopy(base)
    layout = resolve_layout(dense)
    kwargs = capture_block_kwargs(layout.base_model, layout.blocks, calibration.input_ids[:1], torch.device("cpu"))
    with torch.no_grad():
        hidden = dense(calibration.input_ids, output_hidden_states=True).hidden_states

    spy = _Spy(monkeypatch)
    gp_model = copy.deepcopy(base)
    _run(gp_model, calibration, reconstruction=["lr", "br", "gp"])
    gp_target_block1 = spy.calls[1]["targets"]
    assert torch.allclose(gp_target_block1, hidden[2], atol=1e-5)  # dense block 1 on the dense stream

    spy.calls.clear()
    local_model = copy.deepcopy(base)
    _run(local_model, calibration, reconstruction=["lr", "br"])
    sparse_input = spy.calls[1]["inputs"]
    with torch.no_grad():
        expected_local = call_block(layout.blocks[1], sparse_input, kwargs[1])  # dense block 1 on the sparse stream
    assert torch.allclose(spy.calls[1]["targets"], expected_local, atol=1e-5)
    assert not torch.allclose(gp_target_block1, expected_local, atol=1e-3)  # the construction distinguishes them
    # Block 1's sparse input is the pruned block 0's output, not the dense one.
    assert not torch.allclose(sparse_input, hidden[1], atol=1e-3)


@pytest.mark.parametrize("schedule, expected, trained", [
    ("authors", [(0,), (0, 1), (1, 2), (2, 3), (3,)], [2, 2, 2, 2]),
    ("sliding", [(0, 1), (1, 2), (2, 3)], [1, 2, 2, 1]),
])
def test_cr_visits_overlapping_windows_of_two_blocks(monkeypatch, schedule, expected, trained):
    model = make_tiny_model("llama", num_layers=4)
    spy = _Spy(monkeypatch)
    _, report = _run(model, _calibration(), reconstruction=["lr", "br", "gp", "cr"], br_epochs=2, cr_schedule=schedule)
    blocks = resolve_layout(model).blocks
    visited = [tuple(next(i for i, b in enumerate(blocks) if b is block) for block in call["blocks"]) for call in spy.calls]
    assert visited == expected
    assert [len(b.train_losses) for b in report.blocks] == trained
    assert [[tuple(c["window"]) for c in b.br_choices] for b in report.blocks] == [
        [w for w in expected if i in w] for i in range(4)]


def test_non_finite_loss_reverts_the_block_and_the_run_goes_on(monkeypatch):
    base = make_tiny_model("llama", num_layers=2)
    calibration = _calibration()
    lr_only = copy.deepcopy(base)
    _run(lr_only, calibration, reconstruction=["lr"])

    def poison_first_window(step, loss):
        return loss * float("nan") if spy_calls() == 1 else loss

    spy = _Spy(monkeypatch, loss_transform=poison_first_window)
    spy_calls = lambda: len(spy.calls)  # noqa: E731
    model = copy.deepcopy(base)
    _, report = _run(model, calibration, reconstruction=["lr", "br"])
    assert report.blocks[0].reverted and not report.blocks[1].reverted
    assert "non-finite" in report.blocks[0].warnings[0] and report.warnings
    block0, reference0 = resolve_layout(model).blocks[0], resolve_layout(lr_only).blocks[0]
    for (name, p), (_, q) in zip(block0.named_parameters(), reference0.named_parameters()):
        assert torch.equal(p, q), name  # exactly the LR weights: BR's changes were undone
    assert report.blocks[1].error_after["calibration"] < report.blocks[1].error_before["calibration"]


def test_overfitting_is_visible_in_the_report():
    """Few calibration samples, many epochs: calibration error falls much more than held-out error."""
    base = make_tiny_model("llama", num_layers=2)
    settings = dict(reconstruction=["lr", "br", "gp"], br_epochs=60, br_lr=3e-3, br_batch_size=2)
    _, report = _run(copy.deepcopy(base), _calibration(num=4, heldout=8), **settings, br_keep_best=False,
                     br_patience=None)
    block = report.blocks[-1]
    calibration_gain = block.error_before["calibration"] / block.error_after["calibration"]
    heldout_gain = block.error_before["heldout"] / block.error_after["heldout"]
    assert calibration_gain > 2 * heldout_gain
    # With the held-out controls (the default) each window keeps its best epoch on the held-out rows and stops
    # once more epochs stop helping: the window error on held-out rows never ends above where BR started.
    _, controlled = _run(copy.deepcopy(base), _calibration(num=4, heldout=8), **settings)
    for block in controlled.blocks:
        (choice,) = block.br_choices
        assert choice["stopped_early"] and choice["epochs_run"] < 60
        kept = choice["heldout_by_epoch"][choice["kept_epoch"] - 1] if choice["kept_epoch"] else choice["heldout_before"]
        assert kept == min([choice["heldout_before"], *choice["heldout_by_epoch"]])


def test_heldout_rows_never_reach_the_optimiser():
    """A forward pre-hook on block 0 sees every row the optimiser trains on (grad enabled): each is a calibration row's
    embedding, every calibration row is used, and no held-out row ever appears."""
    model = make_tiny_model("llama", num_layers=2)
    calibration = _calibration(num=8, heldout=6)
    with torch.no_grad():
        embed = model.get_input_embeddings()
        calibration_rows = embed(calibration.input_ids).flatten(1)
        heldout_rows = embed(calibration.heldout_ids).flatten(1)
    seen = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append(hidden.detach().flatten(1).clone())

    handle = resolve_layout(model).blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        _run(model, calibration, reconstruction=["lr", "br", "gp"], br_epochs=2)
    finally:
        handle.remove()
    trained = torch.cat(seen)
    assert trained.shape[0] == 2 * calibration_rows.shape[0]  # two epochs over every calibration row
    distance_to_calibration = torch.cdist(trained, calibration_rows).min(dim=1).values
    distance_to_heldout = torch.cdist(trained, heldout_rows).min(dim=1).values
    assert distance_to_calibration.max() < 1e-5
    assert distance_to_heldout.min() > 1e-2
    assert torch.cdist(calibration_rows, trained).min(dim=1).values.max() < 1e-5  # every calibration row was used


def test_compiled_block_training_matches_eager_and_compiles_once_for_every_window():
    """compile_blocks=True: the same training up to float rounding, and the second window (another block of the same
    class) reuses the first window's compiled graph instead of compiling again."""
    import torch._dynamo

    import hf_recon_prune.reconstruction.execution as execution

    ids = random_ids(8, 16)
    base = make_tiny_model("llama", num_layers=2)
    models, reports = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        execution._COMPILED.clear()
        execution._COMPILE_FAILED.clear()
        torch._dynamo.utils.counters.clear()
        model = copy.deepcopy(base)
        config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=["br", "gp"], num_samples=8, seq_len=16,
                               heldout_fraction=0.0, device="cpu", br_epochs=2, br_batch_size=4, br_lr=1e-3,
                               compile_blocks=compiled)
        reports[compiled] = Pruner(model, config, calibration_data=ids, show_progress=False).prune()
        models[compiled] = model
        if compiled:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for (name, x), y in zip(models[True].state_dict().items(), models[False].state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(x == 0, y == 0), name
    for eager, compiled in zip(reports[False].blocks, reports[True].blocks):
        assert compiled.train_losses[0] == pytest.approx(eager.train_losses[0], rel=1e-4)
        assert compiled.train_losses[0][-1] < compiled.train_losses[0][0]


def test_a_failing_compilation_falls_back_to_eager_training_with_a_note(monkeypatch):
    import torch._dynamo

    import hf_recon_prune.reconstruction.execution as execution

    def broken():
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("simulated: no C compiler found")
        return fail

    monkeypatch.setattr(execution, "_COMPILE_FAILED", [])
    ids = random_ids(8, 16)
    base = make_tiny_model("llama", num_layers=2)
    results = {}
    for compiled in (False, True):
        if compiled:
            monkeypatch.setattr(execution, "_compiled_window_squared_error", broken)
        model = copy.deepcopy(base)
        config = PruningConfig(method="wanda", sparsity=0.5, reconstruction=["br", "gp"], num_samples=8, seq_len=16,
                               heldout_fraction=0.0, device="cpu", br_epochs=2, br_batch_size=4,
                               compile_blocks=compiled)
        results[compiled] = (model, Pruner(model, config, calibration_data=ids, show_progress=False).prune())
    (eager, _), (fallen_back, report) = results[False], results[True]
    for (name, x), y in zip(fallen_back.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(x, y), name
    notes = [w for w in report.warnings if "torch.compile failed" in w]
    assert len(notes) == 1 and "no C compiler found" in notes[0]  # the second window did not try again
    assert execution._COMPILE_FAILED

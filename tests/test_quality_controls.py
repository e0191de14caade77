"""Issue 19's quality controls, each checked against a reference computed here:

* ``br_lr="auto"`` picks the candidate whose probe ends with the lowest held-out error, within 1.5x the steps;
* ``br_keep_best`` keeps the best epoch's weights exactly, ``br_patience`` stops where the held-out curve says,
  and a window whose held-out error BR worsens is reverted bit for bit;
* CR's default schedule is the authors' (single-block windows at both ends), the sliding one is still there, and
  the targets, streams and checkpoints of the single-block windows are right;
* the new fields are validated and the defaults are the paper's calibration budget.

Self-generation's own controls (until EOS, top-k 50, seeded windows, batching, the cache key) are in
``test_self_generation.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_model
from hf_recon_prune import PruningConfig
from hf_recon_prune.architectures import resolve_layout
from hf_recon_prune.calibration import sampling
from hf_recon_prune.pruner import Pruner
from hf_recon_prune.reconstruction import ReconstructionPlan, reconstruct_window, reconstruction_windows
from test_engine_reconstruction import _Spy
from test_pruner import _calibration, _config
from test_reconstruction import _kwargs, _prune_half, _run, _settings, _tiny_llama

CPU = torch.device("cpu")
N, H, L, D = 16, 8, 16, 32


# ============================================================================================== a window to train
class _Window:
    """Block 0 of a tiny Llama, pruned; calibration and held-out inputs with the dense block's outputs as targets."""

    def __init__(self, num_rows: int = N, heldout: int = H, seed: int = 1):
        model = _tiny_llama()
        self.blocks = [model.model.layers[0]]
        self.kwargs = [_kwargs(model, 0)]
        dense = [copy.deepcopy(self.blocks[0])]
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_rows, L, D, generator=generator)
        self.heldout_x = torch.randn(heldout, L, D, generator=generator)
        self.target = _run(dense, self.kwargs, self.x)
        self.heldout_target = _run(dense, self.kwargs, self.heldout_x)
        self.masks = _prune_half(self.blocks[0])

    def copy(self) -> tuple[list[nn.Module], dict[nn.Linear, torch.Tensor]]:
        """An independent copy of the pruned blocks, with the masks keyed by the copy's linears."""
        blocks = copy.deepcopy(self.blocks)
        names = {module: name for name, module in self.blocks[0].named_modules()}
        modules = dict(blocks[0].named_modules())
        return blocks, {modules[names[layer]]: mask for layer, mask in self.masks.items()}

    def train(self, settings, blocks=None, masks=None, loss_transform=None, heldout=True):
        if blocks is None:
            blocks, masks = self.copy()
        extra = dict(heldout_inputs=self.heldout_x, heldout_targets=self.heldout_target) if heldout else {}
        result = reconstruct_window(blocks, masks, self.x, self.target, self.kwargs, settings, CPU,
                                    loss_transform=loss_transform, **extra)
        return blocks, result

    def heldout_error(self, blocks) -> float:
        """The held-out MSE, computed here in float64 (the reference)."""
        with torch.no_grad():
            out = blocks[0].double()(self.heldout_x.double(), **_double(self.kwargs[0]))
            blocks[0].float()
        out = out[0] if isinstance(out, tuple) else out
        return F.mse_loss(out, self.heldout_target.double()).item()


def _double(kwargs):
    return {k: tuple(t.double() for t in v) if isinstance(v, tuple) else
            (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def _state(blocks):
    return {k: v.detach().clone() for k, v in blocks[0].state_dict().items()}


def _assert_same_state(state, reference):
    assert state.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(state[name], value), name


class _EpochWeights:
    """A loss_transform that records the window's weights at the first step of every epoch, i.e. the weights after
    the previous epoch (they reflect every step before, masks included)."""

    def __init__(self, blocks, steps_per_epoch: int):
        self.blocks, self.steps_per_epoch, self.after_epoch = blocks, steps_per_epoch, {}

    def __call__(self, step, loss):
        if step % self.steps_per_epoch == 0:
            self.after_epoch[step // self.steps_per_epoch] = _state(self.blocks)
        return loss


# ============================================================================================== br_lr="auto"
def test_auto_lr_picks_the_candidate_with_the_lowest_heldout_error_after_its_probe():
    window = _Window()
    grid, epochs, batch = (1e-4, 1e-3, 1e-2, 1e-1), 4, 4
    fixed = _settings(br_epochs=epochs, br_batch_size=batch, br_keep_best=False, br_patience=None)
    auto = dataclasses.replace(fixed, br_lr="auto", br_lr_grid=grid)
    # The probe's budget, as documented: the candidates' steps and held-out passes (a third of a training step per
    # row) together cost at most half the window's training (epochs * N rows).
    steps = math.floor((0.5 * epochs * N - len(grid) * H / 3) / (len(grid) * batch))
    assert steps >= 1 and len(grid) * (steps * batch + H / 3) <= 0.5 * epochs * N

    # Reference: each candidate trained at a fixed rate from the same weights; its held-out error after `steps` steps.
    reference = {}
    for lr in grid:
        blocks, masks = window.copy()

        def after_probe(step, loss, blocks=blocks, lr=lr):
            if step == steps:
                reference[lr] = window.heldout_error(blocks)
            return loss

        window.train(dataclasses.replace(fixed, br_lr=lr), blocks, masks, loss_transform=after_probe)
    best = min(grid, key=reference.get)
    assert best == 1e-3  # the construction distinguishes: neither end of the grid wins

    calls = []
    blocks, result = window.train(auto, loss_transform=lambda step, loss: calls.append(step) or loss)
    choice = result.choice
    assert (choice.lr, choice.lr_rule, choice.probe_steps) == (best, "auto", steps)
    assert choice.lr_probe.keys() == {f"{lr:g}" for lr in grid}
    for lr in grid:
        assert choice.lr_probe[f"{lr:g}"] == pytest.approx(reference[lr], rel=1e-4)
    # The winner is then trained from the start like a fixed rate: the same weights, bit for bit.
    fixed_blocks, _ = window.train(dataclasses.replace(fixed, br_lr=best))
    _assert_same_state(_state(blocks), _state(fixed_blocks))
    total = epochs * math.ceil(N / batch)
    assert len(calls) == len(grid) * steps + total <= 1.5 * total  # at most 1.5x the steps of a fixed-rate window


def test_auto_lr_without_heldout_rows_or_room_to_probe_falls_back_to_1e_3_and_says_so():
    window = _Window()
    auto = _settings(br_epochs=2, br_batch_size=4, br_lr="auto", br_keep_best=False, br_patience=None)
    blocks, result = window.train(auto, heldout=False)
    fixed_blocks, _ = window.train(dataclasses.replace(auto, br_lr=1e-3), heldout=False)
    _assert_same_state(_state(blocks), _state(fixed_blocks))
    assert (result.choice.lr, result.choice.lr_rule) == (1e-3, "auto-fallback")
    assert any("no held-out rows" in note for note in result.choice.notes)
    # One epoch over 4 rows leaves no room for four probes within half of it.
    _, short = _Window(num_rows=4).train(dataclasses.replace(auto, br_epochs=1))
    assert short.choice.lr_rule == "auto-fallback" and "no room for a probe" in short.choice.notes[0]


def test_probe_budget_holds_for_any_window():
    from hf_recon_prune.reconstruction.selection import probe_steps

    for rows, epochs, batch, heldout, candidates in [(256, 10, 8, 32, 4), (7, 3, 4, 3, 4), (1, 1, 8, 50, 4),
                                                     (1000, 1, 1, 0, 2), (64, 10, 64, 8, 5)]:
        steps = probe_steps(rows, epochs, batch, heldout, candidates)
        rows_per_step = min(batch, rows)
        assert steps >= 0
        assert candidates * (steps * rows_per_step + heldout / 3) <= 0.5 * epochs * rows or steps == 0
        assert steps <= epochs * math.ceil(rows / rows_per_step)
    assert probe_steps(256, 10, 8, 32, 4) == 38  # the paper's budget: about 1.2 epochs per candidate


# ============================================================================================== best epoch, patience
def _overfitting_window():
    """Few calibration rows and a high rate: the held-out error falls, then rises."""
    return _Window(num_rows=4, heldout=8, seed=3)


def test_keep_best_restores_the_best_epoch_exactly():
    window, epochs = _overfitting_window(), 12
    settings = _settings(br_epochs=epochs, br_batch_size=2, br_lr=3e-3, br_keep_best=True, br_patience=None)
    blocks, masks = window.copy()
    recorder = _EpochWeights(blocks, steps_per_epoch=2)
    _, result = window.train(settings, blocks, masks, loss_transform=recorder)
    # Reference: the held-out error of the weights recorded after every epoch (epoch 0: before BR).
    errors = {epoch: window.heldout_error(_loaded(window, state)) for epoch, state in recorder.after_epoch.items()}
    best = min(errors, key=errors.get)
    assert 0 < best < epochs - 1  # the construction overfits: neither "no BR" nor the last recorded epoch is best
    choice = result.choice
    assert (choice.best_epoch, choice.kept_epoch, choice.epochs_run) == (best, best, epochs)
    assert not choice.stopped_early and not choice.reverted_because_worse
    assert choice.heldout_before == pytest.approx(errors[0], rel=1e-4)
    assert choice.heldout_by_epoch[:epochs - 1] == pytest.approx([errors[e] for e in range(1, epochs)], rel=1e-4)
    _assert_same_state(_state(blocks), recorder.after_epoch[best])  # exactly the best epoch's weights
    for layer, mask in masks.items():
        assert torch.all(layer.weight[~mask] == 0)


def test_patience_stops_after_that_many_epochs_without_a_new_best():
    window, epochs, patience = _overfitting_window(), 12, 2
    base = _settings(br_epochs=epochs, br_batch_size=2, br_lr=3e-3, br_keep_best=True, br_patience=None)
    _, full = window.train(base)
    curve = [full.choice.heldout_before, *full.choice.heldout_by_epoch]
    # Reference: the first epoch that is `patience` epochs past the best so far.
    stop = next(e for e in range(1, epochs + 1) if e - min(range(e + 1), key=curve.__getitem__) >= patience)
    best = min(range(stop + 1), key=curve.__getitem__)
    assert stop < epochs

    blocks, masks = window.copy()
    recorder = _EpochWeights(blocks, steps_per_epoch=2)
    _, result = window.train(dataclasses.replace(base, br_patience=patience), blocks, masks, loss_transform=recorder)
    choice = result.choice
    assert (choice.epochs_run, choice.best_epoch, choice.kept_epoch, choice.stopped_early) == (stop, best, best, True)
    assert len(result.epoch_losses) == stop and result.num_steps == 2 * stop
    _assert_same_state(_state(blocks), recorder.after_epoch[best])


def _loaded(window, state):
    blocks, _ = window.copy()
    blocks[0].load_state_dict(state)
    return blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_window_whose_heldout_error_br_worsens_is_reverted_bit_exactly(dtype):
    window = _Window()
    blocks, masks = window.copy()
    blocks[0].to(dtype)
    before = _state(blocks)
    # Held-out targets that the weights before BR reproduce exactly: any training can only make them worse.
    # (Training runs on float32 master weights, i.e. the upcast block, on float32 inputs: so do these targets.)
    worse = copy.copy(window)
    with torch.no_grad():
        worse.heldout_target = _run([copy.deepcopy(blocks[0]).float()], window.kwargs, window.heldout_x)
    settings = _settings(br_epochs=3, br_batch_size=4, br_lr=1e-3, br_keep_best=True, br_patience=None)
    _, result = worse.train(settings, blocks, masks)
    choice = result.choice
    assert choice.reverted_because_worse and choice.kept_epoch == 0 and choice.best_epoch == 0
    assert not result.reverted and result.warning is None  # not the non-finite revert
    assert all(error > choice.heldout_before for error in choice.heldout_by_epoch)
    _assert_same_state(_state(blocks), before)
    assert all(p.dtype == dtype and not p.requires_grad for p in blocks[0].parameters())
    # Without br_keep_best the window keeps its (worse) trained weights.
    blocks, masks = window.copy()
    blocks[0].to(dtype)
    _, kept = worse.train(dataclasses.replace(settings, br_keep_best=False), blocks, masks)
    assert not kept.choice.reverted_because_worse and kept.choice.kept_epoch == 3
    assert any(not torch.equal(v, before[k]) for k, v in _state(blocks).items())


def test_the_engine_reports_a_revert_and_keeps_the_lr_weights(monkeypatch):
    """In a run, a window whose held-out targets its pre-BR weights already meet is reverted: the block ends with
    exactly the LR weights, and its report says what happened and why."""
    base = make_tiny_model("llama", num_layers=2)
    lr_only = copy.deepcopy(base)
    Pruner(lr_only, _config(), calibration_data=_calibration(), show_progress=False).prune()

    class _MetTargets(_Spy):
        def __call__(self, blocks, masks, inputs, targets, kwargs, config, device, **kw):
            if not self.calls:  # block 0's window: held-out targets = its own output before BR
                kw["heldout_targets"] = _run(blocks, kwargs, kw["heldout_inputs"])
            return super().__call__(blocks, masks, inputs, targets, kwargs, config, device, **kw)

    _MetTargets(monkeypatch)
    model = copy.deepcopy(base)
    report = Pruner(model, _config(reconstruction=["lr", "br", "gp"], br_epochs=3, br_lr=1e-3),
                    calibration_data=_calibration(), show_progress=False).prune()
    (first,), (second,) = report.blocks[0].br_choices, report.blocks[1].br_choices
    assert first["reverted_because_worse"] and first["kept_epoch"] == 0 and first["window"] == [0]
    assert not second["reverted_because_worse"] and second["lr"] == 1e-3 and second["lr_rule"] == "fixed"
    assert not report.blocks[0].reverted  # that flag stays the non-finite revert's
    assert "BR reverted (held-out error worse)" in report.to_markdown().splitlines()[2]
    block, reference = resolve_layout(model).blocks[0], resolve_layout(lr_only).blocks[0]
    for (name, p), (_, q) in zip(block.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
    json.dumps(report.to_dict(), allow_nan=False)  # the choices are plain JSON


# ============================================================================================== CR schedule
def test_the_default_cr_schedule_is_the_authors_and_the_sliding_one_is_an_option():
    assert PruningConfig().cr_schedule == "authors"
    config = PruningConfig(reconstruction=["lr", "br", "gp", "cr"])
    plan = ReconstructionPlan.from_config(config, 4)
    assert plan.windows == ((0,), (0, 1), (1, 2), (2, 3), (3,))
    # A block is final after the last window that contains it; the first window finalises nothing.
    assert [plan.finalised_after(w) for w in range(5)] == [(), (0,), (1,), (2,), (3,)]
    sliding = ReconstructionPlan.from_config(PruningConfig(reconstruction=["lr", "br", "gp", "cr"],
                                                           cr_schedule="sliding"), 4)
    assert sliding.windows == ((0, 1), (1, 2), (2, 3))
    assert [sliding.finalised_after(w) for w in range(3)] == [(0,), (1,), (2, 3)]
    assert reconstruction_windows(6, cross_block=True) == [(0,)] + [(i, i + 1) for i in range(5)] + [(5,)]
    with pytest.raises(ValueError, match=r"PruningConfig.cr_schedule='both' is not allowed; allowed: 'authors', 'sliding'"):
        PruningConfig(cr_schedule="both")


@pytest.mark.parametrize("gp", [True, False])
def test_single_block_windows_train_toward_the_right_targets_from_the_right_inputs(monkeypatch, gp):
    """(0,): embeddings -> dense block 0's output; (0, 1): embeddings -> dense output of block 1; (2,) (the last):
    the output of the finalised blocks 0..1 -> dense output of block 2 (with GP; without, the dense copy of the
    window on the same input)."""
    base = make_tiny_model("llama", num_layers=3)
    calibration = _calibration()
    layout = resolve_layout(base)
    with torch.no_grad():
        hidden = base(calibration.input_ids, output_hidden_states=True).hidden_states  # [3] is after the final norm
        dense_last = [copy.deepcopy(layout.blocks[2])]
    spy = _Spy(monkeypatch)
    model = copy.deepcopy(base)
    recipe = ["lr", "br", "gp", "cr"] if gp else ["lr", "br", "cr"]
    Pruner(model, _config(reconstruction=recipe, br_epochs=2, br_lr=1e-3), calibration_data=calibration,
           show_progress=False).prune()
    pruned = resolve_layout(model)
    windows = [tuple(list(pruned.blocks).index(b) for b in call["blocks"]) for call in spy.calls]
    assert windows == [(0,), (0, 1), (1, 2), (2,)]
    kwargs = [_kwargs_of(model, calibration.input_ids, i) for i in range(3)]
    assert torch.allclose(spy.calls[0]["inputs"], hidden[0], atol=1e-6)
    assert torch.allclose(spy.calls[1]["inputs"], hidden[0], atol=1e-6)
    if gp:
        assert torch.allclose(spy.calls[0]["targets"], hidden[1], atol=1e-5)
        assert torch.allclose(spy.calls[1]["targets"], hidden[2], atol=1e-5)
    # The last window's input: blocks 0 and 1 as they ended (final once window (1, 2) is done) on the embeddings.
    with torch.no_grad():
        sparse_input = _run(pruned.blocks[:2], kwargs[:2], hidden[0])
    assert torch.allclose(spy.calls[3]["inputs"], sparse_input, atol=1e-5)
    if gp:
        with torch.no_grad():
            dense_output = _run(layout.blocks[:3], kwargs, hidden[0])
        assert torch.allclose(spy.calls[3]["targets"], dense_output, atol=1e-5)
    else:
        with torch.no_grad():
            expected = _run(dense_last, kwargs[2:], sparse_input)
        assert torch.allclose(spy.calls[3]["targets"], expected, atol=1e-5)


def _kwargs_of(model, ids, index):
    from hf_recon_prune.capture import capture_block_kwargs

    layout = resolve_layout(model)
    return capture_block_kwargs(layout.base_model, layout.blocks, ids[:1], CPU)[index]


@pytest.mark.parametrize("stop_after", [0, 2])
def test_authors_schedule_resumes_to_the_uninterrupted_result(tmp_path, stop_after):
    """Interrupted after block k (2: possible only with the authors' schedule, whose last window finalises block 3
    alone) and resumed: the same weights and masks as an uninterrupted run, bit for bit."""
    settings = dict(reconstruction=["lr", "br", "gp", "cr"], br_epochs=2, br_lr=1e-3)
    reference = make_tiny_model("llama", num_layers=4)
    reference_pruner = Pruner(reference, _config(**settings), calibration_data=_calibration(), show_progress=False)
    reference_pruner.prune()

    class _Stop(Exception):
        pass

    def stop(index, _report):
        if index == stop_after:
            raise _Stop()

    config = _config(**settings, checkpoint_dir=str(tmp_path / "checkpoints"))
    with pytest.raises(Exception):
        Pruner(make_tiny_model("llama", num_layers=4), config, calibration_data=_calibration(), show_progress=False,
               on_block_end=stop).prune()
    model = make_tiny_model("llama", num_layers=4)
    pruner = Pruner(model, config, calibration_data=_calibration(), show_progress=False)
    report = pruner.prune(resume=True)
    for (name, x), y in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(x, y), name
    assert pruner.masks.keys() == reference_pruner.masks.keys()
    assert all(torch.equal(pruner.masks[k], reference_pruner.masks[k]) for k in pruner.masks)
    assert [len(b.br_choices) for b in report.blocks] == [2, 2, 2, 2]


# ============================================================================================== configuration
@pytest.mark.parametrize("field, value, allowed", [
    ("br_lr", "fast", "a finite number > 0, or 'auto'"),
    ("br_lr", -1.0, "a finite number > 0, or 'auto'"),
    ("br_patience", 0, r"None \(train every epoch\) or an integer >= 1"),
    ("cr_schedule", "paper", "'authors', 'sliding'"),
    ("self_gen_batch_size", "max", r"an integer > 0, or 'auto'"),
    ("self_gen_batch_size", 0, r"an integer > 0, or 'auto'"),
    ("self_gen_max_length", 8, r"None \(= seq_len\) or an integer >= seq_len \(16\)"),
])
def test_new_fields_are_validated_with_the_field_the_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"PruningConfig\.{field}={value!r} is not allowed; allowed: {allowed}"):
        PruningConfig(seq_len=16, **{field: value})


def test_defaults_are_the_papers_calibration_budget_and_roundtrip():
    config = PruningConfig()
    assert (config.num_samples, config.seq_len, config.br_lr) == (256, 1024, "auto")
    assert (config.br_keep_best, config.br_patience, config.self_gen_batch_size) == (True, 3, "auto")
    auto = PruningConfig(br_lr="auto", self_gen_batch_size=64, self_gen_max_length=2048, br_patience=None)
    assert PruningConfig.from_dict(json.loads(auto.to_json_string())) == auto


def test_gumbel_noise_on_the_top_k_alone_is_the_full_noise_bit_for_bit():
    from transformers.generation import TopKLogitsWarper

    generator = torch.Generator().manual_seed(3)
    scores = TopKLogitsWarper(50)(None, torch.randn(6, 3000, generator=generator))
    keys = [11, 12, 13, 14, 15, 2**40 + 7]
    ids = torch.zeros(6, 9, dtype=torch.long)
    assert int(torch.isfinite(scores).sum()) == 6 * 50  # the sparse path is the one taken
    noisy = sampling.SeededGumbelNoise(keys)(ids, scores)
    # reference: noise for every vocabulary entry, as the dense path computes it
    full = sampling.uniform_noise(torch.tensor([k & 0xFFFFFFFF for k in keys]), 9, 3000)
    assert torch.equal(noisy, scores + (-torch.log(-torch.log(full))))
    # a dense row (no top-k) takes the dense path: the same formula
    dense = torch.randn(6, 3000, generator=generator)
    assert torch.equal(sampling.SeededGumbelNoise(keys)(ids, dense), dense + (-torch.log(-torch.log(full))))

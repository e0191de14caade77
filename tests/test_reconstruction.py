"""Block-wise / cross-block reconstruction on tiny Llama blocks, checked against references computed here."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft.tuners.lora import LoraLayer
from torch import nn

from hf_recon_prune import PruningConfig
from hf_recon_prune.config import RECONSTRUCTION_MODES, TRAINED_MODES
from hf_recon_prune.block_io import move_to
from hf_recon_prune.reconstruction import (
    TRAINING_STRATEGIES,
    BlockTrainingSettings,
    FullWeights,
    MaskedLora,
    MaskedLoraLinear,
    TrainResult,
    reconstruct_window,
    reconstruction_windows,
)

CPU = torch.device("cpu")
N, L, D = 16, 16, 32


def _tiny_llama(num_layers: int = 2, dtype=torch.float32, attention=None) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=D, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    if attention is not None:
        config._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, 0.08)  # wider than the default init, so that pruning visibly hurts
    model.requires_grad_(False)
    return model.to(dtype)


def _kwargs(model, index: int) -> dict:
    """The keyword arguments block ``index`` receives in a batch-1 forward (they broadcast over a batch)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})

    handle = model.model.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.arange(L).unsqueeze(0), use_cache=False)
    finally:
        handle.remove()
    return captured


def _prune_half(block: nn.Module) -> dict[nn.Linear, torch.Tensor]:
    """Mask = |W| above its row's median (50% per row); pruned weights zeroed in place."""
    masks = {}
    for module in block.modules():
        if isinstance(module, nn.Linear):
            magnitude = module.weight.detach().float().abs()
            mask = magnitude > magnitude.median(dim=1, keepdim=True).values
            with torch.no_grad():
                module.weight.mul_(mask)
            masks[module] = mask
    return masks


def _run(blocks, kwargs, x):
    with torch.no_grad():
        for block, kw in zip(blocks, kwargs):
            out = block(x, **kw)
            x = out[0] if isinstance(out, tuple) else out
    return x


def _mse(blocks, kwargs, x, target) -> float:
    return F.mse_loss(_run(blocks, kwargs, x).float(), target.float()).item()


def _settings(**overrides) -> BlockTrainingSettings:
    values = dict(br_epochs=20, br_lr=1e-3, br_batch_size=4, seed=0)  # autocast "auto": none on the CPU
    values.update(overrides)
    return BlockTrainingSettings.from_config(PruningConfig(**values))


def _problem(num_blocks: int = 1, dtype=torch.float32, attention=None):
    """Dense copies of the first ``num_blocks`` blocks give the targets; the model's own blocks are pruned.
    ``attention``: the attention implementation (transformers' default when None)."""
    model = _tiny_llama(dtype=dtype, attention=attention)
    blocks = list(model.model.layers[:num_blocks])
    kwargs = [_kwargs(model, i) for i in range(num_blocks)]
    dense = [copy.deepcopy(b) for b in blocks]
    x = torch.randn(N, L, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    target = _run(dense, kwargs, x)
    masks = {}
    for block in blocks:
        masks.update(_prune_half(block))
    return model, blocks, kwargs, masks, x, target


def _state(blocks) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in b.state_dict().items()} for b in blocks]


def _assert_mask_exact(masks):
    for layer, mask in masks.items():
        assert type(layer) is nn.Linear
        assert torch.all(layer.weight[~mask] == 0)
        assert int((layer.weight == 0).sum()) == int((~mask).sum())  # exactly the masked positions are zero


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule():
    assert reconstruction_windows(4, cross_block=False) == [(0,), (1,), (2,), (3,)]
    # The authors' schedule (the default): single-block windows at both ends.
    assert reconstruction_windows(4, cross_block=True) == [(0,), (0, 1), (1, 2), (2, 3), (3,)]
    assert reconstruction_windows(4, cross_block=True, schedule="sliding") == [(0, 1), (1, 2), (2, 3)]
    for schedule in ("authors", "sliding"):
        assert reconstruction_windows(1, cross_block=True, schedule=schedule) == [(0,)]
        assert reconstruction_windows(0, cross_block=True, schedule=schedule) == []
        assert reconstruction_windows(3, cross_block=False, schedule=schedule) == [(0,), (1,), (2,)]
    authors = reconstruction_windows(5, cross_block=True)
    assert [sum(i in w for w in authors) for i in range(5)] == [2, 2, 2, 2, 2]  # every block trained twice
    sliding = reconstruction_windows(5, cross_block=True, schedule="sliding")
    assert [sum(i in w for w in sliding) for i in range(5)] == [1, 2, 2, 2, 1]  # interior blocks trained twice
    with pytest.raises(ValueError, match="cr_schedule='paper' is not allowed; allowed: 'authors', 'sliding'"):
        reconstruction_windows(4, cross_block=True, schedule="paper")


# ---------------------------------------------------------------------------------------------- BR
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_br_lowers_block_error_and_keeps_mask(mode):
    model, blocks, kwargs, masks, x, target = _problem()
    error_before = _mse(blocks, kwargs, x, target)
    originals = {name: m for name, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}

    result = reconstruct_window(blocks, masks, x, target, kwargs, _settings(reconstruction_mode=mode), CPU)

    assert isinstance(result, TrainResult) and not result.reverted and result.warning is None
    assert result.num_steps == 20 * math.ceil(N / 4) and len(result.epoch_losses) == 20
    assert all(math.isfinite(v) for v in result.epoch_losses) and result.seconds > 0
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    error_after = _mse(blocks, kwargs, x, target)
    # LoRA (rank 8 on 32x32 / 32x64 weights, same lr) moves less than full training in 80 steps
    assert error_after < (0.5 if mode == "full" else 0.75) * error_before, (error_before, error_after)
    _assert_mask_exact(masks)
    # plain nn.Linear again (the same objects), nothing left requiring grad or holding a gradient
    assert {n: m for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)} == originals
    assert not any(isinstance(m, LoraLayer) for m in blocks[0].modules())
    assert not any(p.requires_grad or p.grad is not None for p in blocks[0].parameters())
    assert not blocks[0].training


def test_full_mode_trains_other_params_only_when_asked():
    for train_other in (True, False):
        model, blocks, kwargs, masks, x, target = _problem()
        norm_before = blocks[0].input_layernorm.weight.clone()
        pruned_before = {layer: layer.weight.clone() for layer in masks}
        reconstruct_window(blocks, masks, x, target, kwargs, _settings(br_epochs=2, br_train_other_params=train_other), CPU)
        assert torch.equal(blocks[0].input_layernorm.weight, norm_before) is not train_other
        assert all(not torch.equal(layer.weight, w) for layer, w in pruned_before.items())


def test_lora_target_modules_restrict_what_changes():
    model, blocks, kwargs, masks, x, target = _problem()
    before = {name: m.weight.clone() for name, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    settings = _settings(br_epochs=2, reconstruction_mode="lora", lora_target_modules=[r"^mlp\."],
                         br_train_other_params=False)
    reconstruct_window(blocks, masks, x, target, kwargs, settings, CPU)
    for name, module in blocks[0].named_modules():
        if name in before:
            assert torch.equal(module.weight, before[name]) is (not name.startswith("mlp.")), name
    _assert_mask_exact(masks)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_mask_holds_at_every_step(mode):
    model, blocks, kwargs, masks, x, target = _problem()
    seen = []

    def check(step, loss):
        for layer, mask in masks.items():
            if mode == "full":
                assert layer.weight.requires_grad
                assert torch.all(layer.weight[~mask] == 0)
                if step > 0:  # the previous step's gradient, as the optimizer saw it, is masked too
                    assert torch.all(layer.weight.grad[~mask] == 0) and torch.any(layer.weight.grad[mask] != 0)
            else:
                adapted = next(m for m in blocks[0].modules() if isinstance(m, MaskedLoraLinear) and m.base_layer is layer)
                assert torch.all(adapted.effective_weight()[~mask] == 0)
                if step > 0:
                    assert torch.count_nonzero(adapted.lora_B["default"].weight) > 0
        seen.append(step)
        return loss

    result = reconstruct_window(
        blocks, masks, x, target, kwargs, _settings(br_epochs=3, reconstruction_mode=mode), CPU, loss_transform=check
    )
    assert seen == list(range(result.num_steps)) and result.num_steps == 12
    _assert_mask_exact(masks)


def _remask_runs(monkeypatch, device: torch.device, dtype, **settings) -> list[list[dict[str, torch.Tensor]]]:
    """The same full-mode window trained with the old re-masking after every step and without it (eager attention,
    whose backward is deterministic on CUDA, unlike SDPA's, so that the two runs can be compared bit for bit)."""
    import hf_recon_prune.reconstruction.strategies as strategies

    states = []
    for remask in (True, False):
        monkeypatch.setattr(strategies, "REMASK_AFTER_EVERY_STEP", remask)
        model, blocks, kwargs, masks, x, target = _problem(num_blocks=2, dtype=dtype, attention="eager")
        model.to(device)
        kwargs = [move_to(kw, device) for kw in kwargs]
        masks = {layer: mask.to(device) for layer, mask in masks.items()}
        before = {layer: layer.weight.detach().clone() for layer in masks}
        result = reconstruct_window(blocks, masks, x.to(device), target.to(device), kwargs,
                                    _settings(**settings), device)
        assert not result.reverted and result.num_steps > 0
        _assert_mask_exact(masks)
        for layer, mask in masks.items():  # training moved (nearly) every kept weight
            assert (layer.weight[mask] != before[layer][mask]).float().mean() > 0.9
        states.append([{k: v.cpu() for k, v in state.items()} for state in _state(blocks)])
    return states


@pytest.mark.parametrize("train_other", [False, True])
def test_masked_gradients_alone_keep_pruned_weights_zero_bit_for_bit(monkeypatch, train_other):
    """Adam with masked gradients leaves a pruned weight at exactly zero (its moments stay zero), so dropping the
    re-masking after every step changes no value: every weight equals the old way's bit for bit, at a learning rate
    large enough to move every kept weight."""
    with_remask, without = _remask_runs(monkeypatch, CPU, torch.float32, br_epochs=4, br_lr=1e-2,
                                        br_train_other_params=train_other)
    for old, new in zip(with_remask, without):
        assert old.keys() == new.keys()
        for key in old:
            assert torch.equal(old[key], new[key]), key


# ---------------------------------------------------------------------------------------------- failure
@pytest.mark.parametrize("mode,dtype", [("full", torch.float32), ("lora", torch.float32), ("full", torch.bfloat16)])
def test_non_finite_loss_reverts_bit_exactly(mode, dtype):
    model, blocks, kwargs, masks, x, target = _problem(num_blocks=2, dtype=dtype)
    blocks[1].post_attention_layernorm.weight.requires_grad_(True)  # a flag to be restored as it was
    before = _state(blocks)

    def poison(step, loss):
        return loss * float("nan") if step == 6 else loss

    result = reconstruct_window(
        blocks, masks, x, target, kwargs, _settings(br_epochs=3, reconstruction_mode=mode), CPU,
        loss_transform=poison, window_name="blocks (0, 1)",
    )
    assert result.reverted and "blocks (0, 1)" in result.warning and "non-finite" in result.warning
    assert "step 6" in result.warning
    assert result.epoch_losses and len(result.epoch_losses) == 1  # the first epoch finished, the second did not
    for block, saved in zip(blocks, before):
        state = block.state_dict()
        assert state.keys() == saved.keys()
        for key, value in saved.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
        assert not any(isinstance(m, LoraLayer) for m in block.modules())
    flags = [(n, p.requires_grad) for b in blocks for n, p in b.named_parameters()]
    assert [n for n, flag in flags if flag] == ["post_attention_layernorm.weight"]


def test_default_warning_names_the_blocks():
    model, blocks, kwargs, masks, x, target = _problem(num_blocks=2)
    result = reconstruct_window(
        blocks[1:], {k: v for k, v in masks.items() if any(k is m for m in blocks[1].modules())}, x, target,
        kwargs[1:], _settings(br_epochs=1), CPU, loss_transform=lambda step, loss: loss + float("inf"),
    )
    assert result.reverted and "(1,)" in result.warning


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_exception_restores_the_window_and_propagates(mode):
    model, blocks, kwargs, masks, x, target = _problem()
    before = _state(blocks)

    def explode(step, loss):
        if step == 5:
            raise RuntimeError("boom")
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        reconstruct_window(blocks, masks, x, target, kwargs, _settings(reconstruction_mode=mode), CPU, loss_transform=explode)
    state = blocks[0].state_dict()
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], v) for k, v in before[0].items())
    assert not any(isinstance(m, LoraLayer) for m in blocks[0].modules())
    assert not any(p.requires_grad or p.grad is not None for p in blocks[0].parameters())


# ---------------------------------------------------------------------------------------------- CR
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cross_block_window_trains_both_blocks(mode):
    model, blocks, kwargs, masks, x, target = _problem(num_blocks=2)
    before = _state(blocks)
    error_before = _mse(blocks, kwargs, x, target)
    result = reconstruct_window(blocks, masks, x, target, kwargs, _settings(reconstruction_mode=mode), CPU)
    assert not result.reverted
    assert _mse(blocks, kwargs, x, target) < (0.5 if mode == "full" else 0.75) * error_before
    for block, saved in zip(blocks, before):
        state = block.state_dict()
        changed = [k for k in saved if k.endswith("proj.weight") and not torch.equal(state[k], saved[k])]
        assert len(changed) == 7, changed  # every pruned linear of both blocks moved
    _assert_mask_exact(masks)


# ---------------------------------------------------------------------------------------------- dtypes, determinism
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bf16_blocks_use_float32_master_weights(mode):
    model, blocks, kwargs, masks, x, target = _problem(dtype=torch.bfloat16)
    before = _state(blocks)
    error_before = _mse(blocks, kwargs, x, target)
    dtypes_seen = set()

    def watch(step, loss):
        dtypes_seen.update(p.dtype for p in blocks[0].parameters())
        return loss

    reconstruct_window(blocks, masks, x, target, kwargs, _settings(reconstruction_mode=mode), CPU, loss_transform=watch)
    assert dtypes_seen == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in blocks[0].parameters())
    assert _mse(blocks, kwargs, x, target) < 0.7 * error_before
    _assert_mask_exact(masks)
    state = blocks[0].state_dict()
    assert any(not torch.equal(state[k], v) for k, v in before[0].items())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_same_seed_same_weights(mode):
    runs = []
    for seed in (0, 0, 1):
        model, blocks, kwargs, masks, x, target = _problem()
        rng = torch.get_rng_state()
        reconstruct_window(blocks, masks, x, target, kwargs, _settings(br_epochs=2, reconstruction_mode=mode, seed=seed), CPU)
        assert torch.equal(torch.get_rng_state(), rng)  # no global RNG side effect
        runs.append(_state(blocks)[0])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_row_indices_live_with_device_resident_streams():
    """A step gathers the rows of device-resident streams with an index already on the device (an epoch's order is
    moved there once); CPU and disk streams, and mixed placements, are gathered with CPU indices."""
    from hf_recon_prune.reconstruction.block_trainer import _MiniBatches

    host = torch.zeros(4, 2, 3)
    elsewhere = torch.empty(4, 2, 3, device="meta")  # stands for a device the CPU suite does not have
    assert _MiniBatches(host, host, CPU).index_device == CPU
    assert _MiniBatches(elsewhere, elsewhere, elsewhere.device).index_device == elsewhere.device
    assert _MiniBatches(elsewhere, host, elsewhere.device).index_device == CPU
    assert _MiniBatches(host, elsewhere, elsewhere.device).index_device == CPU


def test_bad_arguments():
    model, blocks, kwargs, masks, x, target = _problem()
    layer = blocks[0].mlp.gate_proj  # 64 x 32: a transposed mask has the wrong shape
    with pytest.raises(ValueError, match="mask shape"):
        reconstruct_window(blocks, {layer: masks[layer].T}, x, target, kwargs, _settings(), CPU)
    with pytest.raises(ValueError, match="not inside"):
        reconstruct_window(blocks, {nn.Linear(D, D): torch.ones(D, D, dtype=torch.bool)}, x, target, kwargs, _settings(), CPU)
    with pytest.raises(ValueError, match=r"\[N, L, d\]"):
        reconstruct_window(blocks, masks, x, target[:, :-1], kwargs, _settings(), CPU)


# ---------------------------------------------------------------------------------------------- settings, modes
def test_settings_hold_the_configs_block_training_fields():
    config = PruningConfig(reconstruction_mode="lora", br_epochs=3, br_lr=5e-4, br_batch_size=2,
                           br_train_other_params=False, lora_rank=4, lora_alpha=8.0, lora_target_modules=["mlp"],
                           seed=7, autocast_dtype="float32", compile_blocks=False, br_keep_best=False, br_patience=2)
    settings = BlockTrainingSettings.from_config(config)
    names = {f.name for f in dataclasses.fields(settings)}
    assert names == {"reconstruction_mode", "br_train_other_params", "br_epochs", "br_batch_size", "br_lr", "seed",
                     "lora_rank", "lora_alpha", "lora_target_modules", "autocast_dtype", "compile_blocks",
                     "br_keep_best", "br_patience", "br_lr_grid"}
    assert all(getattr(settings, n) == getattr(config, n) for n in names - {"lora_target_modules", "br_lr_grid"})
    assert settings.lora_target_modules == ("mlp",)  # a copy: changing the config's list does not reach it
    assert settings.br_lr_grid == (2e-4, 5e-4, 1e-3, 2e-3) and not hasattr(config, "br_lr_grid")
    assert BlockTrainingSettings.from_config(PruningConfig(br_lr="auto")).br_lr == "auto"
    with pytest.raises(ValueError, match="br_lr_grid=.* is not allowed"):
        dataclasses.replace(settings, br_lr_grid=(1e-3, 0.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.br_lr = 1.0


def test_every_configurable_mode_has_a_training_strategy():
    assert TRAINING_STRATEGIES == {"full": FullWeights, "lora": MaskedLora}
    assert set(TRAINING_STRATEGIES) == set(TRAINED_MODES)
    assert set(RECONSTRUCTION_MODES) == set(TRAINED_MODES) | {"auto"}  # resolved before training (memory.py)


def test_the_trainer_takes_its_settings_not_the_whole_config():
    model, blocks, kwargs, masks, x, target = _problem()
    with pytest.raises(TypeError, match="takes BlockTrainingSettings"):
        reconstruct_window(blocks, masks, x, target, kwargs, PruningConfig(), CPU)


def test_an_unknown_mode_raises_before_changing_the_window():
    model, blocks, kwargs, masks, x, target = _problem()
    before = _state(blocks)
    settings = dataclasses.replace(_settings(), reconstruction_mode="sparse")
    with pytest.raises(ValueError, match="unknown reconstruction_mode 'sparse'"):
        reconstruct_window(blocks, masks, x, target, kwargs, settings, CPU)
    state = blocks[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in before[0].items())
    assert not any(p.requires_grad or p.grad is not None for p in blocks[0].parameters())


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cuda_bf16_autocast_pinned_streams(mode):
    """The GPU path: bf16 model, float32 master weights under bf16 autocast, fused Adam, pinned CPU streams."""
    device = torch.device("cuda")
    model, blocks, kwargs, masks, x, target = _problem(num_blocks=2, dtype=torch.bfloat16)
    model.to(device)
    kwargs = [move_to(kw, device) for kw in kwargs]
    x_dev, target_dev = x.to(device), target.to(device)
    error_before = _mse(blocks, kwargs, x_dev, target_dev)
    cuda_rng = torch.cuda.get_rng_state(device)
    result = reconstruct_window(
        blocks, masks, x.pin_memory(), target.pin_memory(), kwargs, _settings(reconstruction_mode=mode), device
    )
    assert torch.equal(torch.cuda.get_rng_state(device), cuda_rng)
    assert not result.reverted and result.num_steps == 80
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cuda" for b in blocks for p in b.parameters())
    assert _mse(blocks, kwargs, x_dev, target_dev) < 0.8 * error_before
    _assert_mask_exact(masks)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_blocks", [False, "auto"])
def test_masked_gradients_alone_keep_pruned_weights_zero_on_cuda(monkeypatch, compile_blocks):
    """The same on the GPU path: fused Adam, bf16 autocast over float32 master weights, eager and graphed."""
    with_remask, without = _remask_runs(monkeypatch, torch.device("cuda"), torch.bfloat16, br_epochs=4, br_lr=1e-2,
                                        compile_blocks=compile_blocks)
    for old, new in zip(with_remask, without):
        for key in old:
            assert torch.equal(old[key], new[key]), key


def test_no_garbage_collection_runs_while_a_window_is_captured(monkeypatch):
    """A collection during a capture could destroy an earlier window's graphs (kept in reference cycles), which CUDA
    forbids while capturing: the capture is made with the collector off, and it is on again afterwards, also when
    the capture fails. (The capture is faked: the decision needs no GPU.)"""
    import gc

    from conftest import make_tiny_model, random_ids
    from hf_recon_prune.architectures import resolve_layout
    from hf_recon_prune.capture import capture_block_kwargs
    from hf_recon_prune.reconstruction import execution

    model = make_tiny_model("llama", num_layers=1)
    layout = resolve_layout(model)
    kwargs = capture_block_kwargs(layout.base_model, layout.blocks, random_ids(1, 8, seed=1), torch.device("cpu"))
    x, y = torch.randn(2, 8, model.config.hidden_size), torch.randn(2, 8, model.config.hidden_size)
    collector_on = []

    def fake_capture(module, sample_args, fail=False):
        collector_on.append(gc.isenabled())
        if fail:
            raise RuntimeError("capture failed")
        return module

    assert gc.isenabled()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_capture)
    loss = execution.WindowLoss(list(layout.blocks), kwargs, "graphed")
    with torch.enable_grad():
        expected = execution.window_squared_error(list(layout.blocks), kwargs, x, y)
        assert torch.equal(loss(x, y), expected) and loss.execution == "graphed"
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda m, a: fake_capture(m, a, fail=True))
    failing = execution.WindowLoss(list(layout.blocks), kwargs, "graphed")
    with torch.enable_grad():
        failing(x, y)
    assert failing.execution == "eager" and "capture failed" in failing.notes[0]
    assert collector_on == [False, False] and gc.isenabled()


def test_auto_execution_compiles_large_windows_and_graphs_small_ones_on_cuda(monkeypatch):
    """compile_blocks="auto" decides by the window's size on CUDA only; routers and hooks keep a small window eager
    (the decision needs no GPU: nothing runs)."""
    from torch import nn

    from hf_recon_prune.reconstruction import execution

    monkeypatch.setattr(execution, "_COMPILE_FAILED", [])
    small, large = nn.Linear(1000, 1000), nn.Linear(8000, 6250)  # 1.0 M and 50.0 M parameters (with biases)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sum(p.numel() for p in large.parameters()) >= execution.COMPILE_MIN_PARAMETERS
    choose = execution.choose_execution
    assert choose("auto", cuda, [large]) == "compiled" and choose("auto", cuda, [small]) == "graphed"
    assert choose("auto", cuda, [small, small]) == "graphed"  # shared parameters count once
    assert choose("auto", cpu, [large]) == choose("auto", cpu, [small]) == "eager"
    assert choose(True, cpu, [small]) == "compiled" and choose(False, cuda, [large]) == choose(False, cuda, [small]) == "eager"
    assert choose("auto", cuda, [small], routed=True) == "eager"
    assert "routing" in execution.graph_obstacle([small], routed=True)
    handle = small.register_forward_hook(lambda module, args, out: None)
    assert choose("auto", cuda, [small]) == "eager" and "hooks" in execution.graph_obstacle([small])
    handle.remove()
    small._hf_hook = object()  # what Accelerate's offload adds
    assert choose("auto", cuda, [nn.Sequential(small)]) == "eager"
    del small._hf_hook
    assert execution.graph_obstacle([small]) is None
    monkeypatch.setattr(execution, "_COMPILE_FAILED", ["an earlier window's compilation failed"])
    assert choose("auto", cuda, [large]) == choose(True, cpu, [small]) == "eager"
    with pytest.raises(ValueError, match="allowed: eager, compiled, graphed"):
        execution.WindowLoss([small], [{}], "cudagraphs")

"""Masked LoRA: effective weight M * (W + s B A) during training, masked merge, plain nn.Linear afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from hf_recon_prune.reconstruction import (
    MaskedLoraLinear,
    attach_masked_lora,
    has_lora_layers,
    merge_masked_lora,
    unload_masked_lora,
)

RANK, ALPHA = 4, 8.0


def _tiny_llama(num_layers: int = 2) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    model.requires_grad_(False)
    return model


def _block_kwargs(model, index: int = 0) -> dict:
    captured = {}

    def hook(module, args, kwargs):
        captured.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})

    handle = model.model.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.arange(16).unsqueeze(0), use_cache=False)
    finally:
        handle.remove()
    return captured


def _prune_half(block: nn.Module) -> dict[nn.Linear, torch.Tensor]:
    """Keep the weights above their row's median magnitude; zero the rest in place."""
    masks = {}
    for module in block.modules():
        if isinstance(module, nn.Linear):
            magnitude = module.weight.detach().abs()
            mask = magnitude > magnitude.median(dim=1, keepdim=True).values
            with torch.no_grad():
                module.weight.mul_(mask)
            masks[module] = mask
    return masks


def _out(block, x, kwargs):
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _adapted_layers(block) -> dict[str, MaskedLoraLinear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, MaskedLoraLinear)}


def _train_adapters(handle, block, kwargs, steps: int = 5) -> None:
    """A few Adam steps towards a random target, so that every B is nonzero."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 32, generator=generator)
    target = torch.randn(2, 16, 32, generator=generator)
    optimizer = torch.optim.Adam(handle.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(_out(block, x, kwargs), target).backward()
        optimizer.step()


@pytest.fixture
def setup():
    model = _tiny_llama()
    block = model.model.layers[0]
    masks = _prune_half(block)
    return model, block, masks, _block_kwargs(model)


def test_attach_wraps_pruned_linears_with_peft_layers_and_starts_equal(setup):
    model, block, masks, kwargs = setup
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = _out(block, x, kwargs)
    handle = attach_masked_lora(block, masks, RANK, ALPHA, seed=0)
    layers = _adapted_layers(block)
    assert set(layers) == {name for name, m in block.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 7  # q, k, v, o, gate, up, down
    for layer in layers.values():
        assert isinstance(layer, PeftLoraLinear) and isinstance(layer, LoraLayer)
        assert layer.get_base_layer() in masks
        assert torch.equal(layer.prune_mask, masks[layer.get_base_layer()])
        assert layer.scaling["default"] == pytest.approx(ALPHA / RANK)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # peft's init: B = 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    trainable = {id(p) for p in handle.parameters()}
    assert all((id(p) in trainable) == p.requires_grad for p in block.parameters())
    with torch.no_grad():
        assert torch.equal(_out(block, x, kwargs), before)
    unload_masked_lora(handle)


def test_effective_weight_is_masked_low_rank_update(setup):
    model, block, masks, kwargs = setup
    handle = attach_masked_lora(block, masks, RANK, ALPHA, seed=0)
    _train_adapters(handle, block, kwargs)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    for name, layer in _adapted_layers(block).items():
        base = layer.get_base_layer()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(B) > 0, name
        mask = masks[base].float()
        expected = mask * (base.weight + (ALPHA / RANK) * B @ A)
        with torch.no_grad():
            torch.testing.assert_close(layer.effective_weight(), expected, rtol=1e-5, atol=1e-6)
            x_in = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
            torch.testing.assert_close(layer(x_in), F.linear(x_in, expected, base.bias), rtol=1e-5, atol=1e-6)
        # the update can never revive a pruned weight, and the base weight itself is frozen
        assert torch.all(layer.effective_weight()[~masks[base]] == 0)
        assert base.weight.grad is None and not base.weight.requires_grad
    unload_masked_lora(handle)


def test_merge_equals_adapted_block_and_leaves_plain_linears(setup):
    model, block, masks, kwargs = setup
    originals = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    zeros_before = {name: int((m.weight == 0).sum()) for name, m in originals.items()}
    handle = attach_masked_lora(block, masks, RANK, ALPHA, seed=0)
    _train_adapters(handle, block, kwargs)
    expected_weights, effective = {}, {}
    for name, layer in _adapted_layers(block).items():
        effective[name] = layer.effective_weight().detach().clone()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        base = layer.get_base_layer()
        expected_weights[name] = (masks[base].float() * (base.weight + (ALPHA / RANK) * B @ A)).detach()
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = _out(block, x, kwargs)
    merge_masked_lora(handle)

    assert not has_lora_layers(block)
    assert not any(isinstance(m, LoraLayer) for m in block.modules())
    assert not hasattr(handle.container, "peft_config")
    for name, module in block.named_modules():
        if name in originals:
            assert module is originals[name]  # the very same nn.Linear objects, so mask dicts stay valid
            assert type(module) is nn.Linear
            torch.testing.assert_close(module.weight, expected_weights[name], rtol=1e-5, atol=1e-6)
            assert torch.equal(module.weight, effective[name])  # bit for bit the weight the adapted forward used
            assert torch.all(module.weight[~masks[module]] == 0)
            assert int((module.weight == 0).sum()) == zeros_before[name]
            assert torch.all(module.weight[masks[module]] != 0)
    with torch.no_grad():
        merged = _out(block, x, kwargs)
    torch.testing.assert_close(merged, adapted, rtol=1e-6, atol=1e-7)


def test_target_patterns_and_unload_without_merge(setup):
    model, block, masks, kwargs = setup
    weights = {name: m.weight.detach().clone() for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    handle = attach_masked_lora(block, masks, RANK, ALPHA, target_patterns=[r"mlp\.", r"o_proj$"], seed=0)
    assert set(_adapted_layers(block)) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"}
    _train_adapters(handle, block, kwargs)
    unload_masked_lora(handle)
    assert not has_lora_layers(block)
    for name, module in block.named_modules():
        if name in weights:
            assert torch.equal(module.weight, weights[name])


def test_no_match_attaches_nothing(setup):
    model, block, masks, kwargs = setup
    handle = attach_masked_lora(block, masks, RANK, ALPHA, target_patterns=["nothing_matches"])
    assert handle.layers == {} and not has_lora_layers(block)
    merge_masked_lora(handle)  # a no-op


def test_two_blocks_and_seeded_init_without_global_rng_side_effects():
    model = _tiny_llama()
    blocks = list(model.model.layers)
    masks = {}
    for block in blocks:
        masks.update(_prune_half(block))
    state = torch.get_rng_state()
    handle = attach_masked_lora(blocks, masks, RANK, ALPHA, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(handle.layers) == 14 and {name.split(".")[0] for name in handle.layers} == {"0", "1"}
    first = {name: layer.lora_A["default"].weight.detach().clone() for name, layer in handle.layers.items()}
    unload_masked_lora(handle)

    copy_model = copy.deepcopy(model)
    copy_masks = {}
    for block, copy_block in zip(model.model.layers, copy_model.model.layers):
        lookup = dict(copy_block.named_modules())
        copy_masks.update({lookup[name]: masks[m] for name, m in block.named_modules() if m in masks})
    again = attach_masked_lora(list(copy_model.model.layers), copy_masks, RANK, ALPHA, seed=7)
    for name, layer in again.layers.items():
        assert torch.equal(layer.lora_A["default"].weight, first[name])
    unload_masked_lora(again)

"""The preallocated dynamic KV cache of self-generation, against transformers' own DynamicLayer (torch.cat)."""

from __future__ import annotations

import pytest
import torch

from conftest_calibration_helpers import make_bpe_tokenizer, make_tiny_llama
from hf_recon_prune.calibration import generate_self_calibration
from hf_recon_prune.calibration import kv_cache

cache_utils = pytest.importorskip("transformers.cache_utils")


def _states(batch: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 2, positions, 8)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _same(layer, reference) -> None:
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    assert layer.get_seq_length() == reference.get_seq_length()
    assert layer.get_mask_sizes(1) == reference.get_mask_sizes(1)


def test_appends_write_into_one_buffer_and_return_what_torch_cat_returns():
    layer, reference = kv_cache.PreallocatedLayer(capacity=8), cache_utils.DynamicLayer()
    steps = [_states(3, 5, 0)] + [_states(3, 1, seed) for seed in range(1, 7)]  # 11 positions: past the capacity
    pointers = []
    for keys, values in steps:
        returned = layer.update(keys, values)
        expected = reference.update(keys, values)
        assert torch.equal(returned[0], expected[0]) and torch.equal(returned[1], expected[1])
        _same(layer, reference)
        pointers.append(layer._key_buffer.data_ptr())
    assert len(set(pointers[:4])) == 1  # the first 8 positions: no new allocation, no copy of the cache
    assert layer._key_buffer.shape[-2] == 16  # then it doubled once


def test_crop_and_batch_selection_keep_the_layer_correct():
    layer, reference = kv_cache.PreallocatedLayer(capacity=16), cache_utils.DynamicLayer()
    for cache in (layer, reference):
        cache.update(*_states(4, 6, 0))
        cache.crop(-2)  # a view of the buffer: the next append overwrites the cropped positions
        cache.update(*_states(4, 1, 1))
    _same(layer, reference)
    for cache in (layer, reference):
        cache.batch_select_indices(torch.tensor([3, 1]))  # new tensors: the layer goes back to torch.cat
        cache.update(*_states(2, 1, 2))
    _same(layer, reference)
    for cache in (layer, reference):
        cache.reset()
        cache.update(*_states(1, 3, 3))
    _same(layer, reference)


def test_the_subclass_does_not_replace_transformers_layer_type():
    assert cache_utils.DYNAMIC_LAYER_TYPE_MAPPING["full_attention"] is cache_utils.DynamicLayer


def test_only_full_attention_layers_are_replaced():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1, layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    cache = kv_cache.preallocated_cache(Qwen2ForCausalLM(config), 32)
    assert [type(layer) for layer in cache.layers] == [
        kv_cache.PreallocatedLayer, cache_utils.DynamicSlidingWindowLayer, cache_utils.DynamicSlidingWindowLayer]
    assert cache.layers[0].capacity == 32


def test_no_cache_for_a_model_that_does_not_take_a_dynamic_cache():
    class Recurrent(torch.nn.Module):
        @classmethod
        def _supports_default_dynamic_cache(cls):
            return False

    assert kv_cache.preallocated_cache(Recurrent(), 16) is None


def test_self_generation_uses_it_and_gives_transformers_samples(monkeypatch):
    tokenizer = make_bpe_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    settings = dict(seed=0, batch_size=3, show_progress=False)
    used = []
    real = kv_cache.preallocated_cache

    def spy(model, capacity):
        cache = real(model, capacity)
        used.append((capacity, {type(layer) for layer in cache.layers}))
        return cache

    monkeypatch.setattr("hf_recon_prune.calibration.self_generation.preallocated_cache", spy)
    fast = generate_self_calibration(model, tokenizer, 5, 24, **settings)
    assert used and all(entry == (24, {kv_cache.PreallocatedLayer}) for entry in used)  # prompt + new tokens
    monkeypatch.setattr("hf_recon_prune.calibration.self_generation.preallocated_cache", lambda model, capacity: None)
    plain = generate_self_calibration(model, tokenizer, 5, 24, **settings)  # transformers builds its own cache
    assert torch.equal(fast.input_ids, plain.input_ids) and fast.texts == plain.texts

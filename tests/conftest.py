"""Tiny models, built from a config, for every supported family (no download)."""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 96
HIDDEN = 64
FFN = 128

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, sliding_window=None,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=128,
    ),
    "gemma": lambda: transformers.GemmaConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
    ),
}

FAMILIES = sorted(TINY_CONFIGS)


def make_tiny_model(family: str = "llama", seed: int = 0, num_layers: int = 2, dtype=torch.float32):
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves small weights; widen them so pruning has a visible effect on outputs.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    return model.eval()


def random_ids(num: int, seq_len: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, seq_len), generator=generator)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def fail_pruning_after(monkeypatch, layers: int, message: str = "simulated device failure") -> None:
    """Make the engine raise RuntimeError(message) when it comes to prune layer ``layers + 1`` of the run: a device
    failure part-way through (block 0 of a tiny Llama has 7 linears)."""
    import hf_recon_prune.masking as masking

    real, calls = masking.prune_linear, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > layers:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(masking, "prune_linear", failing)

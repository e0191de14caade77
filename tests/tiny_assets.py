"""Tiny saved models, tokenizers, texts and a stand-in Hub for the example and CLI tests (no network, no weights)."""

from __future__ import annotations

import os
import random

import torch
import transformers

from conftest import TINY_CONFIGS, VOCAB
from hub_server import StandInHub

TOKEN = "hf_StandInTokenForExampleTests0123456789abcdef"
WORDS = VOCAB - 2  # w0 .. w93, then <unk> and </s>


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab.update({"<unk>": WORDS, "</s>": WORDS + 1})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                                pad_token="</s>")


def save_tiny_llama(folder, seed: int = 0, num_layers: int = 2) -> str:
    """A tiny random Llama (hidden 64, 2 blocks) and its tokenizer saved with save_pretrained, like a Hub checkout."""
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = num_layers
    config.eos_token_id = config.pad_token_id = WORDS + 1
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # wider than the default init, so that pruning changes the outputs visibly
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return os.fspath(folder)


def write_text(path, words: int = 12000, seed: int = 0) -> str:
    """Word soup over the tiny vocabulary with a skewed unigram distribution, in lines of 12 words."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(WORDS)]
    tokens = rng.choices([f"w{i}" for i in range(WORDS)], weights=weights, k=words)
    lines = [" ".join(tokens[i:i + 12]) for i in range(0, words, 12)]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return os.fspath(path)


def start_stand_in_hub(monkeypatch, tmp_path, **server_options) -> StandInHub:
    """A stand-in Hub on 127.0.0.1 that needs TOKEN, with huggingface_hub pointed at it (as tests/test_hub.py does)."""
    import huggingface_hub.constants as hf_constants

    server = StandInHub(token=TOKEN, lifetime=120, **server_options).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # `make test` runs with HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never a real cached login
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / "agents.json"),
                        raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The single-commit upload path: every file inline, no Xet transfer (which the stand-in does not serve).
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    return server

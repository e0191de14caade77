"""Tiny tokenizers and models for the calibration tests, built offline in milliseconds."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


@functools.lru_cache(maxsize=None)
def _trained_bpe(add_bos: bool) -> Tokenizer:
    from pydoc_data.topics import topics

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([topics[k] for k in sorted(topics)[:12]], trainer)
    if add_bos:
        # Like Llama: tokenizer(text) starts with <s>, tokenizer(text, add_special_tokens=False) does not.
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tokenizer


def make_bpe_tokenizer(add_bos: bool = False, pad: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A lossless byte-level BPE (vocabulary 400) trained on a few Python documentation topics."""
    kwargs = {"bos_token": "<s>"}
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=_trained_bpe(add_bos), **kwargs)


def make_position_tokenizer(num_words: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for texts of the words w0 w1 ...: every word is its own id, so ids reveal positions."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i + len(SPECIAL_TOKENS) for i in range(num_words)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def position_texts(num_words: int, words_per_document: int) -> list[str]:
    """Documents "w0 w1 ...", cut every words_per_document words; token k of the stream is id k + 3."""
    words = [f"w{i}" for i in range(num_words)]
    return [" ".join(words[i:i + words_per_document]) for i in range(0, num_words, words_per_document)]


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()

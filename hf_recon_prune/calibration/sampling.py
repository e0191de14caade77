"""Sampling for self-generated calibration data that does not depend on how the samples are batched.

``model.generate(do_sample=True)`` draws every row of a batch from torch's one global RNG, so a sample depends on
which other samples share its batch, and a batch size chosen from the free memory would make the data depend on the
machine. Here sampling is done by the Gumbel-max trick instead: ``argmax(scores + G)`` with ``G = -log(-log U)`` and
``U`` uniform is a draw from ``softmax(scores)``. The ``U`` of row ``r`` at position ``t`` for token ``v`` comes from
a counter-based hash of ``(key_r, t, v)``, where ``key_r`` is derived from the seed and the sample's own index, so
each sample's tokens depend only on the seed, its index and the model (up to float rounding of batched matrix
products). Greedy decoding (``do_sample=False``) with these processors after the usual temperature, top-k and top-p
warpers is therefore sampling at that temperature / top-k / top-p.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2**27: a product with a 32-bit value stays far below 2**63 in int64
_TOKEN_SALT = 0x9E3779B9
#: Sequences generated together on a CPU with ``batch_size="auto"``.
CPU_BATCH_SIZE = 32
#: The most sequences ``"auto"`` puts in one batch on a GPU.
MAX_AUTO_BATCH_SIZE = 1024
#: The fraction of the GPU's free memory ``"auto"`` plans to fill with the KV cache and per-sequence buffers.
AUTO_MEMORY_FRACTION = 0.5


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, three rounds) of int64 values in ``[0, 2**32)``, elementwise."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * _MULTIPLIER) & _MASK32
    x = ((x ^ (x >> 16)) * _MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def _uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # 24 bits: exact in float32, never 0 or 1


def _row_hashes(keys: torch.Tensor, position: Union[int, torch.Tensor]) -> torch.Tensor:
    if not isinstance(position, torch.Tensor):
        position = torch.tensor(position, dtype=torch.int64, device=keys.device)
    return mix32(keys.to(torch.int64) ^ mix32(position.to(torch.int64)))


def uniform_noise(keys: torch.Tensor, position: Union[int, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """``[len(keys), vocab_size]`` uniform values in (0, 1): a function of (key, position, token id) only.
    ``position`` may be a one-element tensor on the keys' device (then nothing here waits for the host)."""
    tokens = mix32(torch.arange(vocab_size, dtype=torch.int64, device=keys.device) + _TOKEN_SALT)
    return _uniform_from_bits(mix32(_row_hashes(keys, position)[:, None] ^ tokens[None, :]))


def add_keyed_gumbel(scores: torch.Tensor, keys: torch.Tensor, position: Union[int, torch.Tensor]) -> torch.Tensor:
    """``scores`` plus the keyed Gumbel noise of every entry at ``position`` (``-inf`` stays ``-inf``): what
    :class:`SeededGumbelNoise` adds, for every vocabulary entry, with no host sync (CUDA graphs capture it)."""
    noise = uniform_noise(keys, position, scores.shape[-1])
    return scores + (-torch.log(-torch.log(noise))).to(scores.dtype)


def uniform_noise_at(keys: torch.Tensor, position: int, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The entries ``(rows[i], tokens[i])`` of :func:`uniform_noise`, bit for bit, without the rest."""
    token_hashes = mix32(tokens.to(torch.int64) + _TOKEN_SALT)
    return _uniform_from_bits(mix32(_row_hashes(keys, position)[rows] ^ token_hashes))


#: Below this fraction of finite scores (what top-k / top-p leave), noise is computed for those entries alone.
SPARSE_NOISE_FRACTION = 0.25


class SeededGumbelNoise:
    """A logits processor (``(input_ids, scores) -> scores``) that adds Gumbel noise keyed by each row's key, the
    position being generated and the token id: greedy decoding of the result samples from ``softmax(scores)``.
    Scores that are ``-inf`` (filtered by top-k / top-p, suppressed tokens) stay ``-inf``.

    After top-k, 50 of tens of thousands of scores per row are finite, and hashing noise for every vocabulary entry
    was about half of a CPU profile of generation; so when few scores are finite the noise is computed for those
    entries alone (:func:`uniform_noise_at`, the same values bit for bit, so the samples do not change)."""

    def __init__(self, keys: Sequence[int]):
        self.keys = torch.tensor([int(k) & _MASK32 for k in keys], dtype=torch.int64)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.keys):
            raise RuntimeError(f"{scores.shape[0]} rows of scores for {len(self.keys)} sampling keys")
        if self.keys.device != scores.device:  # once: every later step finds them there
            self.keys = self.keys.to(scores.device)
        position = int(input_ids.shape[1])
        rows, tokens = torch.isfinite(scores).nonzero(as_tuple=True)
        if rows.numel() >= SPARSE_NOISE_FRACTION * scores.numel():
            return add_keyed_gumbel(scores, self.keys, position)
        noise = uniform_noise_at(self.keys, position, rows, tokens)
        noisy = scores.clone()
        noisy[rows, tokens] = scores[rows, tokens] + (-torch.log(-torch.log(noise))).to(scores.dtype)
        return noisy


def sampling_processors(keys: Sequence[int], temperature: float, top_k: int, top_p: float) -> list:
    """The processors that make greedy decoding sample at ``temperature`` with ``top_k`` / ``top_p`` (0 / 1.0: off),
    in the order ``model.generate(do_sample=True)`` applies them, then the keyed Gumbel noise."""
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors: list[Any] = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k > 0:
        processors.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(float(top_p)))
    processors.append(SeededGumbelNoise(keys))
    return processors


def sampling_warpers(temperature: float, top_k: int, top_p: float) -> list:
    """:func:`sampling_processors` without the noise (the CUDA-graph decoder adds it itself, see
    :func:`add_keyed_gumbel`)."""
    return sampling_processors([], temperature, top_k, top_p)[:-1]


def kv_cache_bytes_per_token(model: Any) -> int:
    """Bytes of key/value cache one token of one sequence takes in ``model`` (every layer), from its config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    head_dim = getattr(config, "head_dim", None) or (int(config.hidden_size) // max(heads, 1))
    parameter = next(model.parameters(), None)
    element = parameter.element_size() if parameter is not None else 4
    return 2 * layers * kv_heads * int(head_dim) * element


def auto_batch_size(model: Any, device: torch.device, max_length: int, vocab_size: int,
                    free_bytes: Optional[int] = None) -> int:
    """Sequences to generate together for ``batch_size="auto"``: on a GPU, as many as fit in
    :data:`AUTO_MEMORY_FRACTION` of its free memory with a KV cache of ``max_length`` tokens each plus the per-step
    scores and sampling buffers (the keyed noise's int64 temporaries included: about 64 bytes per vocabulary entry),
    at most :data:`MAX_AUTO_BATCH_SIZE`; on any other device :data:`CPU_BATCH_SIZE`. ``free_bytes`` overrides the
    measured free memory (for tests)."""
    if device.type != "cuda" and free_bytes is None:
        return CPU_BATCH_SIZE
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    per_sequence = kv_cache_bytes_per_token(model) * max_length + 64 * vocab_size
    size = int(AUTO_MEMORY_FRACTION * free_bytes // max(per_sequence, 1))
    size = max(1, min(MAX_AUTO_BATCH_SIZE, size))
    logger.info("self-generation: %d sequences per batch (%.2f MiB each, %.1f GiB free)", size,
                per_sequence / 2**20, free_bytes / 2**30)
    return size


def lengths_before_eos(sequences: torch.Tensor, prompt_length: int, eos_ids: Sequence[int]) -> torch.Tensor:
    """Tokens of each row before its first EOS after the prompt (the whole row when it has none)."""
    generated = sequences[:, prompt_length:]
    if not eos_ids or generated.shape[1] == 0:
        return torch.full((sequences.shape[0],), sequences.shape[1], dtype=torch.long)
    is_eos = torch.isin(generated, torch.tensor(list(eos_ids), dtype=generated.dtype))
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], generated.shape[1],
                                                                                     dtype=torch.long))
    return prompt_length + first.long()

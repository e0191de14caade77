"""Sampling self-generated data with one decoding step captured in a CUDA graph and replayed.

Why: decoding a small model such as SmolLM2-135M is bound by launching kernels from Python (a profile on an H200:
3.0 s of CPU time against 0.27 s of GPU time, docs/benchmarks.md), and transformers' way around it, a compiled
static cache, compiles for 30-40 s per batch size. Capturing the eager kernels of one step costs about one step.

A step must then not depend on anything on the host, so this module decodes by itself instead of through
``model.generate``, with the same result: the prompt is run once (eager), then every step feeds one token per row
at the cache position ``current`` (a device tensor), writes its keys and values there into buffers of the whole
length (``kv_cache.PositionedLayer``), attends over their first :data:`WINDOW`-multiple of positions that holds the
context (one captured graph per such window) under the mask ``position <= current``, and
turns the float32 logits into the next token as ``self_generation`` has ``generate`` do it: suppressed tokens,
temperature / top-k / top-p (transformers' own warpers), the keyed Gumbel noise of ``sampling.py`` (for every
vocabulary entry: the sparse variant needs a host sync), argmax; after EOS a row gets the pad token. The host
looks at the state every :data:`CHECK_EVERY` steps only, to stop once every row has ended.

Attention runs through :func:`decode_attention`, registered with transformers' ``AttentionInterface`` and selected
for the duration of the run: for a single query token it places the query heads that share a key/value head side
by side and attends by two batched matrix products, so grouped-query attention reads the cache once (transformers'
SDPA path repeats the keys and values for every query head whenever a mask is given, in the releases we support,
and the masked SDPA kernel was most of a step at 1024 positions; docs/benchmarks.md).

Which models: a single device, no Accelerate hooks, ``sdpa`` or ``eager`` attention, every layer plain full
attention (no sliding window, no linear attention), and no attention feature the function does not implement
(softcapping, attention sinks): :func:`unsupported_reason`, and :class:`UnsupportedModel` raised at the first
forward. A capture that fails (a model whose step waits for the host, such as a router that counts tokens) leaves
the run to finish eagerly with the same decoder. The samples equal ``generate``'s up to float rounding of the
attention (tests on CPU and on the GPU).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from .kv_cache import cache_argument_name, positioned_cache
from .sampling import add_keyed_gumbel, sampling_warpers

__all__ = ["CHECK_EVERY", "DECODE_ATTENTION", "WINDOW", "SamplingSpec", "UnsupportedModel", "decode_attention",
           "resolve_decoding", "sample_in_graphs", "unsupported_reason"]

logger = logging.getLogger(__name__)

#: The name :func:`decode_attention` is registered under in transformers' ``AttentionInterface``.
DECODE_ATTENTION = "hf_recon_prune_decode"
#: Steps between two looks of the host at whether every row has ended (each look is a host sync).
CHECK_EVERY = 32
#: Attention reads the first multiple of WINDOW positions that holds the context (one graph per window): about
#: half of the cache on average instead of all of it.
WINDOW = 256
_ATTENTIONS = ("sdpa", "eager")


class UnsupportedModel(RuntimeError):
    """The model uses an attention feature :func:`decode_attention` does not implement."""


@dataclass
class SamplingSpec:
    """How a step turns logits into the next token (``self_generation._Generation._generate``'s settings)."""

    keys: list[int]  # one sampling key per row
    temperature: float
    top_k: int
    top_p: float
    suppressed: list[int]
    eos_token_ids: list[int]
    pad_token_id: int


def unsupported_reason(model: Any) -> Optional[str]:
    """Why ``model`` cannot be decoded here (None when it can); the device must be a GPU besides."""
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        return "the model has Accelerate hooks (offloaded or dispatched over devices)"
    devices = {parameter.device for parameter in model.parameters()}
    if len(devices) != 1:
        return f"the model's parameters are on {sorted(map(str, devices))}, not on one device"
    implementations = {config._attn_implementation for config in _configs(model).values()}
    if not implementations or not implementations <= set(_ATTENTIONS):
        return f"attention implementation {sorted(map(str, implementations))}; supported: {list(_ATTENTIONS)}"
    if positioned_cache(model, _Positions(1, next(iter(devices)))) is None:
        return "a layer is not plain full attention (sliding window, linear attention) or the model takes no DynamicCache"
    return None


def resolve_decoding(model: Any, device: torch.device, static_cache: Any,
                     compile_backend: Optional[str]) -> tuple[bool, bool]:
    """(decode in CUDA graphs, use a static KV cache) for self-generation's ``static_cache`` setting (True, False or
    "auto") on ``device``; a ``compile_backend`` leaves the decoding to transformers."""
    if static_cache not in (True, False, "auto"):
        raise ValueError(f"static_cache={static_cache!r} is not allowed; allowed: 'auto' (CUDA graphs where the model "
                         "allows, else the dynamic cache), True (a static cache) or False (the dynamic cache).")
    if static_cache is False or compile_backend is not None:
        return False, bool(static_cache)
    if device.type != "cuda":
        return False, static_cache is True
    reason = unsupported_reason(model)
    if reason is not None:
        logger.info("self-generation: not decoding in CUDA graphs: %s", reason)
    return reason is None, reason is None or static_cache is True


def sample_in_graphs(model: Any, prompts: torch.Tensor, new_tokens: int, spec: SamplingSpec,
                     capture: bool = True) -> tuple[torch.Tensor, bool]:
    """``([rows, prompt + new_tokens], captured)``: the prompts and up to ``new_tokens`` sampled tokens (pad after
    EOS and after the step at which every row had ended), on the prompts' device, and whether the steps ran in a
    CUDA graph. ``capture=False`` runs every step eagerly (the CPU tests do; the result is the same). Raises
    :class:`UnsupportedModel` at the prompt's forward when the model's attention needs a feature
    :func:`decode_attention` lacks."""
    decoder = _Decoder(model, prompts, new_tokens, spec)
    with _decode_attention(model):
        return decoder.run(capture)


def warm_up(step: Callable[[], None]) -> None:
    """One real step on a side stream (CUDA graphs want lazy initialisations done off the capturing stream)."""
    side, current = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        step()
    current.wait_stream(side)


def capture_step(step: Callable[[], None], pool: Any = None) -> tuple[Callable[[], None], Any]:
    """Capture ``step`` (recorded, not run) in the memory ``pool`` (None: a new one); (what replays it, its pool).
    RuntimeError when it cannot be captured. The windows' graphs share one pool: they never run at the same time,
    and what outlives a step is in tensors allocated before the capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph.replay, graph.pool()


# ---------------------------------------------------------------------------------------------------- attention
def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over the cache's window under the decoder's boolean mask (``[1, 1, queries, positions]``).

    For one query token, two batched matrix products over the query heads of each key/value head (softmax in
    float32, as transformers' eager attention): PyTorch's memory-efficient SDPA kernel, the one a mask leaves,
    took about 0.6 ms a layer for 256 SmolLM2 rows at 1024 positions in float32 on an H200, far from reading the
    cache once."""
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise UnsupportedModel(f"attention with {name!r}")
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[-2]:
        raise UnsupportedModel(f"sliding-window attention ({window} < {key.shape[-2]} positions)")
    batch, heads, queries, _ = query.shape
    groups = heads // key.shape[1]
    if queries == 1:
        packed = query.reshape(batch, key.shape[1], groups, query.shape[-1])
        scores = torch.matmul(packed, key.transpose(-1, -2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        scores = scores * (query.shape[-1] ** -0.5 if scaling is None else scaling)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, -float("inf"))
        output = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    else:
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                                  scale=scaling)
    return output.reshape(batch, heads, queries, value.shape[-1]).transpose(1, 2).contiguous(), None


def _configs(model: Any) -> dict[int, Any]:
    """The configuration objects the model's modules read their attention implementation from."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            found[id(config)] = config
    return found


@contextlib.contextmanager
def _decode_attention(model: Any) -> Iterator[None]:
    from transformers import AttentionInterface

    if DECODE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    configs = list(_configs(model).values())
    saved = [config._attn_implementation_internal for config in configs]
    try:
        for config in configs:
            config._attn_implementation_internal = DECODE_ATTENTION
        yield
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation_internal = implementation


# ------------------------------------------------------------------------------------------------------ decoder
class _Positions:
    """What the cache layers share with the decoder: the capacity, the current position (a device tensor) and
    ``arange(capacity)``."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = int(capacity)
        self.current = torch.zeros(1, dtype=torch.long, device=device)
        self.offsets = torch.arange(self.capacity, device=device)
        #: Positions attention reads (a multiple of WINDOW, or the capacity): set on the host before each step.
        self.window = self.capacity

    def window_for(self, last: int) -> int:
        """The window a step whose last token sits at position ``last`` attends over."""
        return min(self.capacity, WINDOW * (last // WINDOW + 1))


class _Decoder:
    def __init__(self, model: Any, prompts: torch.Tensor, new_tokens: int, spec: SamplingSpec):
        rows, length = prompts.shape
        device = prompts.device
        self.model, self.spec, self.prompts, self.new_tokens = model, spec, prompts, int(new_tokens)
        self.positions = _Positions(length + new_tokens, device)
        self.cache = positioned_cache(model, self.positions)
        if self.cache is None:
            raise UnsupportedModel("a layer is not plain full attention, or the model takes no DynamicCache")
        self.output = torch.full((rows, length + new_tokens), spec.pad_token_id, dtype=torch.long, device=device)
        self.output[:, :length] = prompts
        self.tokens = prompts[:, -1:].clone()
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.eos = torch.tensor(spec.eos_token_ids, dtype=torch.long, device=device)
        self.keys = torch.tensor([key & 0xFFFFFFFF for key in spec.keys], dtype=torch.int64, device=device)
        self.warpers = sampling_warpers(spec.temperature, spec.top_k, spec.top_p) if spec.temperature > 0 else []
        self.suppress: Optional[torch.Tensor] = None  # [vocabulary] bool, made from the first logits
        parameters = inspect.signature(model.forward).parameters
        self.arguments = {cache_argument_name(model): self.cache, "use_cache": True,
                          **({"logits_to_keep": 1} if "logits_to_keep" in parameters else {})}
        self.pass_cache_position = "cache_position" in parameters

    def run(self, capture: bool) -> tuple[torch.Tensor, bool]:
        """Every step of a window runs eagerly once on a side stream (lazy initialisations happen there), is
        captured next and replayed from then on; without ``capture`` (or once a capture failed) eagerly."""
        length = self.prompts.shape[1]
        self.positions.window = self.positions.window_for(length - 1)
        self._forward(self.prompts)
        replays: dict[int, Optional[Callable[[], None]]] = {}
        pool = None
        for done in range(1, self.new_tokens):
            self.positions.window = window = self.positions.window_for(length + done - 1)
            if capture and window not in replays:
                replays[window] = None
                warm_up(self._step)
            elif capture and replays[window] is None:
                replays[window], pool = self._capture(pool)
                capture = replays[window] is not None
                (replays[window] or self._step)()
            else:
                (replays.get(window) or self._step)()
            if done % CHECK_EVERY == 0 and not bool(self.unfinished.any()):
                break
        return self.output, any(replays.values())

    def _step(self) -> None:
        self._forward(self.tokens)

    def _capture(self, pool: Any) -> tuple[Optional[Callable[[], None]], Any]:
        try:
            return capture_step(self._step, pool)
        except RuntimeError as error:  # e.g. a step that waits for the host: finish eagerly, from the same state
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.warning("self-generation: the decoding step could not be captured in a CUDA graph (%s); "
                           "decoding eagerly instead", first_line)
            return None, pool

    def _forward(self, input_ids: torch.Tensor) -> None:
        """Feed ``input_ids`` at the current position, choose the next token, append it, advance."""
        count, window = input_ids.shape[1], self.positions.window
        positions = self.positions.current + self.positions.offsets[:count]
        mask = (self.positions.offsets[None, :window] <= positions[:, None]).view(1, 1, count, window)
        arguments = dict(self.arguments, position_ids=positions.view(1, count), attention_mask=mask)
        if self.pass_cache_position:
            arguments["cache_position"] = positions
        logits = self.model(input_ids=input_ids, **arguments).logits[:, -1, :].to(dtype=torch.float32)
        following = self.positions.current + count  # where the new token goes (what generate's noise is keyed by)
        chosen = self._choose(logits, following)
        chosen = torch.where(self.unfinished, chosen, torch.full_like(chosen, self.spec.pad_token_id))
        if self.eos.numel():
            self.unfinished &= ~torch.isin(chosen, self.eos)
        self.output.index_copy_(1, following, chosen.view(-1, 1))
        self.tokens.copy_(chosen.view(-1, 1))
        self.positions.current.add_(count)

    def _choose(self, logits: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if self.suppress is None:
            self.suppress = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            suppressed = [token for token in self.spec.suppressed if token < logits.shape[-1]]
            if suppressed:
                self.suppress[suppressed] = True
        scores = logits.masked_fill(self.suppress, -float("inf"))
        if self.spec.temperature == 0:  # greedy
            return scores.argmax(dim=-1)
        for warper in self.warpers:
            scores = warper(None, scores)
        return add_keyed_gumbel(scores, self.keys, position).argmax(dim=-1)

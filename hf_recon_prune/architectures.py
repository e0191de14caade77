"""Where each model family keeps its decoder blocks, routers and fused projections: the only place with family
knowledge.

The engine needs three things from a causal LM: the ordered list of decoder blocks, the base model that runs the
embeddings (and computes the per-forward keyword arguments the blocks receive), and the prunable weights of a block
(``prunable.py``, which asks this module which names are routers and how fused projections split). Families that
keep their blocks in a known place are listed in ``KNOWN_BLOCK_PATHS``; any other model is handled by the generic
fallback, which looks for the ``nn.ModuleList`` of the model's ``_no_split_modules`` class, inside the text decoder
first (so a multimodal model's vision tower is never taken for its decoder, and is left untouched).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

# model_type -> attribute path of the decoder blocks, from the *ForCausalLM module.
KNOWN_BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
}

#: Names (``re.search`` on the name inside a block) of the routers that choose each token's experts, and of the
#: gates that scale a shared expert. They stay dense unless an ``include_modules`` pattern names them: a pruned
#: router changes which experts every token reaches.
ROUTER_PATTERNS: tuple[str, ...] = (r"(^|\.)(gate|router)$", r"(^|\.)shared_experts?_gate$")


def _halves(config, rows: int) -> list[tuple[str, slice]]:
    half = rows // 2
    return [("gate", slice(0, half)), ("up", slice(half, rows))]


def _qkv(config, rows: int) -> list[tuple[str, slice]]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    return [("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))]


#: model_type -> {name of a fused projection inside a block: its rows split into the projections it fuses}. Each
#: part is pruned as its own matrix (its own sparsity, its own SparseGPT column blocks).
FUSED_PROJECTIONS: dict[str, dict[str, object]] = {
    "phi3": {"self_attn.qkv_proj": _qkv, "mlp.gate_up_proj": _halves},
}


def fused_projection_rows(config, name: str, rows: int) -> Optional[list[tuple[str, slice]]]:
    """How the linear ``name`` (``rows`` output features) splits into fused projections, or None."""
    model_type = getattr(config, "model_type", None)
    split = FUSED_PROJECTIONS.get(model_type, {}).get(name) if config is not None else None
    if split is None:
        return None
    parts = split(config, rows)
    if parts[-1][1].stop != rows:
        raise UnsupportedModelError(f"{name}: {rows} output rows do not split as {model_type} fuses them ({parts})")
    return parts


class UnsupportedModelError(ValueError):
    pass


@dataclass
class DecoderLayout:
    family: str
    blocks: nn.ModuleList
    blocks_path: str
    base_model: nn.Module  # runs embeddings -> blocks -> final norm, without the LM head


def _get_path(root: nn.Module, path: str) -> Optional[nn.Module]:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _find_block_list(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    names = {id(module): name for name, module in model.named_modules()}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for root in ([decoder] if isinstance(decoder, nn.Module) else []) + [model]:
        for module in root.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0 and id(module) in names:
                if all(type(child).__name__ in block_classes for child in module):
                    return names[id(module)], module
    return None


def resolve_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder blocks of a Hugging Face causal LM, or raise naming the model class."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = KNOWN_BLOCK_PATHS.get(model_type)
    blocks = _get_path(model, path) if path else None
    if not isinstance(blocks, nn.ModuleList):
        found = _find_block_list(model)
        if found is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={model_type!r}) is not supported: no list of decoder blocks was "
                f"found (known families: {sorted(KNOWN_BLOCK_PATHS)}). Please open an issue with the model id."
            )
        path, blocks = found
    base_model = getattr(model, "base_model", model)
    if base_model is model or not isinstance(base_model, nn.Module):
        raise UnsupportedModelError(f"{type(model).__name__} has no base model to run the embeddings with")
    from .prunable import prunable_weights

    if not any(prunable_weights(block) for block in blocks):
        raise UnsupportedModelError(
            f"{type(model).__name__}: its decoder blocks ({type(blocks[0]).__name__}) contain nothing to prune "
            "(no torch.nn.Linear, GPT-2 Conv1D or fused experts parameter)."
        )
    return DecoderLayout(family=model_type or "generic", blocks=blocks, blocks_path=path, base_model=base_model)


def prunable_linears(
    block: nn.Module, include: Optional[list[str]] = None, exclude: Optional[list[str]] = None
) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers (names relative to the block), filtered by include/exclude regexes (re.search)."""
    layers = {}
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if include and not any(re.search(p, name) for p in include):
            continue
        if exclude and any(re.search(p, name) for p in exclude):
            continue
        layers[name] = module
    return layers
